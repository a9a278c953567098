//! Kinesis Data Streams operations (target prefix `Kinesis_20131202`):
//! validate as the service model does, call the router, shape the answer.

mod consumers;
mod records;
mod reshard;
mod streams;
mod tags;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use kinesin_meta::{Limits, MetaCommand, StreamChange};
use kinesin_router::{AppendOutcome, ReadRequest, RecordIn, Router, RouterError, StreamOptions};
use kinesin_shard::ReadStart;
use kinesin_types::{
    HashKey, SequenceNumber, ShardId, ShardInfo, ShardState, StreamInfo, StreamMode, StreamStatus,
    DEFAULT_MAX_RECORD_BYTES, MAX_RECORD_BYTES_LIMIT,
};
use serde_json::{json, Map, Value};

use crate::codec::Protocol;
use crate::error::ApiError;
use crate::input::{check_decimal, check_name_pattern, constraint, Input};
use crate::iterator::{self, PageToken, Position, ShardIterator};
use crate::service::{operation_table, Service};

use consumers::*;
use records::*;
pub(crate) use records::{next_event, pin_latest, subscription};
use reshard::*;
use streams::*;
use tags::*;

const MAX_PUT_RECORDS: usize = 500;
const MAX_PUT_RECORDS_BYTES: usize = 5 * 1024 * 1024;
const MAX_GET_RECORDS_BYTES: usize = 10 * 1024 * 1024;
const MAX_TAGS_PER_STREAM: usize = 50;
/// The largest resource policy, as AWS (20 KiB).
const MAX_POLICY_BYTES: usize = 20 * 1024;
/// Shards a stream gets when created in ON_DEMAND mode, as AWS.
const ON_DEMAND_SHARDS: u32 = 4;
/// Streams of one account that may be in ON_DEMAND mode, as AWS.
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
    /// Account of the signing key: the namespace of the names it uses, and
    /// the account its ARNs name.
    pub account: &'a str,
    /// The account whose streams the map keys by their bare names
    /// (`kinesin_meta::stream_key`).
    pub home: &'a str,
    /// Whether an ARN must name the caller's account: not in development
    /// mode, where every request is the one development account and ARNs
    /// made for real AWS accounts keep working.
    pub check_arn_accounts: bool,
    /// Most open shards the cluster allows (DescribeLimits, CreateStream).
    pub shard_limit: u32,
    /// Lifetime of iterators and paging tokens.
    pub validity_ms: u64,
    pub now_ms: u64,
}

impl Context<'_> {
    /// The map key of the caller's stream `name`.
    fn key(&self, name: &str) -> String {
        kinesin_meta::stream_key(self.home, self.account, name)
    }

    /// The name a map key shows the caller (its stream name).
    fn display<'k>(&self, key: &'k str) -> &'k str {
        kinesin_meta::split_stream_key(key).1
    }

    /// Whether the stream a map key names is the caller's. A key qualified
    /// with the home account (which only the native API can make) is
    /// nobody's here: the home account's streams are its bare keys.
    fn owns(&self, key: &str) -> bool {
        match kinesin_meta::split_stream_key(key).0 {
            None => self.home == self.account,
            Some(account) => account == self.account && account != self.home,
        }
    }

    /// An iterator's or paging token's text, signed with the cluster's key.
    fn encode_token<T: iterator::Token>(&self, token: &T) -> String {
        iterator::encode(token, self.router.meta_state().token_key.bytes())
    }

    /// A token this or another node issued (see `iterator::decode`).
    fn decode_token<T: iterator::Token>(&self, text: &str, what: &str) -> Result<T, ApiError> {
        iterator::decode(text, what, self.router.meta_state().token_key.bytes())
    }

    /// The limits a change proposed for this caller must keep where the
    /// metadata group applies it. The checks here, against this node's map,
    /// give the clearest message; two requests at once can both pass them,
    /// not those at apply (`kinesin_meta::Limits`).
    fn limits(&self) -> Limits {
        Limits {
            open_shards: self.shard_limit,
            on_demand_streams: ON_DEMAND_STREAM_LIMIT as u32,
            consumers_per_stream: consumers::MAX_CONSUMERS_PER_STREAM as u32,
            tags_per_stream: MAX_TAGS_PER_STREAM as u32,
        }
    }

    /// Runs a check of the caller's limits against this node's map.
    fn check_limits(
        &self,
        check: impl FnOnce(&Limits, &kinesin_meta::MetaState) -> kinesin_meta::MetaReply,
    ) -> Result<(), ApiError> {
        check(&self.limits(), &self.router.meta_state())
            .map_err(|e| ApiError::from(RouterError::from(e)))
    }

    /// The ARN of the stream a map key names.
    fn arn(&self, key: &str) -> String {
        let (account, name) = kinesin_meta::split_stream_key(key);
        let account = account.unwrap_or(self.home);
        format!("arn:aws:kinesis:{}:{account}:stream/{name}", self.region)
    }

    /// The key of the stream an ARN names, which must be the caller's.
    fn stream_arn(&self, member: &str, arn: &str) -> Result<String, ApiError> {
        let (account, name) = parse_stream_arn(member, arn)?;
        if self.check_arn_accounts && account != self.account {
            return Err(ApiError::new(
                "AccessDeniedException",
                axum::http::StatusCode::BAD_REQUEST,
                format!(
                    "Account {} is not authorized to access {arn}: it belongs to another account.",
                    self.account
                ),
            ));
        }
        Ok(self.key(&name))
    }

    /// The key of the stream a request names by StreamName or StreamARN.
    fn stream_name(&self, i: &Input<'_>) -> Result<String, ApiError> {
        let name = i.opt_str("StreamName")?;
        let arn = i.opt_str("StreamARN")?;
        if let Some(n) = name {
            check_name_pattern("StreamName", n)?;
        }
        let from_arn = arn.map(|a| self.stream_arn("StreamARN", a)).transpose()?;
        match (name.map(|n| self.key(n)), from_arn) {
            (Some(n), Some(a)) if n != a => Err(ApiError::invalid_argument(format!(
                "StreamName {} and StreamARN {} name different streams.",
                name.unwrap_or_default(),
                arn.unwrap_or_default()
            ))),
            (Some(n), _) => Ok(n),
            (None, Some(a)) => Ok(a),
            (None, None) => Err(ApiError::invalid_argument(
                "Either StreamName or StreamARN must be provided.",
            )),
        }
    }

    /// The key of the stream a request names by ResourceARN.
    fn resource_stream(&self, i: &Input<'_>) -> Result<String, ApiError> {
        let arn = i.str("ResourceARN")?;
        if arn.contains("/consumer/") {
            return Err(ApiError::not_found(format!(
                "Resource {arn} not found: stream consumers are not supported yet."
            )));
        }
        self.stream_arn("ResourceARN", arn)
    }

    async fn stream(&self, key: &str) -> Result<StreamInfo, ApiError> {
        self.router.describe_stream(key).await.map_err(|e| match e {
            RouterError::ResourceNotFound(_) => ApiError::not_found(format!(
                "Stream {} under account {} not found.",
                self.display(key),
                self.account
            )),
            other => other.into(),
        })
    }

    /// Proposes a change of `stream`'s settings within the caller's limits.
    async fn change(&self, stream: &str, change: StreamChange) -> Result<(), ApiError> {
        let command = MetaCommand::UpdateStream {
            name: stream.to_string(),
            change,
        };
        self.propose_limited(command).await
    }

    /// Proposes a metadata command that must keep the caller's limits:
    /// checked here against this node's map, and again where it applies.
    async fn propose_limited(&self, command: MetaCommand) -> Result<(), ApiError> {
        self.check_limits(|limits, state| limits.check(state, &command))?;
        self.router
            .meta_write_limited(command, self.limits())
            .await
            .map_err(ApiError::from)
    }
}

/// Kinesis Data Streams as the gateway knows it.
pub const SERVICE: Service = Service {
    name: "kinesis",
    signing_name: "kinesis",
    target_prefix: "Kinesis_20131202.",
    protocols: &[Protocol::Json11, Protocol::Cbor],
    operations: OPERATIONS,
    query: None,
    query_errors: &[],
    query_compatible: false,
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
        let name = ctx.stream_name(i)?;
        add_tags(ctx, &name, i).await
    },
    "TagResource" => {
        let name = ctx.resource_stream(i)?;
        add_tags(ctx, &name, i).await
    },
    "RemoveTagsFromStream" => {
        let name = ctx.stream_name(i)?;
        remove_tags(ctx, &name, i, "TagKeys").await
    },
    "UntagResource" => {
        let name = ctx.resource_stream(i)?;
        remove_tags(ctx, &name, i, "TagKeys").await
    },
    "ListTagsForStream" => list_tags_for_stream(ctx, i).await,
    "ListTagsForResource" => {
        let stream = ctx.stream(&ctx.resource_stream(i)?).await?;
        Ok(json!({ "Tags": tag_list(stream.settings.tags.iter()) }))
    },
    "EnableEnhancedMonitoring" => enhanced_monitoring(ctx, i, true).await,
    "DisableEnhancedMonitoring" => enhanced_monitoring(ctx, i, false).await,
    "StartStreamEncryption" => stream_encryption(ctx, i, true).await,
    "StopStreamEncryption" => stream_encryption(ctx, i, false).await,
    "UpdateMaxRecordSize" => update_max_record_size(ctx, i).await,
    "UpdateStreamMode" => update_stream_mode(ctx, i).await,
    "PutResourcePolicy" => {
        let name = ctx.resource_stream(i)?;
        let policy = i.str("Policy")?;
        if policy.len() > MAX_POLICY_BYTES {
            return Err(ApiError::limit_exceeded(format!(
                "The policy is {} bytes; a resource policy holds at most {MAX_POLICY_BYTES}.",
                policy.len()
            )));
        }
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
        let stream = ctx.stream(&ctx.resource_stream(i)?).await?;
        Ok(json!({
            "Policy": stream.settings.resource_policy.unwrap_or_else(|| "{}".to_string())
        }))
    },
    "DeleteResourcePolicy" => {
        let name = ctx.resource_stream(i)?;
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

/// `arn:aws:kinesis:<region>:<12 digits>:stream/<name>` → (account, name).
pub(crate) fn parse_stream_arn(member: &str, arn: &str) -> Result<(String, String), ApiError> {
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
    Ok((parts[4].to_string(), name.to_string()))
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
            ("123456789012".to_string(), "orders".to_string())
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
