//! Kinesis Data Streams operations (target prefix `Kinesis_20131202`):
//! validate as the service model does, call the router, shape the answer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine;
use kinesin_meta::{MetaCommand, NewShard, StreamChange};
use kinesin_router::{AppendOutcome, ReadRequest, RecordIn, Router, RouterError, StreamOptions};
use kinesin_shard::ReadStart;
use kinesin_types::{
    HashKey, HashKeyRange, SequenceNumber, ShardId, ShardInfo, ShardState, StreamInfo, StreamMode,
    StreamStatus, DEFAULT_MAX_RECORD_BYTES, MAX_RECORD_BYTES_LIMIT,
};
use serde_json::{json, Map, Value};

use crate::codec::Protocol;
use crate::error::ApiError;
use crate::input::{check_decimal, check_name_pattern, constraint, Input};
use crate::iterator::{self, PageToken, Position, ShardIterator};
use crate::service::{operation_table, Service};

const MAX_PUT_RECORDS: usize = 500;
const MAX_PUT_RECORDS_BYTES: usize = 5 * 1024 * 1024;
const MAX_GET_RECORDS_BYTES: usize = 10 * 1024 * 1024;
const MAX_TAGS_PER_STREAM: usize = 50;
/// Shards a stream gets when created in ON_DEMAND mode, as AWS.
const ON_DEMAND_SHARDS: u32 = 4;
const ON_DEMAND_STREAM_LIMIT: usize = 50;
const SHARD_LEVEL_METRICS: &[&str] = &[
    "IncomingBytes",
    "IncomingRecords",
    "OutgoingBytes",
    "OutgoingRecords",
    "WriteProvisionedThroughputExceeded",
    "ReadProvisionedThroughputExceeded",
    "IteratorAgeMilliseconds",
];

/// What one request runs with.
pub struct Context<'a> {
    pub router: &'a Router,
    pub region: &'a str,
    /// Account of the signing key; names the ARNs.
    pub account: &'a str,
    /// Most open shards the cluster allows (DescribeLimits, CreateStream).
    pub shard_limit: u32,
    /// Lifetime of iterators and paging tokens.
    pub validity_ms: u64,
    pub now_ms: u64,
}

impl Context<'_> {
    fn arn(&self, stream: &str) -> String {
        format!(
            "arn:aws:kinesis:{}:{}:stream/{stream}",
            self.region, self.account
        )
    }

    async fn stream(&self, name: &str) -> Result<StreamInfo, ApiError> {
        self.router
            .describe_stream(name)
            .await
            .map_err(|e| match e {
                RouterError::ResourceNotFound(_) => ApiError::not_found(format!(
                    "Stream {name} under account {} not found.",
                    self.account
                )),
                other => other.into(),
            })
    }

    async fn change(&self, stream: &str, change: StreamChange) -> Result<(), ApiError> {
        self.router
            .meta_write(MetaCommand::UpdateStream {
                name: stream.to_string(),
                change,
            })
            .await
            .map_err(ApiError::from)
    }
}

/// Kinesis Data Streams as the gateway knows it.
pub const SERVICE: Service = Service {
    name: "kinesis",
    signing_name: "kinesis",
    target_prefix: "Kinesis_20131202.",
    protocols: &[Protocol::Json, Protocol::Cbor],
    operations: OPERATIONS,
};

fn unsupported(operation: &str) -> ApiError {
    ApiError::unknown_operation(format!(
        "Kinesis operation {operation} is not supported by this endpoint; see docs/api/kinesis.md"
    ))
}

operation_table! {
    Context<'_>, ctx, i;
    "CreateStream" => create_stream(ctx, i).await,
    "DeleteStream" => delete_stream(ctx, i).await,
    "DescribeStream" => describe_stream(ctx, i).await,
    "DescribeStreamSummary" => describe_stream_summary(ctx, i).await,
    "ListStreams" => list_streams(ctx, i),
    "ListShards" => list_shards(ctx, i).await,
    "DescribeLimits" => describe_limits(ctx),
    "PutRecord" => put_record(ctx, i).await,
    "PutRecords" => put_records(ctx, i).await,
    "GetShardIterator" => get_shard_iterator(ctx, i).await,
    "GetRecords" => get_records(ctx, i).await,
    "RegisterStreamConsumer" => register_consumer(ctx, i).await,
    "DeregisterStreamConsumer" => deregister_consumer(ctx, i).await,
    "DescribeStreamConsumer" => describe_consumer(ctx, i).await,
    "ListStreamConsumers" => list_consumers(ctx, i).await,
    "SplitShard" => split_shard(ctx, i).await,
    "MergeShards" => merge_shards(ctx, i).await,
    "UpdateShardCount" => update_shard_count(ctx, i).await,
    "IncreaseStreamRetentionPeriod" => change_retention(ctx, i, true).await,
    "DecreaseStreamRetentionPeriod" => change_retention(ctx, i, false).await,
    "AddTagsToStream" => {
        let name = stream_name(i)?;
        add_tags(ctx, &name, i).await
    },
    "TagResource" => {
        let name = resource_stream(i)?;
        add_tags(ctx, &name, i).await
    },
    "RemoveTagsFromStream" => {
        let name = stream_name(i)?;
        remove_tags(ctx, &name, i, "TagKeys").await
    },
    "UntagResource" => {
        let name = resource_stream(i)?;
        remove_tags(ctx, &name, i, "TagKeys").await
    },
    "ListTagsForStream" => list_tags_for_stream(ctx, i).await,
    "ListTagsForResource" => {
        let stream = ctx.stream(&resource_stream(i)?).await?;
        Ok(json!({ "Tags": tag_list(stream.settings.tags.iter()) }))
    },
    "EnableEnhancedMonitoring" => enhanced_monitoring(ctx, i, true).await,
    "DisableEnhancedMonitoring" => enhanced_monitoring(ctx, i, false).await,
    "StartStreamEncryption" => stream_encryption(ctx, i, true).await,
    "StopStreamEncryption" => stream_encryption(ctx, i, false).await,
    "UpdateMaxRecordSize" => update_max_record_size(ctx, i).await,
    "UpdateStreamMode" => update_stream_mode(ctx, i).await,
    "PutResourcePolicy" => {
        let name = resource_stream(i)?;
        let policy = i.str("Policy")?;
        serde_json::from_str::<Value>(policy).map_err(|e| {
            ApiError::invalid_argument(format!("Policy is not a valid JSON document: {e}"))
        })?;
        ctx.stream(&name).await?;
        ctx.change(
            &name,
            StreamChange::ResourcePolicy(Some(policy.to_string())),
        )
        .await?;
        Ok(json!({}))
    },
    "GetResourcePolicy" => {
        let stream = ctx.stream(&resource_stream(i)?).await?;
        Ok(json!({
            "Policy": stream.settings.resource_policy.unwrap_or_else(|| "{}".to_string())
        }))
    },
    "DeleteResourcePolicy" => {
        let name = resource_stream(i)?;
        let stream = ctx.stream(&name).await?;
        if stream.settings.resource_policy.is_none() {
            return Err(ApiError::not_found(format!(
                "No resource policy found for resource {}.",
                ctx.arn(&name)
            )));
        }
        ctx.change(&name, StreamChange::ResourcePolicy(None))
            .await?;
        Ok(json!({}))
    },
    // Answered with an event stream before the table is consulted
    // (`subscribe` in lib.rs); listed for its metric labels.
    "SubscribeToShard" => Err(ApiError::unknown_operation(
        "SubscribeToShard needs an HTTP/2 event-stream response",
    )),
}

/// The stream a request names by StreamName or StreamARN.
fn stream_name(i: &Input<'_>) -> Result<String, ApiError> {
    let name = i.opt_str("StreamName")?;
    let arn = i.opt_str("StreamARN")?;
    if let Some(n) = name {
        check_name_pattern("StreamName", n)?;
    }
    let from_arn = arn.map(|a| parse_stream_arn("StreamARN", a)).transpose()?;
    match (name, from_arn) {
        (Some(n), Some(a)) if n != a => Err(ApiError::invalid_argument(format!(
            "StreamName {n} and StreamARN {} name different streams.",
            arn.unwrap_or_default()
        ))),
        (Some(n), _) => Ok(n.to_string()),
        (None, Some(a)) => Ok(a),
        (None, None) => Err(ApiError::invalid_argument(
            "Either StreamName or StreamARN must be provided.",
        )),
    }
}

fn resource_stream(i: &Input<'_>) -> Result<String, ApiError> {
    let arn = i.str("ResourceARN")?;
    if arn.contains("/consumer/") {
        return Err(ApiError::not_found(format!(
            "Resource {arn} not found: stream consumers are not supported yet."
        )));
    }
    parse_stream_arn("ResourceARN", arn)
}

/// `arn:aws:kinesis:<region>:<12 digits>:stream/<name>` → name.
fn parse_stream_arn(member: &str, arn: &str) -> Result<String, ApiError> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "kinesis"
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit());
    let name = parts
        .get(5)
        .and_then(|r| r.strip_prefix("stream/"))
        .filter(|_| ok)
        .ok_or_else(|| {
            constraint(
                member,
                arn,
                "satisfy regular expression pattern: arn:aws.*:kinesis:.*:\\d{12}:stream/\\S+",
            )
        })?;
    check_name_pattern("StreamName", name)?;
    Ok(name.to_string())
}

async fn create_stream(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = i.str("StreamName")?;
    check_name_pattern("StreamName", name)?;
    let shard_count = i.opt_int_range("ShardCount", 1, i64::from(u32::MAX))?;
    let mode = match i.opt_object("StreamModeDetails")? {
        Some(d) => parse_mode(d.str("StreamMode")?)?,
        None => StreamMode::Provisioned,
    };
    let shards = match (mode, shard_count) {
        (StreamMode::Provisioned, Some(n)) => n as u32,
        (StreamMode::Provisioned, None) => {
            return Err(ApiError::invalid_argument(
                "ShardCount is required for a stream in PROVISIONED mode.",
            ))
        }
        (StreamMode::OnDemand, None) => ON_DEMAND_SHARDS,
        (StreamMode::OnDemand, Some(_)) => {
            return Err(ApiError::invalid_argument(
                "ShardCount must not be given for a stream in ON_DEMAND mode.",
            ))
        }
    };
    let tags = parse_tags(i)?.unwrap_or_default();
    let max_record_bytes = match i.opt_int_range("MaxRecordSizeInKiB", 1024, 10240)? {
        Some(kib) => kib as u32 * 1024,
        None => DEFAULT_MAX_RECORD_BYTES,
    };
    let state = ctx.router.meta_state();
    let open = state.open_shard_count();
    if open + shards as usize > ctx.shard_limit as usize {
        return Err(ApiError::limit_exceeded(format!(
            "This request would exceed the shard limit of {} for the cluster ({open} open shards, {shards} requested).",
            ctx.shard_limit
        )));
    }
    if mode == StreamMode::OnDemand && state.on_demand_stream_count() >= ON_DEMAND_STREAM_LIMIT {
        return Err(ApiError::limit_exceeded(format!(
            "At most {ON_DEMAND_STREAM_LIMIT} streams may be in ON_DEMAND mode."
        )));
    }
    let options = StreamOptions { mode, tags };
    ctx.router
        .create_stream_with(name, shards, 0, max_record_bytes, &options)
        .await
        .map_err(|e| match e {
            kinesin_router::RouterError::ResourceInUse(_) => ApiError::in_use(format!(
                "Stream {name} under account {} already exists.",
                ctx.account
            )),
            other => other.into(),
        })?;
    Ok(json!({}))
}

fn parse_mode(s: &str) -> Result<StreamMode, ApiError> {
    match s {
        "PROVISIONED" => Ok(StreamMode::Provisioned),
        "ON_DEMAND" => Ok(StreamMode::OnDemand),
        other => Err(constraint(
            "StreamMode",
            other,
            "satisfy enum value set: [PROVISIONED, ON_DEMAND]",
        )),
    }
}

async fn delete_stream(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let enforce = i.opt_bool("EnforceConsumerDeletion")?.unwrap_or(false);
    let stream = ctx.stream(&name).await?;
    if !enforce && !stream.settings.consumers.is_empty() {
        return Err(ApiError::in_use(format!(
            "Stream {name} has {} registered consumers; deregister them or set EnforceConsumerDeletion.",
            stream.settings.consumers.len()
        )));
    }
    ctx.router.delete_stream(&name).await?;
    Ok(json!({}))
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn shard_json(s: &ShardInfo) -> Value {
    let mut v = json!({
        "ShardId": s.shard_id.to_string(),
        "HashKeyRange": {
            "StartingHashKey": s.range.start.to_string(),
            "EndingHashKey": s.range.end.to_string(),
        },
        "SequenceNumberRange": {
            "StartingSequenceNumber": s.starting_sequence().to_string(),
        },
    });
    if let Some(p) = s.parent {
        v["ParentShardId"] = json!(p.to_string());
    }
    if let Some(p) = s.adjacent_parent {
        v["AdjacentParentShardId"] = json!(p.to_string());
    }
    if s.state == ShardState::Sealed {
        let ending = s.ending_sequence.unwrap_or_else(|| s.starting_sequence());
        v["SequenceNumberRange"]["EndingSequenceNumber"] = json!(ending.to_string());
    }
    v
}

fn metrics_json(stream: &StreamInfo) -> Value {
    json!([{ "ShardLevelMetrics": stream.settings.shard_level_metrics }])
}

fn encryption_type(stream: &StreamInfo) -> &'static str {
    if stream.settings.encryption_key.is_some() {
        "KMS"
    } else {
        "NONE"
    }
}

async fn describe_stream(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let limit = i.opt_int_range("Limit", 1, 10_000)?.unwrap_or(100) as usize;
    let after = i.opt_str("ExclusiveStartShardId")?;
    if let Some(a) = after {
        check_name_pattern("ExclusiveStartShardId", a)?;
    }
    let stream = ctx.stream(&name).await?;
    let mut shards: Vec<&ShardInfo> = stream.shards.iter().collect();
    shards.sort_by_key(|s| s.shard_id);
    let after_id = after.and_then(|a| a.parse::<ShardId>().ok());
    let rest: Vec<&ShardInfo> = shards
        .into_iter()
        .filter(|s| after.is_none() || after_id.is_some_and(|a| s.shard_id > a))
        .collect();
    let page: Vec<Value> = rest.iter().take(limit).map(|s| shard_json(s)).collect();
    let mut d = json!({
        "StreamName": name,
        "StreamARN": ctx.arn(&name),
        "StreamStatus": stream.status.as_aws_str(),
        "StreamModeDetails": { "StreamMode": stream.settings.mode.as_aws_str() },
        "Shards": page,
        "HasMoreShards": rest.len() > limit,
        "RetentionPeriodHours": stream.retention_hours,
        "StreamCreationTimestamp": seconds(stream.created_at_ms),
        "EnhancedMonitoring": metrics_json(&stream),
        "EncryptionType": encryption_type(&stream),
    });
    if let Some(k) = &stream.settings.encryption_key {
        d["KeyId"] = json!(k);
    }
    Ok(json!({ "StreamDescription": d }))
}

async fn describe_stream_summary(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let stream = ctx.stream(&name).await?;
    let mut d = json!({
        "StreamName": name,
        "StreamARN": ctx.arn(&name),
        "StreamStatus": stream.status.as_aws_str(),
        "StreamModeDetails": { "StreamMode": stream.settings.mode.as_aws_str() },
        "RetentionPeriodHours": stream.retention_hours,
        "StreamCreationTimestamp": seconds(stream.created_at_ms),
        "EnhancedMonitoring": metrics_json(&stream),
        "EncryptionType": encryption_type(&stream),
        "OpenShardCount": stream.open_shard_count(),
        "ConsumerCount": stream.settings.consumers.len(),
        "MaxRecordSizeInKiB": stream.max_record_bytes / 1024,
    });
    if let Some(k) = &stream.settings.encryption_key {
        d["KeyId"] = json!(k);
    }
    Ok(json!({ "StreamDescriptionSummary": d }))
}

fn list_streams(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let limit = i.opt_int_range("Limit", 1, 10_000)?.unwrap_or(100) as usize;
    let mut after = i.opt_str("ExclusiveStartStreamName")?.map(str::to_string);
    if let Some(token) = i.opt_str("NextToken")? {
        let t: PageToken = iterator::decode(token, "NextToken")?;
        check_token_age(ctx, t.issued_ms)?;
        after = Some(t.after);
    }
    let state = ctx.router.meta_state();
    let rest: Vec<&StreamInfo> = state
        .streams
        .values()
        .filter(|s| after.as_deref().is_none_or(|a| s.name.as_str() > a))
        .collect();
    let page = &rest[..rest.len().min(limit)];
    let more = rest.len() > limit;
    let mut out = json!({
        "StreamNames": page.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        "HasMoreStreams": more,
        "StreamSummaries": page.iter().map(|s| json!({
            "StreamName": s.name.as_str(),
            "StreamARN": ctx.arn(s.name.as_str()),
            "StreamStatus": s.status.as_aws_str(),
            "StreamModeDetails": { "StreamMode": s.settings.mode.as_aws_str() },
            "StreamCreationTimestamp": seconds(s.created_at_ms),
        })).collect::<Vec<_>>(),
    });
    if let (true, Some(last)) = (more, page.last()) {
        out["NextToken"] = json!(iterator::encode(&PageToken {
            stream: String::new(),
            after: last.name.as_str().to_string(),
            filter: None,
            issued_ms: ctx.now_ms,
        }));
    }
    Ok(out)
}

fn check_token_age(ctx: &Context<'_>, issued_ms: u64) -> Result<(), ApiError> {
    if ctx.now_ms.saturating_sub(issued_ms) > ctx.validity_ms {
        return Err(ApiError::new(
            "ExpiredNextTokenException",
            axum::http::StatusCode::BAD_REQUEST,
            format!(
                "The NextToken has expired; it is valid for {} seconds.",
                ctx.validity_ms / 1000
            ),
        ));
    }
    Ok(())
}

/// The ShardFilter of ListShards as a predicate over the shard map.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum ShardFilter {
    AfterShardId(u32),
    AtTrimHorizon,
    FromTrimHorizon,
    AtLatest,
    AtTimestamp,
    FromTimestamp,
}

impl ShardFilter {
    fn parse(i: &Input<'_>) -> Result<Option<Self>, ApiError> {
        let Some(f) = i.opt_object("ShardFilter")? else {
            return Ok(None);
        };
        let kind = f.str("Type")?;
        let filter = match kind {
            "AFTER_SHARD_ID" => {
                let id = f.opt_str("ShardId")?.ok_or_else(|| {
                    ApiError::invalid_argument("ShardFilter AFTER_SHARD_ID needs a ShardId.")
                })?;
                ShardFilter::AfterShardId(id.parse::<ShardId>().map(|s| s.0).map_err(|e| {
                    ApiError::invalid_argument(format!("ShardFilter ShardId: {e}"))
                })?)
            }
            "AT_TRIM_HORIZON" => ShardFilter::AtTrimHorizon,
            "FROM_TRIM_HORIZON" => ShardFilter::FromTrimHorizon,
            "AT_LATEST" => ShardFilter::AtLatest,
            "AT_TIMESTAMP" | "FROM_TIMESTAMP" => {
                f.opt_timestamp_ms("Timestamp")?.ok_or_else(|| {
                    ApiError::invalid_argument(format!("ShardFilter {kind} needs a Timestamp."))
                })?;
                if kind == "AT_TIMESTAMP" {
                    ShardFilter::AtTimestamp
                } else {
                    ShardFilter::FromTimestamp
                }
            }
            other => {
                return Err(constraint(
                    "Type",
                    other,
                    "satisfy enum value set: [AFTER_SHARD_ID, AT_TRIM_HORIZON, FROM_TRIM_HORIZON, AT_LATEST, AT_TIMESTAMP, FROM_TIMESTAMP]",
                ))
            }
        };
        Ok(Some(filter))
    }

    /// Shards whose parents are gone from the map were open at the trim
    /// horizon. The shard map keeps no close times, so the timestamp
    /// filters select as their trim-horizon counterparts.
    fn keeps(&self, stream: &StreamInfo, shard: &ShardInfo) -> bool {
        let parent_present = |p: Option<ShardId>| p.is_some_and(|p| stream.shard(p).is_some());
        match self {
            ShardFilter::AfterShardId(id) => shard.shard_id.0 > *id,
            ShardFilter::AtTrimHorizon | ShardFilter::AtTimestamp => {
                !parent_present(shard.parent) && !parent_present(shard.adjacent_parent)
            }
            ShardFilter::FromTrimHorizon | ShardFilter::FromTimestamp => true,
            ShardFilter::AtLatest => shard.state == ShardState::Open,
        }
    }
}

async fn list_shards(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let limit = i.opt_int_range("MaxResults", 1, 10_000)?.unwrap_or(1000) as usize;
    let token = i.opt_str("NextToken")?;
    let (name, after, filter) = match token {
        Some(t) => {
            if i.opt_str("StreamName")?.is_some() || i.opt_str("StreamARN")?.is_some() {
                return Err(ApiError::invalid_argument(
                    "NextToken and StreamName or StreamARN cannot be provided together.",
                ));
            }
            let t: PageToken = iterator::decode(t, "NextToken")?;
            check_token_age(ctx, t.issued_ms)?;
            let filter = t
                .filter
                .as_deref()
                .map(serde_json::from_str::<ShardFilter>)
                .transpose()
                .map_err(|_| ApiError::invalid_argument("Invalid NextToken."))?;
            let after = t
                .after
                .parse::<ShardId>()
                .map_err(|_| ApiError::invalid_argument("Invalid NextToken."))?;
            (t.stream, Some(after), filter)
        }
        None => {
            let name = stream_name(i)?;
            let after = match i.opt_str("ExclusiveStartShardId")? {
                Some(a) => {
                    check_name_pattern("ExclusiveStartShardId", a)?;
                    Some(a.parse::<ShardId>().map_err(|e| {
                        ApiError::invalid_argument(format!("ExclusiveStartShardId: {e}"))
                    })?)
                }
                None => None,
            };
            i.opt_timestamp_ms("StreamCreationTimestamp")?;
            (name, after, ShardFilter::parse(i)?)
        }
    };
    let stream = ctx.stream(&name).await?;
    let mut shards: Vec<&ShardInfo> = stream
        .shards
        .iter()
        .filter(|s| after.is_none_or(|a| s.shard_id > a))
        .filter(|s| filter.as_ref().is_none_or(|f| f.keeps(&stream, s)))
        .collect();
    shards.sort_by_key(|s| s.shard_id);
    let more = shards.len() > limit;
    shards.truncate(limit);
    let mut out = json!({ "Shards": shards.iter().map(|s| shard_json(s)).collect::<Vec<_>>() });
    if let (true, Some(last)) = (more, shards.last()) {
        out["NextToken"] = json!(iterator::encode(&PageToken {
            stream: name.clone(),
            after: last.shard_id.to_string(),
            filter: filter
                .as_ref()
                .map(|f| serde_json::to_string(f).expect("filters serialize")),
            issued_ms: ctx.now_ms,
        }));
    }
    Ok(out)
}

fn describe_limits(ctx: &Context<'_>) -> Result<Value, ApiError> {
    let state = ctx.router.meta_state();
    Ok(json!({
        "ShardLimit": ctx.shard_limit,
        "OpenShardCount": state.open_shard_count(),
        "OnDemandStreamCount": state.on_demand_stream_count(),
        "OnDemandStreamCountLimit": ON_DEMAND_STREAM_LIMIT,
    }))
}

/// One validated record of a put.
fn parse_record(
    entry: &Input<'_>,
    index: Option<usize>,
    max_record_bytes: u32,
) -> Result<RecordIn, ApiError> {
    let member = |m: &str| match index {
        Some(k) => format!("records.{}.member.{m}", k + 1),
        None => m.to_string(),
    };
    let data_text = entry.str("Data")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(data_text)
        .map_err(|_| {
            ApiError::serialization(format!("{}: Data is not valid base64", member("Data")))
        })?;
    if data.len() > MAX_RECORD_BYTES_LIMIT as usize {
        return Err(constraint(
            &member("Data"),
            format!("{} bytes", data.len()),
            &format!("have length less than or equal to {MAX_RECORD_BYTES_LIMIT}"),
        ));
    }
    let key = entry.str("PartitionKey")?;
    let chars = key.chars().count();
    if chars == 0 || chars > 256 {
        return Err(constraint(
            &member("PartitionKey"),
            key,
            "have length between 1 and 256",
        ));
    }
    let explicit = entry.opt_str("ExplicitHashKey")?;
    if let Some(h) = explicit {
        check_decimal(&member("ExplicitHashKey"), h, 39)?;
        h.parse::<HashKey>().map_err(|_| {
            ApiError::invalid_argument(format!(
                "Invalid ExplicitHashKey. ExplicitHashKey must be in the range: [0, 2^128-1]. Specified value was {h}"
            ))
        })?;
    }
    let size = data.len() + key.len();
    if size > max_record_bytes as usize {
        return Err(ApiError::validation(format!(
            "1 validation error detected: Value at '{}' failed to satisfy constraint: Member must have length less than or equal to {max_record_bytes} (data plus partition key: {size} bytes)",
            member("Data")
        )));
    }
    Ok(RecordIn {
        partition_key: key.to_string(),
        data,
        explicit_hash_key: explicit.map(str::to_string),
    })
}

async fn put_record(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    if let Some(s) = i.opt_str("SequenceNumberForOrdering")? {
        check_decimal("SequenceNumberForOrdering", s, 129)?;
    }
    let stream = ctx.stream(&name).await?;
    // Sequence numbers of one shard only grow, so every record is above any
    // SequenceNumberForOrdering an earlier put of the same key returned.
    let record = parse_record(i, None, stream.max_record_bytes)?;
    let outcome = ctx
        .router
        .put_records(&name, vec![record])
        .await?
        .pop()
        .ok_or_else(|| {
            ApiError::from(kinesin_router::RouterError::Internal("no outcome".into()))
        })?;
    match outcome {
        AppendOutcome::Stored { shard, sequence } => Ok(json!({
            "ShardId": shard.to_string(),
            "SequenceNumber": sequence.to_string(),
            "EncryptionType": encryption_type(&stream),
        })),
        AppendOutcome::Failed(e @ RouterError::Throttled(_)) => Err(e.into()),
        AppendOutcome::Failed(e) => {
            Err(RouterError::Unavailable(format!("the record was not acknowledged: {e}")).into())
        }
    }
}

async fn put_records(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let entries = i
        .opt_array("Records")?
        .ok_or_else(|| constraint("Records", "null", "not be null"))?;
    if entries.is_empty() || entries.len() > MAX_PUT_RECORDS {
        return Err(constraint(
            "Records",
            format!("{} records", entries.len()),
            &format!("have length between 1 and {MAX_PUT_RECORDS}"),
        ));
    }
    let stream = ctx.stream(&name).await?;
    let mut records = Vec::with_capacity(entries.len());
    let mut total = 0usize;
    for (k, e) in entries.iter().enumerate() {
        let obj = e
            .as_object()
            .ok_or_else(|| ApiError::serialization(format!("Records[{k}] must be a structure")))?;
        let r = parse_record(&Input::of_map(obj), Some(k), stream.max_record_bytes)?;
        total += r.data.len() + r.partition_key.len();
        records.push(r);
    }
    let request_limit = MAX_PUT_RECORDS_BYTES.max(stream.max_record_bytes as usize);
    if total > request_limit {
        return Err(ApiError::invalid_argument(format!(
            "Records size exceeds {request_limit} bytes limit (the request carries {total} bytes of data and partition keys)."
        )));
    }
    let outcomes = ctx.router.put_records(&name, records).await?;
    let mut failed = 0;
    let results: Vec<Value> = outcomes
        .into_iter()
        .map(|o| match o {
            AppendOutcome::Stored { shard, sequence } => json!({
                "ShardId": shard.to_string(),
                "SequenceNumber": sequence.to_string(),
            }),
            AppendOutcome::Failed(e) => {
                failed += 1;
                json!({ "ErrorCode": record_error_code(&e), "ErrorMessage": e.to_string() })
            }
        })
        .collect();
    Ok(json!({
        "FailedRecordCount": failed,
        "Records": results,
        "EncryptionType": encryption_type(&stream),
    }))
}

/// The `ErrorCode` of a record PutRecords did not store: throttled, or
/// failed (maybe stored, as Kinesis's InternalFailure).
fn record_error_code(e: &RouterError) -> &'static str {
    match e {
        RouterError::Throttled(_) => "ProvisionedThroughputExceededException",
        _ => "InternalFailure",
    }
}

fn find_shard<'s>(
    ctx: &Context<'_>,
    stream: &'s StreamInfo,
    shard_text: &str,
) -> Result<&'s ShardInfo, ApiError> {
    shard_text
        .parse::<ShardId>()
        .ok()
        .and_then(|id| stream.shard(id))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "Shard {shard_text} in stream {} under account {} does not exist",
                stream.name, ctx.account
            ))
        })
}

async fn get_shard_iterator(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let shard_text = i.str("ShardId")?;
    check_name_pattern("ShardId", shard_text)?;
    let kind = i.str("ShardIteratorType")?;
    let seq = i.opt_str("StartingSequenceNumber")?;
    if let Some(s) = seq {
        check_decimal("StartingSequenceNumber", s, 129)?;
    }
    let timestamp = i.opt_timestamp_ms("Timestamp")?;
    let stream = ctx.stream(&name).await?;
    let shard = find_shard(ctx, &stream, shard_text)?;
    let sequence = |what: &str| -> Result<SequenceNumber, ApiError> {
        let s = seq.ok_or_else(|| {
            ApiError::invalid_argument(format!(
                "StartingSequenceNumber is required for ShardIteratorType {what}."
            ))
        })?;
        let n = s.parse::<SequenceNumber>().map_err(|_| {
            ApiError::invalid_argument(format!(
                "StartingSequenceNumber {s} is not a sequence number of this stream."
            ))
        })?;
        if n.shard() != shard.shard_id || n.generation() != shard.generation {
            return Err(ApiError::invalid_argument(format!(
                "Invalid StartingSequenceNumber. It encodes {}, while it was used in a call to a shard with {}",
                n.shard(),
                shard.shard_id
            )));
        }
        Ok(n)
    };
    let position = match kind {
        "TRIM_HORIZON" => Position::TrimHorizon,
        "AT_SEQUENCE_NUMBER" => Position::At(sequence(kind)?.0),
        "AFTER_SEQUENCE_NUMBER" => Position::After(sequence(kind)?.0),
        "AT_TIMESTAMP" => Position::AtTimestamp(timestamp.ok_or_else(|| {
            ApiError::invalid_argument("Timestamp is required for ShardIteratorType AT_TIMESTAMP.")
        })?),
        "LATEST" => {
            // Pin the tip now: records put after this call must be read.
            let tip = ctx
                .router
                .get_records(
                    &name,
                    shard.shard_id,
                    ReadRequest {
                        start: ReadStart::Latest,
                        limit: 1,
                        max_bytes: 1,
                        wait: Duration::ZERO,
                    },
                )
                .await?;
            Position::At(tip.next.0)
        }
        other => {
            return Err(constraint(
                "ShardIteratorType",
                other,
                "satisfy enum value set: [AT_SEQUENCE_NUMBER, AFTER_SEQUENCE_NUMBER, TRIM_HORIZON, LATEST, AT_TIMESTAMP]",
            ))
        }
    };
    let it = ShardIterator {
        stream: name,
        stream_created_ms: stream.created_at_ms,
        shard: shard.shard_id.0,
        position,
        issued_ms: ctx.now_ms,
    };
    Ok(json!({ "ShardIterator": iterator::encode(&it) }))
}

async fn get_records(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let text = i.str("ShardIterator")?;
    if text.is_empty() || text.len() > 512 {
        return Err(constraint(
            "ShardIterator",
            text,
            "have length between 1 and 512",
        ));
    }
    let limit = match i.opt_i64("Limit")? {
        Some(l) if l > 10_000 => {
            return Err(ApiError::invalid_argument(format!(
                "Limit {l} is above the maximum of 10000 records per GetRecords call."
            )))
        }
        Some(_) => i.opt_int_range("Limit", 1, 10_000)?.unwrap_or(10_000) as usize,
        None => 10_000,
    };
    let it: ShardIterator = iterator::decode(text, "ShardIterator")?;
    if ctx.now_ms.saturating_sub(it.issued_ms) > ctx.validity_ms {
        return Err(ApiError::new(
            "ExpiredIteratorException",
            axum::http::StatusCode::BAD_REQUEST,
            format!(
                "Iterator expired. The iterator was created at time {} while right now it is {} which is further in the future than the tolerated delay of {} milliseconds.",
                it.issued_ms, ctx.now_ms, ctx.validity_ms
            ),
        ));
    }
    let stream = ctx.stream(&it.stream).await?;
    if stream.created_at_ms != it.stream_created_ms {
        return Err(ApiError::not_found(format!(
            "Stream {} was deleted after this iterator was issued.",
            it.stream
        )));
    }
    let shard_id = ShardId(it.shard);
    let batch = ctx
        .router
        .get_records(
            &it.stream,
            shard_id,
            ReadRequest {
                start: it.position.read_start(),
                limit,
                max_bytes: MAX_GET_RECORDS_BYTES,
                wait: Duration::ZERO,
            },
        )
        .await?;
    let bytes: usize = batch.records.iter().map(|(_, r)| r.data.len()).sum();
    metrics::counter!("kinesin_stream_outgoing_records_total", "stream" => it.stream.clone())
        .increment(batch.records.len() as u64);
    metrics::counter!("kinesin_stream_outgoing_bytes_total", "stream" => it.stream.clone())
        .increment(bytes as u64);
    metrics::gauge!("kinesin_stream_iterator_age_seconds", "stream" => it.stream.clone())
        .set(batch.millis_behind_latest as f64 / 1000.0);
    let records: Vec<Value> = batch.records.into_iter().map(record_json).collect();
    let mut out = Map::new();
    out.insert("Records".into(), Value::Array(records));
    out.insert(
        "MillisBehindLatest".into(),
        json!(batch.millis_behind_latest),
    );
    if batch.sealed_and_drained {
        out.insert("ChildShards".into(), child_shards(&stream, shard_id));
    } else {
        let next = ShardIterator {
            position: Position::At(batch.next.0),
            issued_ms: ctx.now_ms,
            ..it
        };
        out.insert("NextShardIterator".into(), json!(iterator::encode(&next)));
    }
    Ok(Value::Object(out))
}

/// A stored record as GetRecords and SubscribeToShard return it.
fn record_json((seq, r): (SequenceNumber, kinesin_shard::StoredRecord)) -> Value {
    json!({
        "SequenceNumber": seq.to_string(),
        "ApproximateArrivalTimestamp": seconds(r.arrival_ms),
        "Data": base64::engine::general_purpose::STANDARD.encode(&r.data),
        "PartitionKey": r.partition_key,
    })
}

fn child_shards(stream: &StreamInfo, parent: ShardId) -> Value {
    let children: Vec<Value> = stream
        .shards
        .iter()
        .filter(|s| s.parent == Some(parent) || s.adjacent_parent == Some(parent))
        .map(|s| {
            let parents: Vec<String> = [s.parent, s.adjacent_parent]
                .into_iter()
                .flatten()
                .map(|p| p.to_string())
                .collect();
            json!({
                "ShardId": s.shard_id.to_string(),
                "ParentShards": parents,
                "HashKeyRange": {
                    "StartingHashKey": s.range.start.to_string(),
                    "EndingHashKey": s.range.end.to_string(),
                },
            })
        })
        .collect();
    Value::Array(children)
}

const MAX_CONSUMERS_PER_STREAM: usize = 20;

impl Context<'_> {
    fn consumer_arn(&self, stream: &str, name: &str, created_ms: u64) -> String {
        format!("{}/consumer/{name}:{}", self.arn(stream), created_ms / 1000)
    }

    /// A `Consumer`; a `ConsumerDescription` adds the StreamARN.
    fn consumer_json(&self, stream: &str, name: &str, created_ms: u64) -> Value {
        json!({
            "ConsumerName": name,
            "ConsumerARN": self.consumer_arn(stream, name, created_ms),
            "ConsumerStatus": "ACTIVE",
            "ConsumerCreationTimestamp": seconds(created_ms),
        })
    }
}

/// `<stream arn>/consumer/<name>:<epoch seconds>` → (stream, consumer).
pub(crate) fn parse_consumer_arn(arn: &str) -> Result<(String, String), ApiError> {
    let invalid = || {
        constraint(
            "ConsumerARN",
            arn,
            "satisfy regular expression pattern: ^(arn):aws.*:kinesis:.*:\\d{12}:.*stream\\/[a-zA-Z0-9_.-]+\\/consumer\\/[a-zA-Z0-9_.-]+:[0-9]+",
        )
    };
    let (stream_arn, rest) = arn.split_once("/consumer/").ok_or_else(invalid)?;
    let (name, stamp) = rest.rsplit_once(':').ok_or_else(invalid)?;
    if stamp.is_empty() || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    check_name_pattern("ConsumerName", name)?;
    Ok((
        parse_stream_arn("ConsumerARN", stream_arn)?,
        name.to_string(),
    ))
}

/// The consumer a request names by ConsumerARN or by StreamARN and
/// ConsumerName; it must exist.
async fn consumer_of(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<(StreamInfo, String, u64), ApiError> {
    let (stream, name) = match i.opt_str("ConsumerARN")? {
        Some(arn) => parse_consumer_arn(arn)?,
        None => {
            let arn = i.opt_str("StreamARN")?.ok_or_else(|| {
                ApiError::invalid_argument(
                    "Either ConsumerARN or StreamARN and ConsumerName must be provided.",
                )
            })?;
            let name = i.str("ConsumerName")?;
            check_name_pattern("ConsumerName", name)?;
            (parse_stream_arn("StreamARN", arn)?, name.to_string())
        }
    };
    let info = ctx.stream(&stream).await?;
    let created = *info.settings.consumers.get(&name).ok_or_else(|| {
        ApiError::not_found(format!(
            "Consumer {name}, account {}, not found.",
            ctx.account
        ))
    })?;
    if let Some(arn) = i.opt_str("ConsumerARN")? {
        if ctx.consumer_arn(&stream, &name, created) != arn {
            return Err(ApiError::not_found(format!(
                "Consumer {arn} not found: the consumer was registered again since."
            )));
        }
    }
    Ok((info, name, created))
}

async fn register_consumer(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let stream = parse_stream_arn("StreamARN", i.str("StreamARN")?)?;
    let name = i.str("ConsumerName")?;
    check_name_pattern("ConsumerName", name)?;
    let info = ctx.stream(&stream).await?;
    if info.settings.consumers.contains_key(name) {
        return Err(ApiError::in_use(format!(
            "Consumer {name} of stream {stream} already exists."
        )));
    }
    if info.settings.consumers.len() >= MAX_CONSUMERS_PER_STREAM {
        return Err(ApiError::limit_exceeded(format!(
            "Stream {stream} already has {MAX_CONSUMERS_PER_STREAM} consumers."
        )));
    }
    ctx.change(
        &stream,
        StreamChange::RegisterConsumer {
            name: name.to_string(),
            now_ms: ctx.now_ms,
        },
    )
    .await?;
    let created = ctx
        .stream(&stream)
        .await?
        .settings
        .consumers
        .get(name)
        .copied()
        .unwrap_or(ctx.now_ms);
    Ok(json!({ "Consumer": ctx.consumer_json(&stream, name, created) }))
}

async fn deregister_consumer(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let (stream, name, _) = consumer_of(ctx, i).await?;
    ctx.change(stream.name.as_str(), StreamChange::DeregisterConsumer(name))
        .await?;
    Ok(json!({}))
}

async fn describe_consumer(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let (stream, name, created) = consumer_of(ctx, i).await?;
    let stream = stream.name.as_str();
    let mut description = ctx.consumer_json(stream, &name, created);
    description["StreamARN"] = json!(ctx.arn(stream));
    Ok(json!({ "ConsumerDescription": description }))
}

async fn list_consumers(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let stream = parse_stream_arn("StreamARN", i.str("StreamARN")?)?;
    let limit = i.opt_int_range("MaxResults", 1, 10_000)?.unwrap_or(100) as usize;
    i.opt_timestamp_ms("StreamCreationTimestamp")?;
    let after = match i.opt_str("NextToken")? {
        Some(t) => {
            let t: PageToken = iterator::decode(t, "NextToken")?;
            check_token_age(ctx, t.issued_ms)?;
            Some(t.after)
        }
        None => None,
    };
    let info = ctx.stream(&stream).await?;
    let rest: Vec<(&String, &u64)> = info
        .settings
        .consumers
        .iter()
        .filter(|(n, _)| after.as_deref().is_none_or(|a| n.as_str() > a))
        .collect();
    let page: Vec<Value> = rest
        .iter()
        .take(limit)
        .map(|(n, c)| ctx.consumer_json(&stream, n, **c))
        .collect();
    let mut out = json!({ "Consumers": page });
    if rest.len() > limit {
        out["NextToken"] = json!(iterator::encode(&PageToken {
            stream: stream.clone(),
            after: rest[limit - 1].0.clone(),
            filter: None,
            issued_ms: ctx.now_ms,
        }));
    }
    Ok(out)
}

/// A validated SubscribeToShard request.
pub struct Subscription {
    pub stream: String,
    pub shard: ShardId,
    pub start: ReadStart,
}

pub async fn subscription(ctx: &Context<'_>, body: &Value) -> Result<Subscription, ApiError> {
    let i = Input::new(body)?;
    let i = &i;
    let (stream, _, _) = consumer_of(ctx, i).await?;
    let shard_text = i.str("ShardId")?;
    check_name_pattern("ShardId", shard_text)?;
    let shard = find_shard(ctx, &stream, shard_text)?;
    let pos = i
        .opt_object("StartingPosition")?
        .ok_or_else(|| constraint("StartingPosition", "null", "not be null"))?;
    let kind = pos.str("Type")?;
    let sequence = || -> Result<SequenceNumber, ApiError> {
        let s = pos.opt_str("SequenceNumber")?.ok_or_else(|| {
            ApiError::invalid_argument(format!("StartingPosition {kind} needs a SequenceNumber."))
        })?;
        check_decimal("SequenceNumber", s, 129)?;
        let n = s
            .parse::<SequenceNumber>()
            .map_err(|e| ApiError::invalid_argument(e.0))?;
        if n.shard() != shard.shard_id || n.generation() != shard.generation {
            return Err(ApiError::invalid_argument(format!(
                "Invalid SequenceNumber: it encodes {}, not {}",
                n.shard(),
                shard.shard_id
            )));
        }
        Ok(n)
    };
    let start = match kind {
        "TRIM_HORIZON" => ReadStart::TrimHorizon,
        "LATEST" => ReadStart::Latest,
        "AT_SEQUENCE_NUMBER" => ReadStart::At(sequence()?),
        "AFTER_SEQUENCE_NUMBER" => ReadStart::After(sequence()?),
        "AT_TIMESTAMP" => ReadStart::AtTimestamp(pos.opt_timestamp_ms("Timestamp")?.ok_or_else(|| {
            ApiError::invalid_argument("StartingPosition AT_TIMESTAMP needs a Timestamp.")
        })?),
        other => {
            return Err(constraint(
                "Type",
                other,
                "satisfy enum value set: [AT_SEQUENCE_NUMBER, AFTER_SEQUENCE_NUMBER, TRIM_HORIZON, LATEST, AT_TIMESTAMP]",
            ))
        }
    };
    Ok(Subscription {
        stream: stream.name.as_str().to_string(),
        shard: shard.shard_id,
        start,
    })
}

/// Pins LATEST to the current tip, so that records put once the call
/// returned are delivered.
pub async fn pin_latest(router: &Router, sub: &mut Subscription) -> Result<(), ApiError> {
    if sub.start == ReadStart::Latest {
        let tip = router
            .get_records(
                &sub.stream,
                sub.shard,
                ReadRequest {
                    start: ReadStart::Latest,
                    limit: 1,
                    max_bytes: 1,
                    wait: Duration::ZERO,
                },
            )
            .await?;
        sub.start = ReadStart::At(tip.next);
    }
    Ok(())
}

/// One SubscribeToShardEvent read from `start`, waiting up to `wait` at the
/// leader for records when there are none yet; returns the event and where
/// the next read starts, or None once a closed shard is fully read.
pub async fn next_event(
    router: &Router,
    sub: &Subscription,
    start: ReadStart,
    wait: Duration,
) -> Result<(Value, Option<ReadStart>, usize), ApiError> {
    let batch = router
        .get_records(
            &sub.stream,
            sub.shard,
            ReadRequest {
                start,
                limit: 10_000,
                max_bytes: MAX_GET_RECORDS_BYTES,
                wait,
            },
        )
        .await?;
    let info = router.describe_stream(&sub.stream).await?;
    let shard = info
        .shard(sub.shard)
        .ok_or_else(|| ApiError::not_found(format!("Shard {} is gone.", sub.shard)))?;
    // Resume with AFTER_SEQUENCE_NUMBER or AT_SEQUENCE_NUMBER alike: the
    // number just below the next one to read, never below the shard's first.
    let continuation = SequenceNumber(
        batch
            .next
            .0
            .saturating_sub(1)
            .max(shard.starting_sequence().0),
    );
    let count = batch.records.len();
    let records: Vec<Value> = batch.records.into_iter().map(record_json).collect();
    let mut event = json!({
        "Records": records,
        "ContinuationSequenceNumber": continuation.to_string(),
        "MillisBehindLatest": batch.millis_behind_latest,
    });
    if batch.sealed_and_drained {
        event["ChildShards"] = child_shards(&info, sub.shard);
        return Ok((event, None, count));
    }
    Ok((event, Some(ReadStart::At(batch.next)), count))
}

/// A stream that may be resharded now: ACTIVE, as AWS requires.
async fn active_stream(ctx: &Context<'_>, name: &str) -> Result<StreamInfo, ApiError> {
    let stream = ctx.stream(name).await?;
    if stream.status != StreamStatus::Active {
        return Err(ApiError::in_use(format!(
            "Stream {name} under account {} not ACTIVE, instead in state {}",
            ctx.account,
            stream.status.as_aws_str()
        )));
    }
    Ok(stream)
}

fn open_shard<'s>(
    ctx: &Context<'_>,
    stream: &'s StreamInfo,
    member: &str,
    i: &Input<'_>,
) -> Result<&'s ShardInfo, ApiError> {
    let text = i.str(member)?;
    check_name_pattern(member, text)?;
    let shard = find_shard(ctx, stream, text)?;
    if shard.state != ShardState::Open {
        return Err(ApiError::invalid_argument(format!(
            "Shard {} in stream {} is closed and cannot be resharded.",
            shard.shard_id, stream.name
        )));
    }
    Ok(shard)
}

async fn reshard(
    ctx: &Context<'_>,
    stream: &StreamInfo,
    parents: Vec<ShardId>,
    children: Vec<NewShard>,
) -> Result<(), ApiError> {
    let open = ctx.router.meta_state().open_shard_count();
    let after = open + children.len() - parents.len().min(open);
    if after > ctx.shard_limit as usize {
        return Err(ApiError::limit_exceeded(format!(
            "This request would exceed the shard limit of {} for the cluster.",
            ctx.shard_limit
        )));
    }
    ctx.router
        .meta_write(MetaCommand::Reshard {
            stream: stream.name.as_str().to_string(),
            parents,
            children,
        })
        .await?;
    Ok(())
}

/// Children keep their parent's replicas: a reshard moves no data.
fn child_of(parent: &ShardInfo, adjacent: Option<&ShardInfo>, range: HashKeyRange) -> NewShard {
    NewShard {
        range,
        parent: parent.shard_id,
        adjacent_parent: adjacent.map(|a| a.shard_id),
        replicas: parent.replicas.clone(),
    }
}

async fn split_shard(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let key_text = i.str("NewStartingHashKey")?;
    check_decimal("NewStartingHashKey", key_text, 39)?;
    let key = key_text
        .parse::<HashKey>()
        .map_err(|e| ApiError::invalid_argument(format!("NewStartingHashKey {key_text}: {e}")))?;
    let stream = active_stream(ctx, &name).await?;
    let parent = open_shard(ctx, &stream, "ShardToSplit", i)?;
    let (low, high) = parent.range.split_at(key).map_err(|e| {
        ApiError::invalid_argument(format!(
            "NewStartingHashKey {key_text} is not inside the range of {}: {e}",
            parent.shard_id
        ))
    })?;
    let children = vec![child_of(parent, None, low), child_of(parent, None, high)];
    reshard(ctx, &stream, vec![parent.shard_id], children).await?;
    Ok(json!({}))
}

async fn merge_shards(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let stream = active_stream(ctx, &name).await?;
    let first = open_shard(ctx, &stream, "ShardToMerge", i)?;
    let second = open_shard(ctx, &stream, "AdjacentShardToMerge", i)?;
    let range = first.range.merge(&second.range).map_err(|_| {
        ApiError::invalid_argument(format!(
            "Shards {} and {} in stream {name} are not adjacent and cannot be merged.",
            first.shard_id, second.shard_id
        ))
    })?;
    let children = vec![child_of(first, Some(second), range)];
    reshard(
        ctx,
        &stream,
        vec![first.shard_id, second.shard_id],
        children,
    )
    .await?;
    Ok(json!({}))
}

/// UNIFORM_SCALING: the open shards become `target` shards of equal
/// ranges. Shards whose range stays the same are kept; each new shard names
/// the (at most two) closed shards it overlaps as parents.
async fn update_shard_count(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let target =
        i.opt_int_range("TargetShardCount", 1, 100_000)?
            .ok_or_else(|| constraint("TargetShardCount", "null", "not be null"))? as usize;
    let scaling = i.str("ScalingType")?;
    if scaling != "UNIFORM_SCALING" {
        return Err(constraint(
            "ScalingType",
            scaling,
            "satisfy enum value set: [UNIFORM_SCALING]",
        ));
    }
    let stream = active_stream(ctx, &name).await?;
    let mut open: Vec<&ShardInfo> = stream
        .shards
        .iter()
        .filter(|s| s.state == ShardState::Open)
        .collect();
    open.sort_by_key(|s| s.range.start);
    let current = open.len();
    if target > current * 2 || target * 2 < current {
        return Err(ApiError::limit_exceeded(format!(
            "UpdateShardCount can at most double or halve the open shards: {current} open, {target} requested."
        )));
    }
    let ranges = HashKeyRange::split_evenly(target as u32);
    let kept = |r: &HashKeyRange| open.iter().any(|s| s.range == *r);
    let parents: Vec<&ShardInfo> = open
        .iter()
        .copied()
        .filter(|s| !ranges.contains(&s.range))
        .collect();
    let mut children = Vec::new();
    for r in ranges.iter().filter(|r| !kept(r)) {
        let overlapping: Vec<&ShardInfo> = parents
            .iter()
            .copied()
            .filter(|s| s.range.start <= r.end && r.start <= s.range.end)
            .collect();
        match overlapping.as_slice() {
            [p] => children.push(child_of(p, None, *r)),
            [p, a] => children.push(child_of(p, Some(a), *r)),
            _ => {
                return Err(ApiError::invalid_argument(format!(
                    "Scaling from {current} to {target} shards would give a new shard more than two parents; scale in smaller steps."
                )))
            }
        }
    }
    if !children.is_empty() {
        let parent_ids = parents.iter().map(|s| s.shard_id).collect();
        reshard(ctx, &stream, parent_ids, children).await?;
    }
    Ok(json!({
        "StreamName": name,
        "StreamARN": ctx.arn(&name),
        "CurrentShardCount": current,
        "TargetShardCount": target,
    }))
}

async fn change_retention(
    ctx: &Context<'_>,
    i: &Input<'_>,
    increase: bool,
) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let hours = i
        .opt_i64("RetentionPeriodHours")?
        .ok_or_else(|| constraint("RetentionPeriodHours", "null", "not be null"))?;
    let stream = ctx.stream(&name).await?;
    if hours < 24 {
        return Err(ApiError::invalid_argument(format!(
            "Minimum allowed retention period is 24 hours. Requested retention period ({hours} hours) is too short."
        )));
    }
    if hours > 8760 {
        return Err(ApiError::invalid_argument(format!(
            "Maximum allowed retention period is 8760 hours. Requested retention period ({hours} hours) is too long."
        )));
    }
    let current = i64::from(stream.retention_hours);
    if increase && hours < current {
        return Err(ApiError::invalid_argument(format!(
            "Requested retention period ({hours} hours) for stream {name} can not be shorter than existing retention period ({current} hours). Use DecreaseRetentionPeriod API."
        )));
    }
    if !increase && hours > current {
        return Err(ApiError::invalid_argument(format!(
            "Requested retention period ({hours} hours) for stream {name} can not be longer than existing retention period ({current} hours). Use IncreaseRetentionPeriod API."
        )));
    }
    ctx.change(&name, StreamChange::RetentionHours(hours as u32))
        .await?;
    Ok(json!({}))
}

fn parse_tags(i: &Input<'_>) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    let Some(pairs) = i.opt_str_map("Tags")? else {
        return Ok(None);
    };
    if pairs.is_empty() || pairs.len() > 200 {
        return Err(constraint(
            "Tags",
            format!("{} tags", pairs.len()),
            "have between 1 and 200 entries",
        ));
    }
    let mut tags = BTreeMap::new();
    for (k, v) in pairs {
        if k.is_empty() || k.chars().count() > 128 {
            return Err(ApiError::invalid_argument(format!(
                "Tag key '{k}' must be 1 to 128 characters."
            )));
        }
        if v.chars().count() > 256 {
            return Err(ApiError::invalid_argument(format!(
                "The value of tag '{k}' must be at most 256 characters."
            )));
        }
        tags.insert(k.to_string(), v.to_string());
    }
    Ok(Some(tags))
}

async fn add_tags(ctx: &Context<'_>, name: &str, i: &Input<'_>) -> Result<Value, ApiError> {
    let tags = parse_tags(i)?.ok_or_else(|| constraint("Tags", "null", "not be null"))?;
    let stream = ctx.stream(name).await?;
    let after: BTreeSet<&String> = stream.settings.tags.keys().chain(tags.keys()).collect();
    if after.len() > MAX_TAGS_PER_STREAM {
        return Err(ApiError::limit_exceeded(format!(
            "Stream {name} would have {} tags; at most {MAX_TAGS_PER_STREAM} are allowed.",
            after.len()
        )));
    }
    ctx.change(name, StreamChange::AddTags(tags)).await?;
    Ok(json!({}))
}

async fn remove_tags(
    ctx: &Context<'_>,
    name: &str,
    i: &Input<'_>,
    member: &str,
) -> Result<Value, ApiError> {
    let keys = i
        .opt_str_list(member)?
        .ok_or_else(|| constraint(member, "null", "not be null"))?;
    if keys.is_empty() || keys.len() > 50 {
        return Err(constraint(
            member,
            format!("{} keys", keys.len()),
            "have length between 1 and 50",
        ));
    }
    ctx.stream(name).await?;
    ctx.change(
        name,
        StreamChange::RemoveTags(keys.into_iter().map(str::to_string).collect()),
    )
    .await?;
    Ok(json!({}))
}

fn tag_list<'t>(tags: impl Iterator<Item = (&'t String, &'t String)>) -> Vec<Value> {
    tags.map(|(k, v)| json!({ "Key": k, "Value": v })).collect()
}

async fn list_tags_for_stream(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let limit = i.opt_int_range("Limit", 1, 50)?.unwrap_or(50) as usize;
    let after = i.opt_str_len("ExclusiveStartTagKey", 1, 128)?;
    let stream = ctx.stream(&name).await?;
    let rest: Vec<(&String, &String)> = stream
        .settings
        .tags
        .iter()
        .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
        .collect();
    Ok(json!({
        "Tags": tag_list(rest.iter().take(limit).copied()),
        "HasMoreTags": rest.len() > limit,
    }))
}

async fn enhanced_monitoring(
    ctx: &Context<'_>,
    i: &Input<'_>,
    enable: bool,
) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let requested = i
        .opt_str_list("ShardLevelMetrics")?
        .ok_or_else(|| constraint("ShardLevelMetrics", "null", "not be null"))?;
    if requested.is_empty() || requested.len() > 7 {
        return Err(constraint(
            "ShardLevelMetrics",
            format!("{} names", requested.len()),
            "have length between 1 and 7",
        ));
    }
    let mut names = Vec::new();
    for m in requested {
        if m == "ALL" {
            names.extend(SHARD_LEVEL_METRICS.iter().map(|s| s.to_string()));
        } else if SHARD_LEVEL_METRICS.contains(&m) {
            names.push(m.to_string());
        } else {
            return Err(constraint(
                "ShardLevelMetrics",
                m,
                "satisfy enum value set: [IncomingBytes, IncomingRecords, OutgoingBytes, OutgoingRecords, WriteProvisionedThroughputExceeded, ReadProvisionedThroughputExceeded, IteratorAgeMilliseconds, ALL]",
            ));
        }
    }
    let stream = ctx.stream(&name).await?;
    let current = stream.settings.shard_level_metrics.clone();
    let mut desired = current.clone();
    if enable {
        desired.extend(names.iter().cloned());
        ctx.change(&name, StreamChange::EnableMetrics(names))
            .await?;
    } else {
        for n in &names {
            desired.remove(n);
        }
        ctx.change(&name, StreamChange::DisableMetrics(names))
            .await?;
    }
    Ok(json!({
        "StreamName": name,
        "StreamARN": ctx.arn(&name),
        "CurrentShardLevelMetrics": current,
        "DesiredShardLevelMetrics": desired,
    }))
}

async fn stream_encryption(
    ctx: &Context<'_>,
    i: &Input<'_>,
    start: bool,
) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let kind = i.str("EncryptionType")?;
    let key = i
        .opt_str_len("KeyId", 1, 2048)?
        .ok_or_else(|| constraint("KeyId", "null", "not be null"))?;
    if kind != "KMS" {
        return Err(ApiError::invalid_argument(format!(
            "EncryptionType must be KMS, not {kind}."
        )));
    }
    let stream = ctx.stream(&name).await?;
    if !start && stream.settings.encryption_key.is_none() {
        return Err(ApiError::invalid_argument(format!(
            "Stream {name} is not encrypted."
        )));
    }
    let change = StreamChange::EncryptionKey(start.then(|| key.to_string()));
    ctx.change(&name, change).await?;
    Ok(json!({}))
}

async fn update_max_record_size(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let kib = i
        .opt_int_range("MaxRecordSizeInKiB", 1024, 10240)?
        .ok_or_else(|| constraint("MaxRecordSizeInKiB", "null", "not be null"))?;
    ctx.stream(&name).await?;
    ctx.change(&name, StreamChange::MaxRecordBytes(kib as u32 * 1024))
        .await?;
    Ok(json!({}))
}

async fn update_stream_mode(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = stream_name(i)?;
    let details = i
        .opt_object("StreamModeDetails")?
        .ok_or_else(|| constraint("StreamModeDetails", "null", "not be null"))?;
    let mode = parse_mode(details.str("StreamMode")?)?;
    let stream = ctx.stream(&name).await?;
    if stream.status != StreamStatus::Active {
        return Err(ApiError::in_use(format!(
            "Stream {name} is {} and cannot change its mode now.",
            stream.status.as_aws_str()
        )));
    }
    ctx.change(&name, StreamChange::Mode(mode)).await?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_arns_name_their_stream() {
        assert_eq!(
            parse_stream_arn(
                "StreamARN",
                "arn:aws:kinesis:us-east-1:123456789012:stream/orders"
            )
            .unwrap(),
            "orders"
        );
        let err = parse_stream_arn("StreamARN", "arn:aws:sqs:us-east-1:123456789012:stream/x")
            .unwrap_err();
        assert_eq!(err.name, "ValidationException");
        assert!(err.message.contains("'streamARN'"), "{}", err.message);
        assert!(parse_stream_arn("StreamARN", "arn:aws:kinesis:r:1:stream/x").is_err());
    }

    #[test]
    fn put_entries_are_validated_as_the_model_says() {
        let entry = |v: Value| parse_record(&Input::new(&v).unwrap(), Some(2), 1024);
        let ok = entry(json!({"Data": "aGk=", "PartitionKey": "k"})).unwrap();
        assert_eq!(ok.data, b"hi");
        let err = entry(json!({"Data": "aGk=", "PartitionKey": ""})).unwrap_err();
        assert_eq!(err.name, "ValidationException");
        assert!(
            err.message.contains("records.3.member.partitionKey"),
            "{}",
            err.message
        );
        let err = entry(json!({"Data": "aGk=", "PartitionKey": "k", "ExplicitHashKey": "01"}))
            .unwrap_err();
        assert_eq!(err.name, "ValidationException");
        // 2^128 has 39 digits: it passes the pattern but not the range.
        let two_to_128 = "340282366920938463463374607431768211456";
        let err =
            entry(json!({"Data": "aGk=", "PartitionKey": "k", "ExplicitHashKey": two_to_128}))
                .unwrap_err();
        assert_eq!(err.name, "InvalidArgumentException");
        let max = u128::MAX.to_string();
        assert!(
            entry(json!({"Data": "aGk=", "PartitionKey": "k", "ExplicitHashKey": max})).is_ok()
        );
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 1024]);
        let err = entry(json!({"Data": big, "PartitionKey": "k"})).unwrap_err();
        assert_eq!(err.name, "ValidationException");
        let err = entry(json!({"Data": "***", "PartitionKey": "k"})).unwrap_err();
        assert_eq!(err.name, "SerializationException");
    }
}
