//! Whole-system tests on in-process clusters of real nodes.

mod common;
mod failover;
mod partition;
mod repair;
mod snapshot;
