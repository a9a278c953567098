//! Whole-system tests on in-process clusters of real nodes.

mod common;
mod drain;
mod failover;
mod partition;
mod repair;
mod snapshot;
