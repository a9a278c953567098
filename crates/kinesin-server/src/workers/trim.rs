//! Retention: dropping a shard's records older than its stream's retention
//! period. The leader computes the horizon (the first record inside
//! retention) and the command carries it, so that every replica deletes
//! exactly the same records (`ShardCommand::Trim`).

use std::sync::Mutex;
use std::time::Duration;

use kinesin_meta::Owner;
use kinesin_shard::{ShardCommand, ShardStateMachine};

use super::{take_turn, JobState, Led};
use crate::reconcile::Context;

const TRIM_EVERY: Duration = Duration::from_secs(60);

/// The trim a shard needs at `now_ms` with `retention_ms`, if any.
fn command(sm: &ShardStateMachine, retention_ms: u64, now_ms: u64) -> Option<ShardCommand> {
    let before_ms = now_ms.saturating_sub(retention_ms);
    let horizon = sm.trim_point(before_ms);
    (horizon > sm.stats().trim_horizon).then_some(ShardCommand::Trim { before_ms, horizon })
}

pub(super) fn run(ctx: &Context, jobs: &Mutex<JobState>, led: &Led<'_>) {
    let Some(Owner::Shard { stream, .. }) = led.owner() else {
        return;
    };
    let Some(sm) = ctx.shards.get(led.group) else {
        return;
    };
    if !take_turn(
        &mut jobs.lock().expect("jobs lock").last_trim,
        led.group,
        TRIM_EVERY,
    ) {
        return;
    }
    let Some(trim) = command(&sm, stream.retention_ms(), kinesin_router::now_ms()) else {
        return;
    };
    let (host, group) = (ctx.host.clone(), led.group);
    tokio::spawn(async move {
        let _ = host.propose(group, trim.encode()).await;
    });
}

#[cfg(test)]
mod tests {
    use kinesin_raft::GroupStateMachine;
    use kinesin_shard::{NewRecord, ShardReply};
    use kinesin_storage::{FsyncPolicy, Storage, WriteBatch};
    use kinesin_types::ShardId;

    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    fn append(sm: &ShardStateMachine, storage: &Storage, index: u64, arrival_ms: u64) -> u128 {
        let mut batch = WriteBatch::default();
        let reply = sm
            .apply(
                index,
                &ShardCommand::Append {
                    arrival_ms,
                    records: vec![NewRecord {
                        partition_key: "k".into(),
                        data: vec![1],
                    }],
                }
                .encode(),
                &mut batch,
            )
            .unwrap();
        storage.write(batch).unwrap();
        sm.publish();
        match ShardReply::decode(&reply).unwrap() {
            ShardReply::Appended { first, .. } => first,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn records_past_retention_are_trimmed_up_to_the_first_one_inside() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let sm = ShardStateMachine::open(storage.clone(), 3, ShardId(0), 0).unwrap();
        let now = 100 * HOUR_MS;
        assert_eq!(
            command(&sm, 24 * HOUR_MS, now),
            None,
            "an empty shard has nothing to trim"
        );
        let first = append(&sm, &storage, 1, now - 30 * HOUR_MS);
        append(&sm, &storage, 2, now - 25 * HOUR_MS);
        let inside = append(&sm, &storage, 3, now - 2 * HOUR_MS);
        assert_eq!(
            command(&sm, 24 * HOUR_MS, now),
            Some(ShardCommand::Trim {
                before_ms: now - 24 * HOUR_MS,
                horizon: inside,
            })
        );
        // Everything is inside 48 hours: the horizon only moves up to the
        // first record (the shard's horizon starts below it), deleting none.
        assert_eq!(
            command(&sm, 48 * HOUR_MS, now),
            Some(ShardCommand::Trim {
                before_ms: now - 48 * HOUR_MS,
                horizon: first,
            })
        );
    }
}
