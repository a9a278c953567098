//! The check a queue replica's log entries and queries must pass, for a
//! coverage-guided fuzz target (`fuzz/`, built with `--cfg fuzzing`) and a
//! random-input property test.

use std::collections::BTreeMap;
use std::sync::Arc;

use kinesin_raft::{GroupKind, GroupStateMachine};
use kinesin_storage::{Storage, WriteBatch};
use kinesin_types::GroupId;

use crate::model::{decode, encode, QueueCommand, QueueConfig};
use crate::QueueKind;

/// A standard and a FIFO queue (with a dead-letter queue) on real storage
/// that apply whatever they are given. Dropped, they delete their rows, so
/// that one storage serves a long run (opening RocksDB for each input would
/// be most of the time).
pub struct Replicas<'a> {
    storage: &'a Storage,
    groups: [u64; 2],
    queues: Vec<Arc<dyn GroupStateMachine>>,
    index: u64,
}

/// A queue with `attributes` as group `group` of `storage`.
pub(crate) fn open_queue(
    storage: &Storage,
    group: u64,
    attributes: &[(&str, &str)],
) -> Arc<dyn GroupStateMachine> {
    let config = QueueConfig {
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        tags: BTreeMap::new(),
        created_ms: 1,
    };
    QueueKind
        .open(storage.clone(), GroupId(group), &encode(&config))
        .expect("open queue")
}

impl<'a> Replicas<'a> {
    /// The two queues, as groups `first` and `first + 1`, which must not
    /// hold rows.
    pub fn open(storage: &'a Storage, first: u64) -> Replicas<'a> {
        let redrive = r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:dlq","maxReceiveCount":"2"}"#;
        let groups = [first, first + 1];
        let queues = vec![
            open_queue(storage, first, &[("RedrivePolicy", redrive)]),
            open_queue(
                storage,
                first + 1,
                &[
                    ("FifoQueue", "true"),
                    ("ContentBasedDeduplication", "true"),
                    ("RedrivePolicy", redrive),
                ],
            ),
        ];
        Replicas {
            storage,
            groups,
            queues,
            index: 0,
        }
    }

    /// Each queue applies `bytes` as a log entry (the leader's clock, then
    /// a command) and answers it as a query. An entry the leader's check
    /// (`check_command`) lets through is applied (an error would stop the
    /// replica); it lets through exactly those whose command decodes, and
    /// apply refuses the rest with an error; queries are answered or
    /// refused; nothing panics. The clock may be anything: apply takes it
    /// as at most 2^60 ms (`kinesin_raft::split_stamp`).
    pub fn entry(&mut self, bytes: &[u8]) {
        self.index += 1;
        let decodes = bytes.len() >= 8 && decode::<QueueCommand>(&bytes[8..]).is_ok();
        for queue in &self.queues {
            let proposable = queue.check_command(bytes).is_ok();
            assert_eq!(proposable, decodes, "the leader's check of a command");
            let mut batch = WriteBatch::default();
            match queue.apply(self.index, bytes, &mut batch) {
                Ok(reply) => {
                    self.storage.write(batch).expect("write");
                    queue.publish();
                    let _ = queue.complete(reply);
                }
                Err(e) => assert!(!proposable, "a proposable command stopped the replica: {e}"),
            }
            let _ = queue.query(bytes);
        }
    }
}

impl Drop for Replicas<'_> {
    fn drop(&mut self) {
        for group in self.groups {
            kinesin_raft::delete_group_state(self.storage, group).expect("delete the queues' rows");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use kinesin_storage::{FsyncPolicy, Storage};

    use super::Replicas;
    use crate::model::{encode, Handle, NewMessage, QueueCommand, StoredMessage};

    fn message(n: u8, group: bool) -> NewMessage {
        let body = format!("body {n}");
        NewMessage {
            message_id: format!("m{n}"),
            size: body.len() as u32,
            body,
            group_id: group.then(|| format!("g{}", n % 3)),
            dedup_id: Some(format!("d{n}")),
            ..Default::default()
        }
    }

    /// A message's sequence number, as a send at log index 1..40 makes it:
    /// the index, then its place in the batch.
    fn seq() -> impl Strategy<Value = u128> {
        (1u128..40).prop_map(|index| index << 32)
    }

    /// A receipt: the sequence number and the receive's log index.
    fn handle() -> impl Strategy<Value = Handle> {
        (seq(), 1u64..40).prop_map(|(seq, nonce)| Handle { seq, nonce })
    }

    /// An entry: the clock, then a command that decodes (one of a few
    /// kinds, with values from small ranges so that they meet the queue's
    /// messages and receipts) or any bytes.
    fn entry() -> impl Strategy<Value = Vec<u8>> {
        let command = prop_oneof![
            (any::<u8>(), any::<bool>()).prop_map(|(n, g)| QueueCommand::Send(vec![message(n, g)])),
            (0u32..12, prop::option::of(0u32..3)).prop_map(|(max, visibility_seconds)| {
                QueueCommand::Receive {
                    max,
                    visibility_seconds,
                }
            }),
            handle().prop_map(|h| QueueCommand::Delete(vec![h])),
            (handle(), 0u32..3).prop_map(|(h, s)| QueueCommand::ChangeVisibility(vec![(h, s)])),
            prop::collection::vec(seq(), 0..3).prop_map(QueueCommand::Remove),
            Just(QueueCommand::Purge),
            Just(QueueCommand::Expire),
            (any::<u8>(), any::<bool>(), 0u64..5_000).prop_map(|(n, g, sent_ms)| {
                QueueCommand::MoveDead {
                    source: "arn:aws:sqs:us-east-1:000000000000:src".into(),
                    messages: vec![StoredMessage {
                        message: message(n, g),
                        sent_ms,
                        seq: 0,
                    }],
                }
            }),
        ]
        .prop_map(|c| encode(&c));
        (
            0u64..5_000,
            prop_oneof![command, prop::collection::vec(any::<u8>(), 0..40)],
        )
            .prop_map(|(clock_ms, command)| [&clock_ms.to_be_bytes()[..], &command].concat())
    }

    #[test]
    fn a_queue_applies_what_decodes_and_refuses_the_rest_without_panicking() {
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
