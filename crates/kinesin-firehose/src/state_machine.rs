//! The delivery stream group's state machine.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex};

use kinesin_raft::{GroupKind, GroupStateMachine, SnapshotRows};
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::GroupId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use kinesin_types::ShardId;

use crate::model::{
    decode, encode, Batch, Checkpoint, FirehoseCommand, FirehoseQuery, FirehoseReply, Plan,
    S3Destination, Source, StreamConfig, StreamInfo,
};

/// The kind's registered name.
pub const FIREHOSE_KIND: &str = "firehose";

/// The header's key in `Cf::StateMachine`.
const HEADER_KEY: &[u8] = b"f:header";
/// Most tags of one delivery stream, as AWS.
const MAX_TAGS: usize = 50;
/// Most record bytes one `Records` query returns: the largest batch a
/// plan makes (a 128 MiB buffering hint) and one record beyond it.
const MAX_READ_BYTES: usize = 129 << 20;

pub struct FirehoseKind;

impl GroupKind for FirehoseKind {
    fn open(
        &self,
        storage: Storage,
        group: GroupId,
        config: &[u8],
    ) -> io::Result<Arc<dyn GroupStateMachine>> {
        let config: StreamConfig = decode(config).map_err(io::Error::other)?;
        let header = Header {
            name: config.name,
            source: config.source,
            checkpoints: BTreeMap::new(),
            destination: config.destination,
            version: 1,
            tags: config.tags,
            encrypted: config.encrypted,
            created_ms: config.created_ms,
            updated_ms: config.created_ms,
            clock_ms: config.created_ms,
            sealed: None,
            delivered_records: 0,
            delivered_bytes: 0,
        };
        let sm = FirehoseStateMachine {
            storage,
            group: group.0,
            published: Mutex::new(encode(&header)),
            stream: Mutex::new(Stream {
                header,
                dirty: false,
                buffered: VecDeque::new(),
                buffered_bytes: 0,
            }),
        };
        sm.reload()?;
        let header = encode(&sm.stream.lock().expect("stream lock").header);
        *sm.published.lock().expect("published lock") = header;
        Ok(Arc::new(sm))
    }
}

/// Everything but the records: the group's small state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    name: String,
    source: Source,
    /// A Kinesis source's shards, as delivered.
    checkpoints: BTreeMap<ShardId, Checkpoint>,
    destination: S3Destination,
    version: u64,
    tags: BTreeMap<String, String>,
    encrypted: bool,
    created_ms: u64,
    updated_ms: u64,
    /// The latest clock a command carried (stored with the header's
    /// changes): arrival times do not run backward while a replica runs.
    clock_ms: u64,
    sealed: Option<Batch>,
    delivered_records: u64,
    delivered_bytes: u64,
}

/// A record waiting for delivery, as the in-memory index holds it.
#[derive(Debug, Clone, Copy)]
struct Buffered {
    seq: u128,
    arrival_ms: u64,
    len: u64,
}

struct Stream {
    header: Header,
    /// The header changed since the last publish.
    dirty: bool,
    buffered: VecDeque<Buffered>,
    buffered_bytes: u64,
}

impl Stream {
    fn info(&self) -> StreamInfo {
        let h = &self.header;
        StreamInfo {
            name: h.name.clone(),
            source: h.source.clone(),
            checkpoints: h.checkpoints.clone(),
            destination: h.destination.clone(),
            version: h.version,
            tags: h.tags.clone(),
            encrypted: h.encrypted,
            created_ms: h.created_ms,
            updated_ms: h.updated_ms,
            buffered_records: self.buffered.len() as u64,
            buffered_bytes: self.buffered_bytes,
            oldest_arrival_ms: self.buffered.front().map(|b| b.arrival_ms),
            sealed: h.sealed.clone(),
            delivered_records: h.delivered_records,
            delivered_bytes: h.delivered_bytes,
        }
    }

    /// The leading buffered records of at most `max_bytes` (at least one).
    fn plan(&self, max_bytes: u64) -> Option<Plan> {
        let first = *self.buffered.front()?;
        let mut plan = Plan {
            from: first.seq,
            to: first.seq,
            records: 0,
            bytes: 0,
            first_arrival_ms: first.arrival_ms,
        };
        for b in &self.buffered {
            if plan.records > 0 && plan.bytes + b.len > max_bytes {
                break;
            }
            plan.to = b.seq;
            plan.records += 1;
            plan.bytes += b.len;
        }
        Some(plan)
    }
}

struct FirehoseStateMachine {
    storage: Storage,
    group: u64,
    stream: Mutex<Stream>,
    /// The encoded header as of the last written batch, for snapshots.
    published: Mutex<Vec<u8>>,
}

/// A record's row: its arrival time (8 bytes, big-endian), then its data.
fn record_row(arrival_ms: u64, data: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(8 + data.len());
    row.extend_from_slice(&arrival_ms.to_be_bytes());
    row.extend_from_slice(data);
    row
}

/// Sequence numbers carry the log index of the put that wrote them.
fn writer_index(_cf: Cf, key: &[u8]) -> u64 {
    (keys::record_seq_of(key) >> 32) as u64
}

/// The clock the leader put before a command, and the rest.
fn split_stamp(bytes: &[u8]) -> io::Result<(u64, &[u8])> {
    kinesin_raft::split_stamp(bytes)
        .ok_or_else(|| io::Error::other("a delivery stream command starts with the leader's clock"))
}

impl FirehoseStateMachine {
    fn put_header(&self, s: &mut Stream, batch: &mut WriteBatch) {
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(self.group, HEADER_KEY),
            encode(&s.header),
        );
        s.dirty = true;
    }

    fn apply_command(
        &self,
        s: &mut Stream,
        batch: &mut WriteBatch,
        index: u64,
        now_ms: u64,
        command: FirehoseCommand,
    ) -> FirehoseReply {
        match command {
            FirehoseCommand::Put(_) if s.header.source != Source::DirectPut => {
                FirehoseReply::NotDirectPut
            }
            FirehoseCommand::Put(records) => {
                let first = u128::from(index) << 32;
                for (slot, data) in records.iter().enumerate() {
                    let seq = first | slot as u128;
                    batch.put_cf(
                        self.storage.cf(Cf::Records),
                        keys::record_key(self.group, seq),
                        record_row(now_ms, data),
                    );
                    s.buffered.push_back(Buffered {
                        seq,
                        arrival_ms: now_ms,
                        len: data.len() as u64,
                    });
                    s.buffered_bytes += data.len() as u64;
                }
                FirehoseReply::Put { first }
            }
            FirehoseCommand::Seal(sealed) if s.header.source != Source::DirectPut => {
                let behind = sealed.ranges.iter().any(|r| {
                    let checkpoint = s.header.checkpoints.get(&r.shard);
                    checkpoint.is_some_and(|c| c.done || c.delivered.is_some_and(|d| r.from <= d))
                });
                if s.header.sealed.is_some() || sealed.ranges.is_empty() || behind {
                    return FirehoseReply::Stale;
                }
                s.header.sealed = Some(sealed);
                self.put_header(s, batch);
                FirehoseReply::Done
            }
            FirehoseCommand::Seal(mut sealed) => {
                let starts_at_front = s.buffered.front().is_some_and(|b| b.seq == sealed.from);
                // A batch ends at a buffered record, as a plan does; one
                // beyond the buffer would delete rows of records not yet
                // put at its commit.
                let ends_in_buffer = s.buffered.back().is_some_and(|b| sealed.to <= b.seq);
                if s.header.sealed.is_some()
                    || !starts_at_front
                    || !ends_in_buffer
                    || sealed.to < sealed.from
                {
                    return FirehoseReply::Stale;
                }
                let covered = s.buffered.iter().take_while(|b| b.seq <= sealed.to);
                let (records, bytes) = covered.fold((0, 0), |(n, size), b| (n + 1, size + b.len));
                sealed.records = records;
                sealed.bytes = bytes;
                s.header.sealed = Some(sealed);
                self.put_header(s, batch);
                FirehoseReply::Done
            }
            FirehoseCommand::Commit { to } => {
                let Some(sealed) = s.header.sealed.take_if(|b| b.to == to) else {
                    return FirehoseReply::Stale;
                };
                // A Kinesis source's counts come from its seal command.
                s.header.delivered_records =
                    s.header.delivered_records.saturating_add(sealed.records);
                s.header.delivered_bytes = s.header.delivered_bytes.saturating_add(sealed.bytes);
                if s.header.source != Source::DirectPut {
                    for r in &sealed.ranges {
                        s.header.checkpoints.entry(r.shard).or_default().delivered = Some(r.to);
                    }
                    for shard in &sealed.finished {
                        s.header.checkpoints.entry(*shard).or_default().done = true;
                    }
                    self.put_header(s, batch);
                    return FirehoseReply::Done;
                }
                while s.buffered.front().is_some_and(|b| b.seq <= to) {
                    let b = s.buffered.pop_front().expect("a front");
                    s.buffered_bytes -= b.len;
                }
                batch.delete_range_cf(
                    self.storage.cf(Cf::Records),
                    keys::record_key(self.group, sealed.from),
                    keys::record_key(self.group, to + 1),
                );
                self.put_header(s, batch);
                FirehoseReply::Done
            }
            FirehoseCommand::Finish(shards) => {
                for shard in shards {
                    s.header.checkpoints.entry(shard).or_default().done = true;
                }
                self.put_header(s, batch);
                FirehoseReply::Done
            }
            FirehoseCommand::Update {
                version,
                destination,
            } => {
                if version != s.header.version {
                    return FirehoseReply::VersionMismatch(s.header.version);
                }
                s.header.destination = destination;
                s.header.version += 1;
                s.header.updated_ms = now_ms;
                self.put_header(s, batch);
                FirehoseReply::Done
            }
            FirehoseCommand::Tag(tags) => {
                let added = tags
                    .keys()
                    .filter(|k| !s.header.tags.contains_key(*k))
                    .count();
                if s.header.tags.len() + added > MAX_TAGS {
                    return FirehoseReply::TooManyTags(MAX_TAGS as u32);
                }
                s.header.tags.extend(tags);
                self.put_header(s, batch);
                FirehoseReply::Done
            }
            FirehoseCommand::Untag(names) => {
                for name in names {
                    s.header.tags.remove(&name);
                }
                self.put_header(s, batch);
                FirehoseReply::Done
            }
            FirehoseCommand::Encryption(on) => {
                s.header.encrypted = on;
                s.header.updated_ms = now_ms;
                self.put_header(s, batch);
                FirehoseReply::Done
            }
        }
    }

    /// Reads the header if one was written and indexes the buffered
    /// records.
    fn load(&self, s: &mut Stream) -> io::Result<()> {
        if let Some(bytes) = self
            .storage
            .get(Cf::StateMachine, &keys::named_key(self.group, HEADER_KEY))
            .map_err(io::Error::other)?
        {
            s.header = decode(&bytes).map_err(io::Error::other)?;
        }
        s.buffered.clear();
        s.buffered_bytes = 0;
        let (from, to) = keys::group_bounds(self.group);
        for row in self.storage.scan(Cf::Records, &from, &to) {
            let (key, value) = row.map_err(io::Error::other)?;
            let (arrival, data) = split_stamp(&value)?;
            s.buffered.push_back(Buffered {
                seq: keys::record_seq_of(&key),
                arrival_ms: arrival,
                len: data.len() as u64,
            });
            s.buffered_bytes += data.len() as u64;
        }
        Ok(())
    }

    fn records(&self, from: u128, to: u128) -> Result<Vec<ByteBuf>, String> {
        let (start, end) = (
            keys::record_key(self.group, from),
            keys::record_key(self.group, to.saturating_add(1)),
        );
        let (mut out, mut bytes) = (Vec::new(), 0);
        for row in self.storage.scan(Cf::Records, &start, &end) {
            let (_, value) = row.map_err(|e| e.to_string())?;
            let (_, data) = split_stamp(&value).map_err(|e| e.to_string())?;
            bytes += data.len();
            if bytes > MAX_READ_BYTES {
                return Err(format!(
                    "records {from}..={to} hold more than {MAX_READ_BYTES} bytes, more than a delivery batch"
                ));
            }
            out.push(ByteBuf::from(data.to_vec()));
        }
        Ok(out)
    }
}

impl GroupStateMachine for FirehoseStateMachine {
    fn apply(&self, index: u64, command: &[u8], batch: &mut WriteBatch) -> io::Result<Vec<u8>> {
        let (stamp, command) = split_stamp(command)?;
        let command: FirehoseCommand = decode(command).map_err(io::Error::other)?;
        let mut s = self.stream.lock().expect("stream lock");
        if stamp > s.header.clock_ms {
            s.header.clock_ms = stamp;
        }
        let now_ms = s.header.clock_ms;
        let reply = self.apply_command(&mut s, batch, index, now_ms, command);
        Ok(encode(&reply))
    }

    fn check_command(&self, command: &[u8]) -> Result<(), String> {
        let (_, command) = split_stamp(command).map_err(|e| e.to_string())?;
        decode::<FirehoseCommand>(command).map(drop)
    }

    fn publish(&self) {
        let mut s = self.stream.lock().expect("stream lock");
        if s.dirty {
            *self.published.lock().expect("published lock") = encode(&s.header);
            s.dirty = false;
        }
    }

    fn snapshot_state(&self) -> Vec<u8> {
        self.published.lock().expect("published lock").clone()
    }

    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()> {
        let header: Header = decode(state).map_err(io::Error::other)?;
        let mut s = self.stream.lock().expect("stream lock");
        s.header = header;
        s.buffered.clear();
        s.buffered_bytes = 0;
        self.put_header(&mut s, batch);
        Ok(())
    }

    fn snapshot_rows(&self) -> SnapshotRows {
        SnapshotRows::Immutable {
            columns: &[Cf::Records],
            writer_index,
        }
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let query: FirehoseQuery = decode(query)?;
        if let FirehoseQuery::Records { from, to } = query {
            return Ok(encode(&self.records(from, to)?));
        }
        let s = self.stream.lock().expect("stream lock");
        Ok(match query {
            FirehoseQuery::Describe => encode(&s.info()),
            FirehoseQuery::Plan(max_bytes) => encode(&s.plan(max_bytes)),
            FirehoseQuery::Records { .. } => unreachable!("answered above"),
        })
    }

    fn reload(&self) -> io::Result<()> {
        let mut s = self.stream.lock().expect("stream lock");
        self.load(&mut s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::destination;
    use crate::model::Compression;
    use kinesin_storage::FsyncPolicy;

    fn open(storage: &Storage) -> Arc<dyn GroupStateMachine> {
        open_with(storage, Source::DirectPut)
    }

    fn open_with(storage: &Storage, source: Source) -> Arc<dyn GroupStateMachine> {
        crate::fuzzing::open_stream(storage, 7, source)
    }

    /// Applies one stamped command as the Raft adapter does.
    fn run(
        storage: &Storage,
        sm: &Arc<dyn GroupStateMachine>,
        index: u64,
        now_ms: u64,
        command: FirehoseCommand,
    ) -> FirehoseReply {
        let mut bytes = now_ms.to_be_bytes().to_vec();
        bytes.extend(encode(&command));
        let mut batch = WriteBatch::default();
        let reply = sm.apply(index, &bytes, &mut batch).expect("apply");
        storage.write(batch).expect("write");
        sm.publish();
        decode(&reply).expect("reply")
    }

    fn query<T: for<'de> Deserialize<'de>>(sm: &Arc<dyn GroupStateMachine>, q: FirehoseQuery) -> T {
        decode(&sm.query(&encode(&q)).expect("query")).expect("answer")
    }

    fn put(data: &[&str]) -> FirehoseCommand {
        FirehoseCommand::Put(
            data.iter()
                .map(|d| ByteBuf::from(d.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn batch(plan: &Plan) -> Batch {
        Batch {
            from: plan.from,
            to: plan.to,
            records: 0,
            bytes: 0,
            bucket: "bucket".into(),
            key: "k".into(),
            compression: Compression::Gzip,
            append_delimiter: false,
            first_arrival_ms: plan.first_arrival_ms,
            ranges: Vec::new(),
            finished: Vec::new(),
            partitioning: None,
            conversion: None,
        }
    }

    /// A batch ends at a buffered record: a raw seal beyond the buffer was
    /// accepted, and its commit would drop records put after the seal; at
    /// `u128::MAX` the commit's range end wrapped to before its start,
    /// which RocksDB refuses, and the group stopped on every replica at
    /// every replay of the entry.
    #[test]
    fn a_seal_beyond_the_buffer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = open(&storage);
        run(&storage, &sm, 3, 100, put(&["aa"]));
        let plan = query::<Option<Plan>>(&sm, FirehoseQuery::Plan(5)).unwrap();
        for (index, to) in [(4, plan.to + 1), (5, u128::MAX)] {
            let beyond = Batch { to, ..batch(&plan) };
            let reply = run(&storage, &sm, index, 110, FirehoseCommand::Seal(beyond));
            assert_eq!(reply, FirehoseReply::Stale, "to {to}");
        }
        let seal = FirehoseCommand::Seal(batch(&plan));
        assert_eq!(run(&storage, &sm, 6, 110, seal), FirehoseReply::Done);
        let commit = FirehoseCommand::Commit { to: plan.to };
        assert_eq!(run(&storage, &sm, 7, 110, commit), FirehoseReply::Done);
    }

    #[test]
    fn a_command_that_does_not_decode_is_refused_before_it_is_proposed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = open(&storage);
        let stamped = |bytes: &[u8]| [&100u64.to_be_bytes()[..], bytes].concat();
        assert!(sm.check_command(&[1, 2, 3]).is_err(), "no clock");
        assert!(sm.check_command(&stamped(&[0xff; 64])).is_err());
        assert!(sm.check_command(&stamped(&encode(&put(&["a"])))).is_ok());
    }

    #[test]
    fn a_records_query_reads_no_more_than_a_delivery_batch() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = open(&storage);
        let big = vec![b'r'; 65 << 20];
        run(&storage, &sm, 3, 100, put(&[""]));
        for index in 4..6 {
            let records = FirehoseCommand::Put(vec![ByteBuf::from(big.clone())]);
            run(&storage, &sm, index, 100, records);
        }
        let first = 3 << 32;
        let one: Vec<ByteBuf> = query(
            &sm,
            FirehoseQuery::Records {
                from: first,
                to: 4 << 32,
            },
        );
        assert_eq!(one.len(), 2);
        let refused = sm.query(&encode(&FirehoseQuery::Records {
            from: first,
            to: u128::MAX,
        }));
        assert!(refused.is_err(), "130 MiB of records in one answer");
    }

    #[test]
    fn sealed_batches_survive_a_restart_and_commit_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = open(&storage);
        assert_eq!(
            run(&storage, &sm, 3, 100, put(&["aa", "bbb"])),
            FirehoseReply::Put { first: 3 << 32 }
        );
        run(&storage, &sm, 4, 90, put(&["cccc"]));
        let info: StreamInfo = query(&sm, FirehoseQuery::Describe);
        assert_eq!((info.buffered_records, info.buffered_bytes), (3, 9));
        assert_eq!(info.oldest_arrival_ms, Some(100));

        // A plan of at most 5 bytes takes the first two records; the
        // clock of the later put did not run backward.
        let plan: Option<Plan> = query(&sm, FirehoseQuery::Plan(5));
        let plan = plan.unwrap();
        assert_eq!((plan.records, plan.bytes, plan.to), (2, 5, (3 << 32) | 1));
        let records: Vec<ByteBuf> = query(
            &sm,
            FirehoseQuery::Records {
                from: plan.from,
                to: plan.to,
            },
        );
        assert_eq!(
            records,
            vec![
                ByteBuf::from(b"aa".to_vec()),
                ByteBuf::from(b"bbb".to_vec())
            ]
        );
        assert_eq!(
            run(&storage, &sm, 5, 110, FirehoseCommand::Seal(batch(&plan))),
            FirehoseReply::Done
        );
        // A second seal while one is pending is refused.
        assert_eq!(
            run(&storage, &sm, 6, 110, FirehoseCommand::Seal(batch(&plan))),
            FirehoseReply::Stale
        );

        // The sealed batch and the buffer are there after a restart.
        drop(sm);
        let sm = open(&storage);
        let info: StreamInfo = query(&sm, FirehoseQuery::Describe);
        let sealed = info.sealed.expect("sealed batch kept");
        assert_eq!((sealed.records, sealed.bytes, sealed.to), (2, 5, plan.to));
        assert_eq!(info.buffered_records, 3);

        // A commit of another range changes nothing; the right one drops
        // the batch's records, once.
        assert_eq!(
            run(&storage, &sm, 7, 120, FirehoseCommand::Commit { to: 1 }),
            FirehoseReply::Stale
        );
        assert_eq!(
            run(
                &storage,
                &sm,
                8,
                120,
                FirehoseCommand::Commit { to: plan.to }
            ),
            FirehoseReply::Done
        );
        assert_eq!(
            run(
                &storage,
                &sm,
                9,
                120,
                FirehoseCommand::Commit { to: plan.to }
            ),
            FirehoseReply::Stale
        );
        let info: StreamInfo = query(&sm, FirehoseQuery::Describe);
        assert_eq!(
            (
                info.buffered_records,
                info.buffered_bytes,
                info.delivered_records
            ),
            (1, 4, 2)
        );
        let rest: Vec<ByteBuf> = query(
            &sm,
            FirehoseQuery::Records {
                from: 0,
                to: u128::MAX - 1,
            },
        );
        assert_eq!(rest, vec![ByteBuf::from(b"cccc".to_vec())]);
        drop(sm);
        let sm = open(&storage);
        let info: StreamInfo = query(&sm, FirehoseQuery::Describe);
        assert_eq!((info.buffered_records, info.sealed), (1, None));
    }

    #[test]
    fn updates_check_the_version_and_tags_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = open(&storage);
        let mut changed = destination();
        changed.size_mib = 64;
        let update = |version| FirehoseCommand::Update {
            version,
            destination: changed.clone(),
        };
        assert_eq!(
            run(&storage, &sm, 2, 5, update(2)),
            FirehoseReply::VersionMismatch(1)
        );
        assert_eq!(run(&storage, &sm, 3, 5, update(1)), FirehoseReply::Done);
        let info: StreamInfo = query(&sm, FirehoseQuery::Describe);
        assert_eq!(
            (info.version, info.destination.size_mib, info.updated_ms),
            (2, 64, 5)
        );
        let tags = |n: usize| {
            FirehoseCommand::Tag((0..n).map(|i| (format!("k{i}"), "v".into())).collect())
        };
        assert_eq!(run(&storage, &sm, 4, 5, tags(50)), FirehoseReply::Done);
        assert_eq!(
            run(
                &storage,
                &sm,
                5,
                5,
                FirehoseCommand::Tag([("new".into(), "v".into())].into())
            ),
            FirehoseReply::TooManyTags(50)
        );
    }

    #[test]
    fn a_kinesis_source_checkpoints_its_shards_and_refuses_puts() {
        use crate::model::{KinesisSource, ShardRange};
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let source = Source::Kinesis(KinesisSource {
            stream_arn: "arn:aws:kinesis:us-east-1:000000000000:stream/src".into(),
            role_arn: "arn:aws:iam::000000000000:role/r".into(),
            stream_key: "src".into(),
            start_ms: 1,
        });
        let sm = open_with(&storage, source.clone());
        assert_eq!(
            run(&storage, &sm, 2, 5, put(&["x"])),
            FirehoseReply::NotDirectPut
        );
        let sealed = |from: u128, to: u128| Batch {
            from,
            to,
            records: 3,
            bytes: 30,
            bucket: "b".into(),
            key: "k".into(),
            compression: Compression::Uncompressed,
            append_delimiter: false,
            first_arrival_ms: 4,
            ranges: vec![
                ShardRange {
                    shard: ShardId(0),
                    from,
                    to: from + 5,
                },
                ShardRange {
                    shard: ShardId(1),
                    from: 100,
                    to,
                },
            ],
            finished: vec![ShardId(0)],
            partitioning: None,
            conversion: None,
        };
        assert_eq!(
            run(&storage, &sm, 3, 5, FirehoseCommand::Seal(sealed(10, 120))),
            FirehoseReply::Done
        );
        drop(sm);
        let sm = open_with(&storage, source);
        assert_eq!(
            run(&storage, &sm, 4, 6, FirehoseCommand::Commit { to: 120 }),
            FirehoseReply::Done
        );
        let info: StreamInfo = query(&sm, FirehoseQuery::Describe);
        assert_eq!(
            info.checkpoints[&ShardId(0)],
            Checkpoint {
                delivered: Some(15),
                done: true
            }
        );
        assert_eq!(
            info.checkpoints[&ShardId(1)],
            Checkpoint {
                delivered: Some(120),
                done: false
            }
        );
        assert_eq!(
            (
                info.delivered_records,
                info.delivered_bytes,
                info.buffered_records
            ),
            (3, 30, 0)
        );
        // A seal of records already delivered (a former leader's) is refused.
        assert_eq!(
            run(&storage, &sm, 5, 6, FirehoseCommand::Seal(sealed(12, 130))),
            FirehoseReply::Stale
        );
        assert_eq!(
            run(
                &storage,
                &sm,
                6,
                6,
                FirehoseCommand::Finish(vec![ShardId(1)])
            ),
            FirehoseReply::Done
        );
        let info: StreamInfo = query(&sm, FirehoseQuery::Describe);
        assert!(info.checkpoints[&ShardId(1)].done);
    }
}
