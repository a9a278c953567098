//! The check a delivery stream replica's log entries and queries must
//! pass, for a coverage-guided fuzz target (`fuzz/`, built with
//! `--cfg fuzzing`) and a random-input property test.

use std::collections::BTreeMap;
use std::sync::Arc;

use kinesin_raft::{GroupKind, GroupStateMachine};
use kinesin_storage::{Storage, WriteBatch};
use kinesin_types::GroupId;

use crate::model::{
    decode, encode, Compression, FirehoseCommand, KinesisSource, S3Destination, Source,
    StreamConfig,
};
use crate::state_machine::FirehoseKind;

/// A DirectPut delivery stream and one reading a Kinesis stream, on real
/// storage, that apply whatever they are given. Dropped, they delete their
/// rows, so that one storage serves a long run.
pub struct Replicas<'a> {
    storage: &'a Storage,
    groups: [u64; 2],
    streams: Vec<Arc<dyn GroupStateMachine>>,
    index: u64,
}

/// The destination every delivery stream of the tests writes to.
pub(crate) fn destination() -> S3Destination {
    S3Destination {
        bucket_arn: "arn:aws:s3:::bucket".into(),
        role_arn: "arn:aws:iam::000000000000:role/r".into(),
        prefix: None,
        error_output_prefix: None,
        size_mib: 1,
        interval_s: 60,
        compression: Compression::Gzip,
        append_delimiter: false,
        extended: false,
        partition_query: None,
        conversion: None,
    }
}

/// A delivery stream from `source` as group `group` of `storage`.
pub(crate) fn open_stream(
    storage: &Storage,
    group: u64,
    source: Source,
) -> Arc<dyn GroupStateMachine> {
    let config = StreamConfig {
        name: format!("s{group}"),
        source,
        destination: destination(),
        tags: BTreeMap::new(),
        encrypted: false,
        created_ms: 1,
    };
    FirehoseKind
        .open(storage.clone(), GroupId(group), &encode(&config))
        .expect("open delivery stream")
}

impl<'a> Replicas<'a> {
    /// The two delivery streams, as groups `first` and `first + 1`, which
    /// must not hold rows.
    pub fn open(storage: &'a Storage, first: u64) -> Replicas<'a> {
        let kinesis = Source::Kinesis(KinesisSource {
            stream_arn: "arn:aws:kinesis:us-east-1:000000000000:stream/k".into(),
            role_arn: "arn:aws:iam::000000000000:role/r".into(),
            stream_key: "000000000000:k".into(),
            start_ms: 1,
        });
        Replicas {
            storage,
            groups: [first, first + 1],
            streams: vec![
                open_stream(storage, first, Source::DirectPut),
                open_stream(storage, first + 1, kinesis),
            ],
            index: 0,
        }
    }

    /// Each stream applies `bytes` as a log entry (the leader's clock, then
    /// a command) and answers what follows the clock as a query (queries
    /// carry no clock). The leader's check (`check_command`) lets through
    /// exactly the entries whose command decodes; those apply (an error
    /// would stop the replica) and the rest are refused with an error;
    /// queries are answered or refused; nothing panics.
    pub fn entry(&mut self, bytes: &[u8]) {
        self.index += 1;
        let decodes = bytes.len() >= 8 && decode::<FirehoseCommand>(&bytes[8..]).is_ok();
        for stream in &self.streams {
            let proposable = stream.check_command(bytes).is_ok();
            assert_eq!(proposable, decodes, "the leader's check of a command");
            let mut batch = WriteBatch::default();
            match stream.apply(self.index, bytes, &mut batch) {
                Ok(reply) => {
                    self.storage.write(batch).expect("write");
                    stream.publish();
                    let _ = stream.complete(reply);
                }
                Err(e) => assert!(!proposable, "a proposable command stopped the replica: {e}"),
            }
            let _ = stream.query(bytes.get(8..).unwrap_or_default());
        }
    }
}

impl Drop for Replicas<'_> {
    fn drop(&mut self) {
        for group in self.groups {
            kinesin_raft::delete_group_state(self.storage, group)
                .expect("delete the delivery streams' rows");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde_bytes::ByteBuf;

    use kinesin_storage::{FsyncPolicy, Storage};
    use kinesin_types::ShardId;

    use super::{destination, Replicas};
    use crate::model::{encode, Batch, Compression, FirehoseCommand, FirehoseQuery};

    /// A record's sequence number, as a put at log index 1..30 makes it.
    fn seq() -> impl Strategy<Value = u128> {
        (1u128..30).prop_map(|index| index << 32)
    }

    fn batch() -> impl Strategy<Value = Batch> {
        (seq(), seq(), 0u64..5).prop_map(|(from, to, records)| Batch {
            from,
            to,
            records,
            bytes: records * 4,
            bucket: "bucket".into(),
            key: "key".into(),
            compression: Compression::Gzip,
            append_delimiter: false,
            first_arrival_ms: 1,
            ranges: Vec::new(),
            finished: Vec::new(),
            partitioning: None,
            conversion: None,
        })
    }

    /// An entry: the clock, then a command that decodes (one of each kind,
    /// with values from small ranges so that seals and commits meet the
    /// buffered records), a query (asked after the clock; as a command it
    /// decodes to something else or nothing), or any bytes.
    fn entry() -> impl Strategy<Value = Vec<u8>> {
        let command = prop_oneof![
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..6), 0..4).prop_map(
                |records| {
                    encode(&FirehoseCommand::Put(
                        records.into_iter().map(ByteBuf::from).collect(),
                    ))
                }
            ),
            batch().prop_map(|b| encode(&FirehoseCommand::Seal(b))),
            seq().prop_map(|to| encode(&FirehoseCommand::Commit { to })),
            (0u32..3).prop_map(|s| encode(&FirehoseCommand::Finish(vec![ShardId(s)]))),
            (0u64..3).prop_map(|version| encode(&FirehoseCommand::Update {
                version,
                destination: destination(),
            })),
            (0usize..60).prop_map(|n| encode(&FirehoseCommand::Tag(
                (0..n)
                    .map(|i| (format!("k{i}"), "v".into()))
                    .collect::<BTreeMap<_, _>>()
            ))),
            Just(encode(&FirehoseCommand::Untag(vec!["k1".into()]))),
            any::<bool>().prop_map(|on| encode(&FirehoseCommand::Encryption(on))),
            (seq(), seq()).prop_map(|(from, to)| encode(&FirehoseQuery::Records { from, to })),
            (0u64..64).prop_map(|n| encode(&FirehoseQuery::Plan(n))),
        ];
        (
            0u64..5_000,
            prop_oneof![command, prop::collection::vec(any::<u8>(), 0..40)],
        )
            .prop_map(|(clock_ms, command)| [&clock_ms.to_be_bytes()[..], &command].concat())
    }

    #[test]
    fn a_delivery_stream_applies_what_decodes_and_refuses_the_rest_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let next = std::cell::Cell::new(1);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::default());
        runner
            .run(&prop::collection::vec(entry(), 1..40), |entries| {
                let mut replicas = Replicas::open(&storage, next.get());
                next.set(next.get() + 2);
                for entry in &entries {
                    replicas.entry(entry);
                }
                Ok(())
            })
            .unwrap();
    }
}
