//! Routing: any node accepts any request. Stream name → shard map (the local
//! copy of the metadata group's state), partition key → MD5 → hash key →
//! shard → its group's leader, which is either this node (propose locally) or
//! another one (forward over internal gRPC). Leader hints from refusals are
//! cached; retries are bounded in count and time.

mod clients;
mod error;
mod groups;
pub mod liveness;
mod router;
mod service;
mod throttle;

pub use error::RouterError;
pub use groups::Retry;
pub use router::{
    now_ms, set_clock_skew_ms, wall_clock, AppendOutcome, LocalShards, ReadRequest, RecordIn,
    Router, RouterConfig, StreamOptions,
};
pub use service::NodeService;
pub use throttle::ShardLimits;
