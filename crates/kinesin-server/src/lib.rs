//! The Kinesin node as a library: `kinesin server`, `kinesin dev` and the
//! test clusters all start nodes through [`Node::start`].

pub mod admin;
pub mod config;
mod controller;
mod failover;
mod node;
mod reconcile;
mod workers;

pub use config::{AuthSetting, Config, ConfigError, FsyncSetting};
pub use node::{shard_timing, Node};
