//! Fast failover. When the failure detector (`kinesin_router::liveness`)
//! finds a node down, the replicas of every group it led stop waiting out
//! its leader lease and hold an election at once, instead of each group
//! waiting for its own timer (lease plus election timeout: 7.5–10 s with the
//! default shard timing). So do the replicas of a group without a leader
//! that has a voter on a down node (a group created just before or while
//! the node is down, whose first vote went to a replica that had not
//! started it yet). The surviving voters take turns by a rank that
//! differs per group, so that new leaders spread over the survivors and
//! two candidates rarely split a vote; pre-vote keeps a replica with a
//! stale log, or one that is wrong about the death, from disturbing anyone.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinesin_raft::{RaftHost, Role};
use kinesin_router::Router;
use kinesin_types::{GroupId, NodeId};
use tokio::sync::watch;

const EVERY: Duration = Duration::from_millis(100);
/// How long the survivor ranked k waits (k times this) before it runs.
const STAGGER: Duration = Duration::from_millis(300);
/// Pause between two election attempts of one replica.
const RETRY: Duration = Duration::from_millis(600);

/// A group whose leader is on a down node, as this replica sees it.
struct Orphan {
    dead: NodeId,
    since: Instant,
    lease_ended: bool,
    last_election: Option<Instant>,
}

pub(crate) async fn run_failover(
    host: RaftHost,
    router: Arc<Router>,
    mut stop: watch::Receiver<bool>,
) {
    let mut orphans: HashMap<GroupId, Orphan> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let down = router.liveness().down();
        if down.is_empty() {
            orphans.clear();
            continue;
        }
        let me = host.node_id();
        for group in host.group_ids() {
            let Some(status) = host.status(group) else {
                orphans.remove(&group);
                continue;
            };
            match status.leader {
                _ if status.role == Role::Leader => {
                    orphans.remove(&group);
                    continue;
                }
                Some(leader) if down.contains(&leader) => {
                    orphans.entry(group).or_insert_with(|| Orphan {
                        dead: leader,
                        since: Instant::now(),
                        lease_ended: false,
                        last_election: None,
                    });
                }
                Some(_) => {
                    orphans.remove(&group);
                    continue;
                }
                // Leaderless with a voter down (a new group whose first
                // candidate asked a replica that had not started it yet):
                // the survivors campaign now instead of on their timers.
                None if !orphans.contains_key(&group) => {
                    let Some(dead) = status.voters.iter().find(|v| down.contains(v)) else {
                        continue;
                    };
                    orphans.insert(
                        group,
                        Orphan {
                            dead: *dead,
                            since: Instant::now(),
                            lease_ended: true,
                            last_election: None,
                        },
                    );
                }
                None => {}
            }
            let Some(orphan) = orphans.get_mut(&group) else {
                continue;
            };
            if !orphan.lease_ended {
                match host.forget_dead_leader(group, orphan.dead).await {
                    Ok(_) => orphan.lease_ended = true,
                    Err(e) => {
                        tracing::debug!(%group, error = %e, "cannot end the dead leader's lease");
                        continue;
                    }
                }
            }
            let live: BTreeSet<NodeId> = status
                .voters
                .iter()
                .copied()
                .filter(|v| !down.contains(v))
                .collect();
            let Some(rank) = rank(group, &live, me) else {
                continue;
            };
            let turn = orphan.since.elapsed() >= STAGGER * rank;
            let rested = orphan.last_election.is_none_or(|t| t.elapsed() >= RETRY);
            if turn && rested {
                orphan.last_election = Some(Instant::now());
                if let Err(e) = host.elect(group).await {
                    tracing::debug!(%group, error = %e, "cannot start an election");
                }
            }
        }
        orphans.retain(|g, _| host.has_group(*g));
    }
}

/// This node's turn among the live voters of `group` (None: not a voter).
/// The order is a hash of group and node, so it differs per group.
fn rank(group: GroupId, live: &BTreeSet<NodeId>, me: NodeId) -> Option<u32> {
    let key = |n: &NodeId| (group.0 ^ n.0.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut order: Vec<NodeId> = live.iter().copied().collect();
    order.sort_by_key(key);
    order.iter().position(|n| *n == me).map(|p| p as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_voter_has_its_own_turn_and_first_turns_spread() {
        let live: BTreeSet<NodeId> = [NodeId(2), NodeId(3)].into();
        let mut first = HashMap::new();
        for g in 1..=100 {
            let group = GroupId(g);
            let ranks: BTreeSet<u32> = live.iter().filter_map(|n| rank(group, &live, *n)).collect();
            assert_eq!(ranks, [0, 1].into());
            let leader = live
                .iter()
                .find(|n| rank(group, &live, **n) == Some(0))
                .unwrap();
            *first.entry(*leader).or_insert(0) += 1;
            assert_eq!(rank(group, &live, NodeId(1)), None);
        }
        assert!(first.values().all(|n| *n >= 30), "{first:?}");
    }
}
