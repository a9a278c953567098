//! Delivery stream operations: create, describe, list, delete, update,
//! tags, encryption, and putting records.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use base64::Engine;
use kinesin_firehose::{FirehoseCommand, FirehoseReply, KinesisSource, Source, StreamConfig};
use kinesin_router::Retry;
use serde_bytes::ByteBuf;
use serde_json::{json, Value};

use super::destination::{self, DESTINATION_ID, OTHER_DESTINATIONS};
use super::{internal, stream_name, Context};
use crate::error::ApiError;
use crate::input::{constraint, Input};

/// Largest record, as AWS: 1,000 KiB.
const MAX_RECORD_BYTES: usize = 1_024_000;
const MAX_BATCH_RECORDS: usize = 500;
/// Largest PutRecordBatch, as AWS: 4 MiB of data.
const MAX_BATCH_BYTES: usize = 4 << 20;
const MAX_TAGS: usize = 50;

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// `Tags`: a list of `{Key, Value}`.
fn read_tags(input: &Input<'_>, member: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut tags = BTreeMap::new();
    let list = input
        .opt_array(member)?
        .map(Vec::as_slice)
        .unwrap_or_default();
    if list.len() > MAX_TAGS {
        return Err(constraint(
            member,
            list.len(),
            "have length less than or equal to 50",
        ));
    }
    for tag in list {
        let Value::Object(map) = tag else {
            return Err(ApiError::serialization(format!(
                "{member}: a tag is not a structure"
            )));
        };
        let tag = input.child(map);
        let key = tag
            .opt_str_len("Key", 1, 128)?
            .ok_or_else(|| constraint("Key", "null", "not be null"))?;
        if key.starts_with("aws:") {
            return Err(ApiError::invalid_argument(
                "Tag keys may not start with aws:",
            ));
        }
        let value = tag.opt_str_len("Value", 0, 256)?.unwrap_or("");
        tags.insert(key.to_string(), value.to_string());
    }
    Ok(tags)
}

pub(super) async fn create_delivery_stream(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let name = stream_name(input)?;
    let kinesis = input.opt_object("KinesisStreamSourceConfiguration")?;
    let source = match input.opt_str("DeliveryStreamType")?.unwrap_or("DirectPut") {
        "DirectPut" if kinesis.is_none() => Source::DirectPut,
        "DirectPut" => {
            return Err(ApiError::invalid_argument(
                "KinesisStreamSourceConfiguration is only for the KinesisStreamAsSource type",
            ))
        }
        "KinesisStreamAsSource" => {
            let config = kinesis.ok_or_else(|| {
                ApiError::invalid_argument(
                    "KinesisStreamSourceConfiguration is required for the KinesisStreamAsSource type",
                )
            })?;
            Source::Kinesis(kinesis_source(ctx, &config).await?)
        }
        "MSKAsSource" | "DatabaseAsSource" => {
            return Err(ApiError::invalid_argument(
                "Only DirectPut and KinesisStreamAsSource delivery streams are supported by Kinesin",
            ))
        }
        other => {
            return Err(constraint(
                "DeliveryStreamType",
                other,
                "satisfy enum value set: [DirectPut, KinesisStreamAsSource, MSKAsSource, DatabaseAsSource]",
            ))
        }
    };
    for member in OTHER_DESTINATIONS {
        if input.opt_object(member)?.is_some() {
            return Err(ApiError::invalid_argument(format!(
                "{member}: only S3 destinations are supported by Kinesin"
            )));
        }
    }
    let destination = match (
        input.opt_object("S3DestinationConfiguration")?,
        input.opt_object("ExtendedS3DestinationConfiguration")?,
    ) {
        (Some(c), None) => destination::read(&c, None, false, ctx.tables)?,
        (None, Some(c)) => destination::read(&c, None, true, ctx.tables)?,
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_argument(
                "Only one destination configuration may be given",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid_argument(
                "A destination configuration (S3 or ExtendedS3) is required",
            ))
        }
    };
    let encrypted = input
        .opt_object("DeliveryStreamEncryptionConfigurationInput")?
        .is_some();
    let config = StreamConfig {
        name: name.to_string(),
        source,
        destination,
        tags: read_tags(input, "Tags")?,
        encrypted,
        created_ms: ctx.now_ms,
    };
    let key = kinesin_firehose::group_name(ctx.account, name);
    match ctx
        .router
        .create_group(
            &key,
            kinesin_firehose::FIREHOSE_KIND,
            kinesin_firehose::encode(&config),
            0,
        )
        .await
    {
        Ok(_) => {}
        // An SDK's retry of a create whose answer was lost finds the
        // stream it made: the same configuration succeeds again.
        Err(kinesin_router::RouterError::ResourceInUse(_))
            if ctx.existing(&key) == Some(config) => {}
        Err(kinesin_router::RouterError::ResourceInUse(_)) => {
            return Err(ApiError::in_use(format!(
                "Firehose {name} under accountId {} already exists",
                ctx.account
            )))
        }
        Err(e) => return Err(e.into()),
    }
    Ok(json!({ "DeliveryStreamARN": ctx.arn(name) }))
}

/// A Kinesis source: the caller's stream the ARN names, which must exist;
/// delivery starts with the records that arrive from now on.
async fn kinesis_source(ctx: &Context<'_>, config: &Input<'_>) -> Result<KinesisSource, ApiError> {
    let arn = config.str("KinesisStreamARN")?;
    let role = config
        .opt_str_len("RoleARN", 1, 512)?
        .ok_or_else(|| constraint("RoleARN", "null", "not be null"))?;
    let (account, stream) = crate::kinesis::parse_stream_arn("KinesisStreamARN", arn)?;
    if ctx.check_accounts && account != ctx.account {
        return Err(ApiError::invalid_argument(format!(
            "Account {} cannot read {arn}: it belongs to another account",
            ctx.account
        )));
    }
    let stream_key = kinesin_meta::stream_key(ctx.home, &account, &stream);
    ctx.router
        .describe_stream(&stream_key)
        .await
        .map_err(|e| match e {
            kinesin_router::RouterError::ResourceNotFound(_) => {
                ApiError::invalid_argument(format!("The Kinesis stream {arn} does not exist"))
            }
            e => e.into(),
        })?;
    Ok(KinesisSource {
        stream_arn: arn.to_string(),
        role_arn: role.to_string(),
        stream_key,
        start_ms: ctx.now_ms,
    })
}

pub(super) async fn delete_delivery_stream(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let stream = ctx.stream(input)?;
    match ctx
        .router
        .delete_group(&kinesin_firehose::group_name(ctx.account, &stream.name))
        .await
    {
        Ok(()) => Ok(json!({})),
        Err(kinesin_router::RouterError::ResourceNotFound(_)) => Err(ctx.not_found(&stream.name)),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn describe_delivery_stream(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    input.opt_int_range("Limit", 1, 10_000)?;
    let stream = ctx.stream(input)?;
    let info = ctx.describe(&stream).await?;
    let mut encryption = json!({"Status": if info.encrypted { "ENABLED" } else { "DISABLED" }});
    if info.encrypted {
        encryption["KeyType"] = json!("AWS_OWNED_CMK");
    }
    let (kind, source) = match &info.source {
        Source::DirectPut => ("DirectPut", Value::Null),
        Source::Kinesis(k) => (
            "KinesisStreamAsSource",
            json!({"KinesisStreamSourceDescription": {
                "KinesisStreamARN": k.stream_arn,
                "RoleARN": k.role_arn,
                "DeliveryStartTimestamp": seconds(k.start_ms),
            }}),
        ),
    };
    Ok(json!({
        "DeliveryStreamDescription": {
            "DeliveryStreamName": stream.name,
            "DeliveryStreamARN": ctx.arn(&stream.name),
            "DeliveryStreamStatus": "ACTIVE",
            "DeliveryStreamEncryptionConfiguration": encryption,
            "DeliveryStreamType": kind,
            "Source": source,
            "VersionId": info.version.to_string(),
            "CreateTimestamp": seconds(info.created_ms),
            "LastUpdateTimestamp": seconds(info.updated_ms),
            "Destinations": [destination::describe(&info.destination)],
            "HasMoreDestinations": false,
        }
    }))
}

pub(super) fn list_delivery_streams(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let limit = input.opt_int_range("Limit", 1, 10_000)?.unwrap_or(10) as usize;
    // Whether the listed streams are DirectPut (None for the source types
    // Kinesin has none of); no type: every stream.
    let wanted = match input.opt_str("DeliveryStreamType")? {
        None => None,
        Some("DirectPut") => Some(Some(true)),
        Some("KinesisStreamAsSource") => Some(Some(false)),
        Some("MSKAsSource" | "DatabaseAsSource") => Some(None),
        Some(other) => {
            return Err(constraint(
                "DeliveryStreamType",
                other,
                "satisfy enum value set: [DirectPut, KinesisStreamAsSource, MSKAsSource, DatabaseAsSource]",
            ))
        }
    };
    let after = input.opt_str_len("ExclusiveStartDeliveryStreamName", 1, 64)?;
    let names: Vec<String> = ctx
        .own_streams()
        .into_iter()
        .filter(|(n, direct)| {
            wanted.is_none_or(|w| w == Some(*direct)) && after.is_none_or(|a| n.as_str() > a)
        })
        .map(|(n, _)| n)
        .collect();
    let more = names.len() > limit;
    Ok(json!({
        "DeliveryStreamNames": names.into_iter().take(limit).collect::<Vec<_>>(),
        "HasMoreDeliveryStreams": more,
    }))
}

/// A record's `Data` (base64 in JSON), at most 1,000 KiB.
fn record_data(record: &Input<'_>, member: &str) -> Result<Vec<u8>, ApiError> {
    let text = record.str("Data")?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| ApiError::serialization(format!("{member}.Data is not valid base64")))?;
    if data.len() > MAX_RECORD_BYTES {
        return Err(constraint(
            &format!("{member}.Data"),
            format!("{} bytes", data.len()),
            &format!("have length less than or equal to {MAX_RECORD_BYTES}"),
        ));
    }
    Ok(data)
}

/// The id of the record with sequence number `seq`.
fn record_id(seq: u128) -> String {
    format!("{seq:048x}")
}

async fn put(
    ctx: &Context<'_>,
    input: &Input<'_>,
    records: Vec<Vec<u8>>,
) -> Result<u128, ApiError> {
    let stream = ctx.stream(input)?;
    let command = FirehoseCommand::Put(records.into_iter().map(ByteBuf::from).collect());
    match ctx
        .command(&stream, &command, Retry::BeforeProposing)
        .await?
    {
        FirehoseReply::Put { first } => Ok(first),
        FirehoseReply::NotDirectPut => Err(ApiError::invalid_argument(
            "This operation is not permitted on KinesisStreamAsSource delivery stream type.",
        )),
        other => Err(internal(format!("unexpected reply to a put: {other:?}"))),
    }
}

pub(super) async fn put_record(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let record = input
        .opt_object("Record")?
        .ok_or_else(|| constraint("Record", "null", "not be null"))?;
    let data = record_data(&record, "Record")?;
    let first = put(ctx, input, vec![data]).await?;
    Ok(json!({ "RecordId": record_id(first), "Encrypted": false }))
}

pub(super) async fn put_record_batch(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let list = input
        .opt_array("Records")?
        .ok_or_else(|| constraint("Records", "null", "not be null"))?;
    if list.is_empty() || list.len() > MAX_BATCH_RECORDS {
        return Err(constraint(
            "Records",
            list.len(),
            "have length between 1 and 500",
        ));
    }
    let mut records = Vec::with_capacity(list.len());
    let mut total = 0;
    for (k, item) in list.iter().enumerate() {
        let Value::Object(map) = item else {
            return Err(ApiError::serialization(format!(
                "Records.{}: not a structure",
                k + 1
            )));
        };
        let data = record_data(&input.child(map), &format!("Records.{}", k + 1))?;
        total += data.len();
        records.push(data);
    }
    if total > MAX_BATCH_BYTES {
        return Err(ApiError::invalid_argument(format!(
            "The records of a PutRecordBatch may hold at most 4 MiB of data; these hold {total} bytes"
        )));
    }
    let count = records.len();
    let first = put(ctx, input, records).await?;
    let responses: Vec<Value> = (0..count)
        .map(|k| json!({ "RecordId": record_id(first + k as u128) }))
        .collect();
    Ok(json!({ "FailedPutCount": 0, "Encrypted": false, "RequestResponses": responses }))
}

pub(super) async fn update_destination(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let stream = ctx.stream(input)?;
    let version = input.str("CurrentDeliveryStreamVersionId")?;
    let version: u64 = version.parse().map_err(|_| {
        constraint(
            "CurrentDeliveryStreamVersionId",
            version,
            "satisfy regular expression pattern: [0-9]+",
        )
    })?;
    let id = input.str("DestinationId")?;
    if id != DESTINATION_ID {
        return Err(ApiError::invalid_argument(format!(
            "Destination Id {id} not found"
        )));
    }
    let info = ctx.describe(&stream).await?;
    let destination =
        match (
            input.opt_object("S3DestinationUpdate")?,
            input.opt_object("ExtendedS3DestinationUpdate")?,
        ) {
            (Some(u), None) => destination::read(&u, Some(&info.destination), false, ctx.tables)?,
            (None, Some(u)) => destination::read(&u, Some(&info.destination), true, ctx.tables)?,
            _ => return Err(ApiError::invalid_argument(
                "Exactly one of S3DestinationUpdate and ExtendedS3DestinationUpdate is required",
            )),
        };
    let command = FirehoseCommand::Update {
        version,
        destination,
    };
    match ctx.command(&stream, &command, Retry::BeforeProposing).await? {
        FirehoseReply::Done => Ok(json!({})),
        FirehoseReply::VersionMismatch(current) => Err(ApiError::new(
            "ConcurrentModificationException",
            StatusCode::BAD_REQUEST,
            format!(
                "Cannot update Firehose {} because the version id {version} does not match the current version id {current}",
                stream.name
            ),
        )),
        other => Err(internal(format!("unexpected reply to an update: {other:?}"))),
    }
}

pub(super) async fn tag_delivery_stream(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let stream = ctx.stream(input)?;
    let tags = read_tags(input, "Tags")?;
    if tags.is_empty() {
        return Err(constraint(
            "Tags",
            0,
            "have length greater than or equal to 1",
        ));
    }
    match ctx
        .command(&stream, &FirehoseCommand::Tag(tags), Retry::Always)
        .await?
    {
        FirehoseReply::Done => Ok(json!({})),
        FirehoseReply::TooManyTags(max) => Err(ApiError::limit_exceeded(format!(
            "A delivery stream may have at most {max} tags"
        ))),
        other => Err(internal(format!("unexpected reply to a tag: {other:?}"))),
    }
}

pub(super) async fn untag_delivery_stream(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let stream = ctx.stream(input)?;
    let keys = input
        .opt_str_list("TagKeys")?
        .ok_or_else(|| constraint("TagKeys", "null", "not be null"))?;
    if keys.is_empty() || keys.len() > MAX_TAGS {
        return Err(constraint(
            "TagKeys",
            keys.len(),
            "have length between 1 and 50",
        ));
    }
    let keys = keys.into_iter().map(str::to_string).collect();
    ctx.command(&stream, &FirehoseCommand::Untag(keys), Retry::Always)
        .await?;
    Ok(json!({}))
}

pub(super) async fn list_tags_for_delivery_stream(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let stream = ctx.stream(input)?;
    let limit = input.opt_int_range("Limit", 1, 50)?.unwrap_or(50) as usize;
    let after = input.opt_str_len("ExclusiveStartTagKey", 1, 128)?;
    let info = ctx.describe(&stream).await?;
    let tags: Vec<(&String, &String)> = info
        .tags
        .iter()
        .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
        .collect();
    let more = tags.len() > limit;
    let tags: Vec<Value> = tags
        .into_iter()
        .take(limit)
        .map(|(k, v)| json!({"Key": k, "Value": v}))
        .collect();
    Ok(json!({ "Tags": tags, "HasMoreTags": more }))
}

pub(super) async fn set_encryption(
    ctx: &Context<'_>,
    input: &Input<'_>,
    on: bool,
) -> Result<Value, ApiError> {
    let stream = ctx.stream(input)?;
    if let Some(config) = input.opt_object("DeliveryStreamEncryptionConfigurationInput")? {
        match config.opt_str("KeyType")? {
            None | Some("AWS_OWNED_CMK") => {}
            Some("CUSTOMER_MANAGED_CMK") => {
                return Err(ApiError::invalid_argument(
                    "CUSTOMER_MANAGED_CMK is not supported by Kinesin (there is no KMS)",
                ))
            }
            Some(other) => {
                return Err(constraint(
                    "KeyType",
                    other,
                    "satisfy enum value set: [AWS_OWNED_CMK, CUSTOMER_MANAGED_CMK]",
                ))
            }
        }
    }
    ctx.command(&stream, &FirehoseCommand::Encryption(on), Retry::Always)
        .await?;
    Ok(json!({}))
}
