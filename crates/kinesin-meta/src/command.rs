//! Commands of the metadata group and their replies.

use std::collections::BTreeMap;

use kinesin_types::{HashKeyRange, NodeId, SequenceNumber, ShardId, StreamMode};
use serde::{Deserialize, Serialize};

use crate::limits::{Limits, LIMITS_VERSION};
use crate::state::{NodeInfo, NodeState};
use crate::token_key::{TokenKey, TOKEN_KEY_VERSION};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// First command of a new cluster.
    Bootstrap {
        cluster_id: String,
    },
    /// Adds a node or updates its addresses.
    RegisterNode(NodeInfo),
    SetNodeState {
        node: NodeId,
        state: NodeState,
    },
    /// Creates a stream with default settings (see [`NewStream`]); written
    /// by releases before `CreateStreamWithSettings`.
    CreateStream {
        name: String,
        shard_count: u32,
        retention_hours: u32,
        max_record_bytes: u32,
        replication_factor: u32,
        now_ms: u64,
        placements: Vec<Vec<NodeId>>,
    },
    DeleteStream {
        name: String,
    },
    /// Replaces a shard's replica set (repair, node removal).
    SetReplicas {
        stream: String,
        shard: ShardId,
        replicas: Vec<NodeId>,
    },
    /// Closes `parents` for writes and opens `children` in their place
    /// (SplitShard, MergeShards, UpdateShardCount). The stream is UPDATING
    /// until every parent's group is sealed (`ShardSealed`).
    Reshard {
        stream: String,
        parents: Vec<ShardId>,
        children: Vec<NewShard>,
    },
    /// A parent's group sealed itself; `ending` is its last sequence number.
    ShardSealed {
        stream: String,
        shard: ShardId,
        ending: Option<SequenceNumber>,
    },
    /// Changes a stream attribute that leaves the shard map alone.
    UpdateStream {
        name: String,
        change: StreamChange,
    },
    /// Every open shard of the stream had a leader answering when the map
    /// was at `epoch`: a CREATING stream becomes ACTIVE, and so does an
    /// UPDATING one whose resharded parents are all sealed. Ignored if the
    /// map changed since (another check follows). Kept last: postcard numbers
    /// the variants, so older logs still decode.
    StreamReady {
        stream: String,
        epoch: u64,
    },
    /// Creates a group of a registered kind; `replicas` were placed by the
    /// proposer, the preferred leader first.
    CreateGroup {
        name: String,
        kind: String,
        replicas: Vec<NodeId>,
        replication_factor: u32,
        config: Vec<u8>,
    },
    DeleteGroup {
        name: String,
    },
    /// Replaces a group's replica set.
    SetGroupReplicas {
        name: String,
        replicas: Vec<NodeId>,
    },
    /// The group had a leader answering (see [`crate::GroupSpec::ready`]).
    GroupReady {
        name: String,
    },
    /// Creates a stream with the settings CreateStream sets, in one command
    /// so that a stream never exists without them. Replaces `CreateStream`,
    /// which stays for logs written before.
    CreateStreamWithSettings {
        stream: NewStream,
        mode: StreamMode,
        tags: BTreeMap<String, String>,
    },
    /// Applies `command` (an encoded command other than `Limited`) only if
    /// the map keeps `limits` after it; otherwise nothing changes and the
    /// reply is [`MetaError::LimitExceeded`]. See [`Limits`]. The command
    /// is held encoded, and decoded one level at a time, so that a nesting
    /// sent by a hostile peer never recurses a decoder.
    Limited {
        limits: Limits,
        command: Vec<u8>,
    },
    /// Drops a sealed shard whose records are all past the stream's
    /// retention from the map (its replicas then delete its group), so
    /// that reshards do not leave groups behind for good.
    RemoveSealedShard {
        stream: String,
        shard: ShardId,
    },
    /// Gives the cluster its token key, if it has none (the first one
    /// applied stays).
    SetTokenKey {
        key: TokenKey,
    },
    /// A `Reshard` (encoded, as in `Limited`) to apply only if the map
    /// keeps `limits` and keeps at most `closed_shards` closed shards
    /// after it ([`crate::closed_shard_room`]); otherwise nothing changes
    /// and the reply is [`MetaError::LimitExceeded`]. Reshards proposed at
    /// once can each pass a check before proposing by what the others
    /// close; here they are ordered.
    LimitedReshard {
        limits: Limits,
        closed_shards: u32,
        command: Vec<u8>,
    },
}

/// The data version whose releases decode [`MetaCommand::RemoveSealedShard`].
pub const SHARD_REMOVAL_VERSION: u32 = 5;

/// The data version whose releases decode [`MetaCommand::LimitedReshard`].
pub const CLOSED_LIMIT_VERSION: u32 = 8;

/// A stream to create. `placements[i]` holds the replicas of shard i, the
/// preferred leader first; the proposer computed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewStream {
    pub name: String,
    pub shard_count: u32,
    pub retention_hours: u32,
    pub max_record_bytes: u32,
    pub replication_factor: u32,
    pub now_ms: u64,
    pub placements: Vec<Vec<NodeId>>,
}

/// A shard a reshard creates. Its id, group and generation are assigned when
/// the command applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewShard {
    pub range: HashKeyRange,
    pub parent: ShardId,
    pub adjacent_parent: Option<ShardId>,
    pub replicas: Vec<NodeId>,
}

/// One change to a stream's settings; the gateway validated the values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamChange {
    RetentionHours(u32),
    MaxRecordBytes(u32),
    Mode(StreamMode),
    AddTags(BTreeMap<String, String>),
    RemoveTags(Vec<String>),
    EnableMetrics(Vec<String>),
    DisableMetrics(Vec<String>),
    EncryptionKey(Option<String>),
    ResourcePolicy(Option<String>),
    RegisterConsumer { name: String, now_ms: u64 },
    DeregisterConsumer(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("stream {0} already exists")]
    StreamExists(String),
    #[error("stream {0} not found")]
    StreamNotFound(String),
    #[error("shard {0} not found")]
    ShardNotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("group {0} already exists")]
    GroupExists(String),
    #[error("group {0} not found")]
    GroupNotFound(String),
    /// A [`MetaCommand::Limited`] would have passed one of its limits.
    #[error("{0}")]
    LimitExceeded(String),
}

pub type MetaReply = Result<(), MetaError>;

impl MetaCommand {
    /// The data version whose releases first decode this command. A node of
    /// an older release cannot apply it (its map would silently lack the
    /// change), so it is proposed only once every node runs at least this
    /// version (`Router::cluster_data_version`).
    pub fn introduced_in(&self) -> u32 {
        match self {
            MetaCommand::CreateGroup { .. }
            | MetaCommand::DeleteGroup { .. }
            | MetaCommand::SetGroupReplicas { .. }
            | MetaCommand::GroupReady { .. }
            | MetaCommand::CreateStreamWithSettings { .. } => 3,
            // A key qualified by its account (`names.rs`).
            MetaCommand::CreateStream { name, .. } if name.contains(':') => 3,
            // One level only: a nested one is refused where it applies,
            // and following it here would recurse as deep as a peer likes.
            MetaCommand::Limited { command, .. } => match MetaCommand::decode(command) {
                Ok(MetaCommand::Limited { .. }) | Err(_) => LIMITS_VERSION,
                Ok(inner) => inner.introduced_in().max(LIMITS_VERSION),
            },
            MetaCommand::RemoveSealedShard { .. } => SHARD_REMOVAL_VERSION,
            MetaCommand::SetTokenKey { .. } => TOKEN_KEY_VERSION,
            MetaCommand::LimitedReshard { .. } => CLOSED_LIMIT_VERSION,
            _ => 1,
        }
    }

    /// `self` to apply only if the map keeps `limits`.
    pub fn limited(self, limits: Limits) -> MetaCommand {
        MetaCommand::Limited {
            limits,
            command: self.encode(),
        }
    }

    /// `self`, a reshard, to apply only if the map keeps `limits` and at
    /// most `closed_shards` closed shards.
    pub fn limited_reshard(self, limits: Limits, closed_shards: u32) -> MetaCommand {
        MetaCommand::LimitedReshard {
            limits,
            closed_shards,
            command: self.encode(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        postcard::from_bytes(bytes)
            .map_err(|e| MetaError::Invalid(format!("undecodable command: {e}")))
    }
}

pub fn encode_reply(reply: &MetaReply) -> Vec<u8> {
    postcard::to_stdvec(reply).expect("encoding to a Vec cannot fail")
}

pub fn decode_reply(bytes: &[u8]) -> MetaReply {
    postcard::from_bytes(bytes)
        .unwrap_or_else(|e| Err(MetaError::Invalid(format!("undecodable reply: {e}"))))
}
