//! Routing: any node accepts any request. Stream name → shard map (the local
//! copy of the metadata group's state), partition key → MD5 → hash key →
//! shard → its group's leader, which is either this node (propose locally) or
//! another one (forward over internal gRPC). Leader hints from refusals are
//! cached; retries are bounded in count and time.

mod clients;
mod error;
mod groups;
pub mod liveness;
mod records;
mod router;
mod service;
mod streams;
mod throttle;

pub use error::RouterError;
pub use groups::{stamp, Retry};
pub use kinesin_raft::clock::{now_ms, set_clock_skew_ms, wall_clock};
pub use records::{AppendOutcome, ReadRequest, RecordIn};
pub use router::{LocalShards, Router, RouterConfig};
pub use service::NodeService;
pub use streams::StreamOptions;
pub use throttle::ShardLimits;
