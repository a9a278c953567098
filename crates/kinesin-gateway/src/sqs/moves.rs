//! Message move tasks (StartMessageMoveTask, ListMessageMoveTasks,
//! CancelMessageMoveTask). A task lives in its dead-letter queue's group;
//! that queue's leader moves the messages, back to the queues they came
//! from or to a named queue, at the task's rate (kinesin-server's redrive
//! worker).

use axum::http::StatusCode;
use base64::Engine;
use kinesin_queue::{MoveTask, QueueCommand, QueueQuery, QueueReply, TaskStatus};
use kinesin_router::Retry;
use serde_json::{json, Map, Value};

use super::queues::dead_letter_sources;
use super::{internal, invalid_parameter, Context, Queue};
use crate::error::ApiError;
use crate::input::Input;

/// Fastest rate a task may ask for, as AWS.
const MAX_RATE: i64 = 500;
/// Most tasks ListMessageMoveTasks shows, as AWS.
const MAX_LISTED: i64 = 10;

fn not_found(message: impl Into<String>) -> ApiError {
    ApiError::new(
        "ResourceNotFoundException",
        StatusCode::BAD_REQUEST,
        message,
    )
}

fn refused(message: &str) -> ApiError {
    ApiError::new("UnsupportedOperation", StatusCode::BAD_REQUEST, message)
}

/// A task's handle: its queue's ARN and its id, as JSON in base64.
fn task_handle(source_arn: &str, id: u64) -> String {
    let json = json!({ "taskId": id.to_string(), "sourceArn": source_arn }).to_string();
    base64::engine::general_purpose::STANDARD.encode(json)
}

fn parse_task_handle(handle: &str) -> Option<(String, u64)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(handle)
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    let id = value.get("taskId")?.as_str()?.parse().ok()?;
    Some((value.get("sourceArn")?.as_str()?.to_string(), id))
}

impl Context<'_> {
    /// The queue an ARN names: in this region, of the caller's account
    /// (any account in development mode).
    fn queue_of_arn(&self, member: &str, arn: &str) -> Result<Queue, ApiError> {
        let missing = || {
            not_found(format!(
                "The resource that you specified for the {member} parameter doesn't exist."
            ))
        };
        let (region, account, name) = kinesin_queue::parse_arn(arn).ok_or_else(missing)?;
        if region != self.region || (self.check_accounts && account != self.account) {
            return Err(missing());
        }
        self.find_queue(account, name).ok_or_else(missing)
    }
}

pub(super) async fn start_message_move_task(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let source = ctx.queue_of_arn("SourceArn", input.str("SourceArn")?)?;
    let source_arn = ctx.arn(&source.account, &source.name);
    let destination = match input.opt_str("DestinationArn")? {
        Some(arn) => {
            let target = ctx.queue_of_arn("DestinationArn", arn)?;
            if target.group == source.group {
                return Err(invalid_parameter(
                    "The destination queue must be another queue than the source queue.",
                ));
            }
            if target.name.ends_with(".fifo") != source.name.ends_with(".fifo") {
                return Err(invalid_parameter(
                    "The destination queue must be of the source queue's type (FIFO or standard).",
                ));
            }
            Some(ctx.arn(&target.account, &target.name))
        }
        None => None,
    };
    let rate = input
        .opt_int_range("MaxNumberOfMessagesPerSecond", 1, MAX_RATE)?
        .map(|r| r as u32);
    let (sources, _) = dead_letter_sources(ctx, &source.account, &source_arn, None, 1).await?;
    if sources.is_empty() {
        return Err(refused(
            "Source queue must be configured as a Dead Letter Queue.",
        ));
    }
    let command = QueueCommand::StartMoveTask { destination, rate };
    match ctx
        .command(source.group, &command, Retry::BeforeProposing)
        .await?
    {
        QueueReply::TaskStarted(id) => Ok(json!({ "TaskHandle": task_handle(&source_arn, id) })),
        QueueReply::TaskRunning => Err(refused(
            "There is already a task running. Only one active task is allowed for a source queue arn at a given time.",
        )),
        other => Err(internal(format!(
            "unexpected reply to a move task's start: {other:?}"
        ))),
    }
}

fn task_entry(source_arn: &str, task: &MoveTask) -> Value {
    let mut out = Map::new();
    if task.status == TaskStatus::Running {
        out.insert("TaskHandle".into(), task_handle(source_arn, task.id).into());
    }
    out.insert("Status".into(), task.status.name().into());
    out.insert("SourceArn".into(), source_arn.into());
    if let Some(destination) = &task.destination {
        out.insert("DestinationArn".into(), destination.as_str().into());
    }
    if let Some(rate) = task.rate {
        out.insert("MaxNumberOfMessagesPerSecond".into(), rate.into());
    }
    out.insert("ApproximateNumberOfMessagesMoved".into(), task.moved.into());
    out.insert(
        "ApproximateNumberOfMessagesToMove".into(),
        task.to_move.into(),
    );
    if let Some(reason) = &task.failure {
        out.insert("FailureReason".into(), reason.as_str().into());
    }
    out.insert("StartedTimestamp".into(), task.started_ms.into());
    Value::Object(out)
}

pub(super) async fn list_message_move_tasks(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let source = ctx.queue_of_arn("SourceArn", input.str("SourceArn")?)?;
    let source_arn = ctx.arn(&source.account, &source.name);
    let max = input
        .opt_int_range("MaxResults", 1, MAX_LISTED)?
        .unwrap_or(1) as usize;
    let tasks: Vec<MoveTask> = ctx.query(source.group, &QueueQuery::MoveTasks).await?;
    let results: Vec<Value> = tasks
        .iter()
        .take(max)
        .map(|t| task_entry(&source_arn, t))
        .collect();
    Ok(json!({ "Results": results }))
}

pub(super) async fn cancel_message_move_task(
    ctx: &Context<'_>,
    input: &Input<'_>,
) -> Result<Value, ApiError> {
    let gone = || not_found("The task does not exist or is not running.");
    let (source_arn, id) = parse_task_handle(input.str("TaskHandle")?).ok_or_else(gone)?;
    let source = ctx
        .queue_of_arn("TaskHandle", &source_arn)
        .map_err(|_| gone())?;
    match ctx
        .command(
            source.group,
            &QueueCommand::CancelMoveTask(id),
            Retry::BeforeProposing,
        )
        .await?
    {
        QueueReply::Cancelled(Some(moved)) => {
            Ok(json!({ "ApproximateNumberOfMessagesMoved": moved }))
        }
        QueueReply::Cancelled(None) => Err(gone()),
        other => Err(internal(format!(
            "unexpected reply to a move task's cancel: {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_handle_names_its_queue_and_task() {
        let arn = "arn:aws:sqs:us-east-1:000000000000:dlq";
        let handle = task_handle(arn, 42);
        assert_eq!(parse_task_handle(&handle), Some((arn.to_string(), 42)));
        assert_eq!(parse_task_handle("not base64!"), None);
        let other = base64::engine::general_purpose::STANDARD.encode(r#"{"taskId":"x"}"#);
        assert_eq!(parse_task_handle(&other), None);
    }
}
