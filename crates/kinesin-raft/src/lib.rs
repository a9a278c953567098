//! Multi-Raft: every Raft group of a node (the metadata group, one group per
//! shard replica, groups of registered kinds) on one RocksDB and one set of peer connections. This is
//! the only crate that names openraft types; the rest of Kinesin sees groups,
//! commands as bytes, and [`GroupStateMachine`].

pub mod blocking_reads;
pub mod clock;
mod host;
pub mod inspect;
mod kinds;
mod log_store;
mod network;
mod snapshot_schedule;
mod state_machine;
mod types;

pub use host::{
    ForwardHandler, GroupStatus, RaftHost, RaftHostError, RaftService, Role, TimingProfile,
};
pub use kinds::{GroupKind, GroupKinds};
pub use network::{FilterAction, ForwardError, NoFilter, TransportFilter};
pub use state_machine::{
    delete_group_state, split_stamp, FixedRows, GroupStateMachine, SnapshotRows,
};

#[cfg(test)]
mod conformance;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(test)]
mod robustness;
