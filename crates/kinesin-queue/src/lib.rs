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

#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod model;
pub mod policy;
mod state_machine;

pub use model::{
    decode, encode, DeadLetters, Delivered, EntryError, Handle, MessageAttribute, MoveBatch,
    MoveTask, NewMessage, QueueCommand, QueueConfig, QueueInfo, QueueQuery, QueueReply, Received,
    SendRefused, Sent, StoredMessage, TaskStatus, EXPIRE_VERSION, MAX_RECEIVE, MOVE_DEAD_VERSION,
};
pub use state_machine::{QueueKind, QUEUE_KIND};

/// The map name of a queue's group.
pub fn group_name(account: &str, queue: &str) -> String {
    format!("sqs/{account}/{queue}")
}

/// The tag that, given to CreateQueue, sets how many partitions (groups)
/// a standard queue has: 1 (the default) to [`MAX_PARTITIONS`].
pub const PARTITIONS_TAG: &str = "kinesin:partitions";
pub const MAX_PARTITIONS: u32 = 16;

/// The map name of partition `k` of a queue. Partition 0 is the queue's
/// own group (settings, tags, policy, move tasks and messages); partitions
/// 1.. hold messages and a copy of the settings. `#` is in no queue name.
pub fn partition_name(account: &str, queue: &str, k: u32) -> String {
    match k {
        0 => group_name(account, queue),
        k => format!("{}#{k}", group_name(account, queue)),
    }
}

/// The account, queue name and partition a queue group's map name names.
pub fn parse_group_name(name: &str) -> Option<(&str, &str, u32)> {
    let (account, rest) = name.strip_prefix("sqs/")?.split_once('/')?;
    match rest.split_once('#') {
        None => Some((account, rest, 0)),
        Some((queue, k)) => Some((account, queue, k.parse().ok().filter(|k| *k > 0)?)),
    }
}

/// The region, account and queue name of an SQS ARN
/// (`arn:aws:sqs:region:account:name`).
pub fn parse_arn(arn: &str) -> Option<(&str, &str, &str)> {
    let parts: Vec<&str> = arn.split(':').collect();
    match parts.as_slice() {
        ["arn", _, "sqs", region, account, name] if !account.is_empty() && !name.is_empty() => {
            Some((region, account, name))
        }
        _ => None,
    }
}

/// Whether a dead-letter queue whose `RedriveAllowPolicy` is `policy`
/// (None: unset, which allows every queue) takes dead letters from the
/// queue `source` (an ARN).
pub fn redrive_allowed(policy: Option<&str>, source: &str) -> bool {
    let Some(policy) = policy.filter(|p| !p.is_empty()) else {
        return true;
    };
    let Ok(policy) = serde_json::from_str::<serde_json::Value>(policy) else {
        return false;
    };
    match policy.get("redrivePermission").and_then(|p| p.as_str()) {
        Some("allowAll") => true,
        Some("byQueue") => policy
            .get("sourceQueueArns")
            .and_then(|a| a.as_array())
            .is_some_and(|arns| arns.iter().any(|a| a.as_str() == Some(source))),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_parse_back() {
        assert_eq!(partition_name("1", "q", 0), "sqs/1/q");
        assert_eq!(partition_name("1", "q", 3), "sqs/1/q#3");
        assert_eq!(parse_group_name("sqs/1/q"), Some(("1", "q", 0)));
        assert_eq!(parse_group_name("sqs/1/q#3"), Some(("1", "q", 3)));
        assert_eq!(parse_group_name("sqs/1/q#0"), None);
        assert_eq!(parse_group_name("firehose/1/q"), None);
        assert_eq!(
            parse_arn("arn:aws:sqs:us-east-1:1:q.fifo"),
            Some(("us-east-1", "1", "q.fifo"))
        );
        assert_eq!(parse_arn("arn:aws:sns:us-east-1:1:q"), None);
        assert_eq!(parse_arn("arn:aws:sqs:us-east-1::q"), None);
    }

    #[test]
    fn a_redrive_allow_policy_admits_the_queues_it_names() {
        let me = "arn:aws:sqs:us-east-1:000000000000:src";
        assert!(redrive_allowed(None, me));
        assert!(redrive_allowed(Some(""), me));
        assert!(redrive_allowed(
            Some(r#"{"redrivePermission":"allowAll"}"#),
            me
        ));
        assert!(!redrive_allowed(
            Some(r#"{"redrivePermission":"denyAll"}"#),
            me
        ));
        let by_queue = format!(r#"{{"redrivePermission":"byQueue","sourceQueueArns":["{me}"]}}"#);
        assert!(redrive_allowed(Some(&by_queue), me));
        assert!(!redrive_allowed(
            Some(&by_queue),
            "arn:aws:sqs:us-east-1:000000000000:other"
        ));
        assert!(!redrive_allowed(Some("not json"), me));
    }
}
