//! A model test: random appends, trims, seals, reads and restarts of a
//! shard, checked against a map of what it must hold. Two replicas apply
//! the same log: one entry by entry, as a leader, the other in batches of
//! several entries, as a follower catching up; both must agree with the
//! model.

use std::collections::BTreeMap;

use kinesin_raft::GroupStateMachine;
use kinesin_storage::{FsyncPolicy, Storage, WriteBatch};
use kinesin_types::{SequenceNumber, ShardId};
use proptest::prelude::*;

use crate::{NewRecord, ReadStart, ShardCommand, ShardRejection, ShardReply, ShardStateMachine};

const SHARD: ShardId = ShardId(2);
const GENERATION: u32 = 1;
const LEADER: u64 = 7;
const FOLLOWER: u64 = 8;

#[derive(Debug, Clone)]
enum Start {
    TrimHorizon,
    Latest,
    At(prop::sample::Index),
    After(prop::sample::Index),
    AtTimestamp(u64),
}

#[derive(Debug, Clone)]
enum Op {
    /// Records of these data sizes (none: a malformed entry), proposed by
    /// a leader whose clock is `skew_ms` behind the shared clock.
    Append {
        advance_ms: u64,
        skew_ms: u64,
        sizes: Vec<usize>,
    },
    /// Retention cut-off `back_ms` before the clock.
    Trim {
        back_ms: u64,
    },
    Seal,
    Read {
        start: Start,
        limit: usize,
        max_bytes: usize,
    },
    /// The follower applies what it has not yet, in one batch.
    CatchUp,
    /// The leader's process restarts: its state is read back from storage.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let start = prop_oneof![
        Just(Start::TrimHorizon),
        Just(Start::Latest),
        any::<prop::sample::Index>().prop_map(Start::At),
        any::<prop::sample::Index>().prop_map(Start::After),
        (0u64..400).prop_map(Start::AtTimestamp),
    ];
    prop_oneof![
        6 => (0u64..30, 0u64..40, prop::collection::vec(0usize..300, 0..6))
            .prop_map(|(advance_ms, skew_ms, sizes)| Op::Append { advance_ms, skew_ms, sizes }),
        1 => (0u64..150).prop_map(|back_ms| Op::Trim { back_ms }),
        1 => Just(Op::Seal),
        4 => (start, 1usize..8, 1usize..900)
            .prop_map(|(start, limit, max_bytes)| Op::Read { start, limit, max_bytes }),
        2 => Just(Op::CatchUp),
        1 => Just(Op::Restart),
    ]
}

/// What the shard must hold.
struct Model {
    records: BTreeMap<u128, (String, Vec<u8>, u64)>,
    /// Every sequence number ever written, trimmed ones included.
    written: Vec<u128>,
    last: Option<u128>,
    last_arrival_ms: u64,
    horizon: u128,
    sealed: bool,
}

impl Model {
    fn tip(&self) -> u128 {
        self.last.map_or(self.horizon, |s| s + 1)
    }

    fn apply(&mut self, index: u64, command: &ShardCommand) -> ShardReply {
        match command {
            ShardCommand::Append { .. } if self.sealed => {
                ShardReply::Rejected(ShardRejection::Sealed)
            }
            ShardCommand::Append { records, .. } if records.is_empty() => {
                ShardReply::Rejected(ShardRejection::Malformed)
            }
            ShardCommand::Append {
                arrival_ms,
                records,
            } => {
                let arrival_ms = (*arrival_ms).max(self.last_arrival_ms);
                self.last_arrival_ms = arrival_ms;
                for (k, r) in records.iter().enumerate() {
                    let seq = SequenceNumber::new(GENERATION, SHARD, index, k as u16).0;
                    let stored = (r.partition_key.clone(), r.data.clone(), arrival_ms);
                    self.records.insert(seq, stored);
                    self.written.push(seq);
                    self.last = Some(seq);
                }
                ShardReply::Appended {
                    first: SequenceNumber::new(GENERATION, SHARD, index, 0).0,
                    count: records.len() as u32,
                }
            }
            ShardCommand::Seal => {
                self.sealed = true;
                ShardReply::Sealed { ending: self.last }
            }
            ShardCommand::Trim { horizon, .. } => {
                let horizon = (*horizon).min(self.tip());
                if horizon > self.horizon {
                    self.records = self.records.split_off(&horizon);
                    self.horizon = horizon;
                }
                ShardReply::Trimmed {
                    horizon: self.horizon,
                }
            }
        }
    }

    /// The first record that arrived at or after `time_ms`, or the tip.
    fn first_at_or_after(&self, time_ms: u64) -> u128 {
        self.records
            .iter()
            .find(|(_, r)| r.2 >= time_ms)
            .map_or(self.tip(), |(s, _)| *s)
    }

    /// The written sequence number `i` picks (the horizon before any).
    fn pick(&self, i: &prop::sample::Index) -> u128 {
        if self.written.is_empty() {
            self.horizon
        } else {
            *i.get(&self.written)
        }
    }

    fn resolve(&self, start: &Start) -> u128 {
        let seq = match start {
            Start::TrimHorizon => self.horizon,
            Start::Latest => self.tip(),
            Start::At(i) => self.pick(i),
            Start::After(i) => self.pick(i) + 1,
            Start::AtTimestamp(t) => self.first_at_or_after(*t),
        };
        seq.max(self.horizon)
    }

    /// `start` as the shard takes it.
    fn read_start(&self, start: &Start) -> ReadStart {
        match start {
            Start::TrimHorizon => ReadStart::TrimHorizon,
            Start::Latest => ReadStart::Latest,
            Start::At(i) => ReadStart::At(SequenceNumber(self.pick(i))),
            Start::After(i) => ReadStart::After(SequenceNumber(self.pick(i))),
            Start::AtTimestamp(t) => ReadStart::AtTimestamp(*t),
        }
    }
}

/// Applies entries as one Raft apply batch: one storage write, then publish.
fn apply_batch(sm: &ShardStateMachine, entries: &[(u64, ShardCommand)]) -> Vec<ShardReply> {
    let mut batch = WriteBatch::default();
    let replies = entries
        .iter()
        .map(|(index, command)| {
            let reply = sm.apply(*index, &command.encode(), &mut batch).unwrap();
            ShardReply::decode(&reply).unwrap()
        })
        .collect();
    sm.storage.write(batch).unwrap();
    sm.publish();
    replies
}

/// The replica's reads and stats agree with the model.
fn check_replica(
    sm: &ShardStateMachine,
    model: &Model,
    reads: &[(Start, usize, usize)],
    now_ms: u64,
) -> Result<(), TestCaseError> {
    let stats = sm.stats();
    prop_assert_eq!(stats.trim_horizon, model.horizon);
    prop_assert_eq!(stats.last_sequence, model.last);
    prop_assert_eq!(stats.sealed, model.sealed);
    for (start, limit, max_bytes) in reads {
        let from = sm.resolve(model.read_start(start)).unwrap();
        prop_assert_eq!(from.0, model.resolve(start), "resolving {:?}", start);
        let batch = sm.read(from, *limit, *max_bytes, now_ms).unwrap();
        // At most `limit` records of about `max_bytes` (at least one), in
        // order from `from`, stopping early only at those bounds.
        let want: Vec<_> = model.records.range(from.0..).collect();
        let mut bytes = 0;
        let mut taken = 0;
        for (seq, (key, data, arrival)) in &want {
            let size = key.len() + data.len();
            if taken == *limit || (taken > 0 && bytes + size > *max_bytes) {
                prop_assert_eq!(batch.millis_behind_latest, now_ms.saturating_sub(*arrival));
                break;
            }
            let (got_seq, got) = &batch.records[taken];
            prop_assert_eq!(got_seq.0, **seq);
            prop_assert_eq!(
                (&got.partition_key, &got.data, got.arrival_ms),
                (key, data, *arrival)
            );
            bytes += size;
            taken += 1;
        }
        prop_assert_eq!(batch.records.len(), taken);
        if taken == want.len() {
            prop_assert_eq!(batch.millis_behind_latest, 0);
        }
        let next = batch
            .records
            .last()
            .map_or(from.0.max(model.tip()), |(s, _)| s.0 + 1);
        prop_assert_eq!(batch.next.0, next);
        prop_assert_eq!(
            batch.sealed_and_drained,
            model.sealed && next >= model.tip()
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn a_shard_holds_and_reads_what_a_map_of_its_log_says(
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let open = |group| ShardStateMachine::open(storage.clone(), group, SHARD, GENERATION).unwrap();
        let mut leader = open(LEADER);
        let follower = open(FOLLOWER);
        let mut model = Model {
            records: BTreeMap::new(),
            written: Vec::new(),
            last: None,
            last_arrival_ms: 0,
            horizon: SequenceNumber::first_of(GENERATION, SHARD).0,
            sealed: false,
        };
        // Entries the follower has not applied, with the leader's replies.
        let mut behind: Vec<(u64, ShardCommand, ShardReply)> = Vec::new();
        let mut clock_ms = 100u64;
        let mut index = 10u64;
        let mut key = 0u64;
        let mut reads = Vec::new();
        for op in ops {
            let command = match op {
                Op::Append { advance_ms, skew_ms, sizes } => {
                    clock_ms += advance_ms;
                    let records = sizes
                        .into_iter()
                        .map(|size| {
                            key += 1;
                            NewRecord { partition_key: format!("k{key}"), data: vec![key as u8; size] }
                        })
                        .collect();
                    ShardCommand::Append { arrival_ms: clock_ms.saturating_sub(skew_ms), records }
                }
                Op::Trim { back_ms } => {
                    let before_ms = clock_ms.saturating_sub(back_ms);
                    let horizon = leader.trim_point(before_ms);
                    prop_assert_eq!(horizon, model.first_at_or_after(before_ms));
                    ShardCommand::Trim { before_ms, horizon }
                }
                Op::Seal => ShardCommand::Seal,
                Op::Read { start, limit, max_bytes } => {
                    reads.push((start, limit, max_bytes));
                    check_replica(&leader, &model, &reads[reads.len() - 1..], clock_ms)?;
                    continue;
                }
                Op::CatchUp => {
                    let entries: Vec<_> = behind.iter().map(|(i, c, _)| (*i, c.clone())).collect();
                    let replies = apply_batch(&follower, &entries);
                    let wanted: Vec<_> = behind.drain(..).map(|(_, _, r)| r).collect();
                    prop_assert_eq!(replies, wanted);
                    check_replica(&follower, &model, &reads, clock_ms)?;
                    continue;
                }
                Op::Restart => {
                    leader = open(LEADER);
                    check_replica(&leader, &model, &reads, clock_ms)?;
                    continue;
                }
            };
            index += 1;
            let want = model.apply(index, &command);
            let got = apply_batch(&leader, &[(index, command.clone())]);
            prop_assert_eq!(&got[0], &want);
            behind.push((index, command, want));
        }
        let entries: Vec<_> = behind.into_iter().map(|(i, c, _)| (i, c)).collect();
        apply_batch(&follower, &entries);
        check_replica(&leader, &model, &reads, clock_ms)?;
        check_replica(&follower, &model, &reads, clock_ms)?;
    }
}

/// Entries of any bytes are refused as malformed or applied as the
/// commands they decode to (the check of `crate::fuzzing`, which a fuzz
/// target runs too). Most random entries do not decode; a few valid ones
/// (appends, a seal, a trim) are mixed in.
#[test]
fn any_bytes_are_refused_or_applied_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
    let next = std::cell::Cell::new(1);
    let valid = [
        ShardCommand::Append {
            arrival_ms: 5,
            records: vec![NewRecord {
                partition_key: "k".into(),
                data: vec![1, 2],
            }],
        },
        ShardCommand::Seal,
        ShardCommand::Trim {
            before_ms: 6,
            horizon: SequenceNumber::new(GENERATION, SHARD, 12, 0).0,
        },
    ]
    .map(|c| c.encode());
    let entry = prop_oneof![
        prop::sample::select(valid.to_vec()),
        prop::collection::vec(any::<u8>(), 0..300),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::default());
    runner
        .run(&prop::collection::vec(entry, 1..8), |entries| {
            let mut replica = crate::fuzzing::Replica::open(&storage, next.get());
            next.set(next.get() + 1);
            for entry in &entries {
                replica.entry(entry);
            }
            Ok(())
        })
        .unwrap();
}
