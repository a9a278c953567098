//! The shard state machine: appends batches of records under deterministic
//! sequence numbers, seals, trims by retention, and serves reads from the
//! local replica's applied state.

mod command;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(test)]
mod model;
mod read;
mod state_machine;

pub use command::{NewRecord, ShardCommand, ShardRejection, ShardReply, StoredRecord};
pub use read::{ReadBatch, ReadStart};
pub use state_machine::{ShardStateMachine, ShardStats};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("shard is sealed and accepts no more records")]
    Sealed,
    #[error("sequence number {0} does not belong to this shard")]
    ForeignSequenceNumber(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("corrupt reply from the state machine: {0}")]
    Corrupt(String),
}

impl From<kinesin_storage::StorageError> for ShardError {
    fn from(e: kinesin_storage::StorageError) -> Self {
        ShardError::Storage(e.to_string())
    }
}
