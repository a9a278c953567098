//! The reconciler, one of the loops that make the cluster match its map
//! (the others are in `crate::controller`). It runs on every node: it starts
//! the replicas the map assigns to this node and removes those it no longer
//! assigns; on groups this node leads it aligns the Raft membership with the
//! assigned replicas and runs the leader-side jobs (`crate::workers`: seal,
//! leadership hand-off, trim).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesin_meta::{GroupSpec, MetaState, MetaStateMachine, Owner};
use kinesin_raft::{GroupKinds, RaftHost, Role, TimingProfile};
use kinesin_router::{LocalShards, Router};
use kinesin_shard::ShardStateMachine;
use kinesin_storage::Storage;
use kinesin_types::{GroupId, NodeId, ShardInfo, ShardState, StreamStatus};
use tokio::sync::watch;

use crate::config::Config;
use crate::workers::{self, JobState};

#[derive(Clone)]
pub(crate) struct Context {
    pub config: Config,
    pub host: RaftHost,
    pub router: Arc<Router>,
    pub meta: Arc<MetaStateMachine>,
    pub shards: Arc<LocalShards>,
    pub storage: Storage,
    pub shard_timing: TimingProfile,
    pub kinds: GroupKinds,
}

const TICK: Duration = Duration::from_millis(500);
/// How long a replica the map no longer assigns keeps running before its
/// data is deleted.
const REMOVE_GRACE: Duration = Duration::from_secs(10);
/// Longest one membership alignment may take before it is retried.
const ALIGN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the k-th replica of a new group waits for an earlier one to
/// make its first membership before it makes it itself.
const INIT_STAGGER: Duration = Duration::from_secs(2);

/// Per-group bookkeeping so that slow operations are not started twice.
#[derive(Default)]
struct Busy {
    membership: HashSet<GroupId>,
    unassigned_since: HashMap<GroupId, Instant>,
    /// New groups without a membership here, and since when.
    uninitialized_since: HashMap<GroupId, Instant>,
    initializing: HashSet<GroupId>,
    /// Groups of kinds this node has not registered (warned once).
    unknown_kind: HashSet<GroupId>,
}

pub(crate) async fn run_reconciler(ctx: Context, mut stop: watch::Receiver<bool>) {
    let mut changes = ctx.meta.subscribe();
    let busy = Arc::new(Mutex::new(Busy::default()));
    let jobs = Arc::new(Mutex::new(JobState::default()));
    loop {
        let state = ctx.meta.state();
        reconcile_once(&ctx, &state, &busy, &jobs).await;
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// A group the map assigns to this node.
struct Wanted {
    replicas: Vec<NodeId>,
    what: WantedGroup,
}

enum WantedGroup {
    Shard { stream: String, shard: ShardInfo },
    Kind { spec: GroupSpec },
}

impl Wanted {
    /// Still making its first membership from the map's replicas: all
    /// shards of a CREATING stream, the children a reshard opened in an
    /// UPDATING one (the newest generation), a group not yet ready.
    fn is_new(&self, state: &MetaState) -> bool {
        match &self.what {
            WantedGroup::Shard { stream, shard } => {
                state.streams.get(stream).is_some_and(|s| match s.status {
                    StreamStatus::Creating => true,
                    StreamStatus::Updating => {
                        shard.state == ShardState::Open
                            && s.shards.iter().map(|x| x.generation).max() == Some(shard.generation)
                    }
                    _ => false,
                })
            }
            WantedGroup::Kind { spec, .. } => !spec.ready,
        }
    }
}

async fn reconcile_once(
    ctx: &Context,
    state: &MetaState,
    busy: &Arc<Mutex<Busy>>,
    jobs: &Arc<Mutex<JobState>>,
) {
    let me = ctx.host.node_id();
    let wanted: BTreeMap<GroupId, Wanted> = state
        .placed()
        .filter(|p| p.replicas.contains(&me))
        .map(|p| {
            let what = match p.owner {
                Owner::Shard { stream, shard } => WantedGroup::Shard {
                    stream: stream.name.to_string(),
                    shard: shard.clone(),
                },
                Owner::Group { spec, .. } => WantedGroup::Kind { spec: spec.clone() },
            };
            let replicas = p.replicas.to_vec();
            (p.group, Wanted { replicas, what })
        })
        .collect();

    for (group, w) in &wanted {
        if ctx.host.has_group(*group) {
            continue;
        }
        let started = match &w.what {
            WantedGroup::Shard { shard, .. } => start_replica(ctx, shard).await,
            WantedGroup::Kind { spec, .. } => start_kind_replica(ctx, spec, busy).await,
        };
        if let Err(e) = started {
            tracing::warn!(%group, error = %e, "cannot start replica");
        }
    }
    initialize_new_groups(ctx, state, &wanted, busy);
    let mut unassigned = Vec::new();
    let mut leading_unassigned = Vec::new();
    {
        let mut b = busy.lock().expect("busy lock");
        b.unassigned_since.retain(|g, _| !wanted.contains_key(g));
        for group in ctx.host.group_ids() {
            if group.is_meta() || wanted.contains_key(&group) {
                continue;
            }
            // The map no longer places a replica here: the stream was deleted
            // or the replica moved. Keep serving as a voter for a grace period
            // so the shard's leader can finish the membership change first.
            let since = *b.unassigned_since.entry(group).or_insert_with(Instant::now);
            if ctx.host.is_leader(group) {
                leading_unassigned.push(group);
            }
            if since.elapsed() >= REMOVE_GRACE {
                b.unassigned_since.remove(&group);
                unassigned.push(group);
            }
        }
    }
    // A leader the map no longer assigns hands leadership to an assigned
    // voter, which then changes the membership.
    for group in leading_unassigned {
        let Some(placed) = state.placed_group(group) else {
            continue;
        };
        let Some(status) = ctx.host.status(group) else {
            continue;
        };
        if let Some(to) = placed.replicas.iter().find(|r| status.voters.contains(r)) {
            let _ = ctx.host.transfer_leader(group, *to).await;
        }
    }
    for group in unassigned {
        tracing::info!(%group, "removing a replica no longer assigned to this node");
        ctx.shards.remove(group);
        if let Err(e) = ctx.host.stop_group(group, true).await {
            tracing::warn!(%group, error = %e, "cannot remove replica");
        }
    }

    let mut led = HashSet::new();
    for (group, w) in &wanted {
        let Some(status) = ctx.host.status(*group) else {
            continue;
        };
        if status.role != Role::Leader {
            continue;
        }
        led.insert(*group);
        let desired: BTreeSet<NodeId> = w.replicas.iter().copied().collect();
        let aligned = status.voters == desired;
        if !aligned {
            align_membership(ctx, state, *group, desired, busy.clone());
        }
        let led_group = workers::Led {
            group: *group,
            status: &status,
            replicas: &w.replicas,
            state,
        };
        workers::run_on_leader(ctx, jobs, &led_group, aligned).await;
    }
    workers::after_pass(jobs, &led);
}

async fn start_replica(ctx: &Context, shard: &ShardInfo) -> anyhow::Result<()> {
    let sm = Arc::new(ShardStateMachine::open(
        ctx.storage.clone(),
        shard.group.0,
        shard.shard_id,
        shard.generation,
    )?);
    ctx.shards.insert(shard.group, sm.clone());
    ctx.host
        .start_group(shard.group, sm, &ctx.shard_timing)
        .await?;
    Ok(())
}

async fn start_kind_replica(
    ctx: &Context,
    spec: &GroupSpec,
    busy: &Arc<Mutex<Busy>>,
) -> anyhow::Result<()> {
    let Some(kind) = ctx.kinds.get(&spec.kind) else {
        if busy
            .lock()
            .expect("busy lock")
            .unknown_kind
            .insert(spec.group)
        {
            tracing::warn!(group = %spec.group, kind = %spec.kind, "the map places a group of a kind this node does not know; not starting it");
        }
        return Ok(());
    };
    let sm = kind.open(ctx.storage.clone(), spec.group, &spec.config)?;
    ctx.host
        .start_group(spec.group, sm, &ctx.shard_timing)
        .await?;
    Ok(())
}

/// Makes the first membership of new groups that have none here yet.
///
/// The preferred leader (the first replica) does it at once; if the group
/// still has no membership here after [`INIT_STAGGER`] times this node's
/// position among the replicas not found down, this replica does it, so a group starts
/// with any live majority of its replicas and never waits for one node.
/// Every replica initializes with the same membership (the map's
/// replicas), which openraft allows: the leader's log replaces the others'.
/// Only while the group is new ([`Wanted::is_new`]) and never after: a
/// replica added later to a running group must wait to be contacted, or it
/// would found a second group of its own.
fn initialize_new_groups(
    ctx: &Context,
    state: &MetaState,
    wanted: &BTreeMap<GroupId, Wanted>,
    busy: &Arc<Mutex<Busy>>,
) {
    let me = ctx.host.node_id();
    let mut b = busy.lock().expect("busy lock");
    b.uninitialized_since.retain(|g, _| wanted.contains_key(g));
    for (group, w) in wanted {
        let pristine = w.is_new(state)
            && ctx
                .host
                .status(*group)
                .is_some_and(|st| st.addresses.is_empty());
        if !pristine {
            b.uninitialized_since.remove(group);
            continue;
        }
        let since = *b
            .uninitialized_since
            .entry(*group)
            .or_insert_with(Instant::now);
        // Replicas on nodes found down do not take a turn.
        let rank = w
            .replicas
            .iter()
            .filter(|r| !ctx.router.liveness().is_down(**r))
            .position(|r| *r == me)
            .unwrap_or(0) as u32;
        if since.elapsed() < INIT_STAGGER * rank || !b.initializing.insert(*group) {
            continue;
        }
        let members = addresses(state, &w.replicas);
        if members.len() != w.replicas.len() {
            b.initializing.remove(group);
            continue;
        }
        let (host, busy, group) = (ctx.host.clone(), busy.clone(), *group);
        // In the background: it completes once a majority of the replicas
        // started the group, and the reconciler must go on starting ours.
        tokio::spawn(async move {
            if let Err(e) = host.initialize(group, members).await {
                tracing::warn!(%group, error = %e, "cannot initialize group");
            }
            busy.lock().expect("busy lock").initializing.remove(&group);
        });
    }
}

fn addresses(state: &MetaState, nodes: &[NodeId]) -> BTreeMap<NodeId, String> {
    nodes
        .iter()
        .filter_map(|n| state.nodes.get(n).map(|info| (*n, info.raft_addr.clone())))
        .collect()
}

/// Adds missing replicas as learners, waits for them to catch up, then
/// makes the assigned replicas the voters. Runs in the background.
fn align_membership(
    ctx: &Context,
    state: &MetaState,
    group: GroupId,
    desired: BTreeSet<NodeId>,
    busy: Arc<Mutex<Busy>>,
) {
    if !busy.lock().expect("busy lock").membership.insert(group) {
        return;
    }
    let host = ctx.host.clone();
    let wanted: Vec<NodeId> = desired.iter().copied().collect();
    let members = addresses(state, &wanted);
    tokio::spawn(async move {
        let attempt = async {
            let status = host
                .status(group)
                .ok_or(kinesin_raft::RaftHostError::NoSuchGroup(group))?;
            for (node, addr) in &members {
                if !status.voters.contains(node) && !status.learners.contains(node) {
                    host.add_learner(group, *node, addr.clone(), true).await?;
                }
            }
            host.change_voters(group, desired.clone(), false).await?;
            let status = host
                .status(group)
                .ok_or(kinesin_raft::RaftHostError::NoSuchGroup(group))?;
            let stale: BTreeSet<NodeId> = status
                .learners
                .into_iter()
                .filter(|l| !desired.contains(l))
                .collect();
            if !stale.is_empty() {
                host.remove_learners(group, stale).await?;
            }
            Ok::<(), kinesin_raft::RaftHostError>(())
        };
        // A stuck attempt (leader change, unreachable learner) is abandoned
        // and retried on a later pass.
        let result = match tokio::time::timeout(ALIGN_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(kinesin_raft::RaftHostError::Raft {
                group,
                detail: "membership change timed out".into(),
            }),
        };
        match result {
            Ok(()) => {
                tracing::info!(%group, voters = ?desired, "membership matches the assignment")
            }
            Err(e) => tracing::warn!(%group, error = %e, "membership change failed; will retry"),
        }
        busy.lock().expect("busy lock").membership.remove(&group);
    });
}
