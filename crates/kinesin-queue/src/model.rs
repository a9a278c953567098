//! Commands, queries and replies of a queue group, and what a message is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::PermissionRefused;

/// A queue's configuration when it is created (the group's config in the
/// map): its attributes as the gateway validated and completed them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub attributes: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub created_ms: u64,
}

/// A typed message attribute (`MessageAttributes`, or the system attribute
/// `AWSTraceHeader`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageAttribute {
    pub name: String,
    pub data_type: String,
    pub string_value: Option<String>,
    #[serde(with = "serde_bytes")]
    pub binary_value: Vec<u8>,
}

/// A message as SendMessage gives it, with what the gateway derived from
/// it (id, digests, sender).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    pub message_id: String,
    pub body: String,
    pub attributes: Vec<MessageAttribute>,
    pub system_attributes: Vec<MessageAttribute>,
    pub md5_of_body: String,
    pub md5_of_attributes: Option<String>,
    pub md5_of_system_attributes: Option<String>,
    pub sender_id: String,
    /// None: the queue's DelaySeconds.
    pub delay_seconds: Option<u32>,
    pub group_id: Option<String>,
    pub dedup_id: Option<String>,
    /// The SHA-256 of the body (hex), for a FIFO message without a
    /// deduplication id: its id if the queue deduplicates by content.
    pub content_dedup_id: Option<String>,
    /// Body and attributes in bytes, checked against MaximumMessageSize.
    pub size: u32,
}

/// A message as its row stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub message: NewMessage,
    pub sent_ms: u64,
    /// Its place in the queue; for FIFO queues the SequenceNumber.
    pub seq: u128,
}

/// What a receipt handle names: a message and the receive that handed it
/// out (the log index of that receive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    pub seq: u128,
    pub nonce: u64,
}

/// The most messages one receive takes (SQS's `MaxNumberOfMessages`
/// limit). Apply takes no more whatever a command asks, so a command
/// that did not come through the gateway's check cannot make every
/// replica reserve room for billions of messages.
pub const MAX_RECEIVE: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// Sets the given attributes (validated by the gateway).
    SetAttributes(BTreeMap<String, String>),
    Tag(BTreeMap<String, String>),
    Untag(Vec<String>),
    Send(Vec<NewMessage>),
    /// Takes up to `max` visible messages (at most [`MAX_RECEIVE`]),
    /// hiding them for the visibility timeout (None: the queue's).
    Receive {
        max: u32,
        visibility_seconds: Option<u32>,
    },
    Delete(Vec<Handle>),
    ChangeVisibility(Vec<(Handle, u32)>),
    Purge,
    /// Messages moved here from a source queue's dead letters, keeping
    /// their id, attributes and first send time.
    Move(Vec<StoredMessage>),
    /// Drops dead letters once their dead-letter queue has them.
    Remove(Vec<u128>),
    /// A receive with an attempt id (FIFO queues): repeated within
    /// `window_seconds` (five minutes for a `ReceiveRequestAttemptId`),
    /// while none of the messages it took was deleted or had its
    /// visibility changed, it answers the same messages and receipts and
    /// restarts their visibility timeout.
    ReceiveAttempt {
        max: u32,
        visibility_seconds: Option<u32>,
        attempt: String,
        window_seconds: u32,
    },
    /// Dead letters of the queue `source` (an ARN) moved here, as
    /// [`QueueCommand::Move`]; each remembers its source, where a move
    /// task without a destination sends it back. A leader moves dead
    /// letters with it until every node decodes [`QueueCommand::MoveDead`].
    MoveFrom {
        source: String,
        messages: Vec<StoredMessage>,
    },
    /// Starts a message move task (StartMessageMoveTask) unless one runs.
    StartMoveTask {
        destination: Option<String>,
        rate: Option<u32>,
    },
    /// Cancels the running move task with this id.
    CancelMoveTask(u64),
    /// Messages a move task copied to their destination: dropped here if
    /// still held by the claim that named them, and counted as moved.
    MovedOut {
        task: u64,
        handles: Vec<Handle>,
    },
    /// Ends a running move task: done, or failed for this reason.
    EndMoveTask {
        task: u64,
        failure: Option<String>,
    },
    /// Adds a statement (JSON) labelled `label` to the queue's policy,
    /// which is made with the id `policy_id` if the queue has none.
    AddPermission {
        label: String,
        statement: String,
        policy_id: String,
    },
    /// Removes the policy's statements labelled `label`.
    RemovePermission {
        label: String,
    },
    /// Hides the given visible messages for the running move task `task`
    /// while it copies them, so that no consumer takes or deletes one
    /// meanwhile; a claim not followed by [`QueueCommand::MovedOut`] ends
    /// after a minute. Answers the claimed messages' handles.
    ClaimForMove {
        task: u64,
        seqs: Vec<u128>,
    },
    /// Drops the messages past the queue's retention. Every command does
    /// that in sequence order; on a standard queue this one also drops
    /// those past it by their first send time, as AWS does: a dead letter
    /// moved here with an older send time than the messages before it.
    /// Data version [`EXPIRE_VERSION`]: an older release cannot decode it.
    Expire,
    /// Dead letters of the queue `source` (an ARN) moved here, as
    /// [`QueueCommand::MoveFrom`], except that on a FIFO queue their
    /// retention restarts at the move, as AWS does (their SentTimestamp
    /// stays the first send time). Data version [`MOVE_DEAD_VERSION`]: an
    /// older release cannot decode it.
    MoveDead {
        source: String,
        messages: Vec<StoredMessage>,
    },
}

/// The data version whose queue replicas decode [`QueueCommand::Expire`]
/// (`kinesin_storage::data_version::HISTORY`): a queue's leader proposes it
/// only once every node reports at least this version.
pub const EXPIRE_VERSION: u32 = 9;

/// The data version whose queue replicas decode
/// [`QueueCommand::MoveDead`]: a queue's leader moves its dead letters with
/// it only once every node reports at least this version.
pub const MOVE_DEAD_VERSION: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueQuery {
    /// Settings, tags and message counts.
    Info,
    /// The attributes alone (a map of strings), without counting messages.
    Settings,
    /// Answers non-empty when a receive would take a message now.
    Ready,
    /// Up to this many messages received more often than the redrive
    /// policy allows (and at most 4 MiB of them, one entry at the
    /// dead-letter queue), with its ARN ([`DeadLetters`]).
    DeadLetters(u32),
    /// The queue's move tasks, the latest first (`Vec<MoveTask>`).
    MoveTasks,
    /// The running move task and up to this many of the visible messages
    /// it moves next ([`MoveBatch`]).
    MoveBatch(u32),
    /// As [`QueueQuery::Ready`], and also non-empty when a receive with
    /// this attempt id would repeat an earlier one.
    ReadyFor(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskStatus {
    Running,
    Completed,
    Cancelled,
    Failed,
}

impl TaskStatus {
    /// The name SQS gives the status.
    pub fn name(self) -> &'static str {
        match self {
            TaskStatus::Running => "RUNNING",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Cancelled => "CANCELLED",
            TaskStatus::Failed => "FAILED",
        }
    }
}

/// A message move task (StartMessageMoveTask) of a queue, kept with the
/// queue: its id is the log index of its start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveTask {
    pub id: u64,
    pub status: TaskStatus,
    /// None: each message goes back to the queue it came from.
    pub destination: Option<String>,
    pub rate: Option<u32>,
    pub moved: u64,
    /// The queue's messages when the task started.
    pub to_move: u64,
    pub started_ms: u64,
    pub failure: Option<String>,
}

/// What a move task moves next: messages with the queue each came from as
/// a dead letter (None: sent here directly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveBatch {
    pub task: Option<MoveTask>,
    pub messages: Vec<(StoredMessage, Option<String>)>,
}

/// Messages waiting to move to the dead-letter queue `target` (an ARN).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetters {
    pub target: String,
    pub messages: Vec<StoredMessage>,
}

/// A sent message, or the earlier one whose deduplication id it repeated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub message_id: String,
    pub seq: u128,
}

/// A message a receive took, before its body was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub handle: Handle,
    pub receive_count: u32,
    pub first_receive_ms: u64,
}

/// A received message with its body, as the leader answers the receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub received: Received,
    pub message: StoredMessage,
}

/// Why a queue refused one message of a send: its settings decide, so the
/// queue checks them where it applies the send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendRefused {
    /// Larger than the queue's MaximumMessageSize.
    TooLarge { max: u32 },
    /// A FIFO message without a deduplication id, on a queue that does not
    /// deduplicate by content.
    NoDeduplicationId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryError {
    /// No message of the queue has this receipt's message (deleted,
    /// expired, or never there).
    ReceiptHandleIsInvalid,
    /// ChangeMessageVisibility on a message that is not in flight.
    MessageNotInflight,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueReply {
    Done,
    Sent(Vec<Result<Sent, SendRefused>>),
    Received(Vec<Received>),
    Delivered(Vec<Delivered>),
    Entries(Vec<Result<(), EntryError>>),
    /// PurgeQueue within 60 s of the last one.
    PurgeInProgress,
    /// TagQueue would leave the queue with more than this many tags.
    TooManyTags(u32),
    /// A move task started with this id.
    TaskStarted(u64),
    /// StartMoveTask while a task runs.
    TaskRunning,
    /// CancelMoveTask: the messages the task moved, or None when no task of
    /// that id runs.
    Cancelled(Option<u64>),
    PermissionRefused(PermissionRefused),
    Claimed(Vec<Handle>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    pub attributes: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub created_ms: u64,
    pub modified_ms: u64,
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub oldest_sent_ms: Option<u64>,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding to a Vec cannot fail")
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("undecodable queue message: {e}"))
}
