//! The cluster map.

use std::collections::BTreeMap;

use kinesin_types::{GroupId, NodeId, ShardInfo, StreamInfo, StreamMode};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Holds replicas and takes leadership.
    Active,
    /// Leaving gracefully: takes no new replicas, hands leadership away.
    Draining,
    /// Gone: removed by an operator or declared dead by the controller.
    Removed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Address of the internal gRPC port (Raft traffic and the native API).
    pub raft_addr: String,
    /// Address of the AWS-compatible HTTP port.
    pub api_addr: String,
    pub zone: String,
    pub state: NodeState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub cluster_id: String,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub streams: BTreeMap<String, StreamInfo>,
    /// Next free shard-group id (0 is the metadata group).
    pub next_group: u64,
    /// Log index of the last applied command, for freshness checks.
    pub applied_index: u64,
}

impl MetaState {
    /// Open shards of every stream (the cluster's shard limit counts them).
    pub fn open_shard_count(&self) -> usize {
        self.streams
            .values()
            .map(StreamInfo::open_shard_count)
            .sum()
    }

    /// Streams in ON_DEMAND mode.
    pub fn on_demand_stream_count(&self) -> usize {
        self.streams
            .values()
            .filter(|s| s.settings.mode == StreamMode::OnDemand)
            .count()
    }

    pub fn active_nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values().filter(|n| n.state == NodeState::Active)
    }

    /// Every shard, with its stream name.
    pub fn shards(&self) -> impl Iterator<Item = (&str, &ShardInfo)> {
        self.streams
            .iter()
            .flat_map(|(name, s)| s.shards.iter().map(move |sh| (name.as_str(), sh)))
    }

    pub fn shard_by_group(&self, group: GroupId) -> Option<(&StreamInfo, &ShardInfo)> {
        self.streams.values().find_map(|s| {
            s.shards
                .iter()
                .find(|sh| sh.group == group)
                .map(|sh| (s, sh))
        })
    }

    /// Replicas hosted per node, counting every shard.
    pub fn replica_load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.active_nodes().map(|n| (n.id, 0)).collect();
        for (_, shard) in self.shards() {
            for r in &shard.replicas {
                *load.entry(*r).or_default() += 1;
            }
        }
        load
    }
}
