//! Loops on the metadata leader only. The controller keeps three voters in
//! the metadata group and re-places the replicas of nodes that have been
//! unreachable for longer than `repair_after_secs` or are draining. The
//! settler turns new streams ACTIVE, and new groups ready, once they have
//! leaders.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesin_meta::{
    place_replicas, MetaCommand, MetaState, NodeState, Owner, TokenKey, TOKEN_KEY_VERSION,
};
use kinesin_types::{GroupId, NodeId, StreamStatus};
use tokio::sync::watch;

use crate::reconcile::Context;

/// How often the metadata leader looks for streams whose shards all lead.
const SETTLE_EVERY: Duration = Duration::from_millis(250);

/// On the metadata leader: turns a CREATING stream (or an UPDATING one whose
/// resharded parents are sealed) ACTIVE once every open shard has a leader
/// that answers. Checks run in the background, one per stream at a time,
/// on every map change and every [`SETTLE_EVERY`].
pub(crate) async fn run_stream_settler(ctx: Context, mut stop: watch::Receiver<bool>) {
    let mut changes = ctx.meta.subscribe();
    let checking: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(SETTLE_EVERY) => {}
        }
        if !ctx.host.is_leader(GroupId::META) {
            continue;
        }
        let state = ctx.meta.state();
        for (name, spec) in state.groups.iter().filter(|(_, g)| !g.ready) {
            let key = format!("group:{name}");
            if !checking.lock().expect("checking lock").insert(key.clone()) {
                continue;
            }
            let (router, checking, name, group) = (
                ctx.router.clone(),
                checking.clone(),
                name.clone(),
                spec.group,
            );
            tokio::spawn(async move {
                if router.group_led(group).await {
                    let ready = MetaCommand::GroupReady { name: name.clone() };
                    if let Err(e) = router.meta_write(ready).await {
                        tracing::debug!(group = %name, error = %e, "cannot mark the group ready yet");
                    }
                }
                checking.lock().expect("checking lock").remove(&key);
            });
        }
        for (name, info) in state.streams.iter().filter(|(_, s)| s.awaits_leaders()) {
            if !checking.lock().expect("checking lock").insert(name.clone()) {
                continue;
            }
            let (router, checking, name, info) = (
                ctx.router.clone(),
                checking.clone(),
                name.clone(),
                info.clone(),
            );
            tokio::spawn(async move {
                if router.open_shards_led(&info).await {
                    let ready = MetaCommand::StreamReady {
                        stream: name.clone(),
                        epoch: info.epoch,
                    };
                    if let Err(e) = router.meta_write(ready).await {
                        tracing::debug!(stream = %name, error = %e, "cannot mark the stream ready yet");
                    }
                }
                checking.lock().expect("checking lock").remove(&name);
            });
        }
    }
}

pub(crate) async fn run_controller(ctx: Context, mut stop: watch::Receiver<bool>) {
    let mut unreachable_since: HashMap<NodeId, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !ctx.host.is_leader(GroupId::META) {
            unreachable_since.clear();
            continue;
        }
        let state = ctx.meta.state();
        if let Err(e) = balance_meta_voters(&ctx, &state).await {
            tracing::warn!(error = %e, "cannot adjust metadata voters");
        }
        let me = ctx.host.node_id();
        let repair_after = Duration::from_secs(ctx.config.repair_after_secs);
        let mut dead: BTreeSet<NodeId> = BTreeSet::new();
        let mut unreachable: BTreeSet<NodeId> = BTreeSet::new();
        for node in state
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active && n.id != me)
        {
            if ctx.router.meta_leader_hears(node.id) {
                unreachable_since.remove(&node.id);
            } else {
                unreachable.insert(node.id);
                let since = *unreachable_since
                    .entry(node.id)
                    .or_insert_with(Instant::now);
                if since.elapsed() >= repair_after {
                    dead.insert(node.id);
                }
            }
        }
        let leaving: BTreeSet<NodeId> = state
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Active)
            .map(|n| n.id)
            .collect();
        let exclude: BTreeSet<NodeId> = dead.union(&leaving).copied().collect();
        if let Err(e) = repair_replicas(&ctx, &state, &exclude, &unreachable).await {
            tracing::warn!(error = %e, "replica repair failed; will retry");
        }
        if let Err(e) = finish_drains(&ctx, &state).await {
            tracing::warn!(error = %e, "cannot finish a drain; will retry");
        }
        // A cluster made by an older release gets its key once every node
        // decodes it; a new one got it at bootstrap, unless the bootstrap
        // stopped before or a node joined while it ran.
        if state.token_key.bytes().is_none()
            && ctx.router.cluster_data_version() >= TOKEN_KEY_VERSION
        {
            match ctx.router.meta_write(new_token_key()).await {
                Ok(()) => tracing::info!("gave the cluster a key to sign iterators and tokens"),
                Err(e) => tracing::warn!(error = %e, "cannot set the token key; will retry"),
            }
        }
    }
}

/// A command giving the cluster a new random token key, if it has none.
pub(crate) fn new_token_key() -> MetaCommand {
    MetaCommand::SetTokenKey {
        key: TokenKey::new(rand::random()),
    }
}

/// A draining node that holds no replica any more is removed: marked
/// Removed in the map and dropped from the metadata group's membership.
async fn finish_drains(
    ctx: &Context,
    state: &MetaState,
) -> Result<(), kinesin_router::RouterError> {
    let Some(status) = ctx.host.status(GroupId::META) else {
        return Ok(());
    };
    for node in state.nodes.values() {
        let holds = state.holds_replicas(node.id);
        if node.state == NodeState::Draining && !holds && !status.voters.contains(&node.id) {
            tracing::info!(
                node = node.id.0,
                "drained node holds no replica; removing it"
            );
            ctx.router
                .meta_write(MetaCommand::SetNodeState {
                    node: node.id,
                    state: NodeState::Removed,
                })
                .await?;
        }
        if node.state == NodeState::Removed && status.learners.contains(&node.id) {
            ctx.host
                .remove_learners(GroupId::META, BTreeSet::from([node.id]))
                .await?;
        }
    }
    Ok(())
}

/// Keeps min(3, nodes) voters in the metadata group; the others are learners
/// that still receive the map.
async fn balance_meta_voters(
    ctx: &Context,
    state: &MetaState,
) -> Result<(), kinesin_raft::RaftHostError> {
    let Some(status) = ctx.host.status(GroupId::META) else {
        return Ok(());
    };
    let active: BTreeSet<NodeId> = state.active_nodes().map(|n| n.id).collect();
    let mut voters: BTreeSet<NodeId> = status
        .voters
        .iter()
        .filter(|v| active.contains(v))
        .copied()
        .collect();
    let target = active.len().min(3);
    if voters.len() >= target && voters == status.voters {
        return Ok(());
    }
    for learner in &status.learners {
        if voters.len() >= target {
            break;
        }
        let caught_up = status.follower_matched.get(learner).copied().unwrap_or(0) + 10
            >= status.last_log_index;
        if active.contains(learner) && caught_up {
            voters.insert(*learner);
        }
    }
    if voters != status.voters && !voters.is_empty() {
        tracing::info!(?voters, "changing metadata voters");
        ctx.host.change_voters(GroupId::META, voters, true).await?;
    }
    Ok(())
}

/// Replaces replicas on excluded nodes (dead or leaving) with new ones, and
/// adds replicas to groups created when fewer nodes were available. New
/// replicas go only to nodes that answer now (not `unreachable`).
async fn repair_replicas(
    ctx: &Context,
    state: &MetaState,
    exclude: &BTreeSet<NodeId>,
    unreachable: &BTreeSet<NodeId>,
) -> Result<(), kinesin_router::RouterError> {
    let mut load = state.replica_load();
    let usable = state
        .active_nodes()
        .filter(|n| !exclude.contains(&n.id) && !unreachable.contains(&n.id))
        .count();
    for placed in state.placed() {
        // Repair only settled groups: new ones may be making their first
        // membership from the map's replicas, and deleting ones go.
        let (factor, key) = match placed.owner {
            Owner::Shard { stream, shard } if stream.status == StreamStatus::Active => (
                stream.replication_factor,
                format!("{}/{}", stream.name, shard.shard_id.0),
            ),
            Owner::Group { name, spec } if spec.ready => {
                (spec.replication_factor, name.to_string())
            }
            _ => continue,
        };
        let factor = factor as usize;
        let current = placed.replicas;
        let target = factor.min(usable).max(current.len().min(factor));
        let keep: Vec<NodeId> = current
            .iter()
            .filter(|r| !exclude.contains(r))
            .copied()
            .collect();
        if keep.len() == current.len() && keep.len() >= target {
            continue;
        }
        let mut avoid: BTreeSet<NodeId> = exclude.union(unreachable).copied().collect();
        avoid.extend(keep.iter().copied());
        let missing = target.saturating_sub(keep.len());
        let added = place_replicas(state, &key, missing, &avoid, &mut load);
        let mut replicas = keep;
        replicas.extend(added);
        if replicas.is_empty() || replicas == current {
            continue;
        }
        tracing::info!(group = %placed.group, %key, ?replicas, "re-placing replicas");
        let command = match placed.owner {
            Owner::Shard { stream, shard } => MetaCommand::SetReplicas {
                stream: stream.name.to_string(),
                shard: shard.shard_id,
                replicas,
            },
            Owner::Group { name, .. } => MetaCommand::SetGroupReplicas {
                name: name.to_string(),
                replicas,
            },
        };
        ctx.router.meta_write(command).await?;
    }
    Ok(())
}
