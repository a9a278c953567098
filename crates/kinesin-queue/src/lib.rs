//! SQS queues as a Raft group kind. A queue is a group of the kind
//! [`QUEUE_KIND`] whose state machine holds the queue's settings, its
//! messages and their delivery state (visible-at, receive count, the
//! current receipt), FIFO group locks and deduplication ids. Every command
//! carries the leader's clock (the router's stamped proposals):
//! apply never reads a clock, so replicas agree on which message is
//! visible when.
//!
//! Message bodies and delivery state are rows of the group (bodies never
//! change once written; state changes with every receive), so snapshots
//! carry them as mutable rows; the settings are the small state. An
//! in-memory index of the delivery state answers receives without reading
//! storage while applying; it is rebuilt from the rows at a start and after
//! a snapshot install.

mod model;
mod state_machine;

pub use model::{
    decode, encode, DeadLetters, Delivered, EntryError, Handle, MessageAttribute, NewMessage,
    QueueCommand, QueueConfig, QueueInfo, QueueQuery, QueueReply, Received, SendRefused, Sent,
    StoredMessage,
};
pub use state_machine::{QueueKind, QUEUE_KIND};

/// The map name of a queue's group.
pub fn group_name(account: &str, queue: &str) -> String {
    format!("sqs/{account}/{queue}")
}

/// The map name of the queue an ARN (`arn:aws:sqs:region:account:name`)
/// names.
pub fn group_of_arn(arn: &str) -> Option<String> {
    let parts: Vec<&str> = arn.split(':').collect();
    match parts.as_slice() {
        ["arn", _, "sqs", _, account, name] if !account.is_empty() && !name.is_empty() => {
            Some(group_name(account, name))
        }
        _ => None,
    }
}
