//! The cluster map.

use std::collections::BTreeMap;

use kinesin_types::{GroupId, NodeId, ShardInfo, StreamInfo, StreamMode};
use serde::{Deserialize, Serialize};

use crate::token_key::TokenKey;

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
    /// Raft groups of other kinds than stream shards (a queue's state, a
    /// test key-value store), by name. Kept last: the data-version 2 → 3
    /// upgrade relies on it (`version/mod.rs`). Defaults when absent so that
    /// tools read the JSON map of an older node.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupSpec>,
    /// The key that signs iterators and paging tokens. Kept last, after
    /// `groups`, for the same reason (`version/mod.rs`).
    #[serde(default)]
    pub token_key: TokenKey,
}

/// A Raft group of a kind registered with the nodes (not a stream shard:
/// those live in their stream's shard map).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub group: GroupId,
    /// Which state machine the group runs; a node that has no kind of that
    /// name registered does not start it.
    pub kind: String,
    /// Replicas, the preferred leader first.
    pub replicas: Vec<NodeId>,
    /// How many replicas the group should have; repair restores it.
    pub replication_factor: u32,
    /// Given to the kind's state machine when a replica opens.
    pub config: Vec<u8>,
    /// A leader answered once: from then on no replica may make the group's
    /// first membership (a replica added later waits to be contacted).
    pub ready: bool,
}

/// One Raft group the map places on nodes: a stream shard or a
/// [`GroupSpec`].
#[derive(Debug, Clone, Copy)]
pub struct Placed<'a> {
    pub group: GroupId,
    pub kind: &'a str,
    pub replicas: &'a [NodeId],
    pub owner: Owner<'a>,
}

#[derive(Debug, Clone, Copy)]
pub enum Owner<'a> {
    Shard {
        stream: &'a StreamInfo,
        shard: &'a ShardInfo,
    },
    Group {
        name: &'a str,
        spec: &'a GroupSpec,
    },
}

impl Owner<'_> {
    /// How operators name the group: `stream/shardId-…` for a shard, the
    /// map name (`sqs/account/queue#k`, …) for any other kind.
    pub fn name(&self) -> String {
        match self {
            Owner::Shard { stream, shard } => format!("{}/{}", stream.name, shard.shard_id),
            Owner::Group { name, .. } => (*name).to_string(),
        }
    }
}

/// The kind name of stream shard groups.
pub const STREAM_KIND: &str = "stream";

impl MetaState {
    /// Open shards of every stream (the cluster's shard limit counts them).
    pub fn open_shard_count(&self) -> usize {
        self.streams
            .values()
            .map(StreamInfo::open_shard_count)
            .sum()
    }

    /// Shards resharding closed (sealing or sealed) that the map still
    /// holds: each keeps its group until its records pass retention.
    pub fn closed_shard_count(&self) -> usize {
        self.streams
            .values()
            .map(|s| s.shards.len() - s.open_shard_count())
            .sum()
    }

    /// Streams in ON_DEMAND mode whose map key `owned` accepts (AWS counts
    /// them per account).
    pub fn on_demand_streams(&self, owned: impl Fn(&str) -> bool) -> usize {
        self.streams
            .iter()
            .filter(|(key, s)| s.settings.mode == StreamMode::OnDemand && owned(key))
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

    /// Every Raft group the map places (not the metadata group).
    pub fn placed(&self) -> impl Iterator<Item = Placed<'_>> {
        let shards = self.streams.values().flat_map(|stream| {
            stream.shards.iter().map(move |shard| Placed {
                group: shard.group,
                kind: STREAM_KIND,
                replicas: &shard.replicas,
                owner: Owner::Shard { stream, shard },
            })
        });
        let groups = self.groups.iter().map(|(name, spec)| Placed {
            group: spec.group,
            kind: &spec.kind,
            replicas: &spec.replicas,
            owner: Owner::Group { name, spec },
        });
        shards.chain(groups)
    }

    /// Does the map place a replica of any group (a stream shard, a queue
    /// partition, a delivery stream's group) on `node`?
    pub fn holds_replicas(&self, node: NodeId) -> bool {
        self.placed().any(|p| p.replicas.contains(&node))
    }

    pub fn placed_group(&self, group: GroupId) -> Option<Placed<'_>> {
        self.placed().find(|p| p.group == group)
    }

    /// Replicas hosted per node, counting every placed group.
    pub fn replica_load(&self) -> BTreeMap<NodeId, usize> {
        let mut load: BTreeMap<NodeId, usize> = self.active_nodes().map(|n| (n.id, 0)).collect();
        for placed in self.placed() {
            for r in placed.replicas {
                *load.entry(*r).or_default() += 1;
            }
        }
        load
    }

    /// How many groups (stream shards, queue partitions, delivery streams'
    /// groups) name each active node their preferred leader.
    pub fn preferred_leads(&self) -> BTreeMap<NodeId, usize> {
        let mut leads: BTreeMap<NodeId, usize> = self.active_nodes().map(|n| (n.id, 0)).collect();
        for placed in self.placed() {
            if let Some(first) = placed.replicas.first() {
                *leads.entry(*first).or_default() += 1;
            }
        }
        leads
    }
}
