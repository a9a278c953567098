//! Handing leadership to the group's preferred leader (the first replica
//! of the map) once it has caught up, or away from a node that is leaving
//! or whose disk is full.

use std::sync::Mutex;
use std::time::Duration;

use kinesin_meta::{MetaState, NodeState};
use kinesin_raft::GroupStatus;
use kinesin_types::NodeId;

use super::{take_turn, JobState, Led};
use crate::reconcile::Context;

/// At most one hand-off per group this often.
const TRANSFER_EVERY: Duration = Duration::from_secs(30);
/// A follower within this many entries of the leader's log has caught up.
const CAUGHT_UP_ENTRIES: u64 = 2;
/// A follower that acknowledged within this long is answering.
const ANSWERING_MS: u64 = 2_000;

/// Where this leader (`me`) should hand the group's leadership, if
/// anywhere: to the preferred leader when it is active, caught up and
/// answering; to any other voter when this node is leaving.
fn target(
    me: NodeId,
    state: &MetaState,
    replicas: &[NodeId],
    status: &GroupStatus,
) -> Option<NodeId> {
    let preferred = *replicas.first()?;
    let preferred_ready = preferred != me
        && state
            .nodes
            .get(&preferred)
            .is_some_and(|n| n.state == NodeState::Active)
        && status
            .follower_matched
            .get(&preferred)
            .copied()
            .unwrap_or(0)
            + CAUGHT_UP_ENTRIES
            >= status.last_log_index
        && status
            .follower_ack_age_ms
            .get(&preferred)
            .copied()
            .flatten()
            .is_some_and(|ms| ms < ANSWERING_MS);
    if preferred_ready {
        return Some(preferred);
    }
    let leaving = state
        .nodes
        .get(&me)
        .is_some_and(|n| n.state != NodeState::Active);
    if leaving {
        return status.voters.iter().find(|v| **v != me).copied();
    }
    None
}

/// Where a leader whose disk is full hands the group: the voter that
/// answered last (it refuses proposals and cannot append; the others can).
fn away_from_full_disk(me: NodeId, status: &GroupStatus) -> Option<NodeId> {
    status
        .voters
        .iter()
        .filter(|v| **v != me)
        .filter_map(|v| {
            let age = status.follower_ack_age_ms.get(v).copied().flatten()?;
            (age < ANSWERING_MS).then_some((age, *v))
        })
        .min()
        .map(|(_, v)| v)
}

/// Starts a hand-off if one is due; returns whether it did.
pub(super) async fn run(ctx: &Context, jobs: &Mutex<JobState>, led: &Led<'_>) -> bool {
    let me = ctx.host.node_id();
    let to = if ctx.host.disk_full() {
        away_from_full_disk(me, led.status)
    } else {
        target(me, led.state, led.replicas, led.status)
    };
    let Some(to) = to else {
        return false;
    };
    if !take_turn(
        &mut jobs.lock().expect("jobs lock").last_transfer,
        led.group,
        TRANSFER_EVERY,
    ) {
        return false;
    }
    tracing::info!(group = %led.group, to = to.0, "handing leadership to the preferred leader");
    let _ = ctx.host.transfer_leader(led.group, to).await;
    true
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use kinesin_meta::NodeInfo;
    use kinesin_raft::Role;
    use kinesin_types::GroupId;

    use super::*;

    fn map(states: &[(u64, NodeState)]) -> MetaState {
        let mut state = MetaState::default();
        for (id, ns) in states {
            state.nodes.insert(
                NodeId(*id),
                NodeInfo {
                    id: NodeId(*id),
                    raft_addr: String::new(),
                    api_addr: String::new(),
                    zone: String::new(),
                    state: *ns,
                },
            );
        }
        state
    }

    /// Node 1 leads a group of 1, 2, 3 at log index 100; node 2 has
    /// `matched` and last answered `ack_ms` ago.
    fn status(matched: u64, ack_ms: Option<u64>) -> GroupStatus {
        GroupStatus {
            group: GroupId(5),
            role: Role::Leader,
            leader: Some(NodeId(1)),
            term: 3,
            last_log_index: 100,
            applied_index: 100,
            purged_index: None,
            snapshot_index: None,
            voters: BTreeSet::from([NodeId(1), NodeId(2), NodeId(3)]),
            joint: false,
            learners: BTreeSet::new(),
            addresses: BTreeMap::new(),
            follower_ack_age_ms: BTreeMap::from([(NodeId(2), ack_ms), (NodeId(3), Some(10))]),
            follower_matched: BTreeMap::from([(NodeId(2), matched), (NodeId(3), 100)]),
        }
    }

    const ACTIVE: [(u64, NodeState); 3] = [
        (1, NodeState::Active),
        (2, NodeState::Active),
        (3, NodeState::Active),
    ];
    const ME: NodeId = NodeId(1);
    const PREFERS_2: [NodeId; 3] = [NodeId(2), NodeId(1), NodeId(3)];

    #[test]
    fn a_caught_up_answering_preferred_leader_gets_the_leadership() {
        let state = map(&ACTIVE);
        assert_eq!(
            target(ME, &state, &PREFERS_2, &status(99, Some(50))),
            Some(NodeId(2))
        );
    }

    #[test]
    fn a_lagging_silent_or_inactive_preferred_leader_does_not() {
        let state = map(&ACTIVE);
        assert_eq!(target(ME, &state, &PREFERS_2, &status(90, Some(50))), None);
        assert_eq!(
            target(ME, &state, &PREFERS_2, &status(100, Some(5_000))),
            None
        );
        assert_eq!(target(ME, &state, &PREFERS_2, &status(100, None)), None);
        let draining_2 = map(&[
            (1, NodeState::Active),
            (2, NodeState::Draining),
            (3, NodeState::Active),
        ]);
        assert_eq!(
            target(ME, &draining_2, &PREFERS_2, &status(100, Some(5))),
            None
        );
    }

    #[test]
    fn the_preferred_leader_keeps_it_and_a_leaving_leader_hands_it_on() {
        let state = map(&ACTIVE);
        let prefers_me = [NodeId(1), NodeId(2), NodeId(3)];
        assert_eq!(target(ME, &state, &prefers_me, &status(100, Some(5))), None);
        let leaving = map(&[
            (1, NodeState::Draining),
            (2, NodeState::Active),
            (3, NodeState::Active),
        ]);
        assert_eq!(
            target(ME, &leaving, &prefers_me, &status(0, None)),
            Some(NodeId(2))
        );
    }

    #[test]
    fn a_leader_with_a_full_disk_hands_to_the_freshest_answering_voter() {
        // Node 3 answered 10 ms ago, node 2 50 ms ago.
        assert_eq!(
            away_from_full_disk(ME, &status(100, Some(50))),
            Some(NodeId(3))
        );
        // Node 2 answered more recently; a caught-up log is not required
        // (the leader can append nothing itself).
        assert_eq!(
            away_from_full_disk(ME, &status(0, Some(1))),
            Some(NodeId(2))
        );
        let mut silent = status(100, None);
        silent
            .follower_ack_age_ms
            .insert(NodeId(3), Some(ANSWERING_MS + 1));
        assert_eq!(away_from_full_disk(ME, &silent), None);
    }
}
