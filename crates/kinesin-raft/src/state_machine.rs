//! Adapter between openraft's state-machine API and the groups' own state
//! machines ([`GroupStateMachine`]), plus cheap snapshots.
//!
//! The adapter persists the applied log id and membership in the same write
//! batch as the group's own changes, so a crash leaves a consistent prefix.
//! Shard groups write that batch without the WAL (`write_unlogged`): their
//! records already went through the WAL once, as log entries, and a crash
//! only takes the state back to the last memtable flush (all column
//! families flush at one point), from where the log re-applies them. The
//! metadata group's small writes go through the WAL (not fsynced) so its
//! map does not step back at a restart. Before a snapshot lets openraft
//! purge the log, everything is persisted (memtables flushed, WAL synced).
//!
//! A snapshot is the group's small state (`snapshot_state`), the applied log
//! id, and the rows the state machine declares ([`SnapshotRows`]). A kind
//! whose rows never change once written and carry the log index that wrote
//! them (a stream shard's records) gets cheap snapshots: building one
//! captures only the small state, and the rows it covers are read from the
//! live column families when it is sent (those written at or below the
//! snapshot's index). A row deleted meanwhile (a record trimmed by retention)
//! is simply not sent: deletions are re-applied from the log after the
//! snapshot anyway. A kind whose rows change in place (a queue's message
//! state) gets them copied when the snapshot is built, from a RocksDB
//! snapshot taken together with the applied id, into `Cf::SnapshotCopies`,
//! where sends read them; a replica that installs such a snapshot makes the
//! same copy, so that it can send the snapshot on. Such a kind may also have
//! rows that never change once written ([`FixedRows`], a queue's message
//! bodies, most of its bytes): those are left out of the copy and sent from
//! the live column family as a stream shard's records are. Such kinds build
//! their snapshots on a schedule of their own (`snapshot_schedule`). The
//! Raft layer knows nothing else about rows.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use futures::{Stream, TryStreamExt};
use kinesin_storage::keys;
use kinesin_storage::{Cf, Durability, RetriedBatch, Storage, View, WriteBatch};
use kinesin_types::GroupId;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use crate::snapshot_schedule::SnapshotSchedule;
use crate::types::{
    decode, encode, LogId, Reply, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};

/// The latest clock [`split_stamp`] gives (2^60 ms, some 36 million years).
const MAX_STAMP_MS: u64 = 1 << 60;

/// The clock a leader put before a stamped command or query (8 bytes,
/// big-endian ms), and the rest; None if `bytes` is shorter. The clock is
/// taken as at most [`MAX_STAMP_MS`], so that a kind adding any `u32` of
/// seconds to it cannot overflow whatever a raw proposal's stamp says.
pub fn split_stamp(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (clock, rest) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*clock).min(MAX_STAMP_MS), rest))
}

/// What a Raft group replicates: implemented by the metadata and shard state
/// machines. Commands and replies are opaque bytes to the Raft layer.
pub trait GroupStateMachine: Send + Sync + 'static {
    /// Applies a committed command written at `index`, adding its writes to
    /// `batch`, and returns the reply. Must be deterministic: no clock, no
    /// randomness. An error stops the group on this node (openraft treats
    /// it as a storage failure): the answer for a command this replica
    /// cannot apply as its peers do, such as one written by a newer release,
    /// since skipping it would leave the replica silently different.
    fn apply(&self, index: u64, command: &[u8], batch: &mut WriteBatch) -> io::Result<Vec<u8>>;

    /// Refuses, before it is proposed, a command that
    /// [`GroupStateMachine::apply`] would stop the group on (the leader
    /// runs it on every proposal, whoever sent it): a command that does not
    /// decode must never enter the log, where every replica would stop on
    /// it at every replay. The default takes every command.
    fn check_command(&self, _command: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Called once the batch of the applies before it is written, so that
    /// in-memory views never run ahead of storage.
    fn publish(&self);

    /// The group's small state (everything but records), for snapshots.
    fn snapshot_state(&self) -> Vec<u8>;

    /// Replaces the group's small state with a snapshot's, adding the writes
    /// to `batch`; followed by [`GroupStateMachine::publish`].
    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()>;

    /// What a snapshot carries besides the small state.
    fn snapshot_rows(&self) -> SnapshotRows {
        SnapshotRows::None
    }

    /// Answers a read query from the applied state (the leader calls it
    /// for [`crate::RaftHost::read`]). Queries, like commands, are the
    /// kind's own bytes; an error is a message for the caller.
    fn query(&self, _query: &[u8]) -> Result<Vec<u8>, String> {
        Err("this group kind answers no queries".into())
    }

    /// Turns the reply of a command this leader applied into the answer its
    /// proposer gets, reading what apply may not (rows written by earlier
    /// applies, such as the bodies of messages a receive took). Runs on the
    /// leader after the reply's batch was written.
    fn complete(&self, reply: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(reply)
    }

    /// Rebuilds in-memory state from storage once an installed snapshot's
    /// rows are in place (after the install, or at a start that finished an
    /// interrupted one): [`GroupStateMachine::restore`] runs before they
    /// arrive.
    fn reload(&self) -> io::Result<()> {
        Ok(())
    }

    /// A counter that moves whenever published state may have changed, for
    /// callers that wait for it (a queue's long polls); None if the kind
    /// keeps none.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The rows (keyed by group id, in column families other than the state
/// machine's own) that a group's snapshots carry.
#[derive(Clone, Copy)]
pub enum SnapshotRows {
    /// The small state is everything.
    None,
    /// Rows in `columns` (each one of [`Cf::SNAPSHOT_ROWS`]) that are never
    /// changed once written, only deleted; `writer_index` reads from a key
    /// the log index of the entry that wrote it.
    Immutable {
        columns: &'static [Cf],
        writer_index: fn(Cf, &[u8]) -> u64,
    },
    /// Rows in `columns` (each one of [`Cf::SNAPSHOT_ROWS`]) that applies
    /// change in place: building a snapshot copies them, from a RocksDB
    /// snapshot taken with the applied id, into [`Cf::SnapshotCopies`],
    /// where sends read them; except the `fixed` ones, sent from the live
    /// column family.
    Mutable {
        columns: &'static [Cf],
        fixed: Option<FixedRows>,
    },
}

/// Rows among a [`SnapshotRows::Mutable`] kind's that are never changed once
/// written, only deleted, and whose keys carry the log index of the entry
/// that wrote them. A snapshot sends those written at or below its index
/// that are still there when it is sent: one deleted after the snapshot was
/// built is deleted again by the log entries that follow it.
#[derive(Clone, Copy)]
pub struct FixedRows {
    pub column: Cf,
    /// What their keys start with after the group id.
    pub prefix: &'static [u8],
    /// The log index of the entry that wrote the row with this key.
    pub writer_index: fn(&[u8]) -> u64,
}

impl FixedRows {
    /// The keys of `group`'s fixed rows.
    fn bounds(&self, group: u64) -> (Vec<u8>, Vec<u8>) {
        let from = keys::named_key(group, self.prefix);
        let mut to = from.clone();
        // The least key above every key that starts with `from`.
        while let Some(last) = to.pop() {
            if last < u8::MAX {
                to.push(last + 1);
                return (from, to);
            }
        }
        (from, keys::group_bounds(group).1)
    }
}

impl SnapshotRows {
    fn columns(self) -> &'static [Cf] {
        match self {
            SnapshotRows::None => &[],
            SnapshotRows::Immutable { columns, .. } | SnapshotRows::Mutable { columns, .. } => {
                columns
            }
        }
    }
}

/// Snapshot data: the group's small state plus a lazy view of its records.
pub struct GroupSnapshot {
    pub(crate) state: Vec<u8>,
    pub(crate) source: SnapshotSource,
}

pub(crate) enum SnapshotSource {
    /// Rows of the live column families written at log index ≤ `upto`.
    Live {
        storage: Storage,
        group: u64,
        upto: u64,
        rows: SnapshotRows,
    },
    /// Rows copied when the snapshot at log index `index` was built (the
    /// copy is kept while `_held` has clones), and the `fixed` rows of the
    /// live column family written at log index ≤ `index`.
    Copied {
        storage: Storage,
        group: u64,
        index: u64,
        fixed: Option<FixedRows>,
        _held: Arc<()>,
    },
    /// Records received from the leader, parked in the staging column
    /// family until the install moves them.
    Staged,
}

/// One snapshot record: (column family tag, key, value).
pub(crate) type SnapshotRow = (u8, Vec<u8>, Vec<u8>);

/// One run of snapshot records.
pub(crate) type SnapshotChunk = Vec<SnapshotRow>;

const CHUNK_BYTES: usize = 4 << 20;

fn cf_of(tag: u8) -> io::Result<Cf> {
    Cf::of_snapshot_tag(tag).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown snapshot column family {tag}"),
        )
    })
}

impl GroupSnapshot {
    /// Calls `sink` with chunks of at most about 4 MiB (a single larger
    /// record makes a larger chunk).
    pub(crate) fn for_each_chunk(
        &self,
        mut sink: impl FnMut(SnapshotChunk) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut chunk = SnapshotChunk::new();
        let mut size = 0usize;
        let mut push = |item: SnapshotRow| -> io::Result<()> {
            size += item.1.len() + item.2.len();
            chunk.push(item);
            if size >= CHUNK_BYTES {
                size = 0;
                sink(std::mem::take(&mut chunk))?;
            }
            Ok(())
        };
        match &self.source {
            SnapshotSource::Live {
                storage,
                group,
                upto,
                rows:
                    SnapshotRows::Immutable {
                        columns,
                        writer_index,
                    },
            } => {
                let (from, to) = keys::group_bounds(*group);
                for &cf in *columns {
                    let written = |key: &[u8]| writer_index(cf, key);
                    push_live(storage, cf, (&from, &to), *upto, &written, &mut push)?;
                }
            }
            SnapshotSource::Copied {
                storage,
                group,
                index,
                fixed,
                ..
            } => {
                let (from, to) = copy_bounds(*group, *index);
                for kv in storage.scan(Cf::SnapshotCopies, &from, &to) {
                    let (k, v) = kv?;
                    // group(8) | index(8) | tag(1) | key
                    let tag = *k.get(16).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "short snapshot copy key")
                    })?;
                    push((tag, k[17..].to_vec(), v.into_vec()))?;
                }
                if let Some(fixed) = fixed {
                    let (from, to) = fixed.bounds(*group);
                    let written = fixed.writer_index;
                    push_live(
                        storage,
                        fixed.column,
                        (&from, &to),
                        *index,
                        &written,
                        &mut push,
                    )?;
                }
            }
            SnapshotSource::Live {
                rows: SnapshotRows::None | SnapshotRows::Mutable { .. },
                ..
            }
            | SnapshotSource::Staged => {}
        }
        if !chunk.is_empty() {
            sink(chunk)?;
        }
        Ok(())
    }
}

/// Calls `push` with each row of `cf` in `[from, to)` that the entry at
/// log index ≤ `upto` wrote.
fn push_live(
    storage: &Storage,
    cf: Cf,
    (from, to): (&[u8], &[u8]),
    upto: u64,
    writer_index: &dyn Fn(&[u8]) -> u64,
    push: &mut dyn FnMut(SnapshotRow) -> io::Result<()>,
) -> io::Result<()> {
    let tag = cf
        .snapshot_tag()
        .ok_or_else(|| io::Error::other(format!("{} rows cannot be in a snapshot", cf.name())))?;
    for kv in storage.scan(cf, from, to) {
        let (k, v) = kv?;
        if writer_index(&k) <= upto {
            push((tag, k.into_vec(), v.into_vec()))?;
        }
    }
    Ok(())
}

/// A token that keeps the row copy of the snapshot at `index`.
fn hold_copy(copies: &mut HashMap<u64, Weak<()>>, index: u64) -> Arc<()> {
    if let Some(held) = copies.get(&index).and_then(Weak::upgrade) {
        return held;
    }
    let held = Arc::new(());
    copies.insert(index, Arc::downgrade(&held));
    held
}

/// The keys of the copy of `group`'s rows for the snapshot at `index`.
fn copy_bounds(group: u64, index: u64) -> (Vec<u8>, Vec<u8>) {
    let key = |i: u64| [group.to_be_bytes(), i.to_be_bytes()].concat();
    match index.checked_add(1) {
        Some(next) => (key(index), key(next)),
        None => (key(index), keys::group_bounds(group).1),
    }
}

/// Copies `group`'s rows in `columns` but the `fixed` ones, as `view` shows
/// them, into [`Cf::SnapshotCopies`] under `index`, in bounded batches.
fn copy_rows(
    storage: &Storage,
    view: &View<'_>,
    group: u64,
    index: u64,
    (columns, fixed): (&[Cf], Option<FixedRows>),
) -> io::Result<u64> {
    let (copy_from, copy_to) = copy_bounds(group, index);
    let mut copied = 0;
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(storage.cf(Cf::SnapshotCopies), &copy_from, &copy_to);
    let (from, to) = keys::group_bounds(group);
    for &cf in columns {
        let tag = cf.snapshot_tag().ok_or_else(|| {
            io::Error::other(format!("{} rows cannot be in a snapshot", cf.name()))
        })?;
        let ranges = match fixed.filter(|f| f.column == cf) {
            Some(f) => {
                let (skip_from, skip_to) = f.bounds(group);
                vec![(from.clone(), skip_from), (skip_to, to.clone())]
            }
            None => vec![(from.clone(), to.clone())],
        };
        for kv in ranges.iter().flat_map(|(a, b)| view.scan(cf, a, b)) {
            let (k, v) = kv?;
            let mut copy = Vec::with_capacity(17 + k.len());
            copy.extend_from_slice(&copy_from);
            copy.push(tag);
            copy.extend_from_slice(&k);
            batch.put_cf(storage.cf(Cf::SnapshotCopies), copy, v);
            copied += 1;
            if batch.size_in_bytes() >= CHUNK_BYTES {
                write_rows(storage, std::mem::take(&mut batch), OnFullDisk::Wait)?;
            }
        }
    }
    write_rows(storage, batch, OnFullDisk::Wait)?;
    Ok(copied)
}

/// What a write of snapshot rows does when the disk is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFullDisk {
    /// Waits until RocksDB writes again: a step of openraft's own, which
    /// stops the group for good if it fails (builds, installs).
    Wait,
    /// Fails at once: a transfer the sender starts again later.
    Fail,
}

/// Writes rows of a snapshot, from a blocking thread.
fn write_rows(storage: &Storage, batch: WriteBatch, on_full: OnFullDisk) -> io::Result<()> {
    match on_full {
        OnFullDisk::Wait => storage.write_patiently_blocking(batch, Durability::Buffered)?,
        OnFullDisk::Fail => storage.write(batch)?,
    }
    Ok(())
}

/// Parks a received chunk in the staging column family.
pub(crate) fn stage_chunk(
    storage: &Storage,
    group: u64,
    chunk: SnapshotChunk,
    on_full: OnFullDisk,
) -> io::Result<()> {
    let mut batch = WriteBatch::default();
    let cf = storage.cf(Cf::Staging);
    let prefix = group.to_be_bytes();
    for (tag, key, value) in chunk {
        cf_of(tag)?;
        // Every row of a group's snapshot is keyed under the group's prefix
        // (`keys::group_bounds`); a row outside it would overwrite another
        // group's data when the install moves it into place.
        if !key.starts_with(&prefix) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a snapshot row of group {group} has a key outside the group"),
            ));
        }
        let mut k = Vec::with_capacity(9 + key.len());
        k.extend_from_slice(&group.to_be_bytes());
        k.push(tag);
        k.extend_from_slice(&key);
        batch.put_cf(cf, k, value);
    }
    write_rows(storage, batch, on_full)
}

/// Moves a group's staged snapshot records into the live column families,
/// a bounded batch at a time; for a kind with mutable rows copies them
/// for the installed snapshot at `index` (so that this replica can send
/// it on); then drops the staging rows and the install marker. Idempotent:
/// puts of the same keys and values.
fn move_staged(storage: &Storage, group: u64, rows: SnapshotRows, index: u64) -> io::Result<()> {
    let (from, to) = keys::group_bounds(group);
    let mut batch = WriteBatch::default();
    for kv in storage.scan(Cf::Staging, &from, &to) {
        let (k, v) = kv?;
        // staging key: group(8) | tag(1) | original key
        batch.put_cf(storage.cf(cf_of(k[8])?), &k[9..], v);
        if batch.size_in_bytes() >= CHUNK_BYTES {
            write_rows(storage, std::mem::take(&mut batch), OnFullDisk::Wait)?;
        }
    }
    write_rows(storage, std::mem::take(&mut batch), OnFullDisk::Wait)?;
    if let SnapshotRows::Mutable { columns, fixed } = rows {
        copy_rows(storage, &storage.view(), group, index, (columns, fixed))?;
    }
    batch.delete_range_cf(storage.cf(Cf::Staging), &from, &to);
    batch.delete_cf(
        storage.cf(Cf::StateMachine),
        keys::named_key(group, INSTALLING_KEY),
    );
    write_rows(storage, batch, OnFullDisk::Wait)?;
    storage.sync_patiently_blocking()?;
    Ok(())
}

/// Finishes a snapshot install a crash interrupted; called before the
/// group starts, with what its state machine's snapshots carry. Returns
/// whether there was one.
pub(crate) fn resume_install(
    storage: &Storage,
    group: u64,
    rows: SnapshotRows,
) -> io::Result<bool> {
    let marker = keys::named_key(group, INSTALLING_KEY);
    if storage.get(Cf::StateMachine, &marker)?.is_none() {
        return Ok(false);
    }
    let saved: Option<SavedSnapshot> = load_named(storage, group, SNAPSHOT_KEY, "snapshot")?;
    let index = saved
        .and_then(|s| s.meta.last_log_id)
        .map_or(0, |l| l.index);
    move_staged(storage, group, rows, index)?;
    Ok(true)
}

pub(crate) fn clear_staging(storage: &Storage, group: u64, on_full: OnFullDisk) -> io::Result<()> {
    let (from, to) = keys::group_bounds(group);
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(storage.cf(Cf::Staging), &from, &to);
    write_rows(storage, batch, on_full)
}

#[derive(Serialize, Deserialize, Default)]
struct Applied {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

#[derive(Serialize, Deserialize)]
struct SavedSnapshot {
    meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

const APPLIED_KEY: &[u8] = b"\0applied";
const SNAPSHOT_KEY: &[u8] = b"\0snapshot";
/// Present while an installed snapshot's records move out of staging.
const INSTALLING_KEY: &[u8] = b"\0installing";

/// openraft's view of one group's state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    storage: Storage,
    group: u64,
    inner: Arc<dyn GroupStateMachine>,
    /// Held while an apply or an install writes and publishes, and while a
    /// snapshot reads the applied id and the published state or saves
    /// itself.
    applying: Arc<Mutex<()>>,
    /// Held for the whole of a snapshot install, until its rows left
    /// staging (which goes on even if openraft stops waiting).
    installing: Arc<tokio::sync::Mutex<()>>,
    /// Row copies of built snapshots (by index) that snapshots being sent
    /// still read ([`SnapshotRows::Mutable`]).
    copies: Arc<Mutex<HashMap<u64, Weak<()>>>>,
    /// When to build snapshots, for kinds whose builds copy rows (the
    /// others follow openraft's policy).
    schedule: Option<SnapshotSchedule>,
}

impl StateMachineStore {
    pub fn new(storage: Storage, group: u64, inner: Arc<dyn GroupStateMachine>) -> Self {
        StateMachineStore {
            storage,
            group,
            inner,
            applying: Arc::default(),
            installing: Arc::default(),
            copies: Arc::default(),
            schedule: None,
        }
    }

    /// Builds snapshots on [`SnapshotSchedule`]'s rule instead of
    /// openraft's: after `every` entries, or more after a build that copied
    /// many rows; `request` asks openraft for a build.
    pub(crate) fn scheduled(
        mut self,
        every: u64,
        request: Arc<dyn Fn() + Send + Sync>,
    ) -> io::Result<Self> {
        let saved: Option<SavedSnapshot> = self.load(SNAPSHOT_KEY, "snapshot")?;
        let index = saved
            .and_then(|s| s.meta.last_log_id)
            .map_or(0, |l| l.index);
        self.schedule = Some(SnapshotSchedule::new(every, index, request));
        Ok(self)
    }

    /// The saved snapshot, with its row copy (if the kind has one) held
    /// for as long as the returned snapshot lives. The key is read and the
    /// hold taken under the copies lock, which pruning holds too, so that a
    /// copy is never deleted between the two.
    fn current(&self) -> io::Result<Option<Snapshot>> {
        let mut copies = self.copies.lock().expect("copies lock");
        Ok(self
            .load::<SavedSnapshot>(SNAPSHOT_KEY, "snapshot")?
            .map(|saved| self.snapshot_of(saved, &mut copies)))
    }

    /// Deletes the row copies of every snapshot but `keep` and those still
    /// being sent.
    fn prune_copies(&self, keep: u64) -> io::Result<()> {
        // Held until the deletes are written: see `current`.
        let mut copies = self.copies.lock().expect("copies lock");
        copies.retain(|_, held| held.strong_count() > 0);
        let mut kept: Vec<u64> = copies.keys().copied().collect();
        kept.push(keep);
        kept.sort_unstable();
        kept.dedup();
        let cf = self.storage.cf(Cf::SnapshotCopies);
        let (mut from, end) = keys::group_bounds(self.group);
        let mut batch = WriteBatch::default();
        for index in kept {
            let (lo, hi) = copy_bounds(self.group, index);
            batch.delete_range_cf(cf, &from, &lo);
            from = hi;
        }
        batch.delete_range_cf(cf, &from, &end);
        match self.storage.write(batch) {
            // Only space is lost: the next snapshot prunes these copies too.
            Err(e) if e.is_no_space() => Ok(()),
            other => other.map_err(Into::into),
        }
    }

    /// Free when no snapshot install of this group is under way; a group's
    /// data must not be deleted while one is.
    pub(crate) fn install_lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.installing.clone()
    }

    fn load<T: for<'a> Deserialize<'a>>(
        &self,
        name: &[u8],
        what: &'static str,
    ) -> io::Result<Option<T>> {
        load_named(&self.storage, self.group, name, what)
    }

    /// Writes a batch that changes the applied state and publishes the
    /// state machine's new state, under the lock a snapshot build reads
    /// both under. A full disk is waited out (with the lock released):
    /// openraft stops the group for good if an apply or install fails.
    async fn write_and_publish(&self, batch: WriteBatch, how: Durability) -> io::Result<()> {
        let mut batch = RetriedBatch::new(batch);
        self.storage
            .patiently(|| {
                let _consistent = self.applying.lock().expect("apply lock");
                let written = self.storage.write_as(batch.attempt(), how);
                if written.is_ok() {
                    self.inner.publish();
                }
                written
            })
            .await?;
        Ok(())
    }

    fn put(&self, batch: &mut WriteBatch, name: &[u8], value: Vec<u8>) {
        batch.put_cf(
            self.storage.cf(Cf::StateMachine),
            keys::named_key(self.group, name),
            value,
        );
    }

    fn applied(&self) -> io::Result<Applied> {
        applied_in(&self.storage, self.group)
    }

    fn snapshot_of(&self, saved: SavedSnapshot, copies: &mut HashMap<u64, Weak<()>>) -> Snapshot {
        let upto = saved.meta.last_log_id.as_ref().map_or(0, |l| l.index);
        let source = match self.inner.snapshot_rows() {
            SnapshotRows::Mutable { fixed, .. } => SnapshotSource::Copied {
                storage: self.storage.clone(),
                group: self.group,
                index: upto,
                fixed,
                _held: hold_copy(copies, upto),
            },
            rows => SnapshotSource::Live {
                storage: self.storage.clone(),
                group: self.group,
                upto,
                rows,
            },
        };
        Snapshot {
            meta: saved.meta,
            snapshot: GroupSnapshot {
                state: saved.state,
                source,
            },
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = GroupSnapshot;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let started = std::time::Instant::now();
        // openraft builds snapshots beside `apply`: read the applied id and
        // the state it describes under the lock `apply` holds while it
        // writes and publishes, so that they match.
        let rows = self.inner.snapshot_rows();
        // openraft builds in a task of its own, beside installs: an install
        // moving rows would show a copy half of them.
        let _no_install = match rows {
            SnapshotRows::Mutable { .. } => Some(self.installing.clone().lock_owned().await),
            _ => None,
        };
        let (applied, state, copied) = match rows {
            SnapshotRows::Mutable { columns, fixed } => {
                // Rows that change in place are copied as a RocksDB
                // snapshot taken with the applied id shows them, outside
                // the lock and off the async workers. A saved snapshot at
                // the same index already has its whole copy, which a send
                // may be reading: it is left alone.
                let (storage, group) = (self.storage.clone(), self.group);
                let (applying, inner) = (self.applying.clone(), self.inner.clone());
                tokio::task::spawn_blocking(
                    move || -> io::Result<(Applied, Vec<u8>, Option<u64>)> {
                        let (applied, state, view, saved) = {
                            let _consistent = applying.lock().expect("apply lock");
                            let saved: Option<SavedSnapshot> =
                                load_named(&storage, group, SNAPSHOT_KEY, "snapshot")?;
                            (
                                applied_in(&storage, group)?,
                                inner.snapshot_state(),
                                storage.view(),
                                saved.and_then(|s| s.meta.last_log_id),
                            )
                        };
                        let copied = if saved != applied.last_applied {
                            let index = applied.last_applied.as_ref().map_or(0, |l| l.index);
                            Some(copy_rows(&storage, &view, group, index, (columns, fixed))?)
                        } else {
                            None
                        };
                        Ok((applied, state, copied))
                    },
                )
                .await
                .map_err(io::Error::other)??
            }
            _ => {
                let _consistent = self.applying.lock().expect("apply lock");
                (self.applied()?, self.inner.snapshot_state(), None)
            }
        };
        let saved = SavedSnapshot {
            meta: SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership,
            },
            state,
        };
        // openraft purges the log up to this snapshot next, and a saved
        // snapshot is restored at start-up when it is ahead of the applied
        // state: what it covers must be durable before it is saved —
        // unlogged applies included, which only a memtable flush persists
        // (seconds on a busy disk, so off the async workers).
        let storage = self.storage.clone();
        let unlogged = self.group != GroupId::META.0;
        tokio::task::spawn_blocking(move || {
            if unlogged {
                storage.persist_patiently_blocking()
            } else {
                storage.sync_patiently_blocking()
            }
        })
        .await
        .map_err(io::Error::other)??;
        // An install may have finished meanwhile: never replace its newer
        // snapshot with this one. The save is synced, so off the async
        // workers too.
        let encoded = encode(&saved);
        let snapshot = loop {
            let (this, encoded) = (self.clone(), encoded.clone());
            let last = saved.meta.last_log_id;
            let written = tokio::task::spawn_blocking(move || -> io::Result<_> {
                let _consistent = this.applying.lock().expect("apply lock");
                let stored = this.load::<SavedSnapshot>(SNAPSHOT_KEY, "snapshot")?;
                Ok(if stored.is_none_or(|s| s.meta.last_log_id <= last) {
                    let mut batch = WriteBatch::default();
                    this.put(&mut batch, SNAPSHOT_KEY, encoded);
                    this.storage.write_durable(batch)
                } else {
                    Ok(())
                })
            })
            .await
            .map_err(io::Error::other)??;
            match written {
                Ok(()) => {
                    break self
                        .current()?
                        .ok_or_else(|| io::Error::other("the snapshot just saved is gone"))?
                }
                Err(e) if e.is_no_space() => self.storage.writable().await,
                Err(e) => return Err(e.into()),
            }
        };
        if let SnapshotRows::Mutable { .. } = rows {
            let keep = snapshot.meta.last_log_id.as_ref().map_or(0, |l| l.index);
            if let Some(schedule) = &self.schedule {
                schedule.built(keep, copied);
            }
            self.prune_copies(keep)?;
        }
        metrics::histogram!("kinesin_raft_snapshot_build_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = GroupSnapshot;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.applied()?;
        Ok((applied.last_applied, applied.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>>
            + Unpin
            + openraft::OptionalSend,
    {
        let mut applied = self.applied()?;
        let mut batch = WriteBatch::default();
        let mut replies = Vec::new();
        let mut bytes = 0;
        while let Some((entry, responder)) = entries.try_next().await? {
            if let EntryPayload::Normal(command) = &entry.payload {
                bytes += command.0.len() as u64;
            }
            let reply = match &entry.payload {
                EntryPayload::Normal(command) => self
                    .inner
                    .apply(entry.log_id.index, &command.0, &mut batch)
                    .inspect_err(|e| {
                        tracing::error!(
                            group = self.group,
                            index = entry.log_id.index,
                            error = %e,
                            "cannot apply a committed command: stopping this replica of the group"
                        )
                    })?,
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    Vec::new()
                }
                EntryPayload::Blank => Vec::new(),
            };
            applied.last_applied = Some(entry.log_id);
            if let Some(responder) = responder {
                replies.push((responder, reply));
            }
        }
        self.put(&mut batch, APPLIED_KEY, encode(&applied));
        let how = if self.group == GroupId::META.0 {
            Durability::Buffered
        } else {
            Durability::Unlogged
        };
        self.write_and_publish(batch, how).await?;
        for (responder, reply) in replies {
            responder.send(Reply(reply));
        }
        if let (Some(schedule), Some(last)) = (&self.schedule, applied.last_applied) {
            schedule.applied(last.index, bytes);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: GroupSnapshot,
    ) -> Result<(), io::Error> {
        let (storage, group) = (self.storage.clone(), self.group);
        let installing = self.installing.clone().lock_owned().await;
        let GroupSnapshot { state, source } = snapshot;
        if !matches!(source, SnapshotSource::Staged) {
            // A snapshot of this store itself: stage what it covers, so the
            // install below is the same as for a received one.
            let live = GroupSnapshot {
                state: Vec::new(),
                source,
            };
            let staged = storage.clone();
            tokio::task::spawn_blocking(move || {
                clear_staging(&staged, group, OnFullDisk::Wait)?;
                live.for_each_chunk(|chunk| stage_chunk(&staged, group, chunk, OnFullDisk::Wait))
            })
            .await
            .map_err(io::Error::other)??;
        }
        // One batch replaces the group's small state and applied id, and
        // marks the install as begun; the records then move out of staging
        // in bounded batches (a shard of several GiB never sits in memory),
        // and a crash in between finishes the move at the next start
        // (`resume_install`).
        let (from, to) = keys::group_bounds(group);
        let mut batch = WriteBatch::default();
        for &cf in self.inner.snapshot_rows().columns() {
            batch.delete_range_cf(storage.cf(cf), &from, &to);
        }
        batch.delete_range_cf(storage.cf(Cf::StateMachine), &from, &to);
        self.inner.restore(&state, &mut batch)?;
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.put(&mut batch, APPLIED_KEY, encode(&applied));
        let saved = SavedSnapshot {
            meta: meta.clone(),
            state,
        };
        self.put(&mut batch, SNAPSHOT_KEY, encode(&saved));
        self.put(&mut batch, INSTALLING_KEY, Vec::new());
        // A snapshot built meanwhile sees the old applied id with the old
        // state, or the new with the new. The new small state is published
        // before the rows arrived: only a leader reads them, and a replica
        // installing a snapshot is not one.
        self.write_and_publish(batch, Durability::Buffered).await?;
        let (rows, index) = (
            self.inner.snapshot_rows(),
            meta.last_log_id.as_ref().map_or(0, |l| l.index),
        );
        tokio::task::spawn_blocking(move || {
            let _installing = installing;
            // The install's start is on disk before any row moves; the
            // fsync runs here, off the runtime and outside the apply lock.
            storage.sync_patiently_blocking()?;
            move_staged(&storage, group, rows, index)
        })
        .await
        .map_err(io::Error::other)??;
        if let SnapshotRows::Mutable { .. } = rows {
            self.prune_copies(index)?;
        }
        if let Some(schedule) = &self.schedule {
            schedule.installed(index);
        }
        self.inner.reload()
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        self.current()
    }
}

fn load_named<T: for<'a> Deserialize<'a>>(
    storage: &Storage,
    group: u64,
    name: &[u8],
    what: &'static str,
) -> io::Result<Option<T>> {
    match storage.get(Cf::StateMachine, &keys::named_key(group, name))? {
        Some(v) => Ok(Some(decode(what, &v)?)),
        None => Ok(None),
    }
}

fn applied_in(storage: &Storage, group: u64) -> io::Result<Applied> {
    Ok(load_named(storage, group, APPLIED_KEY, "applied state")?.unwrap_or_default())
}

/// The last log id `group`'s state machine applied, read offline.
pub(crate) fn applied_of(storage: &Storage, group: u64) -> io::Result<Option<LogId>> {
    Ok(applied_in(storage, group)?.last_applied)
}

/// Removes a group's state-machine data (the group left this node).
pub fn delete_group_state(storage: &Storage, group: u64) -> io::Result<()> {
    let (from, to) = keys::group_bounds(group);
    let mut batch = WriteBatch::default();
    let row_cfs = Cf::SNAPSHOT_ROWS.map(|(_, cf)| cf);
    for &cf in row_cfs
        .iter()
        .chain(&[Cf::StateMachine, Cf::Staging, Cf::SnapshotCopies])
    {
        batch.delete_range_cf(storage.cf(cf), &from, &to);
    }
    storage.write_durable(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kinesin_storage::FsyncPolicy;

    use super::*;

    fn staged_records(storage: &Storage, group: u64, count: u32, size: usize) -> Vec<[u8; 24]> {
        let mut keys_written = Vec::new();
        for run in 0..count / 10 {
            let chunk = (0..10)
                .map(|i| {
                    let key = keys::record_key(group, u128::from(run * 10 + i));
                    keys_written.push(key);
                    (1, key.to_vec(), vec![i as u8; size])
                })
                .collect();
            stage_chunk(storage, group, chunk, OnFullDisk::Fail).unwrap();
        }
        keys_written
    }

    /// A chunk holding a row of another group is refused whole: nothing of
    /// it is staged, so an install cannot overwrite that group's data.
    #[test]
    fn a_snapshot_row_outside_its_group_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let group = 7;
        let chunk = vec![
            (1, keys::record_key(group, 1).to_vec(), b"mine".to_vec()),
            (
                1,
                keys::record_key(group + 1, 1).to_vec(),
                b"theirs".to_vec(),
            ),
        ];
        let err = stage_chunk(&storage, group, chunk, OnFullDisk::Fail).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let (from, to) = keys::group_bounds(group);
        assert_eq!(storage.scan(Cf::Staging, &from, &to).count(), 0);
        let short = vec![(1, vec![0, 0], b"x".to_vec())];
        assert!(stage_chunk(&storage, group, short, OnFullDisk::Fail).is_err());
    }

    /// A crash after an install's first batch (small state, applied id and
    /// the marker written; old records gone) but before its records left
    /// staging: the next start moves them, once.
    #[test]
    fn an_interrupted_install_finishes_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        let group = 9;
        // More than one bounded batch of records.
        let staged = staged_records(&storage, group, 120, 100 << 10);
        let mut batch = WriteBatch::default();
        batch.put_cf(
            storage.cf(Cf::StateMachine),
            keys::named_key(group, INSTALLING_KEY),
            Vec::new(),
        );
        storage.write(batch).unwrap();

        assert!(resume_install(&storage, group, SnapshotRows::None).unwrap());
        for (k, key) in staged.iter().enumerate() {
            let value = storage.get(Cf::Records, key).unwrap().expect("moved");
            assert_eq!(value, vec![(k % 10) as u8; 100 << 10]);
        }
        let (from, to) = keys::group_bounds(group);
        assert_eq!(storage.scan(Cf::Staging, &from, &to).count(), 0);
        assert!(!resume_install(&storage, group, SnapshotRows::None).unwrap());
    }

    #[test]
    fn a_group_without_an_install_under_way_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        staged_records(&storage, 4, 10, 8);
        assert!(!resume_install(&storage, 4, SnapshotRows::None).unwrap());
        let (from, to) = keys::group_bounds(4);
        assert_eq!(storage.scan(Cf::Staging, &from, &to).count(), 10);
    }

    const MUTABLE: SnapshotRows = SnapshotRows::Mutable {
        columns: &[Cf::Rows],
        fixed: None,
    };

    fn put_row(storage: &Storage, group: u64, key: &str, value: &str) {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            storage.cf(Cf::Rows),
            keys::named_key(group, key.as_bytes()),
            value,
        );
        storage.write(batch).unwrap();
    }

    fn sent(
        storage: &Storage,
        group: u64,
        index: u64,
        fixed: Option<FixedRows>,
    ) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
        let snapshot = GroupSnapshot {
            state: Vec::new(),
            source: SnapshotSource::Copied {
                storage: storage.clone(),
                group,
                index,
                fixed,
                _held: Arc::new(()),
            },
        };
        let mut rows = Vec::new();
        snapshot
            .for_each_chunk(|chunk| {
                rows.extend(chunk);
                Ok(())
            })
            .unwrap();
        rows
    }

    /// A copy shows the rows as the view did, whatever changed after; an
    /// interrupted install of a mutable kind also leaves the copy its
    /// snapshot is sent from.
    #[test]
    fn mutable_rows_are_sent_as_they_were_when_the_snapshot_was_built() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        let group = 6;
        put_row(&storage, group, "a", "1");
        put_row(&storage, group, "b", "2");
        let view = storage.view();
        put_row(&storage, group, "a", "changed");
        put_row(&storage, group, "c", "new");
        put_row(&storage, group + 1, "other", "group");
        copy_rows(&storage, &view, group, 10, (&[Cf::Rows], None)).unwrap();
        drop(view);
        let key = |k: &str| keys::named_key(group, k.as_bytes());
        assert_eq!(
            sent(&storage, group, 10, None),
            vec![(3, key("a"), b"1".to_vec()), (3, key("b"), b"2".to_vec())]
        );
        assert!(sent(&storage, group, 11, None).is_empty());

        let staged = vec![(3, key("x"), b"9".to_vec())];
        stage_chunk(&storage, group, staged.clone(), OnFullDisk::Fail).unwrap();
        let mut batch = WriteBatch::default();
        batch.put_cf(
            storage.cf(Cf::StateMachine),
            keys::named_key(group, INSTALLING_KEY),
            Vec::new(),
        );
        storage.write(batch).unwrap();
        assert!(resume_install(&storage, group, MUTABLE).unwrap());
        assert_eq!(
            storage.get(Cf::Rows, &key("x")).unwrap(),
            Some(b"9".to_vec())
        );
        // No saved snapshot names an index here: the copy is at 0.
        assert!(sent(&storage, group, 0, None).contains(&staged[0]));
    }

    /// Fixed rows written at or below the snapshot's index are sent from
    /// the live column family, those deleted meanwhile not; none is copied.
    #[test]
    fn fixed_rows_are_sent_live_and_never_copied() {
        const FIXED: FixedRows = FixedRows {
            column: Cf::Rows,
            prefix: b"f",
            writer_index: |key| u64::from(key[9] - b'0'),
        };
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let group = 6;
        put_row(&storage, group, "a", "1");
        put_row(&storage, group, "f1", "body 1");
        put_row(&storage, group, "f2", "body 2");
        put_row(&storage, group, "g", "7");
        let view = storage.view();
        put_row(&storage, group, "a", "changed");
        put_row(&storage, group, "f6", "written after");
        let mut batch = WriteBatch::default();
        batch.delete_cf(storage.cf(Cf::Rows), keys::named_key(group, b"f2"));
        storage.write(batch).unwrap();
        copy_rows(&storage, &view, group, 5, (&[Cf::Rows], Some(FIXED))).unwrap();
        drop(view);

        let (from, to) = keys::group_bounds(group);
        assert_eq!(
            storage.scan(Cf::SnapshotCopies, &from, &to).count(),
            2,
            "only a and g are copied"
        );
        let key = |k: &str| keys::named_key(group, k.as_bytes());
        let mut rows = sent(&storage, group, 5, Some(FIXED));
        rows.sort();
        assert_eq!(
            rows,
            vec![
                (3, key("a"), b"1".to_vec()),
                (3, key("f1"), b"body 1".to_vec()),
                (3, key("g"), b"7".to_vec()),
            ]
        );
        assert_eq!(
            FIXED.bounds(group),
            (key("f"), key("g")),
            "the fixed rows' bounds"
        );
    }
}
