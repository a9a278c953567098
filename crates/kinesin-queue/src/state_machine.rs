//! The queue group's state machine.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::sync::{Arc, Mutex};

use kinesin_raft::{GroupKind, GroupStateMachine, SnapshotRows};
use kinesin_storage::{keys, Cf, Storage, WriteBatch};
use kinesin_types::GroupId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::model::{
    decode, encode, DeadLetters, Delivered, EntryError, Handle, NewMessage, QueueCommand,
    QueueConfig, QueueInfo, QueueQuery, QueueReply, Received, SendRefused, Sent, StoredMessage,
};

/// The kind's registered name.
pub const QUEUE_KIND: &str = "sqs-queue";

/// Row tags after the group id in `Cf::Rows`.
const TAG_STATE: u8 = 1;
const TAG_BODY: u8 = 2;
const TAG_DEDUP: u8 = 3;
/// The settings' key in `Cf::StateMachine`.
const HEADER_KEY: &[u8] = b"q:header";
/// The queue's clock (`Queue::clock_ms`) in `Cf::StateMachine`.
const CLOCK_KEY: &[u8] = b"q:clock";

/// How long a deduplication id holds (FIFO queues), as AWS.
const DEDUP_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Most messages one receive turns into dead letters: each pass over the
/// queue costs a scan, and the rest die at the next receive.
const MAX_DEATHS_PER_RECEIVE: usize = 100;
/// Most tags of one queue, as AWS.
const MAX_TAGS: usize = 50;
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

impl Header {
    fn number(&self, name: &str, default: u64) -> u64 {
        self.attributes
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn flag(&self, name: &str) -> bool {
        self.attributes.get(name).is_some_and(|v| v == "true")
    }

    fn fifo(&self) -> bool {
        self.flag("FifoQueue")
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
        Some((target, u32::try_from(max).ok()?))
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

#[derive(Default)]
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
    dedup: BTreeMap<String, Dedup>,
    /// (expiry, key) of every deduplication entry, to drop them in order.
    dedup_expiry: BTreeSet<(u64, String)>,
}

impl Queue {
    /// The messages a receive at `now_ms` may take, in queue order: visible
    /// ones, and for a FIFO queue only the leading visible messages of each
    /// message group that has none in flight.
    fn takeable(&self, now_ms: u64, max: usize) -> Vec<u128> {
        let mut out = Vec::new();
        if !self.header.fifo() {
            for (seq, m) in &self.messages {
                if out.len() == max {
                    break;
                }
                if m.visible_at_ms <= now_ms && !m.dead {
                    out.push(*seq);
                }
            }
            return out;
        }
        let mut blocked: HashSet<&str> = self
            .messages
            .values()
            .filter(|m| m.in_flight(now_ms))
            .filter_map(|m| m.group_id.as_deref())
            .collect();
        for (seq, m) in &self.messages {
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
                // A later message of the group must wait for this one.
                blocked.insert(group);
            }
        }
        out
    }

    fn info(&self, now_ms: u64) -> QueueInfo {
        let (mut visible, mut in_flight, mut delayed) = (0, 0, 0);
        for m in self.messages.values().filter(|m| !m.dead) {
            if m.visible_at_ms <= now_ms {
                visible += 1;
            } else if m.receive_count > 0 {
                in_flight += 1;
            } else {
                delayed += 1;
            }
        }
        QueueInfo {
            attributes: self.header.attributes.clone(),
            tags: self.header.tags.clone(),
            created_ms: self.header.created_ms,
            modified_ms: self.header.modified_ms,
            visible,
            in_flight,
            delayed,
            oldest_sent_ms: self.messages.values().map(|m| m.sent_ms).min(),
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

/// The clock the leader put before a command or query, and the rest.
fn split_stamp(bytes: &[u8]) -> Result<(u64, &[u8]), String> {
    if bytes.len() < 8 {
        return Err("a queue command or query starts with the leader's clock".into());
    }
    let (clock, rest) = bytes.split_at(8);
    Ok((u64::from_be_bytes(clock.try_into().expect("8 bytes")), rest))
}

impl QueueStateMachine {
    fn state_key(&self, seq: u128) -> Vec<u8> {
        row_key(self.group, TAG_STATE, &seq.to_be_bytes())
    }

    fn body_key(&self, seq: u128) -> Vec<u8> {
        row_key(self.group, TAG_BODY, &seq.to_be_bytes())
    }

    fn dedup_key(&self, key: &str) -> Vec<u8> {
        row_key(self.group, TAG_DEDUP, key.as_bytes())
    }

    fn put_state(&self, batch: &mut WriteBatch, seq: u128, m: &MessageState) {
        batch.put_cf(self.storage.cf(Cf::Rows), self.state_key(seq), encode(m));
    }

    fn remove_message(&self, q: &mut Queue, batch: &mut WriteBatch, seq: u128) {
        q.messages.remove(&seq);
        batch.delete_cf(self.storage.cf(Cf::Rows), self.state_key(seq));
        batch.delete_cf(self.storage.cf(Cf::Rows), self.body_key(seq));
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

    /// Drops messages past their retention and deduplication ids past
    /// their window, as of `now_ms`.
    fn expire(&self, q: &mut Queue, batch: &mut WriteBatch, now_ms: u64) {
        let retention_ms = q
            .header
            .number("MessageRetentionPeriod", DEFAULT_RETENTION_S)
            * 1000;
        // Messages are in the order they were sent: the oldest lead.
        while let Some((&seq, m)) = q.messages.first_key_value() {
            if m.sent_ms + retention_ms > now_ms {
                break;
            }
            self.remove_message(q, batch, seq);
        }
        while let Some((expires, key)) = q.dedup_expiry.first().cloned() {
            if expires > now_ms {
                break;
            }
            q.dedup_expiry.pop_first();
            q.dedup.remove(&key);
            batch.delete_cf(self.storage.cf(Cf::Rows), self.dedup_key(&key));
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
            if let Some(earlier) = dedup_key.as_ref().and_then(|k| q.dedup.get(k)) {
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
                batch.put_cf(
                    self.storage.cf(Cf::Rows),
                    self.dedup_key(&key),
                    encode(&entry),
                );
                q.dedup_expiry.insert((entry.expires_ms, key.clone()));
                q.dedup.insert(key, entry);
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
            self.put_state(batch, seq, &state);
            q.messages.insert(seq, state);
        }
        QueueReply::Sent(sent)
    }

    fn receive(
        &self,
        q: &mut Queue,
        batch: &mut WriteBatch,
        index: u64,
        now_ms: u64,
        max: u32,
        visibility_seconds: Option<u32>,
    ) -> QueueReply {
        let visibility_ms = visibility_seconds
            .map(u64::from)
            .unwrap_or_else(|| q.header.number("VisibilityTimeout", DEFAULT_VISIBILITY_S))
            * 1000;
        let limit = q.header.redrive().map(|(_, max)| max);
        let mut out = Vec::with_capacity(max as usize);
        // A message past the redrive limit becomes a dead letter instead
        // of going out again, and the receive looks further.
        let mut deaths = 0;
        while out.len() < max as usize && deaths < MAX_DEATHS_PER_RECEIVE {
            let taken = q.takeable(now_ms, max as usize - out.len());
            if taken.is_empty() {
                break;
            }
            let mut died = false;
            for seq in taken {
                let Some(m) = q.messages.get_mut(&seq) else {
                    continue;
                };
                if limit.is_some_and(|limit| m.receive_count >= limit) {
                    m.dead = true;
                    died = true;
                    deaths += 1;
                    let m = m.clone();
                    self.put_state(batch, seq, &m);
                    continue;
                }
                out.push(self.take(m, seq, index, now_ms, visibility_ms, batch));
            }
            if !died {
                break;
            }
        }
        QueueReply::Received(out)
    }

    fn take(
        &self,
        m: &mut MessageState,
        seq: u128,
        index: u64,
        now_ms: u64,
        visibility_ms: u64,
        batch: &mut WriteBatch,
    ) -> Received {
        m.receive_count += 1;
        if m.first_receive_ms == 0 {
            m.first_receive_ms = now_ms;
        }
        m.nonce = index;
        m.visible_at_ms = now_ms + visibility_ms;
        self.put_state(batch, seq, m);
        Received {
            handle: Handle { seq, nonce: index },
            receive_count: m.receive_count,
            first_receive_ms: m.first_receive_ms,
        }
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
                    let dead: Vec<u128> = q
                        .messages
                        .iter()
                        .filter(|(_, m)| m.dead)
                        .map(|(seq, _)| *seq)
                        .collect();
                    for seq in dead {
                        if let Some(m) = q.messages.get_mut(&seq) {
                            m.dead = false;
                            let m = m.clone();
                            self.put_state(batch, seq, &m);
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
            } => self.receive(q, batch, index, now_ms, max, visibility_seconds),
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
                        m.visible_at_ms = now_ms + u64::from(seconds) * 1000;
                        let m = m.clone();
                        self.put_state(batch, h.seq, &m);
                        Ok(())
                    })
                    .collect();
                QueueReply::Entries(results)
            }
            QueueCommand::Move(messages) => {
                for (slot, mut stored) in messages.into_iter().enumerate() {
                    let seq = (u128::from(index) << 32) | slot as u128;
                    stored.seq = seq;
                    let state = MessageState {
                        sent_ms: stored.sent_ms,
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
                    self.put_state(batch, seq, &state);
                    q.messages.insert(seq, state);
                }
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
        q.messages.clear();
        q.dedup.clear();
        q.dedup_expiry.clear();
        let (from, to) = (
            row_key(self.group, TAG_STATE, &[]),
            row_key(self.group, TAG_STATE + 1, &[]),
        );
        for row in self.storage.scan(Cf::Rows, &from, &to) {
            let (key, value) = row.map_err(io::Error::other)?;
            let seq = u128::from_be_bytes(
                key[9..]
                    .try_into()
                    .map_err(|_| io::Error::other("a queue state row has a malformed key"))?,
            );
            q.messages
                .insert(seq, decode(&value).map_err(io::Error::other)?);
        }
        let (from, to) = (
            row_key(self.group, TAG_DEDUP, &[]),
            row_key(self.group, TAG_DEDUP + 1, &[]),
        );
        for row in self.storage.scan(Cf::Rows, &from, &to) {
            let (key, value) = row.map_err(io::Error::other)?;
            let key = String::from_utf8_lossy(&key[9..]).into_owned();
            let entry: Dedup = decode(&value).map_err(io::Error::other)?;
            q.dedup_expiry.insert((entry.expires_ms, key.clone()));
            q.dedup.insert(key, entry);
        }
        Ok(())
    }

    /// Reads the bodies of received messages; one deleted meanwhile is left
    /// out.
    fn deliver(&self, received: Vec<Received>) -> Result<Vec<Delivered>, String> {
        let mut out = Vec::with_capacity(received.len());
        for r in received {
            let Some(bytes) = self
                .storage
                .get(Cf::Rows, &self.body_key(r.handle.seq))
                .map_err(|e| e.to_string())?
            else {
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

    fn snapshot_rows(&self) -> SnapshotRows {
        SnapshotRows::Mutable {
            columns: &[Cf::Rows],
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
                let mut messages = Vec::new();
                for (seq, _) in q.messages.iter().filter(|(_, m)| m.dead) {
                    if messages.len() == max as usize {
                        break;
                    }
                    let row = self
                        .storage
                        .get(Cf::Rows, &self.body_key(*seq))
                        .map_err(|e| e.to_string())?;
                    if let Some(bytes) = row {
                        messages.push(decode(&bytes)?);
                    }
                }
                encode(&DeadLetters { target, messages })
            }
            QueueQuery::Ready => {
                if q.takeable(now_ms, 1).is_empty() {
                    Vec::new()
                } else {
                    vec![1]
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
        let config = QueueConfig {
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tags: BTreeMap::new(),
            created_ms: 1,
        };
        QueueKind
            .open(storage.clone(), GroupId(42), &encode(&config))
            .expect("open queue")
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
        let mut q = now_ms.to_be_bytes().to_vec();
        q.extend(encode(&QueueQuery::Info));
        decode(&sm.query(&q).unwrap()).unwrap()
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
    fn a_message_past_the_receive_limit_becomes_a_dead_letter_and_moves_whole() {
        let (_dir, s) = scratch();
        let policy = r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:dlq","maxReceiveCount":2}"#;
        let sm = open(&s, &[("RedrivePolicy", policy), ("VisibilityTimeout", "1")]);
        run(
            &s,
            &sm,
            1,
            500,
            QueueCommand::Send(vec![message("m", None, None), message("n", None, None)]),
        );
        assert_eq!(receive(&s, &sm, 2, 1_000, 1).len(), 1);
        assert_eq!(bodies(&receive(&s, &sm, 3, 2_000, 1)), ["m"]);
        // m was received twice: the third receive passes it over for n.
        assert_eq!(bodies(&receive(&s, &sm, 4, 3_000, 10)), ["n"]);
        let mut q = 3_000u64.to_be_bytes().to_vec();
        q.extend(encode(&QueueQuery::DeadLetters(10)));
        let dead: DeadLetters = decode(&sm.query(&q).unwrap()).unwrap();
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

        run(&s, &sm, 5, 9_000, QueueCommand::Remove(vec![seq]));
        let after: DeadLetters = decode(&sm.query(&q).unwrap()).unwrap();
        assert!(after.messages.is_empty());
        assert_eq!(info(&sm, 9_000).visible, 1, "n is visible again, m is gone");
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
}
