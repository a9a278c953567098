//! Commands, queries and replies of a delivery stream's group.

use std::collections::BTreeMap;

use kinesin_types::ShardId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// How objects are compressed (`CompressionFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    Uncompressed,
    Gzip,
    Snappy,
    HadoopSnappy,
    /// A ZIP archive of one entry (deflated) named as the object.
    Zip,
}

impl Compression {
    /// The API's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Uncompressed => "UNCOMPRESSED",
            Compression::Gzip => "GZIP",
            Compression::Snappy => "Snappy",
            Compression::HadoopSnappy => "HADOOP_SNAPPY",
            Compression::Zip => "ZIP",
        }
    }

    pub fn from_name(name: &str) -> Option<Compression> {
        [
            Compression::Uncompressed,
            Compression::Gzip,
            Compression::Snappy,
            Compression::HadoopSnappy,
            Compression::Zip,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }

    /// What AWS appends to the object key.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Uncompressed => "",
            Compression::Gzip => ".gz",
            Compression::Snappy => ".snappy",
            Compression::HadoopSnappy => ".hsnappy",
            Compression::Zip => ".zip",
        }
    }
}

/// An S3 (or ExtendedS3) destination, as the gateway validated it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Destination {
    pub bucket_arn: String,
    pub role_arn: String,
    pub prefix: Option<String>,
    pub error_output_prefix: Option<String>,
    pub size_mib: u32,
    pub interval_s: u32,
    pub compression: Compression,
    /// The AppendDelimiterToRecord processor: a newline after each record.
    pub append_delimiter: bool,
    /// Configured as ExtendedS3 (described as both, as AWS does).
    pub extended: bool,
    /// Dynamic partitioning: the MetadataExtraction processor's jq query.
    pub partition_query: Option<String>,
    /// DataFormatConversionConfiguration (kept while disabled, as AWS
    /// describes it).
    pub conversion: Option<Conversion>,
}

impl S3Destination {
    /// The conversion records go through, when enabled.
    pub fn converting(&self) -> Option<&Conversion> {
        self.conversion.as_ref().filter(|c| c.enabled)
    }

    /// The bucket of `arn:aws:s3:::bucket`.
    pub fn bucket(&self) -> &str {
        self.bucket_arn
            .strip_prefix("arn:aws:s3:::")
            .unwrap_or(&self.bucket_arn)
    }
}

/// JSON → Parquet conversion (`DataFormatConversionConfiguration`). The
/// table's columns are resolved from the node's Glue table definitions
/// when the destination is configured and kept here, so every replica
/// converts alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversion {
    pub enabled: bool,
    pub schema: SchemaConfig,
    pub columns: Vec<Column>,
    pub input: Deserializer,
    pub output: ParquetSerDe,
}

/// `SchemaConfiguration`: the Glue table, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaConfig {
    pub role_arn: String,
    pub catalog_id: Option<String>,
    pub database: String,
    pub table: String,
    pub region: Option<String>,
    pub version_id: String,
}

/// A table column: its name and Hive type (`int`, `array<string>`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub type_name: String,
}

/// The JSON deserializer (`InputFormatConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Deserializer {
    OpenX {
        case_insensitive: bool,
        dots_to_underscores: bool,
        /// Column name → the JSON key it is read from.
        mappings: BTreeMap<String, String>,
    },
    Hive {
        /// Stored and described; timestamps are read as ISO 8601 text or
        /// epoch milliseconds whatever they say.
        timestamp_formats: Vec<String>,
    },
}

/// `ParquetSerDe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParquetSerDe {
    pub block_size: u32,
    pub page_size: u32,
    pub compression: ParquetCompression,
    pub dictionary: bool,
    pub max_padding: u32,
    pub writer_v2: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParquetCompression {
    Uncompressed,
    Gzip,
    Snappy,
}

/// A sealed batch's conversion: the format and the key of the object of
/// the records that do not convert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Converting {
    pub format: Conversion,
    pub error_key: String,
}

/// Where a delivery stream's records come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// PutRecord and PutRecordBatch: the group's own log.
    DirectPut,
    /// A durable consumer of a Kinesin stream.
    Kinesis(KinesisSource),
}

/// KinesisStreamAsSource: the stream, and when delivery starts (records
/// that arrived earlier are not delivered, as AWS starts at LATEST).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KinesisSource {
    pub stream_arn: String,
    pub role_arn: String,
    /// The stream's key in the cluster map.
    pub stream_key: String,
    pub start_ms: u64,
}

/// How far a Kinesis source's shard is delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last delivered sequence number.
    pub delivered: Option<u128>,
    /// Sealed by a reshard and delivered to its end: its children may be
    /// read.
    pub done: bool,
}

/// One shard's part of a sealed batch of a Kinesis source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub shard: ShardId,
    pub from: u128,
    pub to: u128,
}

/// A delivery stream when it is created (the group's config in the map).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    pub name: String,
    pub source: Source,
    pub destination: S3Destination,
    pub tags: BTreeMap<String, String>,
    /// Created with server-side encryption on (stored and shown only).
    pub encrypted: bool,
    pub created_ms: u64,
}

/// Records sealed into one object: the sequence range it covers and where
/// it goes, fixed before the upload so that a retry writes the same object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub from: u128,
    pub to: u128,
    pub records: u64,
    pub bytes: u64,
    pub bucket: String,
    pub key: String,
    pub compression: Compression,
    pub append_delimiter: bool,
    /// Arrival time of the batch's first record.
    pub first_arrival_ms: u64,
    /// A Kinesis source's records: ranges of its shards, in the object's
    /// order (`from` and `to` are then the first and last of them).
    pub ranges: Vec<ShardRange>,
    /// Shards whose last records this batch holds (done once committed).
    pub finished: Vec<ShardId>,
    /// Dynamic partitioning, fixed when the batch is sealed (`key` is then
    /// unused): one object per partition.
    pub partitioning: Option<Partitioning>,
    /// Record format conversion, fixed when the batch is sealed.
    pub conversion: Option<Converting>,
}

impl Batch {
    /// What ends its objects' keys.
    pub fn extension(&self) -> &'static str {
        crate::object::extension(self.compression, self.conversion.is_some())
    }
}

/// What names the objects of a dynamically partitioned batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partitioning {
    pub query: String,
    pub prefix: String,
    pub error_prefix: String,
    pub stream: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FirehoseCommand {
    /// Appends records (their data).
    Put(Vec<ByteBuf>),
    /// Seals the leading buffered records up to `batch.to` into the object
    /// `batch.key`; refused while another batch is sealed or if the range
    /// does not start at the first buffered record.
    Seal(Batch),
    /// The sealed batch ending at `to` was uploaded: its records go (a
    /// Kinesis source's checkpoints advance).
    Commit {
        to: u128,
    },
    /// Shards of a Kinesis source sealed and delivered to their end with
    /// nothing left to seal.
    Finish(Vec<ShardId>),
    /// UpdateDestination, if the stream is still at `version`.
    Update {
        version: u64,
        destination: S3Destination,
    },
    Tag(BTreeMap<String, String>),
    Untag(Vec<String>),
    /// Start/StopDeliveryStreamEncryption.
    Encryption(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FirehoseReply {
    /// The first record's sequence number; the rest follow one by one.
    Put {
        first: u128,
    },
    Done,
    /// A seal or commit that does not match the buffered records or the
    /// sealed batch (a former leader's, or a repeat).
    Stale,
    /// UpdateDestination named another version than the current one.
    VersionMismatch(u64),
    TooManyTags(u32),
    /// A put into a delivery stream whose source is a Kinesis stream.
    NotDirectPut,
}

/// What the leader's delivery job may seal next: the leading buffered
/// records up to a size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub from: u128,
    pub to: u128,
    pub records: u64,
    pub bytes: u64,
    pub first_arrival_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FirehoseQuery {
    Describe,
    /// The leading buffered records of at most this many bytes (at least
    /// one record).
    Plan(u64),
    /// The data of the records `from..=to`, in order.
    Records {
        from: u128,
        to: u128,
    },
}

/// The state DescribeDeliveryStream and the delivery job read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub name: String,
    pub source: Source,
    pub checkpoints: BTreeMap<ShardId, Checkpoint>,
    pub destination: S3Destination,
    pub version: u64,
    pub tags: BTreeMap<String, String>,
    pub encrypted: bool,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub buffered_records: u64,
    pub buffered_bytes: u64,
    pub oldest_arrival_ms: Option<u64>,
    pub sealed: Option<Batch>,
    pub delivered_records: u64,
    pub delivered_bytes: u64,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding to a Vec cannot fail")
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("undecodable firehose message: {e}"))
}
