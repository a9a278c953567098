//! Data version 1: the metadata value as releases up to 2026-11-30 wrote it,
//! the bare postcard of these types. Frozen: postcard encodes fields and
//! enum variants by position, so nothing here may change. Newtypes of the
//! live crates (ids, hash keys, sequence numbers) appear as the integers and
//! strings they wrap, which is how postcard encodes them.

use std::collections::{BTreeMap, BTreeSet};

use kinesin_types::{
    GroupId, HashKey, HashKeyRange, NodeId, SequenceNumber, ShardId, ShardInfo, ShardState,
    StreamInfo, StreamMode, StreamName, StreamSettings, StreamStatus,
};
use serde::Deserialize;

use crate::state::{MetaState, NodeInfo, NodeState};

#[derive(Deserialize)]
pub(super) struct MetaStateV1 {
    cluster_id: String,
    nodes: BTreeMap<u64, NodeInfoV1>,
    streams: BTreeMap<String, StreamInfoV1>,
    next_group: u64,
    applied_index: u64,
}

#[derive(Deserialize)]
struct NodeInfoV1 {
    id: u64,
    raft_addr: String,
    api_addr: String,
    zone: String,
    state: NodeStateV1,
}

#[derive(Deserialize)]
enum NodeStateV1 {
    Active,
    Draining,
    Removed,
}

#[derive(Deserialize)]
struct StreamInfoV1 {
    /// Encoded as the string it wraps; stored names were validated.
    name: StreamName,
    status: StreamStatusV1,
    created_at_ms: u64,
    retention_hours: u32,
    max_record_bytes: u32,
    replication_factor: u32,
    epoch: u64,
    shards: Vec<ShardInfoV1>,
    settings: StreamSettingsV1,
}

#[derive(Deserialize)]
enum StreamStatusV1 {
    Creating,
    Active,
    Updating,
    Deleting,
}

#[derive(Deserialize)]
struct ShardInfoV1 {
    shard_id: u32,
    group: u64,
    range: (u128, u128),
    state: ShardStateV1,
    parent: Option<u32>,
    adjacent_parent: Option<u32>,
    generation: u32,
    replicas: Vec<u64>,
    ending_sequence: Option<u128>,
}

#[derive(Deserialize)]
enum ShardStateV1 {
    Open,
    Sealing,
    Sealed,
}

#[derive(Deserialize)]
struct StreamSettingsV1 {
    mode: StreamModeV1,
    tags: BTreeMap<String, String>,
    shard_level_metrics: BTreeSet<String>,
    encryption_key: Option<String>,
    resource_policy: Option<String>,
    consumers: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
enum StreamModeV1 {
    Provisioned,
    OnDemand,
}

impl MetaStateV1 {
    /// The step to data version 2, which changed only the encoding.
    pub(super) fn upgrade(self) -> MetaState {
        MetaState {
            cluster_id: self.cluster_id,
            nodes: self
                .nodes
                .into_iter()
                .map(|(id, n)| (NodeId(id), n.upgrade()))
                .collect(),
            streams: self
                .streams
                .into_iter()
                .map(|(name, s)| (name, s.upgrade()))
                .collect(),
            next_group: self.next_group,
            applied_index: self.applied_index,
            groups: Default::default(),
            token_key: Default::default(),
        }
    }
}

impl NodeInfoV1 {
    fn upgrade(self) -> NodeInfo {
        NodeInfo {
            id: NodeId(self.id),
            raft_addr: self.raft_addr,
            api_addr: self.api_addr,
            zone: self.zone,
            state: match self.state {
                NodeStateV1::Active => NodeState::Active,
                NodeStateV1::Draining => NodeState::Draining,
                NodeStateV1::Removed => NodeState::Removed,
            },
        }
    }
}

impl StreamInfoV1 {
    fn upgrade(self) -> StreamInfo {
        StreamInfo {
            name: self.name,
            status: match self.status {
                StreamStatusV1::Creating => StreamStatus::Creating,
                StreamStatusV1::Active => StreamStatus::Active,
                StreamStatusV1::Updating => StreamStatus::Updating,
                StreamStatusV1::Deleting => StreamStatus::Deleting,
            },
            created_at_ms: self.created_at_ms,
            retention_hours: self.retention_hours,
            max_record_bytes: self.max_record_bytes,
            replication_factor: self.replication_factor,
            epoch: self.epoch,
            shards: self.shards.into_iter().map(ShardInfoV1::upgrade).collect(),
            settings: StreamSettings {
                mode: match self.settings.mode {
                    StreamModeV1::Provisioned => StreamMode::Provisioned,
                    StreamModeV1::OnDemand => StreamMode::OnDemand,
                },
                tags: self.settings.tags,
                shard_level_metrics: self.settings.shard_level_metrics,
                encryption_key: self.settings.encryption_key,
                resource_policy: self.settings.resource_policy,
                consumers: self.settings.consumers,
            },
        }
    }
}

impl ShardInfoV1 {
    fn upgrade(self) -> ShardInfo {
        ShardInfo {
            shard_id: ShardId(self.shard_id),
            group: GroupId(self.group),
            range: HashKeyRange {
                start: HashKey(self.range.0),
                end: HashKey(self.range.1),
            },
            state: match self.state {
                ShardStateV1::Open => ShardState::Open,
                ShardStateV1::Sealing => ShardState::Sealing,
                ShardStateV1::Sealed => ShardState::Sealed,
            },
            parent: self.parent.map(ShardId),
            adjacent_parent: self.adjacent_parent.map(ShardId),
            generation: self.generation,
            replicas: self.replicas.into_iter().map(NodeId).collect(),
            ending_sequence: self.ending_sequence.map(SequenceNumber),
        }
    }
}
