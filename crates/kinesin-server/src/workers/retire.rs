//! Removing a sealed shard: once a retention period has passed since its
//! seal, every record it holds is past retention (none
//! arrive after the seal), so readers lose nothing that AWS would keep; the
//! map drops it and its replicas delete its group. Without this, every
//! reshard left its parents' groups running for good.
//!
//! Every replica stores when it applied the seal
//! (`ShardStateMachine::sealed_at_ms`), flushed when the seal is
//! published, so restarts (a crash too) and leader changes do not restart
//! the count. A replica that got the seal in a snapshot (or
//! applied it under a release before this one) has no such time: as its
//! leader it counts from when it first saw the shard sealed, in memory,
//! which delays a removal and never hastens one.

use std::sync::{Arc, Mutex};

use kinesin_meta::{MetaCommand, Owner, SHARD_REMOVAL_VERSION};
use kinesin_types::ShardState;

use super::{JobState, Led};
use crate::reconcile::Context;

/// Whether a shard sealed (as its leader knows) at `sealed_seen_ms`, whose
/// newest record arrived at `last_arrival_ms`, is past `retention_ms` at
/// `now_ms`.
fn due(sealed_seen_ms: u64, last_arrival_ms: u64, retention_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(sealed_seen_ms) >= retention_ms
        && now_ms.saturating_sub(last_arrival_ms) >= retention_ms
}

pub(super) fn run(ctx: &Context, jobs: &Arc<Mutex<JobState>>, led: &Led<'_>) {
    let Some(Owner::Shard { stream, shard }) = led.owner() else {
        return;
    };
    if shard.state != ShardState::Sealed {
        return;
    }
    let Some(sm) = ctx.shards.get(led.group) else {
        return;
    };
    let stats = sm.stats();
    let now = kinesin_router::now_ms();
    let group = led.group;
    let sealed_at = sm.sealed_at_ms().unwrap_or_else(|e| {
        // Checked again at every pass (0.5 s), so not a warning each time:
        // the storage error shows wherever else it is met.
        tracing::debug!(%group, error = %e, "cannot read when the shard was sealed");
        None
    });
    {
        let mut jobs = jobs.lock().expect("jobs lock");
        let seen = match sealed_at {
            Some(at) => at,
            None => *jobs.sealed_seen.entry(group).or_insert(now),
        };
        if !stats.sealed
            || !due(seen, stats.last_arrival_ms, stream.retention_ms(), now)
            // Older releases cannot decode the removal: until every node
            // runs this one, sealed shards stay, as they did.
            || ctx.router.cluster_data_version() < SHARD_REMOVAL_VERSION
            || !jobs.retiring.insert(group)
        {
            return;
        }
    }
    let router = ctx.router.clone();
    let (stream, shard) = (stream.name.to_string(), shard.shard_id);
    let command = MetaCommand::RemoveSealedShard {
        stream: stream.clone(),
        shard,
    };
    let jobs = Arc::clone(jobs);
    tokio::spawn(async move {
        let result = router.meta_write(command).await;
        // A removal retried after an unknown outcome may find it done.
        let gone = || {
            router
                .meta_state()
                .streams
                .get(&stream)
                .is_none_or(|s| s.shard(shard).is_none())
        };
        match result {
            Err(e) if !gone() => {
                tracing::warn!(%group, error = %e, "cannot remove a sealed shard yet")
            }
            _ => tracing::info!(%group, "removed a sealed shard past its retention"),
        }
        jobs.lock().expect("jobs lock").retiring.remove(&group);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn a_shard_is_due_a_retention_period_after_its_seal_and_its_last_record() {
        let now = 1_000 * HOUR_MS;
        // Sealed 23 h ago: not yet, even without records.
        assert!(!due(now - 23 * HOUR_MS, 0, 24 * HOUR_MS, now));
        assert!(due(now - 24 * HOUR_MS, 0, 24 * HOUR_MS, now));
        // A record newer than the retention keeps it (a clock that jumped).
        assert!(!due(now - 30 * HOUR_MS, now - HOUR_MS, 24 * HOUR_MS, now));
        assert!(due(
            now - 30 * HOUR_MS,
            now - 25 * HOUR_MS,
            24 * HOUR_MS,
            now
        ));
        // A longer retention waits longer.
        assert!(!due(now - 30 * HOUR_MS, 0, 48 * HOUR_MS, now));
        // A clock that went back past the seal is not a reason.
        assert!(!due(now + HOUR_MS, 0, 24 * HOUR_MS, now));
    }
}
