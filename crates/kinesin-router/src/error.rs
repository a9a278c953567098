//! Router errors and their form on the internal gRPC API.

use kinesin_types::NodeId;
use tonic::{Code, Status};

/// What went wrong below the API, named for what happened rather than for
/// any service: each service's error table in the gateway gives them the
/// names its clients know (`kinesin-gateway/src/error.rs` for Kinesis), and
/// the native API reports [`RouterError::name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("{0}")]
    ResourceNotFound(String),
    #[error("{0}")]
    ResourceInUse(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    LimitExceeded(String),
    /// No leader answered within the retry budget; the outcome of a write is
    /// unknown.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// A write may or may not have been applied (its leader went away after
    /// accepting it). Never retried inside the cluster: a blind retry could
    /// store the records twice; the client decides.
    #[error("{0}")]
    Indeterminate(String),
    /// The shard's throughput limit is exhausted for now.
    #[error("{0}")]
    Throttled(String),
    /// The shard was closed by a reshard: route by the new shard map.
    #[error("{0}")]
    ShardClosed(String),
    /// Internal: the asked node does not lead the group; maybe `leader` does.
    #[error("not the leader (leader hint: {0:?})")]
    NotLeader(Option<NodeId>),
}

pub(crate) const LEADER_HINT: &str = "kinesin-leader";

impl RouterError {
    /// The variant's name: the error code of the native API.
    pub fn name(&self) -> &'static str {
        match self {
            RouterError::ResourceNotFound(_) => "ResourceNotFound",
            RouterError::ResourceInUse(_) => "ResourceInUse",
            RouterError::InvalidArgument(_) => "InvalidArgument",
            RouterError::LimitExceeded(_) => "LimitExceeded",
            RouterError::Unavailable(_) => "Unavailable",
            RouterError::Internal(_) => "Internal",
            RouterError::Indeterminate(_) => "Indeterminate",
            RouterError::Throttled(_) => "Throttled",
            RouterError::ShardClosed(_) => "ShardClosed",
            RouterError::NotLeader(_) => "NotLeader",
        }
    }

    /// Worth another attempt (possibly at another node).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RouterError::Unavailable(_) | RouterError::NotLeader(_)
        )
    }
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Status {
        let code = match &e {
            RouterError::ResourceNotFound(_) => Code::NotFound,
            RouterError::ResourceInUse(_) => Code::AlreadyExists,
            RouterError::InvalidArgument(_) => Code::InvalidArgument,
            RouterError::LimitExceeded(_) => Code::OutOfRange,
            RouterError::Throttled(_) => Code::ResourceExhausted,
            RouterError::Unavailable(_) | RouterError::NotLeader(_) => Code::Unavailable,
            RouterError::ShardClosed(_) => Code::FailedPrecondition,
            RouterError::Internal(_) => Code::Internal,
            RouterError::Indeterminate(_) => Code::Unknown,
        };
        let mut status = Status::new(code, e.to_string());
        if let RouterError::NotLeader(Some(leader)) = e {
            if let Ok(v) = leader.0.to_string().parse() {
                status.metadata_mut().insert(LEADER_HINT, v);
            }
        }
        if let RouterError::NotLeader(None) = e {
            status
                .metadata_mut()
                .insert(LEADER_HINT, "none".parse().expect("ascii"));
        }
        status
    }
}

impl From<Status> for RouterError {
    fn from(s: Status) -> RouterError {
        if let Some(hint) = s.metadata().get(LEADER_HINT) {
            let leader = hint.to_str().ok().and_then(|h| h.parse().ok()).map(NodeId);
            return RouterError::NotLeader(leader);
        }
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => RouterError::ResourceNotFound(msg),
            Code::AlreadyExists => RouterError::ResourceInUse(msg),
            Code::InvalidArgument => RouterError::InvalidArgument(msg),
            Code::OutOfRange => RouterError::LimitExceeded(msg),
            Code::ResourceExhausted => RouterError::Throttled(msg),
            Code::Internal => RouterError::Internal(msg),
            Code::FailedPrecondition => RouterError::ShardClosed(msg),
            // The request may have reached the node and taken effect.
            Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
                RouterError::Indeterminate(msg)
            }
            _ => RouterError::Unavailable(msg),
        }
    }
}

impl From<kinesin_raft::RaftHostError> for RouterError {
    fn from(e: kinesin_raft::RaftHostError) -> Self {
        match e {
            kinesin_raft::RaftHostError::NotLeader { leader, .. } => RouterError::NotLeader(leader),
            kinesin_raft::RaftHostError::NoSuchGroup(_) => RouterError::NotLeader(None),
            e @ kinesin_raft::RaftHostError::OutcomeUnknown { .. } => {
                RouterError::Indeterminate(e.to_string())
            }
            e @ (kinesin_raft::RaftHostError::Query { .. }
            | kinesin_raft::RaftHostError::Refused { .. }) => {
                RouterError::InvalidArgument(e.to_string())
            }
            other => RouterError::Unavailable(other.to_string()),
        }
    }
}

impl From<kinesin_shard::ShardError> for RouterError {
    fn from(e: kinesin_shard::ShardError) -> Self {
        match e {
            kinesin_shard::ShardError::ForeignSequenceNumber(_) => {
                RouterError::InvalidArgument(e.to_string())
            }
            kinesin_shard::ShardError::Sealed => RouterError::Unavailable(e.to_string()),
            other => RouterError::Internal(other.to_string()),
        }
    }
}

impl From<kinesin_meta::MetaError> for RouterError {
    fn from(e: kinesin_meta::MetaError) -> Self {
        match e {
            kinesin_meta::MetaError::StreamExists(_) | kinesin_meta::MetaError::GroupExists(_) => {
                RouterError::ResourceInUse(e.to_string())
            }
            kinesin_meta::MetaError::StreamNotFound(_)
            | kinesin_meta::MetaError::ShardNotFound(_)
            | kinesin_meta::MetaError::GroupNotFound(_) => {
                RouterError::ResourceNotFound(e.to_string())
            }
            kinesin_meta::MetaError::Invalid(_) => RouterError::InvalidArgument(e.to_string()),
            kinesin_meta::MetaError::LimitExceeded(m) => RouterError::LimitExceeded(m),
        }
    }
}
