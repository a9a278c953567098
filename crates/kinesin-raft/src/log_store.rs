//! The Raft log of one group, kept in the node's RocksDB. Appends are written
//! at once (so they are readable when `append` returns) and acknowledged to
//! openraft only after the shared syncer has fsynced the WAL. Every write
//! waits out a full disk instead of failing: openraft stops a group for
//! good on a storage error, and the group would stay dead after space is
//! freed.
//!
//! The newest entries are also kept in memory, decoded: right after an
//! append, the leader's replication to each follower and then every
//! replica's apply read them back, and reading them from RocksDB (a scan
//! and a decode per reader) took a twentieth of a busy leader's CPU. The
//! copy mirrors every append, truncation and purge; whatever it does not
//! hold is read from RocksDB as before. All the groups of a node share one
//! byte budget for their copies ([`TailBudget`]).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicUsize, Ordering};
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

struct Tail {
    last_purged: Option<LogId>,
    last_log: Option<LogId>,
    recent: Recent,
}

/// At most this many of a group's newest entries are kept in memory...
const RECENT_ENTRIES: usize = 64;
/// ...and at most this many of their encoded bytes: a node runs hundreds of
/// groups, and a larger entry (a big PutRecords) is read from RocksDB.
const RECENT_BYTES: usize = 128 << 10;

/// What all the groups of a node keep in memory together: an idle group
/// keeps its copy until its next purge, so without a bound a node of
/// thousands of groups would hold up to 128 KiB for each.
pub const NODE_TAIL_BYTES: usize = 64 << 20;

/// The bytes of decoded entries that the groups of a node keep in memory
/// together. First come, first served: a group whose next entry would pass
/// the limit keeps none (its reads go to RocksDB) until others give some
/// back by trimming, truncating, purging or closing.
pub struct TailBudget {
    limit: usize,
    used: AtomicUsize,
}

impl TailBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(TailBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// The bytes kept now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The newest entries of the log, consecutive, each with its encoded size.
struct Recent {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
    budget: Arc<TailBudget>,
}

impl Drop for Recent {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

impl Recent {
    fn new(budget: Arc<TailBudget>) -> Self {
        Recent {
            entries: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.budget.give(self.bytes);
        self.bytes = 0;
    }

    /// Adds an appended entry. One that does not follow the newest kept
    /// entry (the first after a snapshot, say) starts the copy afresh; one
    /// too large to keep, for the group or within the node's budget, leaves
    /// it empty, so that it never has a gap.
    fn push(&mut self, entry: Entry, size: usize) {
        if size > RECENT_BYTES {
            self.clear();
            return;
        }
        if self
            .last_index()
            .is_some_and(|last| last + 1 != entry.log_id.index)
        {
            self.clear();
        }
        while !self.entries.is_empty()
            && (self.entries.len() >= RECENT_ENTRIES || self.bytes + size > RECENT_BYTES)
        {
            self.pop_front();
        }
        if !self.budget.take(size) {
            self.clear();
            return;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
    }

    /// Drops the entries after `kept` (all of them if None).
    fn truncate_after(&mut self, kept: Option<u64>) {
        while self
            .last_index()
            .is_some_and(|last| kept.is_none_or(|k| last > k))
        {
            self.pop_back();
        }
    }

    /// Drops the entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
            self.budget.give(size);
        }
    }

    fn pop_back(&mut self) {
        if let Some((_, size)) = self.entries.pop_back() {
            self.bytes -= size;
            self.budget.give(size);
        }
    }

    /// The entries `start..end` if all of them are here; `last_log` is the
    /// log's newest entry, for a range that reaches past the newest kept.
    fn read(&self, start: u64, end: u64, last_log: Option<u64>) -> Option<Vec<Entry>> {
        let (first, last) = (self.first_index()?, self.last_index()?);
        if start < first {
            return None;
        }
        let end = if end > last + 1 {
            if last_log != Some(last) {
                return None;
            }
            last + 1
        } else {
            end
        };
        if start >= end {
            return Some(Vec::new());
        }
        let (from, to) = ((start - first) as usize, (end - first) as usize);
        Some(
            self.entries
                .range(from..to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

impl LogStore {
    /// `budget` is shared by the node's groups (see [`TailBudget`]).
    pub fn open(storage: Storage, group: u64, budget: Arc<TailBudget>) -> io::Result<Self> {
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
                recent: Recent::new(budget),
            })),
        })
    }

    fn read_range(&self, start: u64, end_exclusive: u64) -> io::Result<Vec<Entry>> {
        if start >= end_exclusive {
            return Ok(Vec::new());
        }
        {
            let tail = self.tail.lock().expect("log tail lock");
            let last_log = tail.last_log.as_ref().map(|l| l.index);
            if let Some(entries) = tail.recent.read(start, end_exclusive, last_log) {
                return Ok(entries);
            }
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
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = encode(&entry);
            batch.put_cf(cf, keys::log_key(self.group, entry.log_id.index), &bytes);
            appended.push((entry, bytes.len()));
        }
        let Some(last) = appended.last().map(|(e, _)| e.log_id) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        // openraft serializes log IO, so no other append or truncate races
        // this update of the cached tail.
        {
            let mut tail = self.tail.lock().expect("log tail lock");
            tail.last_log = Some(last);
            for (entry, size) in appended {
                tail.recent.push(entry, size);
            }
        }
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
        // The copy first: until RocksDB has dropped the entries a read past
        // the trimmed copy goes to RocksDB, never the other way round.
        self.tail
            .lock()
            .expect("log tail lock")
            .recent
            .truncate_after(last_log_id.as_ref().map(|l| l.index));
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
        self.tail
            .lock()
            .expect("log tail lock")
            .recent
            .purge(log_id.index);
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
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::EntryPayload;

    use super::*;
    use crate::types::Command;

    /// Issue 18 item 13: a vote or a truncation is made durable by the
    /// syncer thread's group commit, not by an fsync on the thread that
    /// runs the group (a tokio worker, which such an fsync would block).
    /// While the syncer is held back, neither may finish.
    #[tokio::test(flavor = "current_thread")]
    async fn votes_and_truncations_wait_for_the_syncer_instead_of_syncing_here() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        let mut log = LogStore::open(storage.clone(), 7, unbounded()).unwrap();
        let vote = Vote::new(3, 1);
        held_until_synced(&storage, "a vote", log.save_vote(&vote)).await;
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        held_until_synced(&storage, "a truncation", log.truncate_after(None)).await;
    }

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(LeaderId { term, node_id: 1 }, index)
    }

    fn entry(term: u64, index: u64, bytes: usize) -> Entry {
        Entry {
            log_id: id(term, index),
            payload: EntryPayload::Normal(Command(vec![term as u8; bytes])),
        }
    }

    fn unbounded() -> Arc<TailBudget> {
        TailBudget::new(usize::MAX)
    }

    fn indexes(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    /// The in-memory copy answers only ranges it holds whole, and keeps to
    /// its bounds: consecutive entries, a count, a byte budget.
    #[test]
    fn recent_entries_answer_only_what_they_hold_whole() {
        let mut recent = Recent::new(unbounded());
        assert!(recent.read(1, 2, None).is_none(), "empty");
        for i in 1..=5 {
            recent.push(entry(1, i, 10), 10);
        }
        assert_eq!(
            indexes(&recent.read(2, 4, Some(5)).unwrap()),
            [(1, 2), (1, 3)]
        );
        assert_eq!(
            recent.read(4, u64::MAX, Some(5)).unwrap().len(),
            2,
            "to the end"
        );
        assert!(
            recent.read(7, u64::MAX, Some(5)).unwrap().is_empty(),
            "past the end"
        );
        assert!(
            recent.read(4, u64::MAX, Some(6)).is_none(),
            "the log goes on"
        );
        assert!(
            recent.read(0, 3, Some(5)).is_none(),
            "before the first kept"
        );

        recent.push(entry(1, 9, 10), 10);
        assert_eq!(recent.first_index(), Some(9), "a gap starts afresh");

        for i in 10..10 + RECENT_ENTRIES as u64 {
            recent.push(entry(1, i, 10), 10);
        }
        assert_eq!(recent.entries.len(), RECENT_ENTRIES);
        assert_eq!(recent.first_index(), Some(10), "the oldest left first");

        recent.push(
            entry(1, 10 + RECENT_ENTRIES as u64, RECENT_BYTES + 1),
            RECENT_BYTES + 1,
        );
        assert!(
            recent.entries.is_empty(),
            "too large to keep: nothing is kept"
        );
        assert_eq!(recent.bytes, 0);
        for i in 100..104 {
            recent.push(entry(1, i, RECENT_BYTES / 3), RECENT_BYTES / 3);
        }
        assert_eq!(recent.first_index(), Some(101), "the byte budget");
        assert!(recent.bytes <= RECENT_BYTES);

        recent.truncate_after(Some(102));
        recent.purge(101);
        assert_eq!(
            indexes(&recent.read(102, 103, Some(102)).unwrap()),
            [(1, 102)]
        );
        recent.truncate_after(None);
        assert!(recent.entries.is_empty() && recent.bytes == 0);
    }

    /// The groups of a node keep their copies within one budget: a copy
    /// whose next entry would pass it keeps none, and the bytes others give
    /// back (a purge, a closed group) let it keep entries again.
    #[test]
    fn the_copies_of_all_groups_keep_within_the_node_budget() {
        let budget = TailBudget::new(30);
        let mut a = Recent::new(budget.clone());
        let mut b = Recent::new(budget.clone());
        for i in 1..=3 {
            a.push(entry(1, i, 10), 10);
        }
        assert_eq!(budget.used(), 30);
        b.push(entry(1, 1, 10), 10);
        assert!(b.entries.is_empty(), "past the budget: nothing kept");
        assert!(b.read(1, 2, Some(1)).is_none(), "read from RocksDB");

        a.purge(1);
        assert_eq!(budget.used(), 20);
        b.push(entry(1, 2, 10), 10);
        assert_eq!(b.first_index(), Some(2));
        a.push(entry(1, 4, 10), 10);
        assert!(a.entries.is_empty() && a.bytes == 0, "a full budget");
        assert_eq!(budget.used(), 10, "what a held is given back");

        drop(b);
        assert_eq!(budget.used(), 0, "a closed group gives back its bytes");
    }

    /// After a truncation and appends of a new term over the same indexes,
    /// a read answers the new entries, as RocksDB holds them.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_after_a_truncation_see_the_new_term() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let mut log = LogStore::open(storage.clone(), 7, unbounded()).unwrap();
        let entries = |term, indexes: std::ops::RangeInclusive<u64>| {
            indexes.map(move |i| entry(term, i, 8)).collect::<Vec<_>>()
        };
        let flushed = IOFlushed::noop;
        log.append(entries(1, 1..=6), flushed()).await.unwrap();
        log.truncate_after(Some(id(1, 3))).await.unwrap();
        let kept = log.try_get_log_entries(2..7).await.unwrap();
        assert_eq!(indexes(&kept), [(1, 2), (1, 3)], "the truncated are gone");
        log.append(entries(2, 4..=5), flushed()).await.unwrap();
        let want = [(1, 2), (1, 3), (2, 4), (2, 5)];
        assert_eq!(indexes(&log.try_get_log_entries(2..).await.unwrap()), want);
        let fresh = LogStore::open(storage, 7, unbounded()).unwrap();
        let stored = fresh.read_range(2, u64::MAX).unwrap();
        assert_eq!(indexes(&stored), want, "RocksDB");
        log.purge(id(2, 4)).await.unwrap();
        let after_purge = log.try_get_log_entries(4..6).await.unwrap();
        assert_eq!(indexes(&after_purge), [(2, 5)], "the purged are gone");
    }

    /// An entry too large to keep amid a batch, and a purge past the newest
    /// entry followed by appends (as after a snapshot is installed), leave
    /// reads answering what RocksDB holds.
    #[tokio::test(flavor = "current_thread")]
    async fn reads_match_rocksdb_around_a_large_entry_and_a_purge_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let mut log = LogStore::open(storage.clone(), 7, unbounded()).unwrap();
        let batch = vec![
            entry(1, 1, 8),
            entry(1, 2, RECENT_BYTES + 1),
            entry(1, 3, 8),
        ];
        log.append(batch, IOFlushed::noop()).await.unwrap();
        let read = log.try_get_log_entries(1..4).await.unwrap();
        assert_eq!(indexes(&read), [(1, 1), (1, 2), (1, 3)]);
        assert_eq!(
            read[1],
            entry(1, 2, RECENT_BYTES + 1),
            "the large entry whole"
        );

        log.purge(id(1, 10)).await.unwrap();
        assert!(log.try_get_log_entries(1..11).await.unwrap().is_empty());
        let after = vec![entry(2, 11, 8), entry(2, 12, 8)];
        log.append(after, IOFlushed::noop()).await.unwrap();
        let want = [(2, 11), (2, 12)];
        assert_eq!(indexes(&log.try_get_log_entries(..).await.unwrap()), want);
        let fresh = LogStore::open(storage, 7, unbounded()).unwrap();
        assert_eq!(
            indexes(&fresh.read_range(0, u64::MAX).unwrap()),
            want,
            "RocksDB"
        );
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
