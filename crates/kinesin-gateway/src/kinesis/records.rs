//! Records: put, shard iterators, get, and SubscribeToShard's reads.

use super::*;

pub(super) fn parse_record(
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

pub(super) async fn put_record(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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

pub(super) async fn put_records(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
pub(super) fn record_error_code(e: &RouterError) -> &'static str {
    match e {
        RouterError::Throttled(_) => "ProvisionedThroughputExceededException",
        _ => "InternalFailure",
    }
}

pub(super) fn find_shard<'s>(
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
                ctx.display(stream.name.as_str()),
                ctx.account
            ))
        })
}

pub(super) async fn get_shard_iterator(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
    Ok(json!({ "ShardIterator": ctx.encode_token(&it) }))
}

pub(super) async fn get_records(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
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
    let it: ShardIterator = ctx.decode_token(text, "ShardIterator")?;
    if iterator::expired(it.issued_ms, ctx.now_ms, ctx.validity_ms, "ShardIterator")? {
        return Err(ApiError::new(
            "ExpiredIteratorException",
            axum::http::StatusCode::BAD_REQUEST,
            format!(
                "Iterator expired. The iterator was created at time {} while right now it is {} which is further in the future than the tolerated delay of {} milliseconds.",
                it.issued_ms, ctx.now_ms, ctx.validity_ms
            ),
        ));
    }
    if !ctx.owns(&it.stream) {
        return Err(ApiError::invalid_argument(
            "The ShardIterator was issued to another account.",
        ));
    }
    let stream = ctx.stream(&it.stream).await?;
    if stream.created_at_ms != it.stream_created_ms {
        return Err(ApiError::not_found(format!(
            "Stream {} was deleted after this iterator was issued.",
            ctx.display(&it.stream)
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
        out.insert("NextShardIterator".into(), json!(ctx.encode_token(&next)));
    }
    Ok(Value::Object(out))
}

/// A stored record as GetRecords and SubscribeToShard return it.
pub(super) fn record_json((seq, r): (SequenceNumber, kinesin_shard::StoredRecord)) -> Value {
    json!({
        "SequenceNumber": seq.to_string(),
        "ApproximateArrivalTimestamp": seconds(r.arrival_ms),
        "Data": base64::engine::general_purpose::STANDARD.encode(&r.data),
        "PartitionKey": r.partition_key,
    })
}

pub(super) fn child_shards(stream: &StreamInfo, parent: ShardId) -> Value {
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

/// A validated SubscribeToShard request.
pub struct Subscription {
    /// The consumer (stream key, name and creation time): one subscription
    /// per consumer and shard.
    pub consumer: String,
    pub stream: String,
    pub shard: ShardId,
    pub start: ReadStart,
}

pub async fn subscription(ctx: &Context<'_>, body: &Value) -> Result<Subscription, ApiError> {
    let i = Input::new(body)?;
    let i = &i;
    let (stream, name, created) = consumer_of(ctx, i).await?;
    let consumer = format!("{}/{name}:{created}", stream.name.as_str());
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
        consumer,
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
