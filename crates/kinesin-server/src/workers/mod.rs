//! Leader-side jobs: work that runs on a group's leader, one job per file.
//!
//! The reconciler calls [`run_on_leader`] on every pass for each group this
//! node leads. Each job
//! decides from the map, the group's Raft status and its own bookkeeping
//! whether to act, and acts in the background; a node that loses leadership
//! is simply not called for the group any more, and whatever it started
//! fails harmlessly at the Raft layer (a proposal from a former leader is
//! refused). Jobs of later services (SQS visibility timers, SNS deliveries,
//! Firehose flushes) belong here too.

mod deliver;
mod redrive;
mod retire;
mod seal;
mod transfer;
mod trim;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesin_meta::{MetaState, Owner};
use kinesin_raft::GroupStatus;
use kinesin_types::{GroupId, NodeId};

use crate::reconcile::Context;

/// Bookkeeping shared by the jobs, so that slow work is not started twice
/// and periodic work keeps its period.
#[derive(Default)]
pub(crate) struct JobState {
    sealing: HashSet<GroupId>,
    last_transfer: HashMap<GroupId, Instant>,
    last_trim: HashMap<GroupId, Instant>,
    redriving: HashSet<GroupId>,
    last_redrive: HashMap<GroupId, Instant>,
    /// When this node, leading a sealed shard's group whose replica here
    /// has no stored seal time, first saw it sealed (wall-clock ms); see
    /// `retire`.
    sealed_seen: HashMap<GroupId, u64>,
    /// Sealed shards whose removal is being proposed.
    retiring: HashSet<GroupId>,
    /// Delivery streams with a running delivery task.
    delivering: HashSet<GroupId>,
    /// Queue partitions whose gauges this node set.
    exported: redrive::Exported,
    stores: deliver::Stores,
}

/// Whether `last` is at least `every` ago (or never); if so, it becomes
/// now.
fn take_turn(last: &mut HashMap<GroupId, Instant>, group: GroupId, every: Duration) -> bool {
    if last.get(&group).is_some_and(|t| t.elapsed() < every) {
        return false;
    }
    last.insert(group, Instant::now());
    true
}

/// A group this node leads, as one pass of the reconciler sees it.
pub(crate) struct Led<'a> {
    pub group: GroupId,
    pub status: &'a GroupStatus,
    pub replicas: &'a [NodeId],
    pub state: &'a MetaState,
}

impl Led<'_> {
    fn owner(&self) -> Option<Owner<'_>> {
        self.state.placed_group(self.group).map(|p| p.owner)
    }
}

/// After a pass over the groups this node leads (`led`): zeroes the queue
/// gauges of partitions it no longer leads, forgets when it saw shards it
/// no longer leads sealed.
pub(crate) fn after_pass(jobs: &Mutex<JobState>, led: &HashSet<GroupId>) {
    let mut jobs = jobs.lock().expect("jobs lock");
    redrive::forget_unled(&mut jobs.exported, led);
    // A leader seen again starts counting again (`retire`).
    jobs.sealed_seen.retain(|group, _| led.contains(group));
}

/// Seals a resharded parent, removes one past its retention, moves a
/// queue's dead letters and starts a delivery stream's deliveries at once. Once
/// the membership matches the map (`aligned`), starts at most one of a
/// leadership hand-off and a trim per pass (a hand-off first).
pub(crate) async fn run_on_leader(
    ctx: &Context,
    jobs: &Arc<Mutex<JobState>>,
    led: &Led<'_>,
    aligned: bool,
) {
    seal::run(ctx, jobs, led);
    retire::run(ctx, jobs, led);
    redrive::run(ctx, jobs, led);
    deliver::run(ctx, jobs, led);
    if !aligned || transfer::run(ctx, jobs, led).await {
        return;
    }
    trim::run(ctx, jobs, led);
}
