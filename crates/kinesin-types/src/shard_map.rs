//! The shard map of a stream as the metadata group stores it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{GroupId, HashKey, HashKeyRange, NodeId, SequenceNumber, ShardId, StreamName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    /// Accepts writes.
    Open,
    /// Closed by a reshard in the map; its leader has yet to seal the group
    /// and report the ending sequence number. Receives no new writes.
    Sealing,
    /// Closed by a reshard; readable until retention removes its records.
    Sealed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub shard_id: ShardId,
    /// The Raft group that stores this shard.
    pub group: GroupId,
    pub range: HashKeyRange,
    pub state: ShardState,
    pub parent: Option<ShardId>,
    pub adjacent_parent: Option<ShardId>,
    /// Generation of the shard: 0 at creation, max(parents) + 1 after a reshard.
    pub generation: u32,
    /// Nodes holding a replica, as the controller assigned them.
    pub replicas: Vec<NodeId>,
    /// Set when the shard is sealed: its last sequence number, if it had records.
    pub ending_sequence: Option<SequenceNumber>,
}

impl ShardInfo {
    pub fn starting_sequence(&self) -> SequenceNumber {
        SequenceNumber::first_of(self.generation, self.shard_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamStatus {
    Creating,
    Active,
    Updating,
    Deleting,
}

impl StreamStatus {
    pub fn as_aws_str(self) -> &'static str {
        match self {
            StreamStatus::Creating => "CREATING",
            StreamStatus::Active => "ACTIVE",
            StreamStatus::Updating => "UPDATING",
            StreamStatus::Deleting => "DELETING",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub name: StreamName,
    pub status: StreamStatus,
    /// Milliseconds since the Unix epoch, stamped by the metadata leader.
    pub created_at_ms: u64,
    pub retention_hours: u32,
    pub max_record_bytes: u32,
    /// Replicas each shard should have; the controller adds missing ones
    /// when nodes become available.
    pub replication_factor: u32,
    /// Bumped on every change of the shard map.
    pub epoch: u64,
    pub shards: Vec<ShardInfo>,
    /// What the AWS API sets and reports besides the shard map.
    pub settings: StreamSettings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamMode {
    #[default]
    Provisioned,
    OnDemand,
}

impl StreamMode {
    pub fn as_aws_str(self) -> &'static str {
        match self {
            StreamMode::Provisioned => "PROVISIONED",
            StreamMode::OnDemand => "ON_DEMAND",
        }
    }
}

/// Stream attributes that do not affect where records go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSettings {
    pub mode: StreamMode,
    pub tags: BTreeMap<String, String>,
    /// Enhanced-monitoring metric names as AWS spells them.
    pub shard_level_metrics: BTreeSet<String>,
    /// KMS key id given to StartStreamEncryption. Recorded and reported only:
    /// records are not encrypted at rest.
    pub encryption_key: Option<String>,
    /// Resource policy document (JSON text), stored and returned verbatim.
    pub resource_policy: Option<String>,
    /// Enhanced fan-out consumers: name → registration time (ms).
    pub consumers: BTreeMap<String, u64>,
}

impl StreamInfo {
    /// The retention period in milliseconds.
    pub fn retention_ms(&self) -> u64 {
        u64::from(self.retention_hours) * 3_600_000
    }

    /// CREATING, or UPDATING with every resharded parent sealed: the stream
    /// turns ACTIVE once each open shard has a leader.
    pub fn awaits_leaders(&self) -> bool {
        match self.status {
            StreamStatus::Creating => true,
            StreamStatus::Updating => !self.shards.iter().any(|s| s.state == ShardState::Sealing),
            StreamStatus::Active | StreamStatus::Deleting => false,
        }
    }

    /// The open shard whose range holds `key`.
    pub fn shard_for(&self, key: HashKey) -> Option<&ShardInfo> {
        self.shards
            .iter()
            .find(|s| s.state == ShardState::Open && s.range.contains(key))
    }

    pub fn shard(&self, id: ShardId) -> Option<&ShardInfo> {
        self.shards.iter().find(|s| s.shard_id == id)
    }

    pub fn open_shard_count(&self) -> usize {
        self.shards
            .iter()
            .filter(|s| s.state == ShardState::Open)
            .count()
    }
}
