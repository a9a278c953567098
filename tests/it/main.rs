//! Whole-system tests on in-process clusters of real nodes.

mod availability;
mod aws_sdk;
mod common;
mod drain;
mod events;
mod failover;
mod groups;
mod hostile;
mod metadata;
mod partition;
mod repair;
mod snapshot;
mod sqs_sdk;
