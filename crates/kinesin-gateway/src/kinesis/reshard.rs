//! Resharding: split, merge, and UpdateShardCount's uniform scaling.

use super::*;

/// A stream that may be resharded now: ACTIVE, as AWS requires.
pub(super) async fn active_stream(ctx: &Context<'_>, name: &str) -> Result<StreamInfo, ApiError> {
    let stream = ctx.stream(name).await?;
    if stream.status != StreamStatus::Active {
        return Err(ApiError::in_use(format!(
            "Stream {} under account {} not ACTIVE, instead in state {}",
            ctx.display(name),
            ctx.account,
            stream.status.as_aws_str()
        )));
    }
    Ok(stream)
}

pub(super) fn open_shard<'s>(
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

pub(super) async fn reshard(
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
pub(super) fn child_of(
    parent: &ShardInfo,
    adjacent: Option<&ShardInfo>,
    range: HashKeyRange,
) -> NewShard {
    NewShard {
        range,
        parent: parent.shard_id,
        adjacent_parent: adjacent.map(|a| a.shard_id),
        replicas: parent.replicas.clone(),
    }
}

pub(super) async fn split_shard(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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

pub(super) async fn merge_shards(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
    let stream = active_stream(ctx, &name).await?;
    let first = open_shard(ctx, &stream, "ShardToMerge", i)?;
    let second = open_shard(ctx, &stream, "AdjacentShardToMerge", i)?;
    let range = first.range.merge(&second.range).map_err(|_| {
        ApiError::invalid_argument(format!(
            "Shards {} and {} in stream {} are not adjacent and cannot be merged.",
            first.shard_id,
            second.shard_id,
            ctx.display(&name)
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
pub(super) async fn update_shard_count(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
        "StreamName": ctx.display(&name),
        "StreamARN": ctx.arn(&name),
        "CurrentShardCount": current,
        "TargetShardCount": target,
    }))
}
