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
//! A snapshot is cheap: building it captures the group's small state
//! (`snapshot_state`) and the applied log id. Records are immutable and keyed
//! by sequence number, whose log-index field tells which entry wrote them, so
//! the records a snapshot covers are read from the live column families only
//! when it is sent (those with log index ≤ the snapshot's). A record trimmed
//! by retention meanwhile is simply not sent: trims are idempotent and are
//! re-applied after the snapshot anyway.

use std::io;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use kinesin_storage::keys;
use kinesin_storage::{Cf, Storage, WriteBatch};
use kinesin_types::GroupId;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use crate::types::{
    decode, encode, LogId, Reply, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};

/// What a Raft group replicates: implemented by the metadata and shard state
/// machines. Commands and replies are opaque bytes to the Raft layer.
pub trait GroupStateMachine: Send + Sync + 'static {
    /// Applies a committed command written at `index`, adding its writes to
    /// `batch`. Must be deterministic: no clock, no randomness.
    fn apply(&self, index: u64, command: &[u8], batch: &mut WriteBatch) -> Vec<u8>;

    /// Called once the batch of the applies before it is written, so that
    /// in-memory views never run ahead of storage.
    fn publish(&self);

    /// The group's small state (everything but records), for snapshots.
    fn snapshot_state(&self) -> Vec<u8>;

    /// Replaces the group's small state with a snapshot's, adding the writes
    /// to `batch`; followed by [`GroupStateMachine::publish`].
    fn restore(&self, state: &[u8], batch: &mut WriteBatch) -> io::Result<()>;
}

/// Snapshot data: the group's small state plus a lazy view of its records.
pub struct GroupSnapshot {
    pub(crate) state: Vec<u8>,
    pub(crate) source: SnapshotSource,
}

pub(crate) enum SnapshotSource {
    /// Records of the live column families with log index ≤ `upto`.
    Live {
        storage: Storage,
        group: u64,
        upto: u64,
    },
    /// Records received from the leader, parked in the staging column family.
    Staged { storage: Storage, group: u64 },
}

/// One run of snapshot records: (column family tag, key, value).
pub(crate) type SnapshotChunk = Vec<(u8, Vec<u8>, Vec<u8>)>;

const SNAPSHOT_CFS: [(u8, Cf); 2] = [(1, Cf::Records), (2, Cf::RecordTime)];
const CHUNK_BYTES: usize = 4 << 20;

fn cf_of(tag: u8) -> io::Result<Cf> {
    SNAPSHOT_CFS
        .iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, cf)| *cf)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown snapshot column family {tag}"),
            )
        })
}

/// Log index of the entry that wrote a record key or record-time key.
fn writer_index(cf: Cf, key: &[u8]) -> u64 {
    let seq = match cf {
        Cf::Records => keys::record_seq_of(key),
        _ => keys::record_time_parts(key).1,
    };
    kinesin_types::SequenceNumber(seq).log_index()
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
        let mut push = |chunk: &mut SnapshotChunk,
                        size: &mut usize,
                        item: (u8, Vec<u8>, Vec<u8>)|
         -> io::Result<()> {
            *size += item.1.len() + item.2.len();
            chunk.push(item);
            if *size >= CHUNK_BYTES {
                *size = 0;
                sink(std::mem::take(chunk))?;
            }
            Ok(())
        };
        match &self.source {
            SnapshotSource::Live {
                storage,
                group,
                upto,
            } => {
                let (from, to) = keys::group_bounds(*group);
                for (tag, cf) in SNAPSHOT_CFS {
                    for kv in storage.scan(cf, &from, &to) {
                        let (k, v) = kv?;
                        if writer_index(cf, &k) <= *upto {
                            push(&mut chunk, &mut size, (tag, k.into_vec(), v.into_vec()))?;
                        }
                    }
                }
            }
            SnapshotSource::Staged { storage, group } => {
                let (from, to) = keys::group_bounds(*group);
                for kv in storage.scan(Cf::Staging, &from, &to) {
                    let (k, v) = kv?;
                    // staging key: group(8) | tag(1) | original key
                    push(&mut chunk, &mut size, (k[8], k[9..].to_vec(), v.into_vec()))?;
                }
            }
        }
        if !chunk.is_empty() {
            sink(chunk)?;
        }
        Ok(())
    }
}

/// Parks a received chunk in the staging column family.
pub(crate) fn stage_chunk(storage: &Storage, group: u64, chunk: SnapshotChunk) -> io::Result<()> {
    let mut batch = WriteBatch::default();
    let cf = storage.cf(Cf::Staging);
    for (tag, key, value) in chunk {
        cf_of(tag)?;
        let mut k = Vec::with_capacity(9 + key.len());
        k.extend_from_slice(&group.to_be_bytes());
        k.push(tag);
        k.extend_from_slice(&key);
        batch.put_cf(cf, k, value);
    }
    storage.write(batch)?;
    Ok(())
}

pub(crate) fn clear_staging(storage: &Storage, group: u64) -> io::Result<()> {
    let (from, to) = keys::group_bounds(group);
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(storage.cf(Cf::Staging), &from, &to);
    storage.write(batch)?;
    Ok(())
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

/// openraft's view of one group's state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    storage: Storage,
    group: u64,
    inner: Arc<dyn GroupStateMachine>,
    /// Held while an apply writes and publishes, and while a snapshot reads
    /// the applied id and the published state.
    applying: Arc<Mutex<()>>,
}

impl StateMachineStore {
    pub fn new(storage: Storage, group: u64, inner: Arc<dyn GroupStateMachine>) -> Self {
        StateMachineStore {
            storage,
            group,
            inner,
            applying: Arc::default(),
        }
    }

    fn load<T: for<'a> Deserialize<'a>>(
        &self,
        name: &[u8],
        what: &'static str,
    ) -> io::Result<Option<T>> {
        load_named(&self.storage, self.group, name, what)
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

    fn snapshot_of(&self, saved: SavedSnapshot) -> Snapshot {
        let upto = saved.meta.last_log_id.as_ref().map_or(0, |l| l.index);
        Snapshot {
            meta: saved.meta,
            snapshot: GroupSnapshot {
                state: saved.state,
                source: SnapshotSource::Live {
                    storage: self.storage.clone(),
                    group: self.group,
                    upto,
                },
            },
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = GroupSnapshot;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // openraft builds snapshots beside `apply`: read the applied id and
        // the state it describes under the lock `apply` holds while it
        // writes and publishes, so that they match.
        let (applied, state) = {
            let _consistent = self.applying.lock().expect("apply lock");
            (self.applied()?, self.inner.snapshot_state())
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
                storage.persist()
            } else {
                storage.sync()
            }
        })
        .await
        .map_err(io::Error::other)??;
        let mut batch = WriteBatch::default();
        self.put(&mut batch, SNAPSHOT_KEY, encode(&saved));
        self.storage.write_durable(batch)?;
        Ok(self.snapshot_of(saved))
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
        while let Some((entry, responder)) = entries.try_next().await? {
            let reply = match &entry.payload {
                EntryPayload::Normal(command) => {
                    self.inner.apply(entry.log_id.index, &command.0, &mut batch)
                }
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
        {
            let _consistent = self.applying.lock().expect("apply lock");
            if self.group == GroupId::META.0 {
                self.storage.write(batch)?;
            } else {
                self.storage.write_unlogged(batch)?;
            }
            self.inner.publish();
        }
        for (responder, reply) in replies {
            responder.send(Reply(reply));
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
        let (from, to) = keys::group_bounds(self.group);
        let mut batch = WriteBatch::default();
        for (_, cf) in SNAPSHOT_CFS {
            batch.delete_range_cf(self.storage.cf(cf), &from, &to);
        }
        batch.delete_range_cf(self.storage.cf(Cf::StateMachine), &from, &to);
        snapshot.for_each_chunk(|chunk| {
            for (tag, key, value) in chunk {
                batch.put_cf(self.storage.cf(cf_of(tag)?), key, value);
            }
            Ok(())
        })?;
        batch.delete_range_cf(self.storage.cf(Cf::Staging), &from, &to);
        self.inner.restore(&snapshot.state, &mut batch)?;
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.put(&mut batch, APPLIED_KEY, encode(&applied));
        let saved = SavedSnapshot {
            meta: meta.clone(),
            state: snapshot.state,
        };
        self.put(&mut batch, SNAPSHOT_KEY, encode(&saved));
        self.storage.write(batch)?;
        self.storage.sync()?;
        self.inner.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self
            .load::<SavedSnapshot>(SNAPSHOT_KEY, "snapshot")?
            .map(|saved| self.snapshot_of(saved)))
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
    for cf in [Cf::Records, Cf::RecordTime, Cf::StateMachine, Cf::Staging] {
        batch.delete_range_cf(storage.cf(cf), &from, &to);
    }
    storage.write_durable(batch)?;
    Ok(())
}
