//! Amazon SQS (awsJson1_0 with target prefix `AmazonSQS`, and awsQuery for
//! SDKs older than that): queues are groups of the queue kind
//! (`kinesin_queue`), named `sqs/<account>/<queue>` in the map, so every
//! node answers for every queue.

mod messages;
mod moves;
mod queues;

use std::collections::BTreeMap;

use axum::http::StatusCode;
use kinesin_queue::{group_name, QueueCommand, QueueQuery, QueueReply};
use kinesin_router::{Retry, Router};
use kinesin_types::GroupId;
use serde_json::{Map, Value};

use crate::codec::Protocol;
use crate::error::ApiError;
use crate::input::Input;
use crate::query::QueryShape;
use crate::service::{operation_table, Service};

use messages::*;
use moves::*;
use queues::*;

pub const SERVICE: Service = Service {
    name: "sqs",
    signing_name: "sqs",
    target_prefix: "AmazonSQS.",
    protocols: &[Protocol::Json10, Protocol::Query],
    operations: OPERATIONS,
    query: Some(QueryShape {
        xmlns: "http://queue.amazonaws.com/doc/2012-11-05/",
        maps: &[],
        flattened: &[
            "QueueUrl",
            "Message",
            "SendMessageBatchResultEntry",
            "DeleteMessageBatchResultEntry",
            "ChangeMessageVisibilityBatchResultEntry",
            "BatchResultErrorEntry",
            "Results",
        ],
        flattened_maps: &[
            ("Attribute", "Name", "Value"),
            ("MessageAttribute", "Name", "Value"),
            ("Tag", "Key", "Value"),
        ],
    }),
    query_errors: &[
        (
            "QueueDoesNotExist",
            "AWS.SimpleQueueService.NonExistentQueue",
        ),
        ("QueueNameExists", "QueueAlreadyExists"),
        (
            "MessageNotInflight",
            "AWS.SimpleQueueService.MessageNotInflight",
        ),
        (
            "PurgeQueueInProgress",
            "AWS.SimpleQueueService.PurgeQueueInProgress",
        ),
        (
            "BatchEntryIdsNotDistinct",
            "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
        ),
        (
            "BatchRequestTooLong",
            "AWS.SimpleQueueService.BatchRequestTooLong",
        ),
        (
            "EmptyBatchRequest",
            "AWS.SimpleQueueService.EmptyBatchRequest",
        ),
        (
            "InvalidBatchEntryId",
            "AWS.SimpleQueueService.InvalidBatchEntryId",
        ),
        (
            "TooManyEntriesInBatchRequest",
            "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
        ),
        (
            "UnsupportedOperation",
            "AWS.SimpleQueueService.UnsupportedOperation",
        ),
        ("AccessDeniedException", "AccessDenied"),
    ],
    query_compatible: true,
};

/// What one request runs with.
pub struct Context<'a> {
    pub router: &'a Router,
    /// The operation called.
    pub op: &'a str,
    pub region: &'a str,
    /// Account of the signing key: its queues are its own.
    pub account: &'a str,
    /// Whether a queue URL must name the caller's account (not in
    /// development mode, where any account of a URL is accepted).
    pub check_accounts: bool,
    /// Queue URLs start with this (`http://host:port`).
    pub url_base: &'a str,
    pub now_ms: u64,
}

/// A queue a request names, found in the map.
struct Queue {
    account: String,
    name: String,
    /// Partition 0: the queue's own group, with its tags, policy and move
    /// tasks.
    group: GroupId,
    /// The groups of all its partitions, partition 0 first.
    partitions: Vec<GroupId>,
}

impl Context<'_> {
    fn url(&self, account: &str, name: &str) -> String {
        format!("{}/{account}/{name}", self.url_base)
    }

    fn arn(&self, account: &str, name: &str) -> String {
        format!("arn:aws:sqs:{}:{account}:{name}", self.region)
    }

    /// The queue a `QueueUrl` names: its last two path segments are the
    /// account and the name (any host, so that a URL from any node works).
    async fn queue(&self, input: &Input<'_>) -> Result<Queue, ApiError> {
        let url = input.str("QueueUrl")?;
        let path = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest.split_once('/').map_or("", |(_, p)| p));
        let mut parts = path.trim_end_matches('/').rsplit('/');
        let (Some(name), Some(account)) = (parts.next(), parts.next()) else {
            return Err(invalid_address(url));
        };
        self.named_queue(account, name).await
    }

    /// `account`'s queue `name`, if the caller may call this operation on
    /// it: its own queues, or another account's whose policy allows it.
    async fn named_queue(&self, account: &str, name: &str) -> Result<Queue, ApiError> {
        let queue = self.find_queue(account, name).ok_or_else(no_queue)?;
        if self.check_accounts && account != self.account {
            // Cross-account calls are governed by the queue's policy; the
            // owner's own operations are the owner's alone, as AWS.
            let action = self.op.strip_suffix("Batch").unwrap_or(self.op);
            let shared = CROSS_ACCOUNT.contains(&action)
                && self
                    .query::<BTreeMap<String, String>>(queue.group, &QueueQuery::Settings)
                    .await
                    .is_ok_and(|settings| {
                        kinesin_queue::policy::allows(
                            settings.get("Policy").map(String::as_str),
                            self.account,
                            action,
                            &self.arn(account, name),
                        )
                    });
            if !shared {
                return Err(ApiError::new(
                    "AccessDeniedException",
                    StatusCode::FORBIDDEN,
                    format!(
                        "Access to the resource {} is denied.",
                        self.url(account, name)
                    ),
                ));
            }
        }
        Ok(queue)
    }

    /// `account`'s queue `name` with its partitions, if it exists.
    fn find_queue(&self, account: &str, name: &str) -> Option<Queue> {
        if name.contains('#') {
            return None;
        }
        let state = self.router.meta_state();
        let key = group_name(account, name);
        let group = state
            .groups
            .get(&key)
            .filter(|g| g.kind == kinesin_queue::QUEUE_KIND)?
            .group;
        let others = format!("{key}#");
        let mut partitions = vec![group];
        partitions.extend(
            state
                .groups
                .range(others.clone()..)
                .take_while(|(k, _)| k.starts_with(&others))
                .filter(|(_, g)| g.kind == kinesin_queue::QUEUE_KIND)
                .map(|(_, g)| g.group),
        );
        Some(Queue {
            account: account.to_string(),
            name: name.to_string(),
            group,
            partitions,
        })
    }

    /// The caller's queues (name, group), in name order.
    fn own_queues(&self) -> Vec<(String, GroupId)> {
        self.queues_of(self.account)
    }

    /// `account`'s queues (name, group), in name order.
    fn queues_of(&self, account: &str) -> Vec<(String, GroupId)> {
        let own = group_name(account, "");
        self.router
            .meta_state()
            .groups
            .range(own.clone()..)
            .take_while(|(k, _)| k.starts_with(&own))
            .filter(|(k, g)| g.kind == kinesin_queue::QUEUE_KIND && !k.contains('#'))
            .map(|(k, g)| (k[own.len()..].to_string(), g.group))
            .collect()
    }

    /// Proposes `command` to a queue's group (one of its partitions).
    async fn command(
        &self,
        group: GroupId,
        command: &QueueCommand,
        retry: Retry,
    ) -> Result<QueueReply, ApiError> {
        let reply = self
            .router
            .propose_stamped(group, kinesin_queue::encode(command), retry)
            .await
            .map_err(queue_error)?;
        kinesin_queue::decode(&reply).map_err(internal)
    }

    /// Asks a queue's group (one of its partitions) `query`.
    async fn query<T: for<'de> serde::Deserialize<'de>>(
        &self,
        group: GroupId,
        query: &QueueQuery,
    ) -> Result<T, ApiError> {
        let bytes = kinesin_router::stamp(self.now_ms, &kinesin_queue::encode(query));
        let reply = self.router.read(group, bytes).await.map_err(queue_error)?;
        kinesin_queue::decode(&reply).map_err(internal)
    }
}

/// Operations a queue's policy can grant to other accounts (batches count
/// as their single-message operation).
const CROSS_ACCOUNT: &[&str] = &[
    "SendMessage",
    "ReceiveMessage",
    "DeleteMessage",
    "ChangeMessageVisibility",
    "GetQueueAttributes",
    "GetQueueUrl",
    "PurgeQueue",
    "ListDeadLetterSourceQueues",
];

fn no_queue() -> ApiError {
    ApiError::new(
        "QueueDoesNotExist",
        StatusCode::BAD_REQUEST,
        "The specified queue does not exist.",
    )
}

fn invalid_address(url: &str) -> ApiError {
    ApiError::new(
        "InvalidAddress",
        StatusCode::BAD_REQUEST,
        format!("The address {url} is not valid for this endpoint."),
    )
}

pub(crate) fn invalid_parameter(message: impl Into<String>) -> ApiError {
    ApiError::new("InvalidParameterValue", StatusCode::BAD_REQUEST, message)
}

fn internal(message: String) -> ApiError {
    ApiError::new(
        "InternalFailure",
        StatusCode::INTERNAL_SERVER_ERROR,
        message,
    )
}

/// A router error for a queue: a group gone from the map is a queue that
/// no longer exists.
/// Those of `partitions` whose replicas are not mostly down as this node
/// sees them (`Router::lacks_quorum`).
fn with_quorum(ctx: &Context<'_>, partitions: &[GroupId]) -> Vec<GroupId> {
    partitions
        .iter()
        .copied()
        .filter(|g| !ctx.router.lacks_quorum(*g))
        .collect()
}

fn queue_error(e: kinesin_router::RouterError) -> ApiError {
    match e {
        kinesin_router::RouterError::ResourceNotFound(_) => no_queue(),
        e => e.into(),
    }
}

operation_table! { Context<'_>, ctx, input;
    "CreateQueue" => create_queue(ctx, input).await,
    "GetQueueUrl" => get_queue_url(ctx, input).await,
    "ListQueues" => list_queues(ctx, input),
    "DeleteQueue" => delete_queue(ctx, input).await,
    "GetQueueAttributes" => get_queue_attributes(ctx, input).await,
    "SetQueueAttributes" => set_queue_attributes(ctx, input).await,
    "PurgeQueue" => purge_queue(ctx, input).await,
    "TagQueue" => tag_queue(ctx, input).await,
    "UntagQueue" => untag_queue(ctx, input).await,
    "ListQueueTags" => list_queue_tags(ctx, input).await,
    "SendMessage" => send_message(ctx, input).await,
    "SendMessageBatch" => send_message_batch(ctx, input).await,
    "ReceiveMessage" => receive_message(ctx, input).await,
    "DeleteMessage" => delete_message(ctx, input).await,
    "DeleteMessageBatch" => delete_message_batch(ctx, input).await,
    "ChangeMessageVisibility" => change_message_visibility(ctx, input).await,
    "ChangeMessageVisibilityBatch" => change_message_visibility_batch(ctx, input).await,
    "ListDeadLetterSourceQueues" => list_dead_letter_source_queues(ctx, input).await,
    "AddPermission" => add_permission(ctx, input).await,
    "RemovePermission" => remove_permission(ctx, input).await,
    "StartMessageMoveTask" => start_message_move_task(ctx, input).await,
    "ListMessageMoveTasks" => list_message_move_tasks(ctx, input).await,
    "CancelMessageMoveTask" => cancel_message_move_task(ctx, input).await,
}

/// An operation the service does not have.
fn unsupported(op: &str) -> ApiError {
    ApiError::new(
        "UnsupportedOperation",
        StatusCode::BAD_REQUEST,
        format!("{op} is not supported by Kinesin yet"),
    )
}

/// Runs an SQS operation: a query request's fields are first renamed to
/// the JSON members, and its answer renamed to the query response's
/// elements. Validation errors take SQS's names.
pub async fn handle(
    ctx: &Context<'_>,
    body: &Value,
    protocol: Protocol,
) -> Result<Value, ApiError> {
    let op = ctx.op;
    let result = if protocol == Protocol::Query {
        let input = from_query(body.clone(), op);
        call(ctx, op, &input, protocol)
            .await
            .map(|out| to_query(out, op))
    } else {
        call(ctx, op, body, protocol).await
    };
    result.map_err(|e| match e.name {
        "ValidationException" if e.message.contains("not be null") => {
            ApiError::new("MissingParameter", StatusCode::BAD_REQUEST, e.message)
        }
        "ValidationException" | "InvalidArgumentException" => invalid_parameter(e.message),
        _ => e,
    })
}

/// How a query request names a JSON member: (query name, JSON name, how
/// its entries are written).
enum Shape {
    List,
    Map(&'static str, &'static str),
    Entries,
}

fn query_member(name: &str, op: &str) -> Option<(&'static str, Shape)> {
    Some(match name {
        "Attribute" => ("Attributes", Shape::Map("Name", "Value")),
        "MessageAttribute" => ("MessageAttributes", Shape::Map("Name", "Value")),
        "MessageSystemAttribute" => ("MessageSystemAttributes", Shape::Map("Name", "Value")),
        "Tag" if op == "CreateQueue" => ("tags", Shape::Map("Key", "Value")),
        "Tag" => ("Tags", Shape::Map("Key", "Value")),
        "AttributeName" => ("AttributeNames", Shape::List),
        "MessageAttributeName" => ("MessageAttributeNames", Shape::List),
        "MessageSystemAttributeName" => ("MessageSystemAttributeNames", Shape::List),
        "TagKey" => ("TagKeys", Shape::List),
        "AWSAccountId" => ("AWSAccountIds", Shape::List),
        "ActionName" => ("Actions", Shape::List),
        "SendMessageBatchRequestEntry"
        | "DeleteMessageBatchRequestEntry"
        | "ChangeMessageVisibilityBatchRequestEntry" => ("Entries", Shape::Entries),
        _ => return None,
    })
}

/// A decoded query request in the JSON form the handlers read: SQS's
/// query names (`Attribute.N.Name`, `SendMessageBatchRequestEntry.N.Id`)
/// become the JSON members (`Attributes`, `Entries`).
fn from_query(value: Value, op: &str) -> Value {
    let Value::Object(fields) = value else {
        return value;
    };
    let mut out = Map::new();
    for (name, value) in fields {
        let Some((json_name, shape)) = query_member(&name, op) else {
            out.insert(name, value);
            continue;
        };
        let items = match value {
            Value::Array(items) => items,
            other => vec![other],
        };
        let converted = match shape {
            Shape::List => Value::Array(items),
            Shape::Entries => Value::Array(items.into_iter().map(|i| from_query(i, op)).collect()),
            Shape::Map(key, val) => {
                let mut map = Map::new();
                for item in items {
                    if let Value::Object(mut entry) = item {
                        if let (Some(Value::String(k)), Some(v)) =
                            (entry.remove(key), entry.remove(val))
                        {
                            map.insert(k, v);
                        }
                    }
                }
                Value::Object(map)
            }
        };
        out.insert(json_name.to_string(), converted);
    }
    Value::Object(out)
}

/// An answer in the query response's element names.
fn to_query(value: Value, op: &str) -> Value {
    let Value::Object(fields) = value else {
        return value;
    };
    let mut out = Map::new();
    for (name, value) in fields {
        let renamed = match name.as_str() {
            "QueueUrls" | "queueUrls" => "QueueUrl".to_string(),
            "Messages" => "Message".to_string(),
            "Attributes" => "Attribute".to_string(),
            "MessageAttributes" => "MessageAttribute".to_string(),
            "Tags" => "Tag".to_string(),
            "Successful" => format!("{op}ResultEntry"),
            "Failed" => "BatchResultErrorEntry".to_string(),
            _ => name,
        };
        let value = match value {
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|i| to_query(i, op)).collect())
            }
            other => other,
        };
        out.insert(renamed, value);
    }
    Value::Object(out)
}
