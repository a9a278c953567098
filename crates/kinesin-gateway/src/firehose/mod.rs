//! Amazon Data Firehose (awsJson1_1, target prefix `Firehose_20150804`):
//! delivery streams are groups of the firehose kind (`kinesin_firehose`),
//! named `firehose/<account>/<name>` in the map; their leaders deliver to
//! S3 (`kinesin-server/src/workers/deliver.rs`).

mod destination;
mod streams;

use axum::http::StatusCode;
use kinesin_firehose::{group_name, FirehoseCommand, FirehoseQuery, FirehoseReply, StreamInfo};
use kinesin_router::{Retry, Router};
use kinesin_types::GroupId;

use crate::codec::Protocol;
use crate::error::ApiError;
use crate::input::Input;
use crate::service::{operation_table, Service};

use streams::*;

pub const SERVICE: Service = Service {
    name: "firehose",
    signing_name: "firehose",
    target_prefix: "Firehose_20150804.",
    protocols: &[Protocol::Json11],
    operations: OPERATIONS,
    query: None,
    query_errors: &[],
    query_compatible: false,
};

/// What one request runs with.
pub struct Context<'a> {
    pub router: &'a Router,
    pub region: &'a str,
    /// Account of the signing key: its delivery streams are its own.
    pub account: &'a str,
    /// The account whose streams the map keys by their bare names
    /// (`kinesin_meta::stream_key`), for Kinesis sources.
    pub home: &'a str,
    /// Whether a source stream's ARN must name the caller's account (not
    /// in development mode).
    pub check_accounts: bool,
    pub now_ms: u64,
    /// The Glue tables record format conversion may name.
    pub tables: &'a kinesin_firehose::GlueTables,
}

/// A delivery stream a request names, found in the map.
struct Stream {
    name: String,
    group: GroupId,
}

impl Context<'_> {
    fn arn(&self, name: &str) -> String {
        format!(
            "arn:aws:firehose:{}:{}:deliverystream/{name}",
            self.region, self.account
        )
    }

    /// The caller's delivery stream `DeliveryStreamName` names.
    fn stream(&self, input: &Input<'_>) -> Result<Stream, ApiError> {
        let name = stream_name(input)?;
        let group = self
            .router
            .meta_state()
            .groups
            .get(&group_name(self.account, name))
            .filter(|g| g.kind == kinesin_firehose::FIREHOSE_KIND)
            .map(|g| g.group)
            .ok_or_else(|| self.not_found(name))?;
        Ok(Stream {
            name: name.to_string(),
            group,
        })
    }

    /// The caller's delivery streams (name, whether DirectPut), in name
    /// order.
    fn own_streams(&self) -> Vec<(String, bool)> {
        let own = group_name(self.account, "");
        self.router
            .meta_state()
            .groups
            .range(own.clone()..)
            .take_while(|(k, _)| k.starts_with(&own))
            .filter(|(_, g)| g.kind == kinesin_firehose::FIREHOSE_KIND)
            .map(|(k, g)| {
                let config = kinesin_firehose::decode::<kinesin_firehose::StreamConfig>(&g.config);
                let direct = config.is_ok_and(|c| c.source == kinesin_firehose::Source::DirectPut);
                (k[own.len()..].to_string(), direct)
            })
            .collect()
    }

    /// The configuration an existing delivery stream was created with,
    /// its creation times set to `now_ms` (to compare with a new one).
    fn existing(&self, key: &str) -> Option<kinesin_firehose::StreamConfig> {
        let state = self.router.meta_state();
        let spec = state
            .groups
            .get(key)
            .filter(|g| g.kind == kinesin_firehose::FIREHOSE_KIND)?;
        let mut config: kinesin_firehose::StreamConfig =
            kinesin_firehose::decode(&spec.config).ok()?;
        config.created_ms = self.now_ms;
        if let kinesin_firehose::Source::Kinesis(k) = &mut config.source {
            k.start_ms = self.now_ms;
        }
        Some(config)
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(format!(
            "Firehose {name} under account {} not found.",
            self.account
        ))
    }

    async fn command(
        &self,
        stream: &Stream,
        command: &FirehoseCommand,
        retry: Retry,
    ) -> Result<FirehoseReply, ApiError> {
        let reply = self
            .router
            .propose_stamped(stream.group, kinesin_firehose::encode(command), retry)
            .await
            .map_err(|e| self.router_error(&stream.name, e))?;
        kinesin_firehose::decode(&reply).map_err(internal)
    }

    async fn describe(&self, stream: &Stream) -> Result<StreamInfo, ApiError> {
        let query = kinesin_firehose::encode(&FirehoseQuery::Describe);
        let reply = self
            .router
            .read(stream.group, query)
            .await
            .map_err(|e| self.router_error(&stream.name, e))?;
        kinesin_firehose::decode(&reply).map_err(internal)
    }

    /// A router error for a delivery stream: a group gone from the map is
    /// a stream that no longer exists; Firehose names unavailability
    /// `ServiceUnavailableException`.
    fn router_error(&self, name: &str, e: kinesin_router::RouterError) -> ApiError {
        match ApiError::from(e) {
            e if e.name == "ResourceNotFoundException" => self.not_found(name),
            e if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                ApiError::new("ServiceUnavailableException", e.status, e.message)
            }
            e => e,
        }
    }
}

fn internal(message: String) -> ApiError {
    ApiError::new(
        "InternalFailure",
        StatusCode::INTERNAL_SERVER_ERROR,
        message,
    )
}

/// `DeliveryStreamName`: 1–64 of `[a-zA-Z0-9_.-]`.
fn stream_name<'a>(input: &Input<'a>) -> Result<&'a str, ApiError> {
    let name = input
        .opt_str_len("DeliveryStreamName", 1, 64)?
        .ok_or_else(|| crate::input::constraint("DeliveryStreamName", "null", "not be null"))?;
    crate::input::check_name_pattern("DeliveryStreamName", name)?;
    Ok(name)
}

operation_table! { Context<'_>, ctx, input;
    "CreateDeliveryStream" => create_delivery_stream(ctx, input).await,
    "DeleteDeliveryStream" => delete_delivery_stream(ctx, input).await,
    "DescribeDeliveryStream" => describe_delivery_stream(ctx, input).await,
    "ListDeliveryStreams" => list_delivery_streams(ctx, input),
    "PutRecord" => put_record(ctx, input).await,
    "PutRecordBatch" => put_record_batch(ctx, input).await,
    "UpdateDestination" => update_destination(ctx, input).await,
    "TagDeliveryStream" => tag_delivery_stream(ctx, input).await,
    "UntagDeliveryStream" => untag_delivery_stream(ctx, input).await,
    "ListTagsForDeliveryStream" => list_tags_for_delivery_stream(ctx, input).await,
    "StartDeliveryStreamEncryption" => set_encryption(ctx, input, true).await,
    "StopDeliveryStreamEncryption" => set_encryption(ctx, input, false).await,
}

fn unsupported(op: &str) -> ApiError {
    ApiError::unknown_operation(format!("unknown operation {op}"))
}
