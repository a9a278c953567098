//! Reshard plans: which open shards of a stream close and which shards open
//! in their place, for a split, a merge, or UpdateShardCount's uniform
//! scaling. Pure functions of the stream's shard map, so that the API, the
//! CLI and workers plan the same way; a plan becomes one `Reshard` command.

use kinesin_types::{HashKey, HashKeyRange, ShardId, ShardInfo, ShardState, StreamInfo};

use crate::command::{MetaCommand, NewShard};

/// Why a reshard cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("shard {0} is closed and cannot be resharded")]
    Closed(ShardId),
    #[error("the new starting hash key is not inside the range of {shard}: {reason}")]
    KeyOutside { shard: ShardId, reason: String },
    #[error("shards {0} and {1} are not adjacent and cannot be merged")]
    NotAdjacent(ShardId, ShardId),
    #[error(
        "uniform scaling can at most double or halve the open shards: {current} open, {target} requested"
    )]
    TooFar { current: usize, target: usize },
    #[error(
        "scaling from {current} to {target} shards would give a new shard more than two parents; scale in smaller steps"
    )]
    TooManyParents { current: usize, target: usize },
}

/// The shards a reshard closes and those it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub parents: Vec<ShardId>,
    pub children: Vec<NewShard>,
}

impl Plan {
    /// How many more shards are open once the plan is applied (negative
    /// when it closes more than it opens).
    pub fn open_change(&self) -> isize {
        self.children.len() as isize - self.parents.len() as isize
    }

    /// The metadata command that applies the plan to `stream`.
    pub fn command(self, stream: &str) -> MetaCommand {
        MetaCommand::Reshard {
            stream: stream.to_string(),
            parents: self.parents,
            children: self.children,
        }
    }
}

fn open(shard: &ShardInfo) -> Result<&ShardInfo, PlanError> {
    if shard.state == ShardState::Open {
        Ok(shard)
    } else {
        Err(PlanError::Closed(shard.shard_id))
    }
}

/// Children keep their parent's replicas: a reshard moves no data.
fn child_of(parent: &ShardInfo, adjacent: Option<&ShardInfo>, range: HashKeyRange) -> NewShard {
    NewShard {
        range,
        parent: parent.shard_id,
        adjacent_parent: adjacent.map(|a| a.shard_id),
        replicas: parent.replicas.clone(),
    }
}

/// `parent` becomes two shards, the upper one starting at `at`.
pub fn split(parent: &ShardInfo, at: HashKey) -> Result<Plan, PlanError> {
    let parent = open(parent)?;
    let (low, high) = parent
        .range
        .split_at(at)
        .map_err(|e| PlanError::KeyOutside {
            shard: parent.shard_id,
            reason: e.0,
        })?;
    Ok(Plan {
        parents: vec![parent.shard_id],
        children: vec![child_of(parent, None, low), child_of(parent, None, high)],
    })
}

/// Two adjacent shards become one.
pub fn merge(first: &ShardInfo, second: &ShardInfo) -> Result<Plan, PlanError> {
    let (first, second) = (open(first)?, open(second)?);
    let range = first
        .range
        .merge(&second.range)
        .map_err(|_| PlanError::NotAdjacent(first.shard_id, second.shard_id))?;
    Ok(Plan {
        parents: vec![first.shard_id, second.shard_id],
        children: vec![child_of(first, Some(second), range)],
    })
}

/// The stream's open shards, lowest hash keys first.
pub(crate) fn open_in_key_order(stream: &StreamInfo) -> Vec<&ShardInfo> {
    let mut open: Vec<&ShardInfo> = stream
        .shards
        .iter()
        .filter(|s| s.state == ShardState::Open)
        .collect();
    open.sort_by_key(|s| s.range.start);
    open
}

/// UNIFORM_SCALING: the open shards become `target` shards of equal ranges.
/// Shards whose range stays the same are kept; each new shard names the (at
/// most two) closed shards it overlaps as parents. `target` is at least 1.
pub fn uniform(stream: &StreamInfo, target: usize) -> Result<Plan, PlanError> {
    let open = open_in_key_order(stream);
    let current = open.len();
    if target == 0 || target > current * 2 || target * 2 < current {
        return Err(PlanError::TooFar { current, target });
    }
    let ranges = HashKeyRange::split_evenly(target as u32);
    let parents: Vec<&ShardInfo> = open
        .iter()
        .copied()
        .filter(|s| !ranges.contains(&s.range))
        .collect();
    let mut children = Vec::new();
    for r in ranges
        .iter()
        .filter(|r| !open.iter().any(|s| s.range == **r))
    {
        let overlapping: Vec<&ShardInfo> = parents
            .iter()
            .copied()
            .filter(|s| s.range.start <= r.end && r.start <= s.range.end)
            .collect();
        match overlapping.as_slice() {
            [p] => children.push(child_of(p, None, *r)),
            [p, a] => children.push(child_of(p, Some(a), *r)),
            _ => return Err(PlanError::TooManyParents { current, target }),
        }
    }
    Ok(Plan {
        parents: parents.iter().map(|s| s.shard_id).collect(),
        children,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesin_types::{GroupId, NodeId, StreamName, StreamStatus};

    fn stream(open_shards: u32) -> StreamInfo {
        let shards = HashKeyRange::split_evenly(open_shards)
            .into_iter()
            .enumerate()
            .map(|(i, range)| ShardInfo {
                shard_id: ShardId(i as u32),
                group: GroupId(i as u64 + 1),
                range,
                state: ShardState::Open,
                parent: None,
                adjacent_parent: None,
                generation: 0,
                replicas: vec![NodeId(i as u64 % 3 + 1)],
                ending_sequence: None,
            })
            .collect();
        StreamInfo {
            name: StreamName::new("s").unwrap(),
            status: StreamStatus::Active,
            created_at_ms: 0,
            retention_hours: 24,
            max_record_bytes: 1 << 20,
            replication_factor: 1,
            epoch: 0,
            shards,
            settings: Default::default(),
        }
    }

    #[test]
    fn a_split_makes_two_children_on_the_parents_replicas() {
        let s = stream(1);
        let plan = split(&s.shards[0], HashKey(1 << 100)).unwrap();
        assert_eq!(plan.parents, vec![ShardId(0)]);
        assert_eq!(plan.children.len(), 2);
        assert_eq!(plan.children[1].range.start, HashKey(1 << 100));
        assert!(plan
            .children
            .iter()
            .all(|c| c.replicas == s.shards[0].replicas));
        assert_eq!(plan.open_change(), 1);
        assert!(matches!(
            split(&s.shards[0], HashKey(0)),
            Err(PlanError::KeyOutside { .. })
        ));
    }

    #[test]
    fn only_open_adjacent_shards_merge() {
        let mut s = stream(3);
        let plan = merge(&s.shards[0], &s.shards[1]).unwrap();
        assert_eq!(plan.children[0].adjacent_parent, Some(ShardId(1)));
        assert_eq!(plan.open_change(), -1);
        assert_eq!(
            merge(&s.shards[0], &s.shards[2]),
            Err(PlanError::NotAdjacent(ShardId(0), ShardId(2)))
        );
        s.shards[1].state = ShardState::Sealed;
        assert_eq!(
            merge(&s.shards[0], &s.shards[1]),
            Err(PlanError::Closed(ShardId(1)))
        );
    }

    #[test]
    fn uniform_scaling_keeps_equal_ranges_and_names_at_most_two_parents() {
        // 2 → 4: every shard splits in two.
        let plan = uniform(&stream(2), 4).unwrap();
        assert_eq!(plan.parents.len(), 2);
        assert_eq!(plan.children.len(), 4);
        assert!(plan.children.iter().all(|c| c.adjacent_parent.is_none()));
        // 4 → 2: pairs merge.
        let plan = uniform(&stream(4), 2).unwrap();
        assert_eq!(plan.children.len(), 2);
        assert!(plan.children.iter().all(|c| c.adjacent_parent.is_some()));
        // 3 → 3 changes nothing; 4 → 3 needs two parents per new shard.
        let same = uniform(&stream(3), 3).unwrap();
        assert!(same.parents.is_empty() && same.children.is_empty());
        let plan = uniform(&stream(4), 3).unwrap();
        assert_eq!(plan.parents.len(), 4);
        let ranges: Vec<HashKeyRange> = plan.children.iter().map(|c| c.range).collect();
        assert_eq!(ranges, HashKeyRange::split_evenly(3));
        assert!(plan.children.iter().all(|c| c.adjacent_parent.is_some()));
        assert_eq!(
            uniform(&stream(2), 5),
            Err(PlanError::TooFar {
                current: 2,
                target: 5
            })
        );
        assert!(matches!(
            uniform(&stream(2), 0),
            Err(PlanError::TooFar { .. })
        ));
    }
}
