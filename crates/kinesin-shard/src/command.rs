//! Commands of a shard group and their replies, as replicated bytes.

use serde::{Deserialize, Serialize};

use crate::ShardError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewRecord {
    pub partition_key: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A record as stored and returned to readers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub partition_key: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Milliseconds since the Unix epoch, stamped by the leader.
    pub arrival_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// Appends records; `arrival_ms` is the leader's clock when it proposed.
    Append {
        arrival_ms: u64,
        records: Vec<NewRecord>,
    },
    /// Closes the shard for writes (a reshard made it a parent).
    Seal,
    /// Drops records below `horizon`, which the leader computed as the
    /// first record that arrived at or after `before_ms` (retention), and
    /// the time-index entries before `before_ms`. The horizon travels in
    /// the command because a replica applying a backlog in one batch cannot
    /// see that batch's own records in storage: computing it at apply time
    /// made replicas disagree.
    Trim { before_ms: u64, horizon: u128 },
}

impl ShardCommand {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ShardError> {
        postcard::from_bytes(bytes).map_err(|e| ShardError::Corrupt(e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardReply {
    /// The records got `first`, `first + 1`, … in request order (the
    /// position field of the sequence number counts them).
    Appended {
        first: u128,
        count: u32,
    },
    Sealed {
        ending: Option<u128>,
    },
    Trimmed {
        horizon: u128,
    },
    Rejected(ShardRejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardRejection {
    Sealed,
    Malformed,
}

impl ShardReply {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ShardError> {
        postcard::from_bytes(bytes).map_err(|e| ShardError::Corrupt(e.to_string()))
    }
}
