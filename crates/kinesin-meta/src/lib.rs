//! The metadata group: the cluster map (nodes, streams, shard maps, replica
//! assignments) as a replicated state machine, and the placement logic the
//! controller on the metadata leader uses to propose assignments.

mod command;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod limits;
mod names;
mod placement;
#[cfg(test)]
mod properties;
pub mod reshard;
mod state;
mod state_machine;
mod token_key;
mod version;

pub use command::{
    decode_reply, MetaCommand, MetaError, MetaReply, NewShard, NewStream, StreamChange,
    CLOSED_LIMIT_VERSION, SHARD_REMOVAL_VERSION,
};
pub use limits::{can_pass_limits, closed_shard_room, open_shard_room, Limits, LIMITS_VERSION};
pub use names::{split_stream_key, stream_key};
pub use placement::place_replicas;
pub use state::{GroupSpec, MetaState, NodeInfo, NodeState, Owner, Placed, STREAM_KIND};
pub use state_machine::MetaStateMachine;
pub use token_key::{TokenKey, TOKEN_KEY_LEN, TOKEN_KEY_VERSION};
