//! Enhanced fan-out consumers: register, deregister, describe, list.

use super::*;

pub(super) const MAX_CONSUMERS_PER_STREAM: usize = 20;

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

    /// `<stream arn>/consumer/<name>:<epoch seconds>` → (stream key,
    /// consumer); the stream must be the caller's.
    pub(super) fn parse_consumer_arn(&self, arn: &str) -> Result<(String, String), ApiError> {
        let (stream_arn, name) = split_consumer_arn(arn)?;
        Ok((self.stream_arn("ConsumerARN", stream_arn)?, name))
    }
}

/// `<stream arn>/consumer/<name>:<epoch seconds>` → (stream ARN, consumer).
fn split_consumer_arn(arn: &str) -> Result<(&str, String), ApiError> {
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
    Ok((stream_arn, name.to_string()))
}

/// The consumer a request names by ConsumerARN or by StreamARN and
/// ConsumerName; it must exist.
pub(super) async fn consumer_of(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<(StreamInfo, String, u64), ApiError> {
    let (stream, name) = match i.opt_str("ConsumerARN")? {
        Some(arn) => ctx.parse_consumer_arn(arn)?,
        None => {
            let arn = i.opt_str("StreamARN")?.ok_or_else(|| {
                ApiError::invalid_argument(
                    "Either ConsumerARN or StreamARN and ConsumerName must be provided.",
                )
            })?;
            let name = i.str("ConsumerName")?;
            check_name_pattern("ConsumerName", name)?;
            (ctx.stream_arn("StreamARN", arn)?, name.to_string())
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

pub(super) async fn register_consumer(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let stream = ctx.stream_arn("StreamARN", i.str("StreamARN")?)?;
    let name = i.str("ConsumerName")?;
    check_name_pattern("ConsumerName", name)?;
    let info = ctx.stream(&stream).await?;
    if info.settings.consumers.contains_key(name) {
        return Err(ApiError::in_use(format!(
            "Consumer {name} of stream {} already exists.",
            ctx.display(&stream)
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

pub(super) async fn deregister_consumer(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let (stream, name, _) = consumer_of(ctx, i).await?;
    ctx.change(stream.name.as_str(), StreamChange::DeregisterConsumer(name))
        .await?;
    Ok(json!({}))
}

pub(super) async fn describe_consumer(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let (stream, name, created) = consumer_of(ctx, i).await?;
    let stream = stream.name.as_str();
    let mut description = ctx.consumer_json(stream, &name, created);
    description["StreamARN"] = json!(ctx.arn(stream));
    Ok(json!({ "ConsumerDescription": description }))
}

pub(super) async fn list_consumers(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let stream = ctx.stream_arn("StreamARN", i.str("StreamARN")?)?;
    let limit = i.opt_int_range("MaxResults", 1, 10_000)?.unwrap_or(100) as usize;
    i.opt_timestamp_ms("StreamCreationTimestamp")?;
    let after = match i.opt_str("NextToken")? {
        Some(t) => {
            let t: PageToken = ctx.decode_token(t, "NextToken")?;
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
        out["NextToken"] = json!(ctx.encode_token(&PageToken {
            stream: stream.clone(),
            after: rest[limit - 1].0.clone(),
            filter: None,
            issued_ms: ctx.now_ms,
        }));
    }
    Ok(out)
}
