//! The openraft type configuration shared by every group of the node. The
//! application payload is opaque bytes: each group's state machine decodes
//! its own commands.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An encoded command of some group's state machine.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

// Log lines must not carry megabytes of record data.
impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The state machine's encoded answer to a command.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reply(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reply({} bytes)", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// One configuration for the metadata group and every shard group.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, crate::state_machine::StateMachineStore>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot =
    openraft::type_config::alias::SnapshotOf<TypeConfig, crate::state_machine::GroupSnapshot>;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding to a Vec cannot fail")
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(
    what: &'static str,
    bytes: &'a [u8],
) -> std::io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("corrupt {what}: {e}"),
        )
    })
}
