//! Domain types and pure logic shared by every Kinesin crate: names, hash
//! keys and their ranges, MD5 routing, the sequence-number codec and the
//! shard map. Nothing here does IO, reads the clock or draws randomness.

mod address;
mod hash;
mod names;
mod sequence;
mod shard_map;

pub use address::{validate_api_address, validate_node_address};
pub use hash::{hash_key_for_partition_key, HashKey, HashKeyRange};
pub use names::{GroupId, NodeId, ShardId, StreamName};
pub use sequence::{SequenceNumber, MAX_RECORDS_PER_ENTRY};
pub use shard_map::{ShardInfo, ShardState, StreamInfo, StreamMode, StreamSettings, StreamStatus};

/// A value that failed validation, with a message meant for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// Largest record (data plus partition key) a stream accepts unless it raised
/// its limit: 1 MiB, as AWS Kinesis.
pub const DEFAULT_MAX_RECORD_BYTES: u32 = 1024 * 1024;
/// Largest record any stream may raise its limit to: 10 MiB, as AWS Kinesis.
pub const MAX_RECORD_BYTES_LIMIT: u32 = 10 * 1024 * 1024;
