//! The queue group's state machine.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::io;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::{Arc, Mutex};

use kinesin_raft::{FixedRows, GroupKind, GroupStateMachine, SnapshotRows};
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::GroupId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{
    decode, encode, DeadLetters, Delivered, EntryError, Handle, MoveBatch, MoveTask, NewMessage,
    QueueCommand, QueueConfig, QueueInfo, QueueQuery, QueueReply, Received, SendRefused, Sent,
    StoredMessage, TaskStatus, MAX_RECEIVE,
};
use crate::policy::{self, PermissionRefused};

/// The kind's registered name.
pub const QUEUE_KIND: &str = "sqs-queue";

/// Row tags after the group id in `Cf::Rows`.
const TAG_STATE: u8 = 1;
const TAG_BODY: u8 = 2;
const TAG_DEDUP: u8 = 3;
const TAG_ATTEMPT: u8 = 4;
const TAG_ORIGIN: u8 = 5;
const TAG_TASK: u8 = 6;
/// The settings' key in `Cf::StateMachine`.
const HEADER_KEY: &[u8] = b"q:header";
/// The queue's clock (`Queue::clock_ms`) in `Cf::StateMachine`.
const CLOCK_KEY: &[u8] = b"q:clock";

/// How long a deduplication id holds (FIFO queues), as AWS.
const DEDUP_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Move tasks a queue keeps (ListMessageMoveTasks shows up to 10).
const MAX_TASKS: usize = 10;
/// Most bytes of message rows one move batch or batch of dead letters
/// reads (it becomes one Raft entry at the destination).
const MOVE_BATCH_BYTES: usize = 4 << 20;
/// Most messages one receive turns into dead letters: each pass over the
/// queue costs a scan, and the rest die at the next receive.
const MAX_DEATHS_PER_RECEIVE: usize = 100;
/// Most tags of one queue, as AWS.
const MAX_TAGS: usize = 50;
/// How long a move task's claim hides a message it copies.
const MOVE_CLAIM_MS: u64 = 60 * 1000;
/// Longest policy, as any attribute value (AWS).
const MAX_POLICY_BYTES: usize = 20_480;
/// PurgeQueue may run once per this long.
const PURGE_INTERVAL_MS: u64 = 60 * 1000;

const DEFAULT_VISIBILITY_S: u64 = 30;
const DEFAULT_RETENTION_S: u64 = 345_600;
const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1_048_576;

pub struct QueueKind;

impl GroupKind for QueueKind {
    fn open(
        &self,
        storage: Storage,
        group: GroupId,
        config: &[u8],
    ) -> io::Result<Arc<dyn GroupStateMachine>> {
        let config: QueueConfig = decode(config).map_err(io::Error::other)?;
        let initial = Header {
            attributes: config.attributes,
            tags: config.tags,
            created_ms: config.created_ms,
            modified_ms: config.created_ms,
            last_purge_ms: None,
        };
        let sm = QueueStateMachine {
            storage,
            group: group.0,
            queue: Mutex::new(Queue {
                header: initial.clone(),
                ..Queue::default()
            }),
            published: Mutex::new((encode(&initial), 0)),
            changes: watch::channel(0).0,
        };
        sm.reload()?;
        let published = {
            let q = sm.queue.lock().expect("queue lock");
            (encode(&q.header), q.clock_ms)
        };
        *sm.published.lock().expect("published lock") = published;
        Ok(Arc::new(sm))
    }
}

/// The queue's settings: the group's small state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    attributes: BTreeMap<String, String>,
    tags: BTreeMap<String, String>,
    created_ms: u64,
    modified_ms: u64,
    last_purge_ms: Option<u64>,
}

/// A numeric attribute. The gateway keeps each within AWS's bounds; a
/// replica also caps what it reads at `u32::MAX`, so that no time computed
/// from one can overflow (the queue fuzz target can send any value).
fn number_in(attributes: &BTreeMap<String, String>, name: &str, default: u64) -> u64 {
    attributes
        .get(name)
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(default, |n| n.min(u64::from(u32::MAX)))
}

fn retention_ms(attributes: &BTreeMap<String, String>) -> u64 {
    number_in(attributes, "MessageRetentionPeriod", DEFAULT_RETENTION_S) * 1000
}

fn flag_in(attributes: &BTreeMap<String, String>, name: &str) -> bool {
    attributes.get(name).is_some_and(|v| v == "true")
}

fn fifo_in(attributes: &BTreeMap<String, String>) -> bool {
    flag_in(attributes, "FifoQueue")
}

impl QueueInfo {
    /// Whether a [`QueueCommand::Expire`] at `now_ms` would drop a message:
    /// a standard queue's oldest message by send time is past retention.
    pub fn expire_due(&self, now_ms: u64) -> bool {
        !fifo_in(&self.attributes)
            && self
                .oldest_sent_ms
                .is_some_and(|sent| sent.saturating_add(retention_ms(&self.attributes)) <= now_ms)
    }
}

impl Header {
    fn number(&self, name: &str, default: u64) -> u64 {
        number_in(&self.attributes, name, default)
    }

    fn flag(&self, name: &str) -> bool {
        flag_in(&self.attributes, name)
    }

    fn fifo(&self) -> bool {
        fifo_in(&self.attributes)
    }

    /// The redrive policy's dead-letter queue ARN and receive limit.
    fn redrive(&self) -> Option<(String, u32)> {
        let policy: serde_json::Value =
            serde_json::from_str(self.attributes.get("RedrivePolicy")?).ok()?;
        let target = policy.get("deadLetterTargetArn")?.as_str()?.to_string();
        let max = match policy.get("maxReceiveCount")? {
            serde_json::Value::Number(n) => n.as_u64()?,
            serde_json::Value::String(s) => s.parse().ok()?,
            _ => return None,
        };
        // At least 1, as the gateway requires: a dead letter was received
        // (FIFO receives rely on it, `Groups::leading`).
        Some((target, u32::try_from(max).ok()?.max(1)))
    }

    fn dedup_per_group(&self) -> bool {
        self.attributes
            .get("DeduplicationScope")
            .is_some_and(|v| v == "messageGroup")
    }
}

/// A message's delivery state (its row beside the body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MessageState {
    /// When its retention started: when it was sent, or for a dead letter
    /// moved into a FIFO queue by [`QueueCommand::MoveDead`], the move.
    sent_ms: u64,
    visible_at_ms: u64,
    receive_count: u32,
    first_receive_ms: u64,
    /// The log index of the receive that handed out the current receipt.
    nonce: u64,
    group_id: Option<String>,
    /// Received as often as the redrive policy allows: waits to move to
    /// the dead-letter queue, never delivered again here.
    dead: bool,
}

impl MessageState {
    fn in_flight(&self, now_ms: u64) -> bool {
        self.receive_count > 0 && self.visible_at_ms > now_ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Dedup {
    message_id: String,
    seq: u128,
    expires_ms: u64,
}

/// Messages moved into a queue: from the dead letters of `source`, if
/// named, and with their retention restarting at the move, or counted from
/// their first send time.
struct Moved {
    messages: Vec<StoredMessage>,
    source: Option<String>,
    restart_retention: bool,
}

/// What a receive asks for.
struct Receiving {
    max: u32,
    visibility_seconds: Option<u32>,
    /// The attempt id and how long it can repeat the receive.
    attempt: Option<(String, u64)>,
}

/// A receive that named an attempt id: the receipts it handed out, each
/// with the visible-at time it set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Attempt {
    expires_ms: u64,
    taken: Vec<(Handle, u64)>,
}

trait Expires {
    fn expires_ms(&self) -> u64;
}

impl Expires for Dedup {
    fn expires_ms(&self) -> u64 {
        self.expires_ms
    }
}

impl Expires for Attempt {
    fn expires_ms(&self) -> u64 {
        self.expires_ms
    }
}

/// Hands `m` out in the receive at log index `index` and time `now_ms`,
/// hidden until `visible_at_ms`.
fn take(m: &mut MessageState, seq: u128, index: u64, now_ms: u64, visible_at_ms: u64) -> Received {
    m.receive_count += 1;
    if m.first_receive_ms == 0 {
        m.first_receive_ms = now_ms;
    }
    m.nonce = index;
    m.visible_at_ms = visible_at_ms;
    Received {
        handle: Handle { seq, nonce: index },
        receive_count: m.receive_count,
        first_receive_ms: m.first_receive_ms,
    }
}

/// Entries that expire, each a row under `tag`, with (expiry, key) in
/// order beside the map to drop them oldest first.
struct Expiring<T> {
    tag: u8,
    map: BTreeMap<String, T>,
    order: BTreeSet<(u64, String)>,
}

impl<T: Expires> Expiring<T> {
    fn new(tag: u8) -> Self {
        Expiring {
            tag,
            map: BTreeMap::new(),
            order: BTreeSet::new(),
        }
    }

    fn insert(&mut self, key: String, value: T) {
        self.order.insert((value.expires_ms(), key.clone()));
        if let Some(old) = self.map.insert(key.clone(), value) {
            if old.expires_ms() != self.map[&key].expires_ms() {
                self.order.remove(&(old.expires_ms(), key));
            }
        }
    }
}

/// A FIFO queue's message groups: the messages of each in queue order, and
/// the groups by their oldest message. A receive walks the groups from the
/// oldest, and only the leading messages of each: not every message of the
/// queue, most of which may wait behind a group's message in flight.
#[derive(Default)]
struct Groups {
    members: HashMap<String, BTreeSet<u128>>,
    /// Each group by its oldest message (a message is in one group only).
    heads: BTreeMap<u128, String>,
}

impl Groups {
    fn add(&mut self, group: &str, seq: u128) {
        let Some(members) = self.members.get_mut(group) else {
            self.members
                .insert(group.to_string(), BTreeSet::from([seq]));
            self.heads.insert(seq, group.to_string());
            return;
        };
        let head = members.first().copied();
        members.insert(seq);
        if let Some(name) = head
            .filter(|&h| seq < h)
            .and_then(|h| self.heads.remove(&h))
        {
            self.heads.insert(seq, name);
        }
    }

    fn remove(&mut self, group: &str, seq: u128) {
        let Some(members) = self.members.get_mut(group) else {
            return;
        };
        let was_head = members.first() == Some(&seq);
        members.remove(&seq);
        if !was_head {
            return;
        }
        let Some(name) = self.heads.remove(&seq) else {
            return;
        };
        match members.first() {
            Some(&next) => {
                self.heads.insert(next, name);
            }
            None => {
                self.members.remove(group);
            }
        }
    }

    /// The messages of `group` a receive at `now_ms` may take, at most
    /// `max`: its leading visible ones, dead letters skipped, or none while
    /// one of its messages is in flight. Only a received message can be in
    /// flight, and a group's received messages lead it (receives take the
    /// leading ones), so the walk ends at the first message never received
    /// once it has `max`, and at the first one not yet visible (the later
    /// ones wait for it).
    fn leading(
        &self,
        group: &str,
        messages: &BTreeMap<u128, MessageState>,
        now_ms: u64,
        max: usize,
    ) -> Vec<u128> {
        let mut out = Vec::new();
        let members = self.members.get(group).into_iter().flatten();
        for (seq, m) in members.filter_map(|seq| messages.get(seq).map(|m| (*seq, m))) {
            if m.dead {
                continue;
            }
            if m.in_flight(now_ms) {
                return Vec::new();
            }
            if m.visible_at_ms > now_ms || (out.len() == max && m.receive_count == 0) {
                break;
            }
            if out.len() < max {
                out.push(seq);
            }
        }
        out
    }
}

struct Queue {
    header: Header,
    /// Changed since the last publish.
    header_dirty: bool,
    /// The latest clock any command carried: commands apply at the later of
    /// their stamp and this, so the queue's time never runs backward (two
    /// proposals stamped in one order may commit in the other, and a new
    /// leader's clock may be behind the old one's).
    clock_ms: u64,
    messages: BTreeMap<u128, MessageState>,
    /// (visible-at, seq) of each live message: a standard queue's receive
    /// takes the first keys up to its time instead of walking the messages
    /// in flight. Writing a message's state adds its key; changing its
    /// visible-at, its death and its removal drop the old one (a key left
    /// behind would only be skipped: keys are checked against the message).
    visible_at: BTreeSet<(u64, u128)>,
    /// The dead letters among the messages, kept with their state.
    dead: BTreeSet<u128>,
    /// (sent time, seq) of each message: the oldest message without a walk
    /// (a dead letter moved into a standard queue keeps its first send
    /// time, so sequence order is not send order).
    by_sent: BTreeSet<(u64, u128)>,
    /// A FIFO queue's messages by message group.
    groups: Groups,
    dedup: Expiring<Dedup>,
    attempts: Expiring<Attempt>,
    /// The source queue (ARN) of each message moved here as a dead letter.
    origins: HashMap<u128, String>,
    /// The latest move tasks by id.
    tasks: BTreeMap<u64, MoveTask>,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            header: Header::default(),
            header_dirty: false,
            clock_ms: 0,
            messages: BTreeMap::new(),
            visible_at: BTreeSet::new(),
            dead: BTreeSet::new(),
            by_sent: BTreeSet::new(),
            groups: Groups::default(),
            dedup: Expiring::new(TAG_DEDUP),
            attempts: Expiring::new(TAG_ATTEMPT),
            origins: HashMap::new(),
            tasks: BTreeMap::new(),
        }
    }
}

impl Queue {
    /// The message group `m` counts in: on a FIFO queue its group (a
    /// message without one, which a FIFO queue is never sent, in the group
    /// ""), on a standard queue none.
    fn group_of<'m>(&self, m: &'m MessageState) -> Option<&'m str> {
        self.header
            .fifo()
            .then(|| m.group_id.as_deref().unwrap_or(""))
    }

    /// Adds message `seq`, keyed by its state as [`Queue::key`] keys it.
    fn insert(&mut self, seq: u128, m: MessageState) {
        Self::key(&mut self.visible_at, &mut self.dead, seq, &m);
        if let Some(group) = self.group_of(&m) {
            self.groups.add(group, seq);
        }
        self.by_sent.insert((m.sent_ms, seq));
        self.messages.insert(seq, m);
    }

    /// Keys the state `m` of message `seq`, just written, by its visible-at
    /// time if live or among the dead letters. Its old visible-at key, if
    /// that changed, the caller drops.
    fn key(
        visible_at: &mut BTreeSet<(u64, u128)>,
        dead: &mut BTreeSet<u128>,
        seq: u128,
        m: &MessageState,
    ) {
        if m.dead {
            dead.insert(seq);
        } else {
            dead.remove(&seq);
            visible_at.insert((m.visible_at_ms, seq));
        }
    }

    fn remove(&mut self, seq: u128) -> Option<MessageState> {
        let m = self.messages.remove(&seq)?;
        self.visible_at.remove(&(m.visible_at_ms, seq));
        self.dead.remove(&seq);
        self.by_sent.remove(&(m.sent_ms, seq));
        if let Some(group) = self.group_of(&m) {
            self.groups.remove(group, seq);
        }
        Some(m)
    }

    /// The messages a receive at `now_ms` may take, in queue order: visible
    /// ones, and for a FIFO queue only the leading visible messages of each
    /// message group that has none in flight.
    fn takeable(&self, now_ms: u64, max: usize) -> Vec<u128> {
        if !self.header.fifo() {
            return self
                .visible_now(now_ms)
                .take(max)
                .map(|(_, seq)| seq)
                .collect();
        }
        // The `max` oldest takeable messages so far; the groups are walked
        // from the one with the oldest message, until a group's first
        // message is younger than all of those.
        let mut oldest: BinaryHeap<u128> = BinaryHeap::with_capacity(max + 1);
        for (head, group) in &self.groups.heads {
            if oldest.len() == max && oldest.peek().is_some_and(|youngest| head > youngest) {
                break;
            }
            for seq in self.groups.leading(group, &self.messages, now_ms, max) {
                oldest.push(seq);
                if oldest.len() > max {
                    oldest.pop();
                }
            }
        }
        oldest.into_sorted_vec()
    }

    /// The keys of a standard queue's visible messages at `now_ms`, those
    /// visible longest first.
    fn visible_now(&self, now_ms: u64) -> impl Iterator<Item = (u64, u128)> + '_ {
        self.visible_at
            .range(..=(now_ms, u128::MAX))
            .copied()
            .filter(|(at, seq)| {
                self.messages
                    .get(seq)
                    .is_some_and(|m| m.visible_at_ms == *at && !m.dead)
            })
    }

    /// Whether a receive with attempt id `id` would repeat the earlier one:
    /// every message it took still has that receipt and visible-at time.
    fn repeatable(&self, id: &str, now_ms: u64) -> bool {
        self.attempts.map.get(id).is_some_and(|earlier| {
            earlier.expires_ms > now_ms
                && earlier.taken.iter().all(|(h, visible_at)| {
                    self.messages.get(&h.seq).is_some_and(|m| {
                        m.nonce == h.nonce && m.visible_at_ms == *visible_at && m.in_flight(now_ms)
                    })
                })
        })
    }

    /// The messages that are not dead letters.
    fn live(&self) -> u64 {
        self.messages.len().saturating_sub(self.dead.len()) as u64
    }

    /// The counts walk only the messages not yet visible (in flight or
    /// delayed): every live message is keyed by its visible-at time, so
    /// the rest are visible.
    fn info(&self, now_ms: u64) -> QueueInfo {
        let (mut in_flight, mut delayed) = (0, 0);
        let later = self
            .visible_at
            .range((Excluded((now_ms, u128::MAX)), Unbounded))
            .filter_map(|(at, seq)| {
                self.messages
                    .get(seq)
                    .filter(|m| m.visible_at_ms == *at && !m.dead)
            });
        for m in later {
            if m.receive_count > 0 {
                in_flight += 1;
            } else {
                delayed += 1;
            }
        }
        let live = self.live();
        QueueInfo {
            attributes: self.header.attributes.clone(),
            tags: self.header.tags.clone(),
            created_ms: self.header.created_ms,
            modified_ms: self.header.modified_ms,
            visible: live.saturating_sub(in_flight + delayed),
            in_flight,
            delayed,
            oldest_sent_ms: self.by_sent.first().map(|(sent_ms, _)| *sent_ms),
        }
    }
}

struct QueueStateMachine {
    storage: Storage,
    group: u64,
    /// Applied state, ahead of storage by at most the batch being written.
    queue: Mutex<Queue>,
    /// The encoded header and the clock as of the last written batch, for
    /// snapshots.
    published: Mutex<(Vec<u8>, u64)>,
    changes: watch::Sender<u64>,
}

fn row_key(group: u64, tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + rest.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    k.extend_from_slice(rest);
    k
}

/// The message a row key (after its tag) names.
fn seq_of(key: &[u8]) -> Result<u128, String> {
    Ok(u128::from_be_bytes(key.try_into().map_err(|_| {
        "a queue message row has a malformed key".to_string()
    })?))
}

/// The log index of the entry that wrote the body row with this key: the
/// high bits of its message's `seq`. A malformed key reads as 0, so that a
/// snapshot sends rather than loses it.
fn body_writer_index(key: &[u8]) -> u64 {
    key.get(9..)
        .and_then(|k| seq_of(k).ok())
        .map_or(0, |seq| (seq >> 32) as u64)
}

/// The clock the leader put before a command or query, and the rest.
fn split_stamp(bytes: &[u8]) -> Result<(u64, &[u8]), String> {
    kinesin_raft::split_stamp(bytes)
        .ok_or_else(|| "a queue command or query starts with the leader's clock".into())
}

impl QueueStateMachine {
    fn state_key(&self, seq: u128) -> Vec<u8> {
        row_key(self.group, TAG_STATE, &seq.to_be_bytes())
    }

    fn body_key(&self, seq: u128) -> Vec<u8> {
        row_key(self.group, TAG_BODY, &seq.to_be_bytes())
    }

    fn origin_key(&self, seq: u128) -> Vec<u8> {
        row_key(self.group, TAG_ORIGIN, &seq.to_be_bytes())
    }

    fn task_key(&self, id: u64) -> Vec<u8> {
        row_key(self.group, TAG_TASK, &id.to_be_bytes())
    }

    fn put_expiring<T: Expires + Serialize>(
        &self,
        batch: &mut WriteBatch,
        entries: &mut Expiring<T>,
        key: String,
        value: T,
    ) {
        batch.put_cf(
            self.storage.cf(Cf::Rows),
            row_key(self.group, entries.tag, key.as_bytes()),
            encode(&value),
        );
        entries.insert(key, value);
    }

    /// Drops the entries past their expiry, with their rows.
    fn expire_entries<T>(&self, batch: &mut WriteBatch, entries: &mut Expiring<T>, now_ms: u64) {
        while let Some((expires, key)) = entries.order.first().cloned() {
            if expires > now_ms {
                break;
            }
            entries.order.pop_first();
            entries.map.remove(&key);
            batch.delete_cf(
                self.storage.cf(Cf::Rows),
                row_key(self.group, entries.tag, key.as_bytes()),
            );
        }
    }

    fn put_task(&self, q: &mut Queue, batch: &mut WriteBatch, task: MoveTask) {
        batch.put_cf(
            self.storage.cf(Cf::Rows),
            self.task_key(task.id),
            encode(&task),
        );
        q.tasks.insert(task.id, task);
        while q.tasks.len() > MAX_TASKS {
            if let Some((id, _)) = q.tasks.pop_first() {
                batch.delete_cf(self.storage.cf(Cf::Rows), self.task_key(id));
            }
        }
    }

    /// Writes a message's state, and keys it by visible-at time if live,
    /// or among the dead letters.
    fn put_state(
        &self,
        visible_at: &mut BTreeSet<(u64, u128)>,
        dead: &mut BTreeSet<u128>,
        batch: &mut WriteBatch,
        seq: u128,
        m: &MessageState,
    ) {
        Queue::key(visible_at, dead, seq, m);
        self.write_state(batch, seq, m);
    }

    /// Writes a message's state row only (a new message: `Queue::insert`
    /// keys it).
    fn write_state(&self, batch: &mut WriteBatch, seq: u128, m: &MessageState) {
        batch.put_cf(self.storage.cf(Cf::Rows), self.state_key(seq), encode(m));
    }

    fn remove_message(&self, q: &mut Queue, batch: &mut WriteBatch, seq: u128) {
        q.remove(seq);
        batch.delete_cf(self.storage.cf(Cf::Rows), self.state_key(seq));
        batch.delete_cf(self.storage.cf(Cf::Rows), self.body_key(seq));
        if q.origins.remove(&seq).is_some() {
            batch.delete_cf(self.storage.cf(Cf::Rows), self.origin_key(seq));
        }
    }

    fn put_header(&self, q: &mut Queue, batch: &mut WriteBatch) {
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(self.group, HEADER_KEY),
            encode(&q.header),
        );
        q.header_dirty = true;
    }

    fn put_clock(&self, batch: &mut WriteBatch, clock_ms: u64) {
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(self.group, CLOCK_KEY),
            clock_ms.to_be_bytes(),
        );
    }

    /// Drops messages past their retention, and deduplication and attempt
    /// ids past their window, as of `now_ms`.
    fn expire(&self, q: &mut Queue, batch: &mut WriteBatch, now_ms: u64) {
        let retention_ms = retention_ms(&q.header.attributes);
        // In sequence order, as every release applies it: a dead letter
        // moved here with an older send time waits behind younger messages
        // until a `QueueCommand::Expire` (`expire_by_sent`).
        while let Some((&seq, m)) = q.messages.first_key_value() {
            if m.sent_ms + retention_ms > now_ms {
                break;
            }
            self.remove_message(q, batch, seq);
        }
        self.expire_entries(batch, &mut q.dedup, now_ms);
        self.expire_entries(batch, &mut q.attempts, now_ms);
    }

    /// A standard queue's messages past retention by their first send
    /// time, wherever they are in sequence order, as AWS expires them. A
    /// FIFO queue keeps sequence order: AWS counts a FIFO dead letter's
    /// retention from its move, which puts it in order (`MoveDead`).
    fn expire_by_sent(&self, q: &mut Queue, batch: &mut WriteBatch, now_ms: u64) {
        if q.header.fifo() {
            return;
        }
        let retention_ms = retention_ms(&q.header.attributes);
        while let Some(&(sent_ms, seq)) = q.by_sent.first() {
            if sent_ms.saturating_add(retention_ms) > now_ms {
                break;
            }
            self.remove_message(q, batch, seq);
        }
    }

    fn send(
        &self,
        q: &mut Queue,
        batch: &mut WriteBatch,
        index: u64,
        now_ms: u64,
        messages: Vec<NewMessage>,
    ) -> QueueReply {
        let queue_delay = q.header.number("DelaySeconds", 0);
        let max_size = q
            .header
            .number("MaximumMessageSize", DEFAULT_MAX_MESSAGE_BYTES);
        let mut sent = Vec::with_capacity(messages.len());
        for (slot, mut message) in messages.into_iter().enumerate() {
            let seq = (u128::from(index) << 32) | slot as u128;
            if u64::from(message.size) > max_size {
                sent.push(Err(SendRefused::TooLarge {
                    max: max_size as u32,
                }));
                continue;
            }
            let content_dedup_id = message.content_dedup_id.take();
            if q.header.fifo() && message.dedup_id.is_none() {
                if !q.header.flag("ContentBasedDeduplication") {
                    sent.push(Err(SendRefused::NoDeduplicationId));
                    continue;
                }
                message.dedup_id = content_dedup_id;
            }
            let dedup_key = message.dedup_id.as_ref().map(|id| {
                match (&message.group_id, q.header.dedup_per_group()) {
                    (Some(group), true) => format!("{group}\u{0}{id}"),
                    _ => id.clone(),
                }
            });
            if let Some(earlier) = dedup_key.as_ref().and_then(|k| q.dedup.map.get(k)) {
                sent.push(Ok(Sent {
                    message_id: earlier.message_id.clone(),
                    seq: earlier.seq,
                }));
                continue;
            }
            if let Some(key) = dedup_key {
                let entry = Dedup {
                    message_id: message.message_id.clone(),
                    seq,
                    expires_ms: now_ms + DEDUP_WINDOW_MS,
                };
                self.put_expiring(batch, &mut q.dedup, key, entry);
            }
            let delay_ms = u64::from(message.delay_seconds.unwrap_or(queue_delay as u32)) * 1000;
            let state = MessageState {
                sent_ms: now_ms,
                visible_at_ms: now_ms + delay_ms,
                receive_count: 0,
                first_receive_ms: 0,
                nonce: 0,
                group_id: message.group_id.clone(),
                dead: false,
            };
            sent.push(Ok(Sent {
                message_id: message.message_id.clone(),
                seq,
            }));
            let stored = StoredMessage {
                message,
                sent_ms: now_ms,
                seq,
            };
            batch.put_cf(
                self.storage.cf(Cf::Rows),
                self.body_key(seq),
                encode(&stored),
            );
            self.write_state(batch, seq, &state);
            q.insert(seq, state);
        }
        QueueReply::Sent(sent)
    }

    fn receive(
        &self,
        q: &mut Queue,
        batch: &mut WriteBatch,
        index: u64,
        now_ms: u64,
        receiving: Receiving,
    ) -> QueueReply {
        let Receiving {
            max,
            visibility_seconds,
            attempt,
        } = receiving;
        let visibility_ms = visibility_seconds
            .map(u64::from)
            .unwrap_or_else(|| q.header.number("VisibilityTimeout", DEFAULT_VISIBILITY_S))
            * 1000;
        let attempt = attempt.filter(|_| q.header.fifo());
        if let Some(again) = attempt
            .as_ref()
            .and_then(|(id, _)| self.repeat(q, batch, now_ms, visibility_ms, id))
        {
            return QueueReply::Received(again);
        }
        let limit = q.header.redrive().map(|(_, max)| max);
        let max = max.min(MAX_RECEIVE) as usize;
        let mut out = Vec::with_capacity(max);
        // A message past the redrive limit becomes a dead letter instead
        // of going out again, and the receive looks further.
        let mut deaths = 0;
        while out.len() < max && deaths < MAX_DEATHS_PER_RECEIVE {
            let taken = q.takeable(now_ms, max - out.len());
            if taken.is_empty() {
                break;
            }
            let mut died = false;
            for seq in taken {
                let Some(m) = q.messages.get_mut(&seq) else {
                    continue;
                };
                if limit.is_some_and(|limit| m.receive_count >= limit) {
                    q.visible_at.remove(&(m.visible_at_ms, seq));
                    m.dead = true;
                    died = true;
                    deaths += 1;
                    let m = m.clone();
                    self.put_state(&mut q.visible_at, &mut q.dead, batch, seq, &m);
                    continue;
                }
                q.visible_at.remove(&(m.visible_at_ms, seq));
                out.push(take(m, seq, index, now_ms, now_ms + visibility_ms));
                self.put_state(&mut q.visible_at, &mut q.dead, batch, seq, m);
            }
            if !died {
                break;
            }
        }
        if let Some((id, window_ms)) = attempt.filter(|_| !out.is_empty()) {
            let taken = out
                .iter()
                .map(|r| (r.handle, now_ms + visibility_ms))
                .collect();
            let entry = Attempt {
                expires_ms: now_ms + window_ms,
                taken,
            };
            self.put_expiring(batch, &mut q.attempts, id, entry);
        }
        QueueReply::Received(out)
    }

    /// The receive of attempt `id` again, if every message it took still
    /// has its receipt and visibility: they are hidden anew for
    /// `visibility_ms`.
    fn repeat(
        &self,
        q: &mut Queue,
        batch: &mut WriteBatch,
        now_ms: u64,
        visibility_ms: u64,
        id: &str,
    ) -> Option<Vec<Received>> {
        if !q.repeatable(id, now_ms) {
            return None;
        }
        let earlier = q.attempts.map.get(id)?.clone();
        let visible_at_ms = now_ms + visibility_ms;
        let mut out = Vec::with_capacity(earlier.taken.len());
        for (h, _) in &earlier.taken {
            let m = q.messages.get_mut(&h.seq)?;
            q.visible_at.remove(&(m.visible_at_ms, h.seq));
            m.visible_at_ms = visible_at_ms;
            out.push(Received {
                handle: *h,
                receive_count: m.receive_count,
                first_receive_ms: m.first_receive_ms,
            });
            let m = m.clone();
            self.put_state(&mut q.visible_at, &mut q.dead, batch, h.seq, &m);
        }
        let entry = Attempt {
            expires_ms: earlier.expires_ms,
            taken: earlier
                .taken
                .iter()
                .map(|(h, _)| (*h, visible_at_ms))
                .collect(),
        };
        self.put_expiring(batch, &mut q.attempts, id.to_string(), entry);
        Some(out)
    }

    fn apply_command(
        &self,
        q: &mut Queue,
        batch: &mut WriteBatch,
        index: u64,
        now_ms: u64,
        command: QueueCommand,
    ) -> QueueReply {
        self.expire(q, batch, now_ms);
        match command {
            QueueCommand::SetAttributes(changes) => {
                for (name, value) in changes {
                    // Fixed at creation (the gateway refuses a change): the
                    // index of message groups follows it.
                    if name == "FifoQueue" {
                        continue;
                    }
                    if value.is_empty() {
                        q.header.attributes.remove(&name);
                    } else {
                        q.header.attributes.insert(name, value);
                    }
                }
                q.header.modified_ms = now_ms;
                self.put_header(q, batch);
                if q.header.redrive().is_none() {
                    // Without a dead-letter queue, dead letters are
                    // messages again.
                    let dead: Vec<u128> = q.dead.iter().copied().collect();
                    for seq in dead {
                        if let Some(m) = q.messages.get_mut(&seq) {
                            m.dead = false;
                            let m = m.clone();
                            self.put_state(&mut q.visible_at, &mut q.dead, batch, seq, &m);
                        }
                    }
                }
                QueueReply::Done
            }
            QueueCommand::Tag(tags) => {
                let added = tags
                    .keys()
                    .filter(|k| !q.header.tags.contains_key(*k))
                    .count();
                if q.header.tags.len() + added > MAX_TAGS {
                    return QueueReply::TooManyTags(MAX_TAGS as u32);
                }
                q.header.tags.extend(tags);
                self.put_header(q, batch);
                QueueReply::Done
            }
            QueueCommand::Untag(names) => {
                for name in names {
                    q.header.tags.remove(&name);
                }
                self.put_header(q, batch);
                QueueReply::Done
            }
            QueueCommand::Send(messages) => self.send(q, batch, index, now_ms, messages),
            QueueCommand::Receive {
                max,
                visibility_seconds,
            } => {
                let receiving = Receiving {
                    max,
                    visibility_seconds,
                    attempt: None,
                };
                self.receive(q, batch, index, now_ms, receiving)
            }
            QueueCommand::ReceiveAttempt {
                max,
                visibility_seconds,
                attempt,
                window_seconds,
            } => {
                let receiving = Receiving {
                    max,
                    visibility_seconds,
                    attempt: Some((attempt, u64::from(window_seconds) * 1000)),
                };
                self.receive(q, batch, index, now_ms, receiving)
            }
            QueueCommand::Delete(handles) => {
                let results = handles
                    .into_iter()
                    .map(|h| {
                        // A receipt of an earlier receive deletes nothing
                        // (the message went out again since), as AWS
                        // documents; a message already gone is deleted.
                        if q.messages.get(&h.seq).is_some_and(|m| m.nonce == h.nonce) {
                            self.remove_message(q, batch, h.seq);
                        }
                        Ok(())
                    })
                    .collect();
                QueueReply::Entries(results)
            }
            QueueCommand::ChangeVisibility(changes) => {
                let results = changes
                    .into_iter()
                    .map(|(h, seconds)| {
                        let Some(m) = q.messages.get_mut(&h.seq).filter(|m| m.nonce == h.nonce)
                        else {
                            return Err(EntryError::ReceiptHandleIsInvalid);
                        };
                        if !m.in_flight(now_ms) {
                            return Err(EntryError::MessageNotInflight);
                        }
                        q.visible_at.remove(&(m.visible_at_ms, h.seq));
                        m.visible_at_ms = now_ms + u64::from(seconds) * 1000;
                        let m = m.clone();
                        self.put_state(&mut q.visible_at, &mut q.dead, batch, h.seq, &m);
                        Ok(())
                    })
                    .collect();
                QueueReply::Entries(results)
            }
            QueueCommand::Move(messages) => {
                let moved = Moved {
                    messages,
                    source: None,
                    restart_retention: false,
                };
                self.insert_moved(q, batch, index, now_ms, moved);
                QueueReply::Done
            }
            QueueCommand::MoveFrom { source, messages } => {
                let moved = Moved {
                    messages,
                    source: Some(source),
                    restart_retention: false,
                };
                self.insert_moved(q, batch, index, now_ms, moved);
                QueueReply::Done
            }
            QueueCommand::MoveDead { source, messages } => {
                let moved = Moved {
                    messages,
                    source: Some(source),
                    restart_retention: q.header.fifo(),
                };
                self.insert_moved(q, batch, index, now_ms, moved);
                QueueReply::Done
            }
            QueueCommand::StartMoveTask { destination, rate } => {
                if q.tasks.values().any(|t| t.status == TaskStatus::Running) {
                    return QueueReply::TaskRunning;
                }
                let task = MoveTask {
                    id: index,
                    status: TaskStatus::Running,
                    destination,
                    rate,
                    moved: 0,
                    to_move: q.live(),
                    started_ms: now_ms,
                    failure: None,
                };
                self.put_task(q, batch, task);
                QueueReply::TaskStarted(index)
            }
            QueueCommand::CancelMoveTask(id) => {
                let Some(mut task) = q
                    .tasks
                    .get(&id)
                    .filter(|t| t.status == TaskStatus::Running)
                    .cloned()
                else {
                    return QueueReply::Cancelled(None);
                };
                task.status = TaskStatus::Cancelled;
                let moved = task.moved;
                self.put_task(q, batch, task);
                QueueReply::Cancelled(Some(moved))
            }
            QueueCommand::ClaimForMove { task, seqs } => {
                let running = q
                    .tasks
                    .get(&task)
                    .is_some_and(|t| t.status == TaskStatus::Running);
                let mut claimed = Vec::new();
                for seq in seqs.into_iter().filter(|_| running) {
                    let Some(m) = q
                        .messages
                        .get_mut(&seq)
                        .filter(|m| !m.dead && m.visible_at_ms <= now_ms)
                    else {
                        continue;
                    };
                    q.visible_at.remove(&(m.visible_at_ms, seq));
                    m.visible_at_ms = now_ms + MOVE_CLAIM_MS;
                    m.nonce = index;
                    let m = m.clone();
                    self.put_state(&mut q.visible_at, &mut q.dead, batch, seq, &m);
                    claimed.push(Handle { seq, nonce: index });
                }
                QueueReply::Claimed(claimed)
            }
            QueueCommand::MovedOut { task, handles } => {
                let mut moved = 0;
                for h in handles {
                    if q.messages.get(&h.seq).is_some_and(|m| m.nonce == h.nonce) {
                        self.remove_message(q, batch, h.seq);
                        moved += 1;
                    }
                }
                if let Some(mut task) = q.tasks.get(&task).cloned() {
                    task.moved += moved;
                    self.put_task(q, batch, task);
                }
                QueueReply::Done
            }
            QueueCommand::AddPermission {
                label,
                statement,
                policy_id,
            } => {
                let current = q.header.attributes.get("Policy").map(String::as_str);
                let statement = serde_json::from_str(&statement).unwrap_or_default();
                let policy = match policy::with_statement(current, &policy_id, &label, statement) {
                    Ok(p) if p.len() > MAX_POLICY_BYTES => Err(PermissionRefused::TooLarge {
                        max: MAX_POLICY_BYTES as u32,
                    }),
                    other => other,
                };
                self.set_policy(q, batch, now_ms, policy.map(Some))
            }
            QueueCommand::RemovePermission { label } => {
                let current = q.header.attributes.get("Policy").map(String::as_str);
                let policy = policy::without_statement(current, &label);
                self.set_policy(q, batch, now_ms, policy)
            }
            QueueCommand::EndMoveTask { task, failure } => {
                if let Some(mut task) = q
                    .tasks
                    .get(&task)
                    .filter(|t| t.status == TaskStatus::Running)
                    .cloned()
                {
                    task.status = if failure.is_some() {
                        TaskStatus::Failed
                    } else {
                        TaskStatus::Completed
                    };
                    task.failure = failure;
                    self.put_task(q, batch, task);
                }
                QueueReply::Done
            }
            QueueCommand::Expire => {
                self.expire_by_sent(q, batch, now_ms);
                QueueReply::Done
            }
            QueueCommand::Remove(seqs) => {
                for seq in seqs {
                    if q.messages.get(&seq).is_some_and(|m| m.dead) {
                        self.remove_message(q, batch, seq);
                    }
                }
                QueueReply::Done
            }
            QueueCommand::Purge => {
                if q.header
                    .last_purge_ms
                    .is_some_and(|last| now_ms < last + PURGE_INTERVAL_MS)
                {
                    return QueueReply::PurgeInProgress;
                }
                let all: Vec<u128> = q.messages.keys().copied().collect();
                for seq in all {
                    self.remove_message(q, batch, seq);
                }
                q.header.last_purge_ms = Some(now_ms);
                self.put_header(q, batch);
                QueueReply::Done
            }
        }
    }

    /// Sets (or with None removes) the queue's policy after a permission
    /// change, unless the change was refused.
    fn set_policy(
        &self,
        q: &mut Queue,
        batch: &mut WriteBatch,
        now_ms: u64,
        policy: Result<Option<String>, PermissionRefused>,
    ) -> QueueReply {
        match policy {
            Ok(Some(policy)) => {
                q.header.attributes.insert("Policy".into(), policy);
            }
            Ok(None) => {
                q.header.attributes.remove("Policy");
            }
            Err(refused) => return QueueReply::PermissionRefused(refused),
        }
        q.header.modified_ms = now_ms;
        self.put_header(q, batch);
        QueueReply::Done
    }

    /// Messages moved here from another queue, visible now, keeping their
    /// id, attributes and first send time (which retention counts from
    /// unless `restart_retention`); `source`: the dead-letter source they
    /// came from.
    fn insert_moved(
        &self,
        q: &mut Queue,
        batch: &mut WriteBatch,
        index: u64,
        now_ms: u64,
        moved: Moved,
    ) {
        let Moved {
            messages,
            source,
            restart_retention,
        } = moved;
        for (slot, mut stored) in messages.into_iter().enumerate() {
            let seq = (u128::from(index) << 32) | slot as u128;
            stored.seq = seq;
            // Sent no later than now, whatever the command says, so its
            // retention is counted from a time this queue has seen.
            stored.sent_ms = stored.sent_ms.min(now_ms);
            let state = MessageState {
                sent_ms: if restart_retention {
                    now_ms
                } else {
                    stored.sent_ms
                },
                visible_at_ms: now_ms,
                receive_count: 0,
                first_receive_ms: 0,
                nonce: 0,
                group_id: stored.message.group_id.clone(),
                dead: false,
            };
            batch.put_cf(
                self.storage.cf(Cf::Rows),
                self.body_key(seq),
                encode(&stored),
            );
            self.write_state(batch, seq, &state);
            q.insert(seq, state);
            if let Some(source) = &source {
                batch.put_cf(
                    self.storage.cf(Cf::Rows),
                    self.origin_key(seq),
                    source.as_bytes(),
                );
                q.origins.insert(seq, source.clone());
            }
        }
    }

    /// Reads the delivery state and deduplication ids from the rows, and
    /// the header if one was written.
    fn load(&self, q: &mut Queue) -> io::Result<()> {
        if let Some(bytes) = self
            .storage
            .get(Cf::StateMachine, &keys::named_key(self.group, HEADER_KEY))
            .map_err(io::Error::other)?
        {
            q.header = decode(&bytes).map_err(io::Error::other)?;
        }
        if let Some(bytes) = self
            .storage
            .get(Cf::StateMachine, &keys::named_key(self.group, CLOCK_KEY))
            .map_err(io::Error::other)?
        {
            let (clock, _) = split_stamp(&bytes).map_err(io::Error::other)?;
            q.clock_ms = clock;
        }
        *q = Queue {
            header: std::mem::take(&mut q.header),
            header_dirty: q.header_dirty,
            clock_ms: q.clock_ms,
            ..Queue::default()
        };
        self.scan_tag(TAG_STATE, |key, value| {
            q.insert(seq_of(key)?, decode(value)?);
            Ok(())
        })?;
        self.load_expiring(&mut q.dedup)?;
        self.load_expiring(&mut q.attempts)?;
        self.scan_tag(TAG_ORIGIN, |key, value| {
            q.origins
                .insert(seq_of(key)?, String::from_utf8_lossy(value).into_owned());
            Ok(())
        })?;
        self.scan_tag(TAG_TASK, |_, value| {
            let task: MoveTask = decode(value)?;
            q.tasks.insert(task.id, task);
            Ok(())
        })?;
        Ok(())
    }

    /// Fills `entries` from the rows under its tag.
    fn load_expiring<T: Expires + for<'de> Deserialize<'de>>(
        &self,
        entries: &mut Expiring<T>,
    ) -> io::Result<()> {
        self.scan_tag(entries.tag, |key, value| {
            entries.insert(String::from_utf8_lossy(key).into_owned(), decode(value)?);
            Ok(())
        })
    }

    /// Calls `f` with the key (after the tag) and value of each row under
    /// `tag`.
    fn scan_tag(
        &self,
        tag: u8,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), String>,
    ) -> io::Result<()> {
        let (from, to) = (
            row_key(self.group, tag, &[]),
            row_key(self.group, tag + 1, &[]),
        );
        for row in self.storage.scan(Cf::Rows, &from, &to) {
            let (key, value) = row.map_err(io::Error::other)?;
            f(&key[9..], &value).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Reads the bodies of received messages; one deleted meanwhile is left
    /// out.
    fn deliver(&self, received: Vec<Received>) -> Result<Vec<Delivered>, String> {
        let keys: Vec<Vec<u8>> = received
            .iter()
            .map(|r| self.body_key(r.handle.seq))
            .collect();
        let bodies = self
            .storage
            .multi_get(Cf::Rows, &keys)
            .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(received.len());
        for (r, bytes) in received.into_iter().zip(bodies) {
            let Some(bytes) = bytes else {
                continue;
            };
            out.push(Delivered {
                received: r,
                message: decode(&bytes)?,
            });
        }
        Ok(out)
    }
}

impl GroupStateMachine for QueueStateMachine {
    fn apply(&self, index: u64, command: &[u8], batch: &mut WriteBatch) -> io::Result<Vec<u8>> {
        let (stamp, command) = split_stamp(command).map_err(io::Error::other)?;
        let command: QueueCommand = decode(command).map_err(io::Error::other)?;
        let mut q = self.queue.lock().expect("queue lock");
        if stamp > q.clock_ms {
            q.clock_ms = stamp;
            self.put_clock(batch, stamp);
        }
        let now_ms = q.clock_ms;
        let reply = self.apply_command(&mut q, batch, index, now_ms, command);
        Ok(encode(&reply))
    }

    fn check_command(&self, command: &[u8]) -> Result<(), String> {
        let (_, command) = split_stamp(command)?;
        decode::<QueueCommand>(command).map(drop)
    }

    fn publish(&self) {
        {
            let mut q = self.queue.lock().expect("queue lock");
            let mut published = self.published.lock().expect("published lock");
            if q.header_dirty {
                published.0 = encode(&q.header);
                q.header_dirty = false;
            }
            published.1 = q.clock_ms;
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The clock (8 bytes, big-endian) and the header.
    fn snapshot_state(&self) -> Vec<u8> {
        let published = self.published.lock().expect("published lock");
        let mut state = published.1.to_be_bytes().to_vec();
        state.extend_from_slice(&published.0);
        state
    }

    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()> {
        let (clock_ms, header) = split_stamp(state).map_err(io::Error::other)?;
        let header: Header = decode(header).map_err(io::Error::other)?;
        let mut q = self.queue.lock().expect("queue lock");
        *q = Queue {
            header,
            clock_ms,
            ..Queue::default()
        };
        self.put_header(&mut q, batch);
        self.put_clock(batch, clock_ms);
        Ok(())
    }

    /// Message state changes in place; bodies never do, and their keys
    /// carry the index of the entry that wrote them (a message's `seq`).
    fn snapshot_rows(&self) -> SnapshotRows {
        SnapshotRows::Mutable {
            columns: &[Cf::Rows],
            fixed: Some(FixedRows {
                column: Cf::Rows,
                prefix: &[TAG_BODY],
                writer_index: body_writer_index,
            }),
        }
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        let (now_ms, query) = split_stamp(query)?;
        let q = self.queue.lock().expect("queue lock");
        Ok(match decode::<QueueQuery>(query)? {
            QueueQuery::Info => encode(&q.info(now_ms)),
            QueueQuery::Settings => encode(&q.header.attributes),
            QueueQuery::DeadLetters(max) => {
                let target = q.header.redrive().map(|(t, _)| t).unwrap_or_default();
                let (mut messages, mut bytes) = (Vec::new(), 0);
                for seq in &q.dead {
                    if messages.len() == max as usize || bytes >= MOVE_BATCH_BYTES {
                        break;
                    }
                    let row = self
                        .storage
                        .get(Cf::Rows, &self.body_key(*seq))
                        .map_err(|e| e.to_string())?;
                    if let Some(row) = row {
                        bytes += row.len();
                        messages.push(decode(&row)?);
                    }
                }
                encode(&DeadLetters { target, messages })
            }
            QueueQuery::MoveTasks => encode(&q.tasks.values().rev().cloned().collect::<Vec<_>>()),
            QueueQuery::MoveBatch(max) => {
                let task = q
                    .tasks
                    .values()
                    .find(|t| t.status == TaskStatus::Running)
                    .cloned();
                let mut messages = Vec::new();
                if task.is_none() {
                    return Ok(encode(&MoveBatch { task, messages }));
                }
                let mut bytes = 0;
                let visible = q
                    .messages
                    .iter()
                    .filter(|(_, m)| !m.dead && m.visible_at_ms <= now_ms);
                for (seq, _) in visible.take(max as usize) {
                    if bytes >= MOVE_BATCH_BYTES {
                        break;
                    }
                    // A body is missing only on a replica that installed a
                    // snapshot sent after the message's deletion and has not
                    // applied that deletion yet: an empty batch now would
                    // end the task with messages left, so the worker tries
                    // again at its next turn.
                    let row = self
                        .storage
                        .get(Cf::Rows, &self.body_key(*seq))
                        .map_err(|e| e.to_string())?
                        .ok_or("this replica is still applying the log after a snapshot")?;
                    bytes += row.len();
                    messages.push((decode(&row)?, q.origins.get(seq).cloned()));
                }
                encode(&MoveBatch { task, messages })
            }
            QueueQuery::Ready => {
                if q.takeable(now_ms, 1).is_empty() {
                    Vec::new()
                } else {
                    vec![1]
                }
            }
            QueueQuery::ReadyFor(id) => {
                if q.repeatable(&id, now_ms) || !q.takeable(now_ms, 1).is_empty() {
                    vec![1]
                } else {
                    Vec::new()
                }
            }
        })
    }

    fn complete(&self, reply: Vec<u8>) -> Result<Vec<u8>, String> {
        match decode::<QueueReply>(&reply)? {
            QueueReply::Received(received) => {
                Ok(encode(&QueueReply::Delivered(self.deliver(received)?)))
            }
            _ => Ok(reply),
        }
    }

    fn reload(&self) -> io::Result<()> {
        let mut q = self.queue.lock().expect("queue lock");
        self.load(&mut q)
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MessageAttribute;
    use kinesin_storage::FsyncPolicy;

    /// A scratch storage; the directory lives as long as the guard.
    fn scratch() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).expect("open storage");
        (dir, storage)
    }

    /// A queue with `attributes` on scratch storage.
    fn setup(
        attributes: &[(&str, &str)],
    ) -> (tempfile::TempDir, Storage, Arc<dyn GroupStateMachine>) {
        let (dir, storage) = scratch();
        let sm = open(&storage, attributes);
        (dir, storage, sm)
    }

    fn sent(reply: QueueReply) -> Vec<Result<Sent, SendRefused>> {
        match reply {
            QueueReply::Sent(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn open(storage: &Storage, attributes: &[(&str, &str)]) -> Arc<dyn GroupStateMachine> {
        crate::fuzzing::open_queue(storage, 42, attributes)
    }

    /// Applies one stamped command as the Raft adapter does (batch written,
    /// then published) and returns the leader's completed reply.
    fn run(
        storage: &Storage,
        sm: &Arc<dyn GroupStateMachine>,
        index: u64,
        now_ms: u64,
        command: QueueCommand,
    ) -> QueueReply {
        let mut bytes = now_ms.to_be_bytes().to_vec();
        bytes.extend(encode(&command));
        let mut batch = WriteBatch::default();
        let reply = sm.apply(index, &bytes, &mut batch).expect("apply");
        storage.write(batch).expect("write");
        sm.publish();
        decode(&sm.complete(reply).expect("complete")).expect("reply")
    }

    fn message(body: &str, group: Option<&str>, dedup: Option<&str>) -> NewMessage {
        NewMessage {
            message_id: format!("id-{body}"),
            body: body.into(),
            attributes: vec![MessageAttribute {
                name: "a".into(),
                data_type: "String".into(),
                string_value: Some("b".into()),
                binary_value: Vec::new(),
            }],
            system_attributes: Vec::new(),
            md5_of_body: String::new(),
            md5_of_attributes: None,
            md5_of_system_attributes: None,
            sender_id: "000000000000".into(),
            delay_seconds: None,
            group_id: group.map(str::to_string),
            dedup_id: dedup.map(str::to_string),
            content_dedup_id: None,
            size: body.len() as u32,
        }
    }

    fn receive(
        storage: &Storage,
        sm: &Arc<dyn GroupStateMachine>,
        index: u64,
        now_ms: u64,
        max: u32,
    ) -> Vec<Delivered> {
        match run(
            storage,
            sm,
            index,
            now_ms,
            QueueCommand::Receive {
                max,
                visibility_seconds: None,
            },
        ) {
            QueueReply::Delivered(d) => d,
            other => panic!("{other:?}"),
        }
    }

    fn bodies(delivered: &[Delivered]) -> Vec<&str> {
        delivered
            .iter()
            .map(|d| d.message.message.body.as_str())
            .collect()
    }

    fn info(sm: &Arc<dyn GroupStateMachine>, now_ms: u64) -> QueueInfo {
        query(sm, now_ms, QueueQuery::Info)
    }

    /// Asks a query stamped with `now_ms`, as the leader does.
    fn ask(
        sm: &Arc<dyn GroupStateMachine>,
        now_ms: u64,
        query: &QueueQuery,
    ) -> Result<Vec<u8>, String> {
        let mut q = now_ms.to_be_bytes().to_vec();
        q.extend(encode(query));
        sm.query(&q)
    }

    #[test]
    fn a_received_message_hides_for_its_visibility_timeout_and_a_stale_receipt_deletes_nothing() {
        let (_dir, s, sm) = setup(&[("VisibilityTimeout", "10")]);
        run(
            &s,
            &sm,
            1,
            1_000,
            QueueCommand::Send(vec![message("m", None, None)]),
        );
        let first = receive(&s, &sm, 2, 1_000, 10);
        assert_eq!(bodies(&first), ["m"]);
        assert_eq!(first[0].message.message.attributes.len(), 1);
        assert!(
            receive(&s, &sm, 3, 10_999, 10).is_empty(),
            "hidden for 10 s"
        );
        let info_now = info(&sm, 5_000);
        assert_eq!((info_now.visible, info_now.in_flight), (0, 1));
        let second = receive(&s, &sm, 4, 11_000, 10);
        assert_eq!(second[0].received.receive_count, 2);
        // The first receipt is stale now: the delete succeeds, and the
        // message stays.
        run(
            &s,
            &sm,
            5,
            11_000,
            QueueCommand::Delete(vec![first[0].received.handle]),
        );
        assert_eq!(info(&sm, 30_000).visible, 1);
        run(
            &s,
            &sm,
            6,
            11_000,
            QueueCommand::Delete(vec![second[0].received.handle]),
        );
        assert_eq!(info(&sm, 30_000).visible, 0);
        assert!(
            receive(&s, &sm, 7, 100_000, 10).is_empty(),
            "deleted for good"
        );
    }

    /// The gateway asks for 1 to 10; a command asking for more (a raw
    /// proposal, found by the queue_entries fuzz target) takes ten instead
    /// of reserving room for billions on every replica.
    #[test]
    fn a_receive_takes_at_most_ten_whatever_the_command_asks() {
        for attributes in [&[][..], &[("FifoQueue", "true")][..]] {
            let (_dir, s, sm) = setup(attributes);
            let sends = (0..12)
                .map(|i| {
                    message(
                        &format!("m{i}"),
                        Some(&format!("g{i}")),
                        Some(&i.to_string()),
                    )
                })
                .collect();
            run(&s, &sm, 1, 0, QueueCommand::Send(sends));
            assert_eq!(receive(&s, &sm, 2, 0, u32::MAX).len(), 10);
            assert_eq!(receive(&s, &sm, 3, 0, u32::MAX).len(), 2);
        }
    }

    #[test]
    fn changing_visibility_needs_the_current_receipt_of_a_message_in_flight() {
        let (_dir, s, sm) = setup(&[]);
        run(
            &s,
            &sm,
            1,
            0,
            QueueCommand::Send(vec![message("m", None, None)]),
        );
        let got = receive(&s, &sm, 2, 0, 1);
        let handle = got[0].received.handle;
        let stale = Handle { nonce: 1, ..handle };
        let reply = run(
            &s,
            &sm,
            3,
            0,
            QueueCommand::ChangeVisibility(vec![(handle, 0), (stale, 0)]),
        );
        assert_eq!(
            reply,
            QueueReply::Entries(vec![Ok(()), Err(EntryError::ReceiptHandleIsInvalid)])
        );
        // Visible again at once, so no longer in flight.
        let reply = run(
            &s,
            &sm,
            4,
            0,
            QueueCommand::ChangeVisibility(vec![(handle, 5)]),
        );
        assert_eq!(
            reply,
            QueueReply::Entries(vec![Err(EntryError::MessageNotInflight)])
        );
        assert_eq!(bodies(&receive(&s, &sm, 5, 0, 1)), ["m"]);
    }

    #[test]
    fn fifo_groups_deliver_in_order_one_batch_in_flight_at_a_time() {
        let (_dir, s, sm) = setup(&[("FifoQueue", "true")]);
        let sends = vec![
            message("a1", Some("a"), Some("1")),
            message("b1", Some("b"), Some("2")),
            message("a2", Some("a"), Some("3")),
        ];
        run(&s, &sm, 1, 0, QueueCommand::Send(sends));
        let first = receive(&s, &sm, 2, 0, 1);
        assert_eq!(bodies(&first), ["a1"]);
        // Group a is locked while a1 is in flight: b1 only.
        assert_eq!(bodies(&receive(&s, &sm, 3, 0, 10)), ["b1"]);
        run(
            &s,
            &sm,
            4,
            0,
            QueueCommand::Delete(vec![first[0].received.handle]),
        );
        assert_eq!(bodies(&receive(&s, &sm, 5, 0, 10)), ["a2"]);
    }

    #[test]
    fn the_queue_refuses_messages_its_settings_do_not_allow() {
        let (_dir, s, sm) = setup(&[("FifoQueue", "true"), ("MaximumMessageSize", "1024")]);
        let mut big = message("x", Some("g"), Some("1"));
        big.size = 1025;
        let mut anonymous = message("y", Some("g"), None);
        anonymous.content_dedup_id = Some("hash-of-y".into());
        let fits = message("z", Some("g"), Some("3"));
        let reply = sent(run(
            &s,
            &sm,
            1,
            0,
            QueueCommand::Send(vec![big, anonymous.clone(), fits]),
        ));
        assert_eq!(reply[0], Err(SendRefused::TooLarge { max: 1024 }));
        assert_eq!(reply[1], Err(SendRefused::NoDeduplicationId));
        assert!(reply[2].is_ok());
        // With content-based deduplication the body's hash is the id.
        let mut changes = BTreeMap::new();
        changes.insert("ContentBasedDeduplication".to_string(), "true".to_string());
        run(&s, &sm, 2, 0, QueueCommand::SetAttributes(changes));
        let first = sent(run(
            &s,
            &sm,
            3,
            0,
            QueueCommand::Send(vec![anonymous.clone()]),
        ));
        let again = sent(run(&s, &sm, 4, 0, QueueCommand::Send(vec![anonymous])));
        assert_eq!(first, again);
        let got = receive(&s, &sm, 5, 0, 10);
        assert_eq!(bodies(&got), ["z", "y"]);
        assert_eq!(
            got[1].message.message.dedup_id.as_deref(),
            Some("hash-of-y")
        );
    }

    #[test]
    fn a_deduplication_id_holds_for_five_minutes_even_after_a_delete() {
        let (_dir, s, sm) = setup(&[("FifoQueue", "true")]);
        let one = sent(run(
            &s,
            &sm,
            1,
            0,
            QueueCommand::Send(vec![message("x", Some("g"), Some("d"))]),
        ));
        let got = receive(&s, &sm, 2, 0, 1);
        run(
            &s,
            &sm,
            3,
            0,
            QueueCommand::Delete(vec![got[0].received.handle]),
        );
        let again = sent(run(
            &s,
            &sm,
            4,
            299_999,
            QueueCommand::Send(vec![message("y", Some("g"), Some("d"))]),
        ));
        assert_eq!(
            again, one,
            "the earlier message is named, nothing is stored"
        );
        assert!(receive(&s, &sm, 5, 299_999, 10).is_empty());
        let later = sent(run(
            &s,
            &sm,
            6,
            300_000,
            QueueCommand::Send(vec![message("z", Some("g"), Some("d"))]),
        ));
        assert_ne!(later[0].as_ref().unwrap().seq, one[0].as_ref().unwrap().seq);
        assert_eq!(bodies(&receive(&s, &sm, 7, 300_000, 10)), ["z"]);
    }

    #[test]
    fn delays_retention_and_purge_follow_the_stamped_clock() {
        let (_dir, s, sm) = setup(&[("MessageRetentionPeriod", "60"), ("DelaySeconds", "5")]);
        let mut late = message("late", None, None);
        late.delay_seconds = Some(0);
        run(
            &s,
            &sm,
            1,
            0,
            QueueCommand::Send(vec![message("m", None, None), late]),
        );
        assert_eq!(info(&sm, 0).delayed, 1);
        assert_eq!(bodies(&receive(&s, &sm, 2, 0, 10)), ["late"]);
        assert_eq!(bodies(&receive(&s, &sm, 3, 5_000, 10)), ["m"]);
        // Retention drops both at the first command past 60 s.
        run(&s, &sm, 4, 60_000, QueueCommand::Tag(BTreeMap::new()));
        assert_eq!(info(&sm, 60_000).in_flight, 0);
        run(
            &s,
            &sm,
            5,
            61_000,
            QueueCommand::Send(vec![message("p", None, None)]),
        );
        assert_eq!(
            run(&s, &sm, 6, 61_000, QueueCommand::Purge),
            QueueReply::Done
        );
        assert_eq!(
            run(&s, &sm, 7, 120_999, QueueCommand::Purge),
            QueueReply::PurgeInProgress
        );
        assert_eq!(info(&sm, 61_000).visible, 0);
    }

    #[test]
    fn a_dead_letter_moved_behind_younger_messages_expires_by_its_first_send_time() {
        for fifo in [false, true] {
            let mut attributes = vec![("MessageRetentionPeriod", "60")];
            if fifo {
                attributes.push(("FifoQueue", "true"));
            }
            let (_dir, s, sm) = setup(&attributes);
            let group = |g| fifo.then_some(g);
            let young = message("young", group("g"), group("d1"));
            run(&s, &sm, 1, 50_000, QueueCommand::Send(vec![young]));
            // First sent at 7 ms, moved in at 55 s behind the young one.
            let mut old = stored("old");
            old.message = message("old", group("h"), group("d2"));
            run(&s, &sm, 2, 55_000, QueueCommand::Move(vec![old]));
            // Other commands expire in sequence order: the young message
            // keeps the old one.
            run(&s, &sm, 3, 61_000, QueueCommand::Tag(BTreeMap::new()));
            assert_eq!(info(&sm, 61_000).visible, 2, "fifo {fifo}");
            assert_eq!(info(&sm, 61_000).expire_due(61_000), !fifo);
            run(&s, &sm, 4, 61_000, QueueCommand::Expire);
            let left: &[&str] = if fifo { &["young", "old"] } else { &["young"] };
            assert_eq!(bodies(&receive(&s, &sm, 5, 61_000, 10)), left);
            assert!(!info(&sm, 61_000).expire_due(61_000));
            // Past the young message's retention, on a queue no one uses:
            // the worker's check sees it (a standard queue's), and the
            // command drops it, in flight or not.
            assert!(!info(&sm, 109_999).expire_due(109_999));
            assert_eq!(info(&sm, 110_000).expire_due(110_000), !fifo);
            run(&s, &sm, 6, 110_000, QueueCommand::Expire);
            let after = info(&sm, 110_000);
            assert_eq!(
                (after.visible, after.in_flight, after.oldest_sent_ms),
                (0, 0, None)
            );
        }
    }

    #[test]
    fn a_fifo_dead_letter_queue_counts_retention_from_the_move() {
        for fifo in [false, true] {
            let mut attributes = vec![("MessageRetentionPeriod", "60")];
            if fifo {
                attributes.push(("FifoQueue", "true"));
            }
            let (_dir, s, sm) = setup(&attributes);
            // First sent at 7 ms, moved in as a dead letter at 50 s.
            let mut old = stored("old");
            old.message = message("old", fifo.then_some("g"), fifo.then_some("d"));
            let moved = QueueCommand::MoveDead {
                source: "arn:aws:sqs:us-east-1:000000000000:src".into(),
                messages: vec![old],
            };
            run(&s, &sm, 1, 50_000, moved);
            // A standard queue drops it by its first send time; a FIFO
            // queue keeps it for its retention after the move, a restart
            // included, and answers its first send time all along.
            assert_eq!(info(&sm, 61_000).expire_due(61_000), !fifo);
            run(&s, &sm, 2, 61_000, QueueCommand::Expire);
            let sm = open(&s, &attributes);
            assert_eq!(info(&sm, 61_000).visible, u64::from(fifo), "fifo {fifo}");
            if !fifo {
                continue;
            }
            assert_eq!(info(&sm, 61_000).oldest_sent_ms, Some(50_000));
            let got = receive(&s, &sm, 3, 109_999, 10);
            assert_eq!(bodies(&got), ["old"]);
            assert_eq!(got[0].message.sent_ms, 7, "SentTimestamp stays");
            run(&s, &sm, 4, 110_000, QueueCommand::Tag(BTreeMap::new()));
            let after = info(&sm, 110_000);
            assert_eq!((after.visible, after.in_flight), (0, 0));
        }
    }

    #[test]
    fn numeric_attributes_beyond_any_bound_cannot_overflow_times() {
        let (_dir, s) = scratch();
        let sm = open(&s, &[]);
        let huge = u64::MAX.to_string();
        let changes = BTreeMap::from([
            ("MessageRetentionPeriod".to_string(), huge.clone()),
            ("VisibilityTimeout".to_string(), huge),
        ]);
        run(&s, &sm, 1, 0, QueueCommand::SetAttributes(changes));
        run(
            &s,
            &sm,
            2,
            0,
            QueueCommand::Send(vec![message("a", None, None)]),
        );
        // Retention times 1000 wrapped to just below the send time: the
        // message expired at once.
        assert_eq!(bodies(&receive(&s, &sm, 3, 1_000, 1)), ["a"]);
        // Hidden for u32::MAX seconds, not for a wrapped time.
        assert!(receive(&s, &sm, 4, 2_000_000, 1).is_empty());
    }

    #[test]
    fn a_fifo_queue_stays_fifo_and_a_message_dies_only_once_received() {
        let (_dir, s) = scratch();
        let policy = r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:dlq.fifo","maxReceiveCount":0}"#;
        let sm = open(&s, &[("FifoQueue", "true"), ("RedrivePolicy", policy)]);
        let changes = BTreeMap::from([("FifoQueue".to_string(), String::new())]);
        run(&s, &sm, 1, 0, QueueCommand::SetAttributes(changes));
        let send = vec![
            message("a", Some("g"), Some("1")),
            message("b", Some("g"), Some("2")),
        ];
        run(&s, &sm, 2, 0, QueueCommand::Send(send));
        // Still FIFO: one message of the group at a time. A limit below 1
        // counts as 1, so the first receive delivers instead of killing.
        assert_eq!(bodies(&receive(&s, &sm, 3, 1_000, 1)), ["a"]);
        assert!(receive(&s, &sm, 4, 1_000, 10).is_empty());
        assert_eq!(info(&sm, 1_000).attributes["FifoQueue"], "true");
    }

    #[test]
    fn a_message_past_the_receive_limit_becomes_a_dead_letter_and_moves_whole() {
        let (_dir, s) = scratch();
        let policy = r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:dlq","maxReceiveCount":2}"#;
        let sm = open(&s, &[("RedrivePolicy", policy), ("VisibilityTimeout", "1")]);
        run(
            &s,
            &sm,
            1,
            500,
            QueueCommand::Send(vec![message("m", None, None)]),
        );
        assert_eq!(bodies(&receive(&s, &sm, 2, 1_000, 1)), ["m"]);
        assert_eq!(bodies(&receive(&s, &sm, 3, 2_000, 1)), ["m"]);
        run(
            &s,
            &sm,
            4,
            2_500,
            QueueCommand::Send(vec![message("n", None, None)]),
        );
        // m was received twice: the third receive passes it over for n.
        assert_eq!(bodies(&receive(&s, &sm, 5, 3_000, 10)), ["n"]);
        let dead: DeadLetters = query(&sm, 3_000, QueueQuery::DeadLetters(10));
        assert_eq!(dead.target, "arn:aws:sqs:us-east-1:000000000000:dlq");
        assert_eq!(dead.messages.len(), 1);
        let seq = dead.messages[0].seq;

        let dlq = QueueKind
            .open(s.clone(), GroupId(43), &encode(&QueueConfig::default()))
            .unwrap();
        run(
            &s,
            &dlq,
            1,
            9_000,
            QueueCommand::Move(dead.messages.clone()),
        );
        let moved = receive(&s, &dlq, 2, 9_000, 10);
        assert_eq!(moved[0].message.message.message_id, "id-m");
        assert_eq!(moved[0].message.sent_ms, 500, "the first send time stays");
        assert_eq!(moved[0].received.receive_count, 1);

        run(&s, &sm, 6, 9_000, QueueCommand::Remove(vec![seq]));
        let after: DeadLetters = query(&sm, 3_000, QueueQuery::DeadLetters(10));
        assert!(after.messages.is_empty());
        assert_eq!(info(&sm, 9_000).visible, 1, "n is visible again, m is gone");
    }

    #[test]
    fn dead_letters_come_in_batches_of_at_most_four_mib() {
        let (_dir, s) = scratch();
        let policy = r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:dlq","maxReceiveCount":1}"#;
        let sm = open(&s, &[("RedrivePolicy", policy), ("VisibilityTimeout", "1")]);
        let body = "x".repeat(1 << 20);
        for i in 0..6 {
            let m = NewMessage {
                message_id: format!("id-{i}"),
                ..message(&body, None, None)
            };
            run(&s, &sm, 1 + i, 500, QueueCommand::Send(vec![m]));
        }
        assert_eq!(receive(&s, &sm, 7, 1_000, 10).len(), 6);
        // Each was received once: the next receive passes them all over.
        assert!(receive(&s, &sm, 8, 3_000, 10).is_empty());
        let dead: DeadLetters = query(&sm, 3_000, QueueQuery::DeadLetters(100));
        assert_eq!(dead.messages.len(), 4, "4 MiB of rows");
        let seqs = dead.messages.iter().map(|m| m.seq).collect();
        run(&s, &sm, 9, 3_000, QueueCommand::Remove(seqs));
        let rest: DeadLetters = query(&sm, 3_000, QueueQuery::DeadLetters(100));
        assert_eq!(rest.messages.len(), 2);
    }

    #[test]
    fn a_command_that_does_not_decode_is_refused_before_it_is_proposed() {
        let (_dir, _s, sm) = setup(&[]);
        let stamped = |bytes: &[u8]| [&1_000u64.to_be_bytes()[..], bytes].concat();
        assert!(sm.check_command(&[1, 2, 3]).is_err(), "no clock");
        assert!(sm.check_command(&stamped(&[0xff; 64])).is_err());
        let send = encode(&QueueCommand::Send(vec![message("m", None, None)]));
        assert!(sm.check_command(&stamped(&send)).is_ok());
    }

    #[test]
    fn a_standard_receive_takes_the_longest_visible_first_and_skips_those_in_flight() {
        let (_dir, s, sm) = setup(&[("VisibilityTimeout", "10")]);
        let sent: Vec<NewMessage> = (0..5)
            .map(|i| message(&format!("m{i}"), None, None))
            .collect();
        run(&s, &sm, 1, 1_000, QueueCommand::Send(sent));
        let first = receive(&s, &sm, 2, 2_000, 3);
        assert_eq!(bodies(&first), ["m0", "m1", "m2"]);
        // m1 back at once; m0 and m2 stay in flight, m3 and m4 wait longest.
        run(
            &s,
            &sm,
            3,
            3_000,
            QueueCommand::ChangeVisibility(vec![(first[1].received.handle, 0)]),
        );
        assert_eq!(bodies(&receive(&s, &sm, 4, 3_000, 10)), ["m3", "m4", "m1"]);
        // Reopened, the index is rebuilt from the rows: all five are in
        // flight until 12 s; then m0 and m2 (visible since 12 s) come
        // before the others (since 13 s), ties in queue order.
        let again = open(&s, &[("VisibilityTimeout", "10")]);
        assert!(receive(&s, &again, 5, 11_999, 10).is_empty());
        assert_eq!(
            bodies(&receive(&s, &again, 6, 13_000, 10)),
            ["m0", "m2", "m1", "m3", "m4"]
        );
    }

    #[test]
    fn the_queue_clock_never_runs_backward() {
        let (_dir, s, sm) = setup(&[]);
        run(
            &s,
            &sm,
            1,
            100_000,
            QueueCommand::Send(vec![message("a", None, None)]),
        );
        // Stamped earlier (another leader's slower clock): applies at the
        // queue's time, so b is not older than a.
        run(
            &s,
            &sm,
            2,
            5_000,
            QueueCommand::Send(vec![message("b", None, None)]),
        );
        let got = receive(&s, &sm, 3, 0, 10);
        assert!(got.iter().all(|d| d.message.sent_ms == 100_000), "{got:?}");
        assert!(got.iter().all(|d| d.received.first_receive_ms == 100_000));
        // The clock survives a snapshot install and a restart.
        let state = sm.snapshot_state();
        let other = open(&s, &[]);
        let mut batch = WriteBatch::default();
        other.restore(&state, &mut batch).unwrap();
        s.write(batch).unwrap();
        other.publish();
        other.reload().unwrap();
        run(
            &s,
            &other,
            4,
            0,
            QueueCommand::Send(vec![message("c", None, None)]),
        );
        let reopened = open(&s, &[]);
        let c = receive(&s, &reopened, 5, 0, 10);
        assert_eq!(bodies(&c), ["c"]);
        assert_eq!(c[0].message.sent_ms, 100_000);
    }

    #[test]
    fn a_reopened_replica_has_every_message_and_its_delivery_state() {
        let (_dir, s) = scratch();
        let handle = {
            let sm = open(&s, &[]);
            run(
                &s,
                &sm,
                1,
                0,
                QueueCommand::Send(vec![message("a", None, None), message("b", None, None)]),
            );
            let mut changes = BTreeMap::new();
            changes.insert("VisibilityTimeout".to_string(), "100".to_string());
            run(&s, &sm, 2, 0, QueueCommand::SetAttributes(changes));
            receive(&s, &sm, 3, 0, 1)[0].received.handle
        };
        let sm = open(&s, &[]);
        let i = info(&sm, 1_000);
        assert_eq!((i.visible, i.in_flight), (1, 1));
        assert_eq!(
            i.attributes.get("VisibilityTimeout").map(String::as_str),
            Some("100")
        );
        assert_eq!(bodies(&receive(&s, &sm, 4, 1_000, 10)), ["b"]);
        run(&s, &sm, 5, 1_000, QueueCommand::Delete(vec![handle]));
        assert!(receive(&s, &sm, 6, 200_000, 10)
            .iter()
            .all(|d| d.message.message.body == "b"));
    }

    /// Snapshots send bodies from the live rows by the index in their keys
    /// (`FixedRows`): every body row, and only those, sits under the
    /// prefix, and its key names the entry that sent it.
    #[test]
    fn body_rows_name_the_entry_that_wrote_them() {
        let (_dir, s, sm) = setup(&[]);
        let two = vec![message("a", None, None), message("b", None, None)];
        run(&s, &sm, 7, 0, QueueCommand::Send(two));
        receive(&s, &sm, 9, 0, 1);
        let SnapshotRows::Mutable {
            fixed: Some(fixed), ..
        } = sm.snapshot_rows()
        else {
            panic!("queue bodies are fixed rows");
        };
        let (from, to) = keys::group_bounds(42);
        let mut bodies = 0;
        for row in s.scan(Cf::Rows, &from, &to) {
            let (key, _) = row.unwrap();
            if key[8..].starts_with(fixed.prefix) {
                bodies += 1;
                assert_eq!((fixed.writer_index)(&key), 7);
            }
        }
        assert_eq!(bodies, 2);
    }

    #[test]
    fn a_restored_header_and_reloaded_rows_make_the_same_queue() {
        let (_dir, s, sm) = setup(&[("VisibilityTimeout", "7")]);
        run(
            &s,
            &sm,
            1,
            0,
            QueueCommand::Send(vec![message("a", None, None)]),
        );
        let state = sm.snapshot_state();
        // An install restores the small state first; the rows arrive
        // afterwards, and reload reads them.
        let mut batch = WriteBatch::default();
        sm.restore(&state, &mut batch).unwrap();
        s.write(batch).unwrap();
        sm.publish();
        assert_eq!(info(&sm, 0).visible, 0, "rows not reloaded yet");
        sm.reload().unwrap();
        let i = info(&sm, 0);
        assert_eq!(i.visible, 1);
        assert_eq!(
            i.attributes.get("VisibilityTimeout").map(String::as_str),
            Some("7")
        );
    }

    fn query<T: for<'de> Deserialize<'de>>(
        sm: &Arc<dyn GroupStateMachine>,
        now_ms: u64,
        query: QueueQuery,
    ) -> T {
        decode(&ask(sm, now_ms, &query).unwrap()).unwrap()
    }

    fn attempt(id: &str) -> QueueCommand {
        QueueCommand::ReceiveAttempt {
            max: 10,
            visibility_seconds: None,
            attempt: id.into(),
            window_seconds: 300,
        }
    }

    fn handles(reply: QueueReply) -> Vec<(Handle, u32)> {
        match reply {
            QueueReply::Delivered(d) => d
                .iter()
                .map(|d| (d.received.handle, d.received.receive_count))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_attempt_id_repeats_its_receive_until_a_message_changes() {
        let (_dir, s) = scratch();
        let sm = open(&s, &[("FifoQueue", "true"), ("VisibilityTimeout", "30")]);
        let sends = vec![
            message("a", Some("g"), Some("1")),
            message("b", Some("g"), Some("2")),
        ];
        run(&s, &sm, 1, 0, QueueCommand::Send(sends));
        let first = handles(run(&s, &sm, 2, 1_000, attempt("x")));
        assert_eq!(first.len(), 2);
        // Nothing is visible, but a long poll with the id is ready at once.
        let ready = |id: &str| ask(&sm, 2_000, &QueueQuery::ReadyFor(id.into())).unwrap();
        assert!(!ready("x").is_empty());
        assert!(ready("y").is_empty());
        let again = handles(run(&s, &sm, 3, 20_000, attempt("x")));
        assert_eq!(again, first, "same messages, receipts and receive counts");
        // The repeat hid them anew: 30 s after the first receive they are
        // still in flight.
        assert_eq!(info(&sm, 45_000).in_flight, 2);
        assert!(handles(run(&s, &sm, 4, 21_000, attempt("y"))).is_empty());

        // A reopened replica repeats it as well.
        let sm = open(&s, &[("FifoQueue", "true"), ("VisibilityTimeout", "30")]);
        assert_eq!(handles(run(&s, &sm, 5, 22_000, attempt("x"))), first);

        // Once a message changed, the id receives anew (here: nothing, the
        // group is locked while its messages are in flight).
        run(
            &s,
            &sm,
            6,
            23_000,
            QueueCommand::ChangeVisibility(vec![(first[0].0, 100)]),
        );
        assert!(handles(run(&s, &sm, 7, 24_000, attempt("x"))).is_empty());

        // Past its window an id is forgotten, though its messages are
        // still in flight.
        run(&s, &sm, 8, 24_000, QueueCommand::Delete(vec![first[1].0]));
        run(
            &s,
            &sm,
            9,
            24_000,
            QueueCommand::ChangeVisibility(vec![(first[0].0, 0)]),
        );
        let short = QueueCommand::ReceiveAttempt {
            max: 10,
            visibility_seconds: None,
            attempt: "z".into(),
            window_seconds: 1,
        };
        let fresh = handles(run(&s, &sm, 10, 25_000, short.clone()));
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].1, 2, "received a second time");
        assert_eq!(handles(run(&s, &sm, 11, 25_500, short.clone())), fresh);
        assert!(handles(run(&s, &sm, 12, 26_001, short)).is_empty());
    }

    #[test]
    fn an_attempt_id_on_a_standard_queue_is_ignored() {
        let (_dir, s, sm) = setup(&[("VisibilityTimeout", "30")]);
        run(
            &s,
            &sm,
            1,
            0,
            QueueCommand::Send(vec![message("a", None, None), message("b", None, None)]),
        );
        let mut one = attempt("x");
        if let QueueCommand::ReceiveAttempt { max, .. } = &mut one {
            *max = 1;
        }
        let first = handles(run(&s, &sm, 2, 0, one.clone()));
        let second = handles(run(&s, &sm, 3, 0, one));
        assert_ne!(first, second, "a standard queue receives anew");
    }

    fn stored(body: &str) -> StoredMessage {
        StoredMessage {
            message: message(body, None, None),
            sent_ms: 7,
            seq: 0,
        }
    }

    /// Times a command carries are bounded: a moved message said to be sent
    /// at `u64::MAX`, or a clock stamp near it (a raw proposal's), made the
    /// sent time plus retention wrap, and the message expired at the next
    /// command (where overflow is checked, every replica panicked).
    #[test]
    fn times_from_a_command_cannot_wrap_a_message_into_expiry() {
        let (_dir, s, sm) = setup(&[]);
        let late = StoredMessage {
            sent_ms: u64::MAX,
            ..stored("late")
        };
        let now = 1_700_000_000_000;
        run(&s, &sm, 1, now, QueueCommand::Move(vec![late]));
        run(&s, &sm, 2, now + 1, QueueCommand::Tag(BTreeMap::new()));
        assert_eq!(info(&sm, now + 1).visible, 1, "a moved message stays");

        let (_dir, s, sm) = setup(&[]);
        let send = QueueCommand::Send(vec![message("m", None, None)]);
        run(&s, &sm, 1, u64::MAX, send);
        run(&s, &sm, 2, u64::MAX, QueueCommand::Tag(BTreeMap::new()));
        assert_eq!(info(&sm, u64::MAX).visible, 1, "a sent message stays");
    }

    fn started(reply: QueueReply) -> u64 {
        match reply {
            QueueReply::TaskStarted(id) => id,
            other => panic!("{other:?}"),
        }
    }

    /// A replica that installed a snapshot sent after a message's deletion
    /// holds its state but no body until it applies the deletion: a move
    /// batch then fails (the worker tries again) instead of coming back
    /// empty, which would end the task with messages left.
    #[test]
    fn a_move_batch_fails_while_a_body_is_missing() {
        let (_dir, s, dlq) = setup(&[]);
        let src = "arn:aws:sqs:us-east-1:000000000000:src".to_string();
        let moved = QueueCommand::MoveFrom {
            source: src,
            messages: vec![stored("a")],
        };
        run(&s, &dlq, 5, 1_000, moved);
        let start = QueueCommand::StartMoveTask {
            destination: None,
            rate: None,
        };
        started(run(&s, &dlq, 6, 1_000, start));
        let body = row_key(42, TAG_BODY, &(5u128 << 32).to_be_bytes());
        assert!(s.get(Cf::Rows, &body).unwrap().is_some(), "moved in at 5");
        let mut batch = WriteBatch::default();
        batch.delete_cf(s.cf(Cf::Rows), body);
        s.write(batch).unwrap();
        let err = ask(&dlq, 2_000, &QueueQuery::MoveBatch(10)).unwrap_err();
        assert!(err.contains("still applying"), "{err}");
    }

    #[test]
    fn a_move_task_knows_where_each_dead_letter_came_from_and_keeps_its_progress() {
        let (_dir, s, dlq) = setup(&[]);
        let src = "arn:aws:sqs:us-east-1:000000000000:src".to_string();
        run(
            &s,
            &dlq,
            1,
            1_000,
            QueueCommand::MoveFrom {
                source: src.clone(),
                messages: vec![stored("a"), stored("b")],
            },
        );
        run(&s, &dlq, 2, 1_000, QueueCommand::Move(vec![stored("c")]));
        let start = QueueCommand::StartMoveTask {
            destination: None,
            rate: Some(10),
        };
        let id = started(run(&s, &dlq, 3, 2_000, start.clone()));
        assert_eq!(
            run(&s, &dlq, 4, 2_000, start.clone()),
            QueueReply::TaskRunning
        );

        let batch: MoveBatch = query(&dlq, 2_000, QueueQuery::MoveBatch(10));
        let task = batch.task.expect("a running task");
        assert_eq!((task.id, task.to_move, task.moved), (id, 3, 0));
        let origins: Vec<Option<&str>> = batch.messages.iter().map(|(_, o)| o.as_deref()).collect();
        assert_eq!(origins, [Some(src.as_str()), Some(src.as_str()), None]);
        assert_eq!(batch.messages[0].0.sent_ms, 7, "the first send time stays");
        let seqs: Vec<u128> = batch.messages[..2].iter().map(|(m, _)| m.seq).collect();
        let claim = QueueCommand::ClaimForMove {
            task: id,
            seqs: seqs.clone(),
        };
        let QueueReply::Claimed(handles) = run(&s, &dlq, 5, 3_000, claim.clone()) else {
            panic!("a claim answers handles");
        };
        assert_eq!(handles.len(), 2);
        // Claimed messages are hidden from receives and from a second claim.
        assert_eq!(bodies(&receive(&s, &dlq, 6, 3_000, 10)), ["c"]);
        assert_eq!(
            run(&s, &dlq, 7, 3_000, claim),
            QueueReply::Claimed(Vec::new())
        );
        // Only the claim's own handles drop them.
        let stale: Vec<Handle> = seqs.iter().map(|&seq| Handle { seq, nonce: 1 }).collect();
        let drop_stale = QueueCommand::MovedOut {
            task: id,
            handles: stale,
        };
        run(&s, &dlq, 8, 3_000, drop_stale);
        assert_eq!(info(&dlq, 3_000).delayed, 2, "still there, still claimed");
        run(
            &s,
            &dlq,
            9,
            3_000,
            QueueCommand::MovedOut { task: id, handles },
        );

        // A reopened replica has the task, its progress and the origins.
        let dlq = open(&s, &[]);
        let batch: MoveBatch = query(&dlq, 40_000, QueueQuery::MoveBatch(10));
        assert_eq!(batch.task.as_ref().map(|t| t.moved), Some(2));
        assert_eq!(
            batch.messages.len(),
            1,
            "c, visible again after its receive"
        );
        assert_eq!(batch.messages[0].1, None);

        let why = Some("no destination".to_string());
        run(
            &s,
            &dlq,
            10,
            40_000,
            QueueCommand::EndMoveTask {
                task: id,
                failure: why.clone(),
            },
        );
        assert_eq!(
            run(&s, &dlq, 11, 40_000, QueueCommand::CancelMoveTask(id)),
            QueueReply::Cancelled(None),
            "only a running task can be cancelled"
        );
        let tasks: Vec<MoveTask> = query(&dlq, 40_000, QueueQuery::MoveTasks);
        assert_eq!(tasks[0].status, TaskStatus::Failed);
        assert_eq!(tasks[0].failure, why);
        let batch: MoveBatch = query(&dlq, 40_000, QueueQuery::MoveBatch(10));
        assert!(batch.task.is_none() && batch.messages.is_empty());

        // The latest ten tasks are kept, the latest first.
        for index in 10..22 {
            let id = started(run(&s, &dlq, index * 2, 5_000, start.clone()));
            assert_eq!(
                run(
                    &s,
                    &dlq,
                    index * 2 + 1,
                    5_000,
                    QueueCommand::CancelMoveTask(id)
                ),
                QueueReply::Cancelled(Some(0))
            );
        }
        let tasks: Vec<MoveTask> = query(&dlq, 5_000, QueueQuery::MoveTasks);
        let ids: Vec<u64> = tasks.iter().map(|t| t.id).collect();
        assert_eq!(ids, (12..22).rev().map(|i| i * 2).collect::<Vec<_>>());
        assert!(tasks.iter().all(|t| t.status == TaskStatus::Cancelled));
        assert_eq!(
            ask(&open(&s, &[]), 5_000, &QueueQuery::MoveTasks).unwrap(),
            encode(&tasks),
            "the dropped tasks' rows are gone"
        );
    }
}

#[cfg(test)]
mod fifo_properties {
    use proptest::prelude::*;

    use super::*;

    /// What a FIFO receive took before the group index: every message
    /// walked in queue order. The index must take exactly the same.
    fn takeable_by_walking(q: &Queue, now_ms: u64, max: usize) -> Vec<u128> {
        let mut out = Vec::new();
        let mut blocked: std::collections::HashSet<&str> = q
            .messages
            .values()
            .filter(|m| m.in_flight(now_ms))
            .filter_map(|m| m.group_id.as_deref())
            .collect();
        for (seq, m) in &q.messages {
            if out.len() == max {
                break;
            }
            let group = m.group_id.as_deref().unwrap_or("");
            if blocked.contains(group) || m.dead {
                continue;
            }
            if m.visible_at_ms <= now_ms {
                out.push(*seq);
            } else {
                blocked.insert(group);
            }
        }
        out
    }

    /// What the counts were before the indexes: every message walked.
    fn info_by_walking(q: &Queue, now_ms: u64) -> (u64, u64, u64, Option<u64>) {
        let (mut visible, mut in_flight, mut delayed) = (0, 0, 0);
        for m in q.messages.values().filter(|m| !m.dead) {
            if m.visible_at_ms <= now_ms {
                visible += 1;
            } else if m.receive_count > 0 {
                in_flight += 1;
            } else {
                delayed += 1;
            }
        }
        let oldest = q.messages.values().map(|m| m.sent_ms).min();
        (visible, in_flight, delayed, oldest)
    }

    /// Moves message `seq` to visible-at `at`, its keys kept as the state
    /// machine keeps them.
    fn set_visible_at(q: &mut Queue, seq: u128, at: u64) {
        let m = q.messages.get_mut(&seq).expect("a message");
        q.visible_at.remove(&(m.visible_at_ms, seq));
        m.visible_at_ms = at;
        Queue::key(&mut q.visible_at, &mut q.dead, seq, m);
    }

    /// What happens to a FIFO queue, as its commands do it. `pick` chooses
    /// among the messages the command may act on.
    #[derive(Debug, Clone)]
    enum Op {
        /// A send with the queue's delay at the time (it may change).
        /// `age_ms` before now: a dead letter moved here keeps its first
        /// send time.
        Send {
            group: u8,
            delay_ms: u64,
            age_ms: u64,
        },
        Receive {
            max: usize,
            visibility_ms: u64,
        },
        /// ChangeMessageVisibility of a message in flight.
        Change {
            pick: usize,
            visibility_ms: u64,
        },
        /// A delete by receipt, or a removal past retention or by a purge.
        Remove {
            pick: usize,
        },
        /// A receive finds a takeable message past its redrive limit.
        Die {
            pick: usize,
        },
        Wait {
            ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..4, prop_oneof![Just(0u64), 1u64..4], prop_oneof![3 => Just(0u64), 1 => 1u64..6])
                .prop_map(|(group, delay_ms, age_ms)| Op::Send { group, delay_ms, age_ms }),
            3 => (1usize..=10, 0u64..4)
                .prop_map(|(max, visibility_ms)| Op::Receive { max, visibility_ms }),
            1 => (any::<usize>(), 0u64..4)
                .prop_map(|(pick, visibility_ms)| Op::Change { pick, visibility_ms }),
            2 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
            1 => any::<usize>().prop_map(|pick| Op::Die { pick }),
            2 => (1u64..4).prop_map(|ms| Op::Wait { ms }),
        ]
    }

    fn nth(seqs: &[u128], pick: usize) -> Option<u128> {
        (!seqs.is_empty()).then(|| seqs[pick % seqs.len()])
    }

    proptest! {
        #[test]
        fn a_fifo_receive_takes_and_counts_what_walking_every_message_does(
            ops in prop::collection::vec(op(), 1..100),
        ) {
            let mut q = Queue::default();
            q.header.attributes.insert("FifoQueue".into(), "true".into());
            let (mut now, mut next) = (0u64, 1u128);
            for op in ops {
                match op {
                    Op::Send { group, delay_ms, age_ms } => {
                        let m = MessageState {
                            sent_ms: now.saturating_sub(age_ms),
                            visible_at_ms: now + delay_ms,
                            receive_count: 0,
                            first_receive_ms: 0,
                            nonce: 0,
                            group_id: Some(format!("g{group}")),
                            dead: false,
                        };
                        q.insert(next, m);
                        next += 1;
                    }
                    Op::Receive { max, visibility_ms } => {
                        let taken = q.takeable(now, max);
                        prop_assert_eq!(&taken, &takeable_by_walking(&q, now, max));
                        for seq in taken {
                            q.messages.get_mut(&seq).expect("taken").receive_count += 1;
                            set_visible_at(&mut q, seq, now + visibility_ms);
                        }
                    }
                    Op::Change { pick, visibility_ms } => {
                        let in_flight: Vec<u128> = q
                            .messages
                            .iter()
                            .filter(|(_, m)| m.in_flight(now))
                            .map(|(seq, _)| *seq)
                            .collect();
                        if let Some(seq) = nth(&in_flight, pick) {
                            set_visible_at(&mut q, seq, now + visibility_ms);
                        }
                    }
                    Op::Remove { pick } => {
                        let all: Vec<u128> = q.messages.keys().copied().collect();
                        if let Some(seq) = nth(&all, pick) {
                            q.remove(seq);
                        }
                    }
                    Op::Die { pick } => {
                        if let Some(seq) = nth(&q.takeable(now, 10), pick) {
                            let m = q.messages.get_mut(&seq).expect("takeable");
                            q.visible_at.remove(&(m.visible_at_ms, seq));
                            m.dead = true;
                            Queue::key(&mut q.visible_at, &mut q.dead, seq, m);
                        }
                    }
                    Op::Wait { ms } => now += ms,
                }
                for max in [1, 3, 10] {
                    prop_assert_eq!(q.takeable(now, max), takeable_by_walking(&q, now, max));
                }
                let info = q.info(now);
                prop_assert_eq!(
                    (info.visible, info.in_flight, info.delayed, info.oldest_sent_ms),
                    info_by_walking(&q, now)
                );
            }
            // The index holds exactly the live messages.
            let indexed: usize = q.groups.members.values().map(BTreeSet::len).sum();
            prop_assert_eq!(indexed, q.messages.len());
            prop_assert_eq!(q.groups.heads.len(), q.groups.members.len());
        }
    }
}
