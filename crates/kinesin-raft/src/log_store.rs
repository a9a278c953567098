//! The Raft log of one group, kept in the node's RocksDB. Appends are written
//! at once (so they are readable when `append` returns) and acknowledged to
//! openraft only after the shared syncer has fsynced the WAL. Every write
//! waits out a full disk instead of failing: openraft stops a group for
//! good on a storage error, and the group would stay dead after space is
//! freed.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use kinesin_storage::keys::{self, TAG_COMMITTED, TAG_PURGED, TAG_VOTE};
use kinesin_storage::{Cf, Durability, Storage, WriteBatch};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::types::{decode, encode, Entry, LogId, TypeConfig, Vote};

/// Log storage of one group. Cheap to clone; clones share the cached tail.
#[derive(Clone)]
pub struct LogStore {
    storage: Storage,
    group: u64,
    tail: Arc<Mutex<Tail>>,
}

#[derive(Default)]
struct Tail {
    last_purged: Option<LogId>,
    last_log: Option<LogId>,
}

impl LogStore {
    pub fn open(storage: Storage, group: u64) -> io::Result<Self> {
        let last_purged: Option<LogId> =
            match storage.get(Cf::RaftState, &keys::state_key(group, TAG_PURGED))? {
                Some(v) => decode("purged log id", &v)?,
                None => None,
            };
        let last_entry = {
            let (from, to) = (keys::log_key(group, 0), keys::log_key(group, u64::MAX));
            match storage.scan_rev(Cf::RaftLog, &from, &to).next() {
                Some(kv) => {
                    let (_, v) = kv?;
                    let entry: Entry = decode("log entry", &v)?;
                    Some(entry.log_id)
                }
                None => None,
            }
        };
        let last_log = last_entry.or(last_purged);
        Ok(LogStore {
            storage,
            group,
            tail: Arc::new(Mutex::new(Tail {
                last_purged,
                last_log,
            })),
        })
    }

    fn read_range(&self, start: u64, end_exclusive: u64) -> io::Result<Vec<Entry>> {
        if start >= end_exclusive {
            return Ok(Vec::new());
        }
        let (from, to) = (
            keys::log_key(self.group, start),
            keys::log_key(self.group, end_exclusive),
        );
        let mut entries = Vec::new();
        for kv in self.storage.scan(Cf::RaftLog, &from, &to) {
            let (_, v) = kv?;
            entries.push(decode::<Entry>("log entry", &v)?);
        }
        Ok(entries)
    }
}

fn bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        self.read_range(start, end)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self
            .storage
            .get(Cf::RaftState, &keys::state_key(self.group, TAG_VOTE))?
        {
            Some(v) => Ok(Some(decode("vote", &v)?)),
            None => Ok(None),
        }
    }
}

impl LogStore {
    /// Writes `batch` and returns once it is on disk, through the group
    /// commit: the fsync runs on the syncer thread, shared with whatever
    /// else waits for one, instead of blocking a runtime thread.
    async fn write_durably(&self, batch: WriteBatch) -> Result<(), io::Error> {
        let (done, synced) = tokio::sync::oneshot::channel();
        self.storage
            .write_then_sync(
                batch,
                Box::new(move |result| {
                    let _ = done.send(result);
                }),
            )
            .await?;
        synced
            .await
            .map_err(|_| io::Error::other("the syncer stopped before the write was on disk"))?
            .map_err(io::Error::other)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let tail = self.tail.lock().expect("log tail lock");
        Ok(LogState {
            last_purged_log_id: tail.last_purged,
            last_log_id: tail.last_log,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Durable before it returns, like every vote, but through the group
    /// commit: when a node dies, the hundreds of groups it led elect at once,
    /// and one fsync per vote, each blocking a runtime thread, made that
    /// election storm take seconds.
    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.storage.cf(Cf::RaftState),
            keys::state_key(self.group, TAG_VOTE),
            encode(vote),
        );
        self.write_durably(batch).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.storage.cf(Cf::RaftState),
            keys::state_key(self.group, TAG_COMMITTED),
            encode(&committed),
        );
        self.storage
            .write_patiently(batch, Durability::Buffered)
            .await?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self
            .storage
            .get(Cf::RaftState, &keys::state_key(self.group, TAG_COMMITTED))?
        {
            Some(v) => decode("committed log id", &v),
            None => Ok(None),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.storage.cf(Cf::RaftLog);
        let mut batch = WriteBatch::default();
        let mut last = None;
        for entry in entries {
            batch.put_cf(
                cf,
                keys::log_key(self.group, entry.log_id.index),
                encode(&entry),
            );
            last = Some(entry.log_id);
        }
        let Some(last) = last else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        // openraft serializes log IO, so no other append or truncate races
        // this update of the cached tail.
        self.tail.lock().expect("log tail lock").last_log = Some(last);
        self.storage
            .write_then_sync(
                batch,
                Box::new(move |result| callback.io_completed(result.map_err(io::Error::other))),
            )
            .await?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.as_ref().map_or(0, |l| l.index + 1);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.storage.cf(Cf::RaftLog),
            keys::log_key(self.group, from),
            keys::log_key(self.group, u64::MAX),
        );
        self.write_durably(batch).await?;
        let mut tail = self.tail.lock().expect("log tail lock");
        let current = tail.last_log.as_ref().map(|l| l.index);
        let kept = last_log_id.as_ref().map(|l| l.index);
        // Truncating after a point beyond the tail removes nothing.
        if kept < current {
            tail.last_log = last_log_id.or_else(|| tail.last_purged);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.storage.cf(Cf::RaftState),
            keys::state_key(self.group, TAG_PURGED),
            encode(&Some(log_id)),
        );
        batch.delete_range_cf(
            self.storage.cf(Cf::RaftLog),
            keys::log_key(self.group, 0),
            keys::log_key(self.group, log_id.index + 1),
        );
        self.storage
            .write_patiently(batch, Durability::Buffered)
            .await?;
        let mut tail = self.tail.lock().expect("log tail lock");
        if tail
            .last_log
            .as_ref()
            .is_none_or(|l| l.index < log_id.index)
        {
            tail.last_log = Some(log_id);
        }
        tail.last_purged = Some(log_id);
        Ok(())
    }
}

/// Removes every trace of a group's log (the group left this node).
pub fn delete_group_log(storage: &Storage, group: u64) -> io::Result<()> {
    let (from, to) = keys::group_bounds(group);
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(storage.cf(Cf::RaftLog), &from, &to);
    batch.delete_range_cf(storage.cf(Cf::RaftState), &from, &to);
    storage.write_durable(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kinesin_storage::FsyncPolicy;

    use super::*;

    /// Issue 18 item 13: a vote or a truncation is made durable by the
    /// syncer thread's group commit, not by an fsync on the thread that
    /// runs the group (a tokio worker, which such an fsync would block).
    /// While the syncer is held back, neither may finish.
    #[tokio::test(flavor = "current_thread")]
    async fn votes_and_truncations_wait_for_the_syncer_instead_of_syncing_here() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        let mut log = LogStore::open(storage.clone(), 7).unwrap();
        let vote = Vote::new(3, 1);
        held_until_synced(&storage, "a vote", log.save_vote(&vote)).await;
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        held_until_synced(&storage, "a truncation", log.truncate_after(None)).await;
    }

    /// Runs `op` while the syncer is held: it must still be pending after
    /// a while. Then lets the syncer go and waits for `op` to finish.
    async fn held_until_synced<T, E: std::fmt::Debug>(
        storage: &Storage,
        what: &str,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> T {
        let hold = storage.hold_syncs();
        let mut op = std::pin::pin!(op);
        let held = tokio::time::timeout(Duration::from_millis(300), op.as_mut()).await;
        assert!(held.is_err(), "{what} was acknowledged without the syncer");
        drop(hold);
        op.await.unwrap()
    }
}
