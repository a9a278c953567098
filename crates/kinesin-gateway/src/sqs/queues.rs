//! Queue operations: create, find, list, delete, attributes, purge, tags.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use kinesin_queue::policy::PermissionRefused;
use kinesin_queue::{QueueCommand, QueueConfig, QueueInfo, QueueQuery, QueueReply};
use kinesin_router::Retry;
use serde_json::{json, Map, Value};

use kinesin_queue::partition_name;

use super::{invalid_parameter, no_queue, Context};
use crate::error::ApiError;
use crate::input::Input;

const MAX_QUEUE_NAME: usize = 80;
const MAX_LIST_RESULTS: i64 = 1000;
const MAX_TAGS: usize = 50;
/// Longest attribute value (a policy), as AWS.
const MAX_ATTRIBUTE_VALUE: usize = 20_480;

/// Settable attributes with their defaults (None: unset unless given), and
/// whether they belong to FIFO queues only.
const SETTABLE: &[(&str, Option<&str>, bool)] = &[
    ("DelaySeconds", Some("0"), false),
    ("MaximumMessageSize", Some("1048576"), false),
    ("MessageRetentionPeriod", Some("345600"), false),
    ("ReceiveMessageWaitTimeSeconds", Some("0"), false),
    ("VisibilityTimeout", Some("30"), false),
    ("Policy", None, false),
    ("RedrivePolicy", None, false),
    ("RedriveAllowPolicy", None, false),
    ("KmsMasterKeyId", None, false),
    ("KmsDataKeyReusePeriodSeconds", None, false),
    ("SqsManagedSseEnabled", Some("true"), false),
    ("FifoQueue", None, true),
    ("ContentBasedDeduplication", Some("false"), true),
    ("DeduplicationScope", Some("queue"), true),
    ("FifoThroughputLimit", Some("perQueue"), true),
];

/// Attributes only GetQueueAttributes shows.
const COMPUTED: &[&str] = &[
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
    "CreatedTimestamp",
    "LastModifiedTimestamp",
    "QueueArn",
];

fn attribute_error(name: &'static str, message: String) -> ApiError {
    ApiError::new(name, StatusCode::BAD_REQUEST, message)
}

fn check_range(name: &str, value: &str, min: u64, max: u64) -> Result<(), ApiError> {
    match value.parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(()),
        _ => Err(attribute_error(
            "InvalidAttributeValue",
            format!("Invalid value for the parameter {name}: {value} (from {min} to {max})."),
        )),
    }
}

fn check_choice(name: &str, value: &str, choices: &[&str]) -> Result<(), ApiError> {
    if choices.contains(&value) {
        Ok(())
    } else {
        Err(attribute_error(
            "InvalidAttributeValue",
            format!(
                "Invalid value for the parameter {name}: {value} (one of {}).",
                choices.join(", ")
            ),
        ))
    }
}

/// Checks one attribute a request sets.
fn check_attribute(name: &str, value: &str, fifo: bool) -> Result<(), ApiError> {
    let Some((_, _, fifo_only)) = SETTABLE.iter().find(|(n, _, _)| *n == name) else {
        return Err(attribute_error(
            "InvalidAttributeName",
            format!("Unknown Attribute {name}."),
        ));
    };
    if *fifo_only && !fifo {
        return Err(attribute_error(
            "InvalidAttributeName",
            format!("Unknown Attribute {name}."),
        ));
    }
    if value.len() > MAX_ATTRIBUTE_VALUE {
        return Err(attribute_error(
            "InvalidAttributeValue",
            format!("Invalid value for the parameter {name}: longer than {MAX_ATTRIBUTE_VALUE} characters."),
        ));
    }
    match name {
        "DelaySeconds" => check_range(name, value, 0, 900),
        "MaximumMessageSize" => check_range(name, value, 1024, 1_048_576),
        "MessageRetentionPeriod" => check_range(name, value, 60, 1_209_600),
        "ReceiveMessageWaitTimeSeconds" => check_range(name, value, 0, 20),
        "VisibilityTimeout" => check_range(name, value, 0, 43_200),
        "KmsDataKeyReusePeriodSeconds" => check_range(name, value, 60, 86_400),
        "FifoQueue" | "ContentBasedDeduplication" | "SqsManagedSseEnabled" => {
            check_choice(name, value, &["true", "false"])
        }
        "DeduplicationScope" => check_choice(name, value, &["messageGroup", "queue"]),
        "FifoThroughputLimit" => check_choice(name, value, &["perQueue", "perMessageGroupId"]),
        "RedriveAllowPolicy" if !value.is_empty() => check_redrive_allow(value),
        "Policy" if !value.is_empty() => {
            serde_json::from_str::<Value>(value)
                .map(|_| ())
                .map_err(|e| {
                    attribute_error(
                        "InvalidAttributeValue",
                        format!("Invalid value for the parameter {name}: not JSON ({e})."),
                    )
                })
        }
        "RedrivePolicy" if !value.is_empty() => check_redrive(value),
        _ => Ok(()),
    }
}

fn check_redrive(value: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        attribute_error(
            "InvalidAttributeValue",
            format!("Value {value} for parameter RedrivePolicy is invalid. Reason: {why}"),
        )
    };
    let policy: Value = serde_json::from_str(value).map_err(|_| bad("not JSON."))?;
    if !policy
        .get("deadLetterTargetArn")
        .and_then(Value::as_str)
        .is_some_and(|a| a.starts_with("arn:"))
    {
        return Err(bad(
            "Redrive policy does not contain a valid deadLetterTargetArn.",
        ));
    }
    let count = match policy.get("maxReceiveCount") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    if !count.is_some_and(|c| (1..=1000).contains(&c)) {
        return Err(bad("maxReceiveCount must be from 1 to 1000."));
    }
    Ok(())
}

/// Most source queues a `byQueue` redrive allow policy names, as AWS.
const MAX_REDRIVE_SOURCES: usize = 10;

fn check_redrive_allow(value: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        attribute_error(
            "InvalidAttributeValue",
            format!("Value {value} for parameter RedriveAllowPolicy is invalid. Reason: {why}"),
        )
    };
    let policy: Value = serde_json::from_str(value).map_err(|_| bad("not JSON."))?;
    let sources = policy.get("sourceQueueArns");
    match policy.get("redrivePermission").and_then(Value::as_str) {
        Some("allowAll" | "denyAll") if sources.is_none() => Ok(()),
        Some("allowAll" | "denyAll") => Err(bad(
            "sourceQueueArns is allowed only when redrivePermission is byQueue.",
        )),
        Some("byQueue") => match sources.and_then(Value::as_array) {
            Some(arns)
                if (1..=MAX_REDRIVE_SOURCES).contains(&arns.len())
                    && arns
                        .iter()
                        .all(|a| a.as_str().is_some_and(|a| a.starts_with("arn:"))) =>
            {
                Ok(())
            }
            _ => Err(bad(&format!(
                "byQueue needs sourceQueueArns: 1 to {MAX_REDRIVE_SOURCES} queue ARNs."
            ))),
        },
        _ => Err(bad(
            "redrivePermission must be one of allowAll, denyAll, byQueue.",
        )),
    }
}

fn check_queue_name(name: &str, fifo: bool) -> Result<(), ApiError> {
    let stem = if fifo {
        name.strip_suffix(".fifo").ok_or_else(|| {
            invalid_parameter("The name of a FIFO queue can only include alphanumeric characters, hyphens, or underscores, must end with .fifo suffix and be 1 to 80 in length.")
        })?
    } else {
        name
    };
    let ok = !stem.is_empty()
        && name.len() <= MAX_QUEUE_NAME
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(invalid_parameter(
            "Can only include alphanumeric characters, hyphens, or underscores. 1 to 80 in length",
        ));
    }
    Ok(())
}

fn tags_of(input: &Input<'_>, member: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let tags: BTreeMap<String, String> = input
        .opt_str_map(member)?
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if tags.len() > MAX_TAGS {
        return Err(invalid_parameter(format!(
            "Too many tags: a queue has at most {MAX_TAGS}."
        )));
    }
    if tags.keys().any(|k| k.is_empty() || k.len() > 128) {
        return Err(invalid_parameter("Tag keys must be 1 to 128 characters."));
    }
    if tags.values().any(|v| v.len() > 256) {
        return Err(invalid_parameter(
            "Tag values must be at most 256 characters.",
        ));
    }
    Ok(tags)
}

/// A redrive policy must name an existing queue of the caller's, in this
/// region, of the same kind (FIFO or standard), other than the queue
/// itself, whose redrive allow policy admits the queue.
async fn check_redrive_target(
    ctx: &Context<'_>,
    queue: &str,
    attributes: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let Some(policy) = attributes.get("RedrivePolicy").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let bad = |why: &str| {
        attribute_error(
            "InvalidAttributeValue",
            format!("Value {policy} for parameter RedrivePolicy is invalid. Reason: {why}"),
        )
    };
    let target = serde_json::from_str::<Value>(policy)
        .ok()
        .and_then(|p| {
            p.get("deadLetterTargetArn")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default();
    let Some((region, account, name)) = kinesin_queue::parse_arn(&target) else {
        return Err(bad("Dead-letter target is not a queue ARN."));
    };
    if region != ctx.region || account != ctx.account {
        return Err(bad(
            "Dead-letter target must be a queue of the same account and region.",
        ));
    }
    if name == queue {
        return Err(bad("Dead-letter target must be another queue."));
    }
    if name.ends_with(".fifo") != queue.ends_with(".fifo") {
        return Err(bad(
            "Dead-letter target must be of the same type (FIFO or standard) as the source queue.",
        ));
    }
    let Some(target) = ctx.find_queue(account, name) else {
        return Err(bad("Dead-letter target does not exist."));
    };
    let settings: BTreeMap<String, String> = ctx.query(target.group, &QueueQuery::Settings).await?;
    let source = ctx.arn(ctx.account, queue);
    if !kinesin_queue::redrive_allowed(
        settings.get("RedriveAllowPolicy").map(String::as_str),
        &source,
    ) {
        return Err(bad(
            "The dead-letter target's RedriveAllowPolicy does not allow this queue.",
        ));
    }
    Ok(())
}

pub(super) async fn create_queue(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let name = input.str("QueueName")?;
    let given: BTreeMap<String, String> = input
        .opt_str_map("Attributes")?
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let fifo = given.get("FifoQueue").is_some_and(|v| v == "true");
    if name.ends_with(".fifo") && !fifo {
        return Err(invalid_parameter(
            "The name of a FIFO queue ends with .fifo: set the FifoQueue attribute to true.",
        ));
    }
    check_queue_name(name, fifo)?;
    for (k, v) in &given {
        check_attribute(k, v, fifo)?;
    }
    check_redrive_target(ctx, name, &given).await?;
    let tags = tags_of(input, "tags")?;
    let partitions = partitions_of(&tags, fifo)?;
    let mut attributes: BTreeMap<String, String> = SETTABLE
        .iter()
        .filter(|(_, _, fifo_only)| fifo || !fifo_only)
        .filter_map(|(n, default, _)| default.map(|d| (n.to_string(), d.to_string())))
        .collect();
    attributes.extend(given.clone());
    if !fifo {
        attributes.remove("FifoQueue");
    }
    let url = ctx.url(ctx.account, name);
    let config = QueueConfig {
        attributes,
        tags,
        created_ms: ctx.now_ms,
    };
    if ctx.find_queue(ctx.account, name).is_none() {
        // The other partitions first: the queue exists, for every call,
        // once partition 0 does. Partitions left by a create that failed
        // part way take this create's settings, or go if this queue has
        // fewer.
        let leftovers: Vec<String> = {
            let prefix = format!("{}#", partition_name(ctx.account, name, 0));
            let state = ctx.router.meta_state();
            state
                .groups
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .filter(|k| {
                    kinesin_queue::parse_group_name(k).is_none_or(|(_, _, p)| p >= partitions)
                })
                .collect()
        };
        for key in leftovers {
            match ctx.router.delete_group(&key).await {
                Ok(()) | Err(kinesin_router::RouterError::ResourceNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for k in 1..partitions {
            let key = partition_name(ctx.account, name, k);
            match create_group(ctx, &key, &config).await {
                Err(kinesin_router::RouterError::ResourceInUse(_)) => {
                    let group = ctx
                        .router
                        .meta_state()
                        .groups
                        .get(&key)
                        .map(|g| g.group)
                        .ok_or_else(no_queue)?;
                    let set = QueueCommand::SetAttributes(config.attributes.clone());
                    ctx.command(group, &set, Retry::Always).await?;
                }
                other => other?,
            }
        }
    }
    match create_group(ctx, &partition_name(ctx.account, name, 0), &config).await {
        Ok(()) => {}
        Err(kinesin_router::RouterError::ResourceInUse(_)) => {
            // Creating an existing queue succeeds when the attributes given
            // match its own.
            let queue = ctx.find_queue(ctx.account, name).ok_or_else(no_queue)?;
            let info: QueueInfo = ctx.query(queue.group, &QueueQuery::Info).await?;
            let differs = given.iter().any(|(k, v)| {
                info.attributes
                    .get(k)
                    .map_or(!v.is_empty(), |have| have != v)
            });
            if differs {
                return Err(ApiError::new(
                    "QueueNameExists",
                    StatusCode::BAD_REQUEST,
                    format!("A queue already exists with the same name and a different value for attribute(s) of {name}"),
                ));
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(json!({ "QueueUrl": url }))
}

async fn create_group(
    ctx: &Context<'_>,
    key: &str,
    config: &QueueConfig,
) -> Result<(), kinesin_router::RouterError> {
    ctx.router
        .create_group(
            key,
            kinesin_queue::QUEUE_KIND,
            kinesin_queue::encode(config),
            0,
        )
        .await
        .map(|_| ())
}

/// How many partitions a new queue has: its `kinesin:partitions` tag, 1
/// without one. FIFO queues have one: their order and deduplication are
/// the queue's.
fn partitions_of(tags: &BTreeMap<String, String>, fifo: bool) -> Result<u32, ApiError> {
    let Some(value) = tags.get(kinesin_queue::PARTITIONS_TAG) else {
        return Ok(1);
    };
    let max = kinesin_queue::MAX_PARTITIONS;
    let count = value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            invalid_parameter(format!(
                "The tag {} must be a number from 1 to {max}.",
                kinesin_queue::PARTITIONS_TAG
            ))
        })?;
    if fifo && count > 1 {
        return Err(invalid_parameter(format!(
            "The tag {} applies to standard queues: a FIFO queue has one partition.",
            kinesin_queue::PARTITIONS_TAG
        )));
    }
    Ok(count)
}

pub(super) async fn get_queue_url(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let name = input.str("QueueName")?;
    let account = input
        .opt_str("QueueOwnerAWSAccountId")?
        .unwrap_or(ctx.account);
    // Another account's queue that its policy does not share is one that
    // "does not exist or you do not have access to", as AWS answers.
    let queue = ctx
        .named_queue(account, name)
        .await
        .map_err(|e| match e.name {
            "AccessDeniedException" => no_queue(),
            _ => e,
        })?;
    Ok(json!({ "QueueUrl": ctx.url(&queue.account, &queue.name) }))
}

pub(super) fn list_queues(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let prefix = input.opt_str("QueueNamePrefix")?.unwrap_or("");
    let max = input.opt_int_range("MaxResults", 1, MAX_LIST_RESULTS)?;
    let after = input.opt_str("NextToken")?;
    let queues = ctx.own_queues();
    let mut names = queues
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with(prefix))
        .filter(|n| after.is_none_or(|a| *n > a));
    let limit = max.unwrap_or(MAX_LIST_RESULTS) as usize;
    let page: Vec<&str> = names.by_ref().take(limit).collect();
    let mut out = Map::new();
    if !page.is_empty() {
        out.insert(
            "QueueUrls".into(),
            page.iter()
                .map(|n| Value::String(ctx.url(ctx.account, n)))
                .collect(),
        );
    }
    // AWS pages only when MaxResults is given.
    if max.is_some() && names.next().is_some() {
        if let Some(last) = page.last() {
            out.insert("NextToken".into(), Value::String(last.to_string()));
        }
    }
    Ok(Value::Object(out))
}

pub(super) async fn delete_queue(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    // Partition 0 last: until it goes, the queue exists and a repeated
    // delete finishes the work.
    for k in (0..queue.partitions.len() as u32).rev() {
        match ctx
            .router
            .delete_group(&partition_name(&queue.account, &queue.name, k))
            .await
        {
            Ok(()) | Err(kinesin_router::RouterError::ResourceNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(json!({}))
}

/// How long GetQueueAttributes waits for a partition other than the first
/// (the router's own retry budget is 10 s).
const PARTITION_PATIENCE: Duration = Duration::from_secs(3);

pub(super) async fn get_queue_attributes(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let wanted = input.opt_str_list("AttributeNames")?.unwrap_or_default();
    for name in &wanted {
        let known =
            *name == "All" || COMPUTED.contains(name) || SETTABLE.iter().any(|(n, _, _)| n == name);
        if !known {
            return Err(attribute_error(
                "InvalidAttributeName",
                format!("Unknown Attribute {name}."),
            ));
        }
    }
    // Partition 0 holds the settings; the others only add to the counts,
    // which are approximate: one that cannot answer soon (most replicas
    // down, no leader in time) is left out rather than failing the call.
    let others = super::with_quorum(ctx, &queue.partitions[1..])
        .into_iter()
        .map(|group| async move {
            let asked = ctx.query::<QueueInfo>(group, &QueueQuery::Info);
            match tokio::time::timeout(PARTITION_PATIENCE, asked).await {
                Ok(Ok(info)) => Ok(Some(info)),
                Ok(Err(e)) if e.status != StatusCode::SERVICE_UNAVAILABLE => Err(e),
                Ok(Err(_)) | Err(_) => Ok(None),
            }
        });
    let (info, others) = tokio::join!(
        ctx.query::<QueueInfo>(queue.group, &QueueQuery::Info),
        futures::future::try_join_all(others)
    );
    let mut info = info?;
    for other in others?.into_iter().flatten() {
        info.visible += other.visible;
        info.in_flight += other.in_flight;
        info.delayed += other.delayed;
    }
    let mut all = info.attributes.clone();
    all.insert(
        "ApproximateNumberOfMessages".into(),
        info.visible.to_string(),
    );
    all.insert(
        "ApproximateNumberOfMessagesNotVisible".into(),
        info.in_flight.to_string(),
    );
    all.insert(
        "ApproximateNumberOfMessagesDelayed".into(),
        info.delayed.to_string(),
    );
    all.insert(
        "CreatedTimestamp".into(),
        (info.created_ms / 1000).to_string(),
    );
    all.insert(
        "LastModifiedTimestamp".into(),
        (info.modified_ms / 1000).to_string(),
    );
    all.insert("QueueArn".into(), ctx.arn(&queue.account, &queue.name));
    let everything = wanted.contains(&"All");
    let chosen: Map<String, Value> = all
        .into_iter()
        .filter(|(k, _)| everything || wanted.contains(&k.as_str()))
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    if chosen.is_empty() {
        return Ok(json!({}));
    }
    Ok(json!({ "Attributes": chosen }))
}

pub(super) async fn set_queue_attributes(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let fifo = queue.name.ends_with(".fifo");
    let given: BTreeMap<String, String> = input
        .opt_str_map("Attributes")?
        .ok_or_else(|| {
            ApiError::new(
                "MissingParameter",
                StatusCode::BAD_REQUEST,
                "The request must contain the parameter Attributes.",
            )
        })?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in &given {
        if k == "FifoQueue" {
            return Err(attribute_error(
                "InvalidAttributeName",
                "FifoQueue is set when a queue is created.".into(),
            ));
        }
        check_attribute(k, v, fifo)?;
    }
    check_redrive_target(ctx, &queue.name, &given).await?;
    // Partition 0 last, as its settings are the ones the queue answers.
    let set = QueueCommand::SetAttributes(given);
    for group in queue.partitions.iter().rev() {
        ctx.command(*group, &set, Retry::Always).await?;
    }
    Ok(json!({}))
}

pub(super) async fn purge_queue(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    // The other partitions first, each refusing if it purged within the
    // minute; then partition 0, which keeps the queue's 60 s limit. A
    // purge that failed part way is finished by the next one.
    let others = queue.partitions[1..]
        .iter()
        .map(|g| ctx.command(*g, &QueueCommand::Purge, Retry::BeforeProposing));
    futures::future::try_join_all(others).await?;
    match ctx
        .command(queue.group, &QueueCommand::Purge, Retry::BeforeProposing)
        .await?
    {
        QueueReply::PurgeInProgress => Err(ApiError::new(
            "PurgeQueueInProgress",
            StatusCode::BAD_REQUEST,
            format!(
                "Only one PurgeQueue operation on {} is allowed every 60 seconds.",
                queue.name
            ),
        )),
        _ => Ok(json!({})),
    }
}

pub(super) async fn tag_queue(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let tags = tags_of(input, "Tags")?;
    match ctx
        .command(queue.group, &QueueCommand::Tag(tags), Retry::Always)
        .await?
    {
        QueueReply::TooManyTags(max) => Err(invalid_parameter(format!(
            "Too many tags: a queue has at most {max}."
        ))),
        _ => Ok(json!({})),
    }
}

pub(super) async fn untag_queue(ctx: &Context<'_>, input: &Input<'_>) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let keys = input
        .opt_str_list("TagKeys")?
        .unwrap_or_default()
        .into_iter()
        .map(str::to_string)
        .collect();
    ctx.command(queue.group, &QueueCommand::Untag(keys), Retry::Always)
        .await?;
    Ok(json!({}))
}

pub(super) async fn list_queue_tags(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let info: QueueInfo = ctx.query(queue.group, &QueueQuery::Info).await?;
    if info.tags.is_empty() {
        return Ok(json!({}));
    }
    Ok(json!({ "Tags": info.tags }))
}

/// `account`'s queues, in name order after `after`, whose redrive policy
/// names the queue `arn`: up to `limit`, and whether there are more.
pub(super) async fn dead_letter_sources(
    ctx: &Context<'_>,
    account: &str,
    arn: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<String>, bool), ApiError> {
    let candidates = ctx
        .queues_of(account)
        .into_iter()
        .filter(|(n, _)| after.is_none_or(|a| n.as_str() > a));
    let mut names = Vec::new();
    for (name, group) in candidates {
        let settings: BTreeMap<String, String> = match ctx.query(group, &QueueQuery::Settings).await
        {
            Ok(s) => s,
            // Deleted since the map was read.
            Err(e) if e.name == "QueueDoesNotExist" => continue,
            Err(e) => return Err(e),
        };
        let names_it = settings
            .get("RedrivePolicy")
            .and_then(|p| serde_json::from_str::<Value>(p).ok())
            .and_then(|p| {
                p.get("deadLetterTargetArn")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .is_some_and(|t| t == arn);
        if names_it {
            if names.len() == limit {
                return Ok((names, true));
            }
            names.push(name);
        }
    }
    Ok((names, false))
}

/// The caller's queues whose redrive policy names this queue.
pub(super) async fn list_dead_letter_source_queues(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let target = ctx.queue(input).await?;
    let arn = ctx.arn(&target.account, &target.name);
    let max = input.opt_int_range("MaxResults", 1, MAX_LIST_RESULTS)?;
    let after = input.opt_str("NextToken")?;
    let limit = max.unwrap_or(MAX_LIST_RESULTS) as usize;
    let (names, more) = dead_letter_sources(ctx, ctx.account, &arn, after, limit).await?;
    let mut out = Map::new();
    out.insert(
        "queueUrls".into(),
        names
            .iter()
            .map(|n| Value::String(ctx.url(ctx.account, n)))
            .collect(),
    );
    if more && max.is_some() {
        if let Some(last) = names.last() {
            out.insert("NextToken".into(), Value::String(last.clone()));
        }
    }
    Ok(Value::Object(out))
}

/// Most actions one AddPermission grants, as AWS.
const MAX_PERMISSION_ACTIONS: usize = 7;

fn missing(member: &str) -> ApiError {
    ApiError::new(
        "MissingParameter",
        StatusCode::BAD_REQUEST,
        format!("The request must contain the parameter {member}."),
    )
}

fn check_label(label: &str) -> Result<(), ApiError> {
    let ok = (1..=80).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid_parameter(format!(
            "Value {label} for parameter Label is invalid. Reason: 1 to 80 alphanumeric characters, hyphens or underscores."
        )))
    }
}

/// One string, or a list when there are several (as AWS writes policies).
fn one_or_list(items: Vec<String>) -> Value {
    match <[String; 1]>::try_from(items) {
        Ok([one]) => Value::String(one),
        Err(items) => items.into(),
    }
}

pub(super) async fn add_permission(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let label = input.str("Label")?;
    check_label(label)?;
    let accounts = input.opt_str_list("AWSAccountIds")?.unwrap_or_default();
    let actions = input.opt_str_list("Actions")?.unwrap_or_default();
    if accounts.is_empty() {
        return Err(missing("AWSAccountIds"));
    }
    if actions.is_empty() {
        return Err(missing("Actions"));
    }
    if let Some(bad) = accounts
        .iter()
        .find(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid_parameter(format!(
            "Value {bad} for parameter AWSAccountIds is invalid. Reason: An account id is 12 digits."
        )));
    }
    if let Some(bad) = actions
        .iter()
        .find(|a| **a != "*" && !super::CROSS_ACCOUNT.contains(a))
    {
        return Err(invalid_parameter(format!(
            "Value SQS:{bad} for parameter ActionName is invalid. Reason: Only the queue owner is allowed to invoke this action."
        )));
    }
    if actions.len() > MAX_PERMISSION_ACTIONS {
        return Err(ApiError::new(
            "OverLimit",
            StatusCode::FORBIDDEN,
            format!("A permission grants at most {MAX_PERMISSION_ACTIONS} actions."),
        ));
    }
    let arn = ctx.arn(&queue.account, &queue.name);
    let statement = json!({
        "Effect": "Allow",
        "Principal": { "AWS": one_or_list(accounts.iter().map(|a| format!("arn:aws:iam::{a}:root")).collect()) },
        "Action": one_or_list(actions.iter().map(|a| format!("SQS:{a}")).collect()),
        "Resource": arn,
    });
    let command = QueueCommand::AddPermission {
        label: label.to_string(),
        statement: statement.to_string(),
        policy_id: format!("{arn}/SQSDefaultPolicy"),
    };
    permission_reply(
        ctx.command(queue.group, &command, Retry::BeforeProposing)
            .await?,
        label,
    )
}

pub(super) async fn remove_permission(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let queue = ctx.queue(input).await?;
    let label = input.str("Label")?;
    let command = QueueCommand::RemovePermission {
        label: label.to_string(),
    };
    permission_reply(
        ctx.command(queue.group, &command, Retry::BeforeProposing)
            .await?,
        label,
    )
}

fn permission_reply(reply: QueueReply, label: &str) -> Result<Value, ApiError> {
    let why = match reply {
        QueueReply::PermissionRefused(why) => why,
        _ => return Ok(json!({})),
    };
    Err(match why {
        PermissionRefused::LabelExists => invalid_parameter(format!(
            "Value {label} for parameter Label is invalid. Reason: Already exists."
        )),
        PermissionRefused::NoSuchLabel => invalid_parameter(format!(
            "Value {label} for parameter Label is invalid. Reason: can't find label on existing policy."
        )),
        PermissionRefused::TooLarge { max } => ApiError::new(
            "OverLimit",
            StatusCode::FORBIDDEN,
            format!("The queue's policy would be longer than {max} characters."),
        ),
    })
}
