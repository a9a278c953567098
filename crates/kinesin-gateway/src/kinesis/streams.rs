//! Stream life cycle and settings: create, delete, describe, list, shards,
//! limits, retention, enhanced monitoring, encryption, record size, mode.

use super::*;

pub(super) async fn create_stream(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
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
    let key = ctx.key(name);
    ctx.check_limits(|limits, state| {
        limits.check_new_stream(state, &key, shards, mode, tags.len())
    })?;
    let options = StreamOptions {
        mode,
        tags,
        limits: Some(ctx.limits()),
    };
    ctx.router
        .create_stream_with(&key, shards, 0, max_record_bytes, &options)
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

pub(super) fn parse_mode(s: &str) -> Result<StreamMode, ApiError> {
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

pub(super) async fn delete_stream(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
    let enforce = i.opt_bool("EnforceConsumerDeletion")?.unwrap_or(false);
    let stream = ctx.stream(&name).await?;
    if !enforce && !stream.settings.consumers.is_empty() {
        return Err(ApiError::in_use(format!(
            "Stream {} has {} registered consumers; deregister them or set EnforceConsumerDeletion.",
            ctx.display(&name),
            stream.settings.consumers.len()
        )));
    }
    ctx.router.delete_stream(&name).await?;
    Ok(json!({}))
}

pub(super) fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

pub(super) fn shard_json(s: &ShardInfo) -> Value {
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

pub(super) fn metrics_json(stream: &StreamInfo) -> Value {
    json!([{ "ShardLevelMetrics": stream.settings.shard_level_metrics }])
}

pub(super) fn encryption_type(stream: &StreamInfo) -> &'static str {
    if stream.settings.encryption_key.is_some() {
        "KMS"
    } else {
        "NONE"
    }
}

pub(super) async fn describe_stream(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
        "StreamName": ctx.display(&name),
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

pub(super) async fn describe_stream_summary(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
    let stream = ctx.stream(&name).await?;
    let mut d = json!({
        "StreamName": ctx.display(&name),
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

pub(super) fn list_streams(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let limit = i.opt_int_range("Limit", 1, 10_000)?.unwrap_or(100) as usize;
    let mut after = i.opt_str("ExclusiveStartStreamName")?.map(str::to_string);
    if let Some(token) = i.opt_str("NextToken")? {
        let t: PageToken = ctx.decode_token(token, "NextToken")?;
        check_token_age(ctx, t.issued_ms)?;
        after = Some(t.after);
    }
    let state = ctx.router.meta_state();
    // Each account sees its own streams only; names sort the same as keys
    // within one account.
    let rest: Vec<&StreamInfo> = state
        .streams
        .values()
        .filter(|s| ctx.owns(s.name.as_str()))
        .filter(|s| {
            after
                .as_deref()
                .is_none_or(|a| ctx.display(s.name.as_str()) > a)
        })
        .collect();
    let page = &rest[..rest.len().min(limit)];
    let more = rest.len() > limit;
    let mut out = json!({
        "StreamNames": page.iter().map(|s| ctx.display(s.name.as_str())).collect::<Vec<_>>(),
        "HasMoreStreams": more,
        "StreamSummaries": page.iter().map(|s| json!({
            "StreamName": ctx.display(s.name.as_str()),
            "StreamARN": ctx.arn(s.name.as_str()),
            "StreamStatus": s.status.as_aws_str(),
            "StreamModeDetails": { "StreamMode": s.settings.mode.as_aws_str() },
            "StreamCreationTimestamp": seconds(s.created_at_ms),
        })).collect::<Vec<_>>(),
    });
    if let (true, Some(last)) = (more, page.last()) {
        out["NextToken"] = json!(ctx.encode_token(&PageToken {
            stream: String::new(),
            after: ctx.display(last.name.as_str()).to_string(),
            filter: None,
            issued_ms: ctx.now_ms,
        }));
    }
    Ok(out)
}

pub(super) fn check_token_age(ctx: &Context<'_>, issued_ms: u64) -> Result<(), ApiError> {
    if iterator::expired(issued_ms, ctx.now_ms, ctx.validity_ms, "NextToken")? {
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
pub(super) enum ShardFilter {
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

pub(super) async fn list_shards(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let limit = i.opt_int_range("MaxResults", 1, 10_000)?.unwrap_or(1000) as usize;
    let token = i.opt_str("NextToken")?;
    let (name, after, filter) = match token {
        Some(t) => {
            if i.opt_str("StreamName")?.is_some() || i.opt_str("StreamARN")?.is_some() {
                return Err(ApiError::invalid_argument(
                    "NextToken and StreamName or StreamARN cannot be provided together.",
                ));
            }
            let t: PageToken = ctx.decode_token(t, "NextToken")?;
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
            if !ctx.owns(&t.stream) {
                return Err(ApiError::invalid_argument(
                    "Invalid NextToken: it was issued to another account.",
                ));
            }
            (t.stream, Some(after), filter)
        }
        None => {
            let name = ctx.stream_name(i)?;
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
        out["NextToken"] = json!(ctx.encode_token(&PageToken {
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

pub(super) fn describe_limits(ctx: &Context<'_>) -> Result<Value, ApiError> {
    let state = ctx.router.meta_state();
    Ok(json!({
        "ShardLimit": ctx.shard_limit,
        "OpenShardCount": state.open_shard_count(),
        "OnDemandStreamCount": state.on_demand_streams(|key| ctx.owns(key)),
        "OnDemandStreamCountLimit": ON_DEMAND_STREAM_LIMIT,
    }))
}

/// One validated record of a put.
pub(super) async fn change_retention(
    ctx: &Context<'_>,
    i: &Input<'_>,
    increase: bool,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
            "Requested retention period ({hours} hours) for stream {} can not be shorter than existing retention period ({current} hours). Use DecreaseRetentionPeriod API.",
            ctx.display(&name)
        )));
    }
    if !increase && hours > current {
        return Err(ApiError::invalid_argument(format!(
            "Requested retention period ({hours} hours) for stream {} can not be longer than existing retention period ({current} hours). Use IncreaseRetentionPeriod API.",
            ctx.display(&name)
        )));
    }
    ctx.change(&name, StreamChange::RetentionHours(hours as u32))
        .await?;
    Ok(json!({}))
}

pub(super) async fn enhanced_monitoring(
    ctx: &Context<'_>,
    i: &Input<'_>,
    enable: bool,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
        "StreamName": ctx.display(&name),
        "StreamARN": ctx.arn(&name),
        "CurrentShardLevelMetrics": current,
        "DesiredShardLevelMetrics": desired,
    }))
}

pub(super) async fn stream_encryption(
    ctx: &Context<'_>,
    i: &Input<'_>,
    start: bool,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
            "Stream {} is not encrypted.",
            ctx.display(&name)
        )));
    }
    let change = StreamChange::EncryptionKey(start.then(|| key.to_string()));
    ctx.change(&name, change).await?;
    Ok(json!({}))
}

pub(super) async fn update_max_record_size(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
    let kib = i
        .opt_int_range("MaxRecordSizeInKiB", 1024, 10240)?
        .ok_or_else(|| constraint("MaxRecordSizeInKiB", "null", "not be null"))?;
    ctx.stream(&name).await?;
    ctx.change(&name, StreamChange::MaxRecordBytes(kib as u32 * 1024))
        .await?;
    Ok(json!({}))
}

pub(super) async fn update_stream_mode(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
    let details = i
        .opt_object("StreamModeDetails")?
        .ok_or_else(|| constraint("StreamModeDetails", "null", "not be null"))?;
    let mode = parse_mode(details.str("StreamMode")?)?;
    let stream = ctx.stream(&name).await?;
    if stream.status != StreamStatus::Active {
        return Err(ApiError::in_use(format!(
            "Stream {} is {} and cannot change its mode now.",
            ctx.display(&name),
            stream.status.as_aws_str()
        )));
    }
    ctx.change(&name, StreamChange::Mode(mode)).await?;
    Ok(json!({}))
}
