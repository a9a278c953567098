//! Stream tags.

use super::*;

pub(super) fn parse_tags(i: &Input<'_>) -> Result<Option<BTreeMap<String, String>>, ApiError> {
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

pub(super) async fn add_tags(
    ctx: &Context<'_>,
    name: &str,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let tags = parse_tags(i)?.ok_or_else(|| constraint("Tags", "null", "not be null"))?;
    ctx.stream(name).await?;
    ctx.change(name, StreamChange::AddTags(tags)).await?;
    Ok(json!({}))
}

pub(super) async fn remove_tags(
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

pub(super) fn tag_list<'t>(tags: impl Iterator<Item = (&'t String, &'t String)>) -> Vec<Value> {
    tags.map(|(k, v)| json!({ "Key": k, "Value": v })).collect()
}

pub(super) async fn list_tags_for_stream(
    ctx: &Context<'_>,
    i: &Input<'_>,
) -> Result<Value, ApiError> {
    let name = ctx.stream_name(i)?;
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
