//! Reads from the local replica's applied state. Records are immutable, so
//! any replica returns a correct prefix of the shard.

use kinesin_storage::{keys, Cf};
use kinesin_types::SequenceNumber;

use crate::command::StoredRecord;
use crate::state_machine::ShardStateMachine;
use crate::ShardError;

/// Where a read starts, as the Kinesis iterator types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStart {
    TrimHorizon,
    Latest,
    At(SequenceNumber),
    After(SequenceNumber),
    AtTimestamp(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBatch {
    pub records: Vec<(SequenceNumber, StoredRecord)>,
    /// The next read starts here (inclusive).
    pub next: SequenceNumber,
    /// Milliseconds between the arrival of the first unread record and `now`;
    /// 0 when the read reached the tip.
    pub millis_behind_latest: u64,
    /// The shard is sealed and every record of it has been read.
    pub sealed_and_drained: bool,
}

impl ShardStateMachine {
    /// Checks that a sequence number was issued by this shard.
    pub fn check_sequence(&self, seq: SequenceNumber) -> Result<(), ShardError> {
        if seq.shard() != self.shard || seq.generation() != self.generation {
            return Err(ShardError::ForeignSequenceNumber(seq.to_string()));
        }
        Ok(())
    }

    /// Resolves a start position to the first sequence number to return.
    pub fn resolve(&self, start: ReadStart) -> Result<SequenceNumber, ShardError> {
        let stats = self.stats();
        let seq = match start {
            ReadStart::TrimHorizon => stats.trim_horizon,
            ReadStart::Latest => self.next_sequence(&stats),
            ReadStart::At(s) => {
                self.check_sequence(s)?;
                s.0
            }
            ReadStart::After(s) => {
                self.check_sequence(s)?;
                s.0 + 1
            }
            ReadStart::AtTimestamp(t) => self.first_sequence_at_or_after(t, &stats),
        };
        Ok(SequenceNumber(seq.max(stats.trim_horizon)))
    }

    /// Reads up to `limit` records and about `max_bytes` (at least one
    /// record) starting at `from`.
    pub fn read(
        &self,
        from: SequenceNumber,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<ReadBatch, ShardError> {
        let stats = self.stats();
        let start = from.0.max(stats.trim_horizon);
        let tip = self.next_sequence(&stats);
        let (_, group_end) = keys::group_bounds(self.group);
        // Never return records beyond what is published (applied and written).
        let upper = keys::record_key(self.group, tip);
        let to = if upper.as_slice() < group_end.as_slice() {
            upper.to_vec()
        } else {
            group_end
        };
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut next = SequenceNumber(start);
        let mut behind = 0;
        for kv in self
            .storage
            .scan(Cf::Records, &keys::record_key(self.group, start), &to)
        {
            let (k, v) = kv?;
            let record: StoredRecord =
                postcard::from_bytes(&v).map_err(|e| ShardError::Corrupt(e.to_string()))?;
            let seq = SequenceNumber(keys::record_seq_of(&k));
            let size = record.data.len() + record.partition_key.len();
            if records.len() >= limit || (!records.is_empty() && bytes + size > max_bytes) {
                behind = now_ms.saturating_sub(record.arrival_ms);
                break;
            }
            bytes += size;
            next = SequenceNumber(seq.0 + 1);
            records.push((seq, record));
        }
        if records.is_empty() {
            // Nothing in [start, tip): no record below the tip can appear later.
            next = SequenceNumber(start.max(tip));
        }
        let drained = stats.sealed && next.0 >= tip;
        Ok(ReadBatch {
            records,
            next,
            millis_behind_latest: behind,
            sealed_and_drained: drained,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewRecord, ShardCommand, ShardReply, ShardStats};
    use kinesin_raft::GroupStateMachine;
    use kinesin_storage::{FsyncPolicy, Storage, WriteBatch};
    use kinesin_types::ShardId;

    fn apply(sm: &ShardStateMachine, index: u64, cmd: ShardCommand) -> ShardReply {
        let mut batch = WriteBatch::default();
        let reply = sm.apply(index, &cmd.encode(), &mut batch).unwrap();
        sm.storage.write(batch).unwrap();
        sm.publish();
        ShardReply::decode(&reply).unwrap()
    }

    fn append(sm: &ShardStateMachine, index: u64, at: u64, n: usize) -> ShardReply {
        let records = (0..n)
            .map(|i| NewRecord {
                partition_key: format!("k{i}"),
                data: vec![i as u8; 10],
            })
            .collect();
        apply(
            sm,
            index,
            ShardCommand::Append {
                arrival_ms: at,
                records,
            },
        )
    }

    #[test]
    fn appends_get_increasing_numbers_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = ShardStateMachine::open(storage, 9, ShardId(3), 1).unwrap();
        let ShardReply::Appended { first, count } = append(&sm, 5, 1000, 3) else {
            panic!()
        };
        assert_eq!(count, 3);
        assert_eq!(SequenceNumber(first).log_index(), 5);
        append(&sm, 7, 900, 2);
        let start = sm.resolve(ReadStart::TrimHorizon).unwrap();
        let batch = sm.read(start, 100, 1 << 20, 2000).unwrap();
        let seqs: Vec<_> = batch.records.iter().map(|(s, _)| s.0).collect();
        assert_eq!(seqs.len(), 5);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        // The second batch arrived "earlier" by the clock but keeps time monotonic.
        assert_eq!(batch.records[4].1.arrival_ms, 1000);
        assert_eq!(batch.millis_behind_latest, 0);
        // Limit and continuation.
        let part = sm.read(start, 2, 1 << 20, 2000).unwrap();
        assert_eq!(part.records.len(), 2);
        assert_eq!(part.millis_behind_latest, 1000);
        let rest = sm.read(part.next, 100, 1 << 20, 2000).unwrap();
        assert_eq!(rest.records.len(), 3);
        // LATEST sees nothing until a new append.
        let latest = sm.resolve(ReadStart::Latest).unwrap();
        assert!(sm.read(latest, 10, 1 << 20, 0).unwrap().records.is_empty());
        append(&sm, 8, 3000, 1);
        assert_eq!(sm.read(latest, 10, 1 << 20, 0).unwrap().records.len(), 1);
    }

    /// A follower catching up applies many entries in one batch, so its
    /// storage does not yet hold the batch's records when a Trim among them
    /// applies. It must end with the same records as the leader, which
    /// applied them one by one (a regression: it used to trim everything).
    #[test]
    fn a_trim_applied_in_one_batch_with_its_appends_agrees_with_the_leader() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let leader = ShardStateMachine::open(storage.clone(), 1, ShardId(0), 0).unwrap();
        let follower = ShardStateMachine::open(storage, 2, ShardId(0), 0).unwrap();
        let appends: Vec<ShardCommand> = [100, 200, 300]
            .into_iter()
            .map(|at| ShardCommand::Append {
                arrival_ms: at,
                records: vec![NewRecord {
                    partition_key: "k".into(),
                    data: vec![1; 10],
                }],
            })
            .collect();
        for (i, cmd) in appends.iter().enumerate() {
            apply(&leader, i as u64 + 1, cmd.clone());
        }
        for before_ms in [50, 250] {
            let trim = ShardCommand::Trim {
                before_ms,
                horizon: leader.trim_point(before_ms),
            };
            apply(&leader, 4, trim.clone());
            let mut batch = WriteBatch::default();
            for (i, cmd) in appends.iter().enumerate() {
                follower
                    .apply(i as u64 + 1, &cmd.encode(), &mut batch)
                    .unwrap();
            }
            follower.apply(4, &trim.encode(), &mut batch).unwrap();
            follower.storage.write(batch).unwrap();
            follower.publish();
            let read = |sm: &ShardStateMachine| {
                let start = sm.resolve(ReadStart::TrimHorizon).unwrap();
                sm.read(start, 100, 1 << 20, 0)
                    .unwrap()
                    .records
                    .into_iter()
                    .map(|(s, _)| s.log_index())
                    .collect::<Vec<_>>()
            };
            let expected = if before_ms == 50 {
                vec![1, 2, 3]
            } else {
                vec![3]
            };
            assert_eq!(read(&leader), expected);
            assert_eq!(read(&follower), expected);
        }
    }

    #[test]
    fn at_timestamp_trim_and_seal() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = ShardStateMachine::open(storage, 1, ShardId(0), 0).unwrap();
        append(&sm, 1, 100, 2);
        append(&sm, 2, 200, 2);
        append(&sm, 3, 300, 2);
        let at = sm.resolve(ReadStart::AtTimestamp(150)).unwrap();
        assert_eq!(at.log_index(), 2);
        let trim = ShardCommand::Trim {
            before_ms: 250,
            horizon: sm.trim_point(250),
        };
        let ShardReply::Trimmed { horizon } = apply(&sm, 4, trim) else {
            panic!()
        };
        assert_eq!(SequenceNumber(horizon).log_index(), 3);
        let all = sm
            .read(sm.resolve(ReadStart::TrimHorizon).unwrap(), 100, 1 << 20, 0)
            .unwrap();
        assert_eq!(all.records.len(), 2);
        // Reading at a trimmed number starts at the horizon instead.
        let old = SequenceNumber::new(0, ShardId(0), 1, 0);
        assert_eq!(sm.resolve(ReadStart::At(old)).unwrap().0, horizon);
        assert!(matches!(
            apply(&sm, 5, ShardCommand::Seal),
            ShardReply::Sealed { .. }
        ));
        assert_eq!(
            append(&sm, 6, 400, 1),
            ShardReply::Rejected(crate::command::ShardRejection::Sealed)
        );
        let end = sm.read(all.next, 100, 1 << 20, 0).unwrap();
        assert!(end.records.is_empty() && end.sealed_and_drained);
        // A number from another shard is refused.
        let foreign = SequenceNumber::new(0, ShardId(1), 1, 0);
        assert!(sm.resolve(ReadStart::At(foreign)).is_err());
    }

    /// Applied as the Raft adapter applies (without the WAL), the seal's
    /// time is flushed at its publish: a crash right after (the store
    /// closed without a flush) keeps it, where the seal applied again from
    /// the log would start the count anew.
    #[test]
    fn the_seal_time_is_flushed_at_its_publish() {
        let dir = tempfile::tempdir().unwrap();
        let sealed_at = {
            let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
            let sm = ShardStateMachine::open(storage.clone(), 1, ShardId(0), 0).unwrap();
            let mut batch = WriteBatch::default();
            sm.apply(1, &ShardCommand::Seal.encode(), &mut batch)
                .unwrap();
            storage.write_unlogged(batch).unwrap();
            sm.publish();
            sm.sealed_at_ms().unwrap().expect("a seal time")
        };
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let reopened = ShardStateMachine::open(storage, 1, ShardId(0), 0).unwrap();
        assert_eq!(reopened.sealed_at_ms().unwrap(), Some(sealed_at));
        assert!(reopened.stats().sealed);
    }

    /// The time a replica applied the seal is kept across a restart, and
    /// a second seal does not move it (`retire` counts from it).
    #[test]
    fn the_seal_time_survives_a_restart_and_a_second_seal() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = ShardStateMachine::open(storage.clone(), 1, ShardId(0), 0).unwrap();
        append(&sm, 1, 100, 1);
        assert_eq!(sm.sealed_at_ms().unwrap(), None);
        let before = kinesin_raft::clock::now_ms();
        apply(&sm, 2, ShardCommand::Seal);
        let sealed_at = sm.sealed_at_ms().unwrap().expect("a seal time");
        assert!(sealed_at >= before && sealed_at <= kinesin_raft::clock::now_ms());
        std::thread::sleep(std::time::Duration::from_millis(5));
        apply(&sm, 3, ShardCommand::Seal);
        drop(sm);
        let reopened = ShardStateMachine::open(storage.clone(), 1, ShardId(0), 0).unwrap();
        assert_eq!(reopened.sealed_at_ms().unwrap(), Some(sealed_at));
        // A snapshot install clears the group's small state; a sealed
        // state restored keeps this replica's time.
        let install = |state: &[u8]| {
            let mut batch = WriteBatch::default();
            let (from, to) = kinesin_storage::keys::group_bounds(1);
            batch.delete_range_cf(storage.cf(kinesin_storage::Cf::StateMachine), &from, &to);
            reopened.restore(state, &mut batch).unwrap();
            storage.write(batch).unwrap();
        };
        install(&reopened.snapshot_state());
        assert_eq!(reopened.sealed_at_ms().unwrap(), Some(sealed_at));
        let open_state = ShardStats {
            sealed: false,
            ..reopened.stats()
        };
        install(&postcard::to_stdvec(&open_state).unwrap());
        assert_eq!(reopened.sealed_at_ms().unwrap(), None);
    }
}
