//! Resharding: split, merge, and UpdateShardCount's uniform scaling, as
//! planned by `kinesin_meta::reshard`.

use kinesin_meta::reshard::{self, Plan, PlanError};

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

/// The AWS shape of a plan that cannot be made.
fn plan_error(ctx: &Context<'_>, stream: &StreamInfo, e: PlanError) -> ApiError {
    let name = ctx.display(stream.name.as_str());
    match e {
        PlanError::Closed(shard) => ApiError::invalid_argument(format!(
            "Shard {shard} in stream {name} is closed and cannot be resharded."
        )),
        PlanError::KeyOutside { shard, reason } => ApiError::invalid_argument(format!(
            "NewStartingHashKey is not inside the range of {shard}: {reason}"
        )),
        PlanError::NotAdjacent(a, b) => ApiError::invalid_argument(format!(
            "Shards {a} and {b} in stream {name} are not adjacent and cannot be merged."
        )),
        PlanError::TooFar { current, target } => ApiError::limit_exceeded(format!(
            "UpdateShardCount can at most double or halve the open shards: {current} open, {target} requested."
        )),
        e @ PlanError::TooManyParents { .. } => ApiError::invalid_argument(format!("{e}.")),
    }
}

/// Applies a plan, within the cluster's shard limit.
async fn reshard(ctx: &Context<'_>, stream: &StreamInfo, plan: Plan) -> Result<(), ApiError> {
    let state = ctx.router.meta_state();
    kinesin_meta::closed_shard_room(ctx.shard_limit, &state, plan.parents.len())
        .map_err(|e| ApiError::from(RouterError::from(e)))?;
    ctx.propose_limited(plan.command(stream.name.as_str()))
        .await
}

fn shard_named<'s>(
    ctx: &Context<'_>,
    stream: &'s StreamInfo,
    member: &str,
    i: &Input<'_>,
) -> Result<&'s ShardInfo, ApiError> {
    let text = i.str(member)?;
    check_name_pattern(member, text)?;
    find_shard(ctx, stream, text)
}

pub(super) async fn split_shard(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
    let key_text = i.str("NewStartingHashKey")?;
    check_decimal("NewStartingHashKey", key_text, 39)?;
    let key = key_text
        .parse::<HashKey>()
        .map_err(|e| ApiError::invalid_argument(format!("NewStartingHashKey {key_text}: {e}")))?;
    let stream = active_stream(ctx, &name).await?;
    let parent = shard_named(ctx, &stream, "ShardToSplit", i)?;
    let plan = reshard::split(parent, key).map_err(|e| plan_error(ctx, &stream, e))?;
    reshard(ctx, &stream, plan).await?;
    Ok(json!({}))
}

pub(super) async fn merge_shards(ctx: &Context<'_>, i: &Input<'_>) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
    let stream = active_stream(ctx, &name).await?;
    let first = shard_named(ctx, &stream, "ShardToMerge", i)?;
    let second = shard_named(ctx, &stream, "AdjacentShardToMerge", i)?;
    let plan = reshard::merge(first, second).map_err(|e| plan_error(ctx, &stream, e))?;
    reshard(ctx, &stream, plan).await?;
    Ok(json!({}))
}

/// UNIFORM_SCALING (`kinesin_meta::reshard::uniform`).
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
    let current = stream.open_shard_count();
    let plan = reshard::uniform(&stream, target).map_err(|e| plan_error(ctx, &stream, e))?;
    if !plan.children.is_empty() {
        reshard(ctx, &stream, plan).await?;
    }
    Ok(json!({
        "StreamName": ctx.display(&name),
        "StreamARN": ctx.arn(&name),
        "CurrentShardCount": current,
        "TargetShardCount": target,
    }))
}
