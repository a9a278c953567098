//! Firehose delivery streams as a Raft group kind. A delivery stream is a
//! group of the kind [`FIREHOSE_KIND`]. With DirectPut, its log is the
//! stream the records are put into and its rows hold the records not yet
//! delivered; with a Kinesis source, the records stay in the source
//! stream and the group holds each shard's checkpoint. The small state
//! holds the destination, the version, the tags and the one *sealed batch*
//! on its way to S3.
//!
//! Delivery is exactly once per object: the group's leader first seals a
//! batch (a sequence range and the object key it becomes) through Raft,
//! then uploads it, then commits it through Raft, which drops its records.
//! A leader that takes over finds the sealed batch and uploads the same
//! records to the same key again: the retry replaces the object with the
//! same bytes instead of adding a second one.

mod convert;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod model;
mod object;
mod partition;
mod state_machine;

pub use convert::{glue_tables, GlueTables};
pub use model::{
    decode, encode, Batch, Checkpoint, Column, Compression, Conversion, Converting, Deserializer,
    FirehoseCommand, FirehoseQuery, FirehoseReply, KinesisSource, ParquetCompression, ParquetSerDe,
    Partitioning, Plan, S3Destination, SchemaConfig, ShardRange, Source, StreamConfig, StreamInfo,
};
pub use object::{
    batch_naming, evaluate_prefix, extension, object_key, objects, render, KeyError, Naming,
    Partition, CONVERSION_FAILED, PARTITION_FAILED,
};
pub use partition::check_query;
pub use state_machine::{FirehoseKind, FIREHOSE_KIND};

/// The map name of a delivery stream's group.
pub fn group_name(account: &str, name: &str) -> String {
    format!("firehose/{account}/{name}")
}
