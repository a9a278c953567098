//! Replica placement. The stored assignment is the truth; this only proposes
//! one. Candidates are ordered by load first, then by zones not yet used,
//! then by their position on a consistent-hash ring walked from the shard's
//! key (so ties break the same way for the same shard).

use std::collections::{BTreeMap, BTreeSet};

use hashring::HashRing;
use kinesin_types::NodeId;

use crate::state::{MetaState, NodeInfo};

/// Chooses `count` distinct replicas for `key` among the active nodes,
/// excluding `exclude`, never two on one node. `load` counts replicas per node
/// and is updated with the choice. Returns fewer when too few nodes exist.
pub fn place_replicas(
    state: &MetaState,
    key: &str,
    count: usize,
    exclude: &BTreeSet<NodeId>,
    load: &mut BTreeMap<NodeId, usize>,
) -> Vec<NodeId> {
    let candidates: Vec<&NodeInfo> = state
        .active_nodes()
        .filter(|n| !exclude.contains(&n.id))
        .collect();
    let mut ring = HashRing::new();
    for n in &candidates {
        ring.add(n.id.0);
    }
    let ring_order: Vec<u64> = ring
        .get_with_replicas(&key, candidates.len())
        .unwrap_or_default();
    let rank = |id: NodeId| {
        ring_order
            .iter()
            .position(|&n| n == id.0)
            .unwrap_or(usize::MAX)
    };
    let mut chosen: Vec<NodeId> = Vec::new();
    let mut zones: BTreeSet<String> = BTreeSet::new();
    while chosen.len() < count {
        let best = candidates
            .iter()
            .filter(|n| !chosen.contains(&n.id))
            .min_by_key(|n| {
                (
                    load.get(&n.id).copied().unwrap_or(0),
                    zones.contains(&n.zone),
                    rank(n.id),
                )
            });
        let Some(best) = best else { break };
        chosen.push(best.id);
        zones.insert(best.zone.clone());
        *load.entry(best.id).or_default() += 1;
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NodeState;

    fn state(nodes: &[(u64, &str)]) -> MetaState {
        let mut s = MetaState::default();
        for (id, zone) in nodes {
            s.nodes.insert(
                NodeId(*id),
                NodeInfo {
                    id: NodeId(*id),
                    raft_addr: String::new(),
                    api_addr: String::new(),
                    zone: zone.to_string(),
                    state: NodeState::Active,
                },
            );
        }
        s
    }

    #[test]
    fn replicas_are_distinct_balanced_and_zone_striped() {
        let s = state(&[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")]);
        let mut load = BTreeMap::new();
        for shard in 0..60 {
            let r = place_replicas(
                &s,
                &format!("orders/{shard}"),
                3,
                &BTreeSet::new(),
                &mut load,
            );
            assert_eq!(r.len(), 3);
            let distinct: BTreeSet<_> = r.iter().collect();
            assert_eq!(distinct.len(), 3, "two replicas on one node: {r:?}");
            let zones: BTreeSet<_> = r.iter().map(|id| s.nodes[id].zone.clone()).collect();
            assert_eq!(zones.len(), 3, "replicas not spread over zones: {r:?}");
        }
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "unbalanced load {load:?}");
    }

    #[test]
    fn too_few_nodes_gives_fewer_replicas_and_exclusions_hold() {
        let s = state(&[(1, "a"), (2, "a")]);
        let mut load = BTreeMap::new();
        let r = place_replicas(&s, "x/0", 3, &BTreeSet::new(), &mut load);
        assert_eq!(r.len(), 2);
        let r = place_replicas(&s, "x/1", 3, &BTreeSet::from([NodeId(1)]), &mut load);
        assert_eq!(r, vec![NodeId(2)]);
    }
}
