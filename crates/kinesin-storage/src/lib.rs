//! The node's storage engine: one RocksDB per node with a column family per
//! kind of data, key encodings, and the group-commit syncer that lets the
//! appends of many Raft groups share one WAL fsync.

pub mod data_version;
mod disk;
pub mod keys;
mod syncer;

use std::path::Path;
use std::sync::Arc;

/// RocksDB's counters of the work done on the calling thread: tests use them
/// to see that scans run on blocking threads, not on the async runtime's.
pub use rocksdb::perf;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteOptions, DB};
pub use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use disk::Disk;
pub use disk::{disk_space, DiskSpace};
use syncer::Syncer;
pub use syncer::{FsyncPolicy, SyncCallback, SyncHold};

/// Column families. Every key in them starts with the group id (see [`keys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    /// Raft log entries: group | index.
    RaftLog,
    /// Raft vote, committed and purged log ids: group | tag.
    RaftState,
    /// Shard records: group | sequence number.
    Records,
    /// Arrival-time index of records: group | time ms | sequence number.
    RecordTime,
    /// State-machine state other than records: group | name.
    StateMachine,
    /// Snapshots being received, before they are installed: group | key.
    Staging,
    /// Node identity (cluster id, node id).
    Node,
    /// Rows of group kinds whose rows change (a queue's messages): group |
    /// the kind's key.
    Rows,
    /// Rows copied when a snapshot of such a kind was built, read when it
    /// is sent: group | snapshot index | tag | key.
    SnapshotCopies,
}

impl Cf {
    pub const ALL: [Cf; 9] = [
        Cf::RaftLog,
        Cf::RaftState,
        Cf::Records,
        Cf::RecordTime,
        Cf::StateMachine,
        Cf::Staging,
        Cf::Node,
        Cf::Rows,
        Cf::SnapshotCopies,
    ];

    /// The families a Raft snapshot may carry rows of, with the tag that
    /// names each on the wire and in `Staging`. Only these can be written
    /// by a received snapshot.
    pub const SNAPSHOT_ROWS: [(u8, Cf); 3] = [(1, Cf::Records), (2, Cf::RecordTime), (3, Cf::Rows)];

    /// The family a snapshot row tag names.
    pub fn of_snapshot_tag(tag: u8) -> Option<Cf> {
        Cf::SNAPSHOT_ROWS
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, cf)| *cf)
    }

    /// The tag of a family snapshots may carry.
    pub fn snapshot_tag(self) -> Option<u8> {
        Cf::SNAPSHOT_ROWS
            .iter()
            .find(|(_, cf)| *cf == self)
            .map(|(t, _)| *t)
    }

    pub fn name(self) -> &'static str {
        match self {
            Cf::RaftLog => "raft_log",
            Cf::RaftState => "raft_state",
            Cf::Records => "records",
            Cf::RecordTime => "record_time",
            Cf::StateMachine => "state_machine",
            Cf::Staging => "staging",
            Cf::Node => "node",
            Cf::Rows => "rows",
            Cf::SnapshotCopies => "snapshot_copies",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("storage closed")]
    Closed,
    #[error("corrupt value under {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl StorageError {
    /// RocksDB refused for lack of space: the write failed, or an earlier
    /// one (or a flush) did and RocksDB now refuses every write until it
    /// has recovered, which it does by itself once space is freed.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StorageError::Rocks(e) if disk::is_no_space(e))
    }
}

/// How a write reaches the disk: see [`Storage::write`],
/// [`Storage::write_durable`] and [`Storage::write_unlogged`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Buffered,
    Durable,
    Unlogged,
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        std::io::Error::other(e)
    }
}

/// The key [`sync_in_write_queue`] writes in [`Cf::Node`].
const SYNC_KEY: &[u8] = b"sync";

/// Makes every write so far durable: away from a full disk with
/// `flush_wal(true)`, beside RocksDB's write queue, else through it (see
/// [`disk`]).
pub(crate) fn sync_wal(db: &DB, disk: &Disk) -> Result<(), StorageError> {
    disk.sync_beside_writes(db).unwrap_or_else(|| {
        metrics::counter!("kinesin_storage_fsyncs_in_write_queue_total").increment(1);
        disk.outcome(sync_in_write_queue(db))
    })
}

/// A tiny write with `sync` set, which fsyncs the WAL up to and including
/// it. Other writes wait behind it in RocksDB's write queue. Not
/// `flush_wal(true)` once a write may have failed: that syncs the WAL file
/// without RocksDB's write path, so after a write has failed (a full disk)
/// it syncs the file the failure left behind, gets "Writer has previous
/// error" and RocksDB takes that as fatal and never resumes. The write
/// path refuses while the database is stopped, with the error that
/// stopped it.
fn sync_in_write_queue(db: &DB) -> Result<(), rocksdb::Error> {
    let mut batch = WriteBatch::default();
    let cf = db
        .cf_handle(Cf::Node.name())
        .expect("every column family is created at open");
    batch.put_cf(cf, SYNC_KEY, []);
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.disk.close();
    }
}

/// See [`Storage::view`].
pub struct View<'a> {
    storage: &'a Storage,
    snapshot: rocksdb::Snapshot<'a>,
}

impl View<'_> {
    /// Forward iteration over `cf` from `from` (inclusive) to `to`
    /// (exclusive), as the view shows it.
    pub fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StorageError>> + '_ {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to.to_vec());
        self.snapshot
            .iterator_cf_opt(
                self.storage.cf(cf),
                opts,
                IteratorMode::From(from, Direction::Forward),
            )
            .map(|r| r.map_err(StorageError::from))
    }
}

/// A key and its value, as iteration yields them.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// A batch to write until the disk takes it. A write consumes its batch,
/// failed or not, so the first attempt writes the batch itself and later
/// ones a copy of its bytes (taken up front: one copy per write).
pub struct RetriedBatch {
    first: Option<WriteBatch>,
    bytes: Vec<u8>,
}

impl RetriedBatch {
    pub fn new(batch: WriteBatch) -> Self {
        RetriedBatch {
            bytes: batch.data().to_vec(),
            first: Some(batch),
        }
    }

    /// The batch for the next attempt.
    pub fn attempt(&mut self) -> WriteBatch {
        self.first
            .take()
            .unwrap_or_else(|| WriteBatch::from_data(&self.bytes))
    }
}

/// The node's RocksDB instance. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    disk: Arc<Disk>,
    syncer: Syncer,
}

impl Storage {
    pub fn open(path: &Path, policy: FsyncPolicy) -> Result<Self, StorageError> {
        Self::open_with(path, policy, false)
    }

    /// Opens the storage so that a crash behaves like a power failure: WAL
    /// writes stay in RocksDB's in-process buffer until a sync writes and
    /// fsyncs them, so `kill -9` loses what no sync covered (only what the
    /// buffer held: a full buffer still goes to the OS unsynced). For the
    /// chaos harness's power-fail fault; never for real data.
    pub fn open_losing_unsynced_on_crash(
        path: &Path,
        policy: FsyncPolicy,
    ) -> Result<Self, StorageError> {
        Self::open_with(path, policy, true)
    }

    fn open_with(
        path: &Path,
        policy: FsyncPolicy,
        buffer_wal_in_process: bool,
    ) -> Result<Self, StorageError> {
        let mut opts = Options::default();
        opts.set_manual_wal_flush(buffer_wal_in_process);
        // A torn last record is what a crash leaves; damage anywhere else in
        // the WAL is data this node fsynced and may have promised to Raft
        // (votes, log entries). RocksDB's default (point-in-time recovery)
        // would silently drop everything from the damage on and the node
        // would rejoin with a shorter log; refuse to open instead.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        opts.set_max_total_wal_size(256 << 20);
        // State machines write without the WAL (`write_unlogged`); flushing
        // every column family at one point keeps what a flush persisted
        // consistent across them (records with the applied index).
        opts.set_atomic_flush(true);
        // Closing is a crash as far as those writes go: RocksDB would flush
        // them at close, so a stop that skipped `persist` (a node's
        // graceful stop persists) would leave more behind than a kill -9,
        // and in-process tests that stop a node would never see state
        // machines rebuilt from the log. The Rust binding has no setter.
        let opts = opts.get_options_from_string("avoid_flush_during_shutdown=true")?;
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = Options::default();
            if matches!(cf, Cf::Records | Cf::RaftLog) {
                o.set_write_buffer_size(64 << 20);
                o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        let disk = Disk::start(&db, path);
        let syncer = Syncer::start(db.clone(), disk.clone(), policy);
        Ok(Storage {
            inner: Arc::new(Inner { db, disk, syncer }),
        })
    }

    pub fn db(&self) -> &DB {
        &self.inner.db
    }

    pub fn cf(&self, cf: Cf) -> &ColumnFamily {
        self.inner
            .db
            .cf_handle(cf.name())
            .expect("every column family is created at open")
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.inner.db.get_cf(self.cf(cf), key)?)
    }

    /// The values of `keys`, in their order: one RocksDB MultiGet, which
    /// looks keys up together (one memtable and version reference, a block
    /// read once for the keys it holds) where one `get` per key repeats all
    /// of that per key.
    pub fn multi_get(
        &self,
        cf: Cf,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        self.inner
            .db
            .batched_multi_get_cf(self.cf(cf), keys, false)
            .into_iter()
            .map(|value| Ok(value?.map(|v| v.to_vec())))
            .collect()
    }

    /// Writes and fsyncs the WAL before returning (votes, node identity).
    pub fn write_durable(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write_as(batch, Durability::Durable)
    }

    /// Writes without waiting for the disk: readable at once, lost on a crash
    /// unless a later sync covers it (the WAL is ordered, so any later sync
    /// does).
    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write_as(batch, Durability::Buffered)
    }

    /// Writes without the WAL: readable at once, but only in memory until a
    /// memtable flush persists it (every column family at one point, so a
    /// crash leaves a consistent earlier state). For state the Raft log
    /// re-derives after a crash: a shard's applied records are then written
    /// and checksummed once in the WAL (as log entries), not twice.
    pub fn write_unlogged(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.write_as(batch, Durability::Unlogged)
    }

    /// Writes `batch` as `how` says.
    pub fn write_as(&self, batch: WriteBatch, how: Durability) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        match how {
            Durability::Buffered => opts.set_sync(false),
            Durability::Durable => opts.set_sync(self.inner.syncer.policy() == FsyncPolicy::Always),
            Durability::Unlogged => opts.disable_wal(true),
        }
        let logged = how != Durability::Unlogged;
        self.inner.disk.write(&self.inner.db, batch, &opts, logged)
    }

    /// Writes `batch` as `how` says, waiting out a full disk instead of
    /// failing: while RocksDB refuses writes for lack of space, the write
    /// is retried once a probe finds it writable again. For the writes of
    /// Raft's log and state machines, where a failure stops the group for
    /// good. Other errors return at once.
    pub async fn write_patiently(
        &self,
        batch: WriteBatch,
        how: Durability,
    ) -> Result<(), StorageError> {
        let mut batch = RetriedBatch::new(batch);
        self.patiently(|| self.write_as(batch.attempt(), how)).await
    }

    /// [`Storage::write_patiently`] for blocking threads.
    pub fn write_patiently_blocking(
        &self,
        batch: WriteBatch,
        how: Durability,
    ) -> Result<(), StorageError> {
        let mut batch = RetriedBatch::new(batch);
        self.inner
            .disk
            .retry_blocking(|| self.write_as(batch.attempt(), how))
    }

    /// Runs `op` until it ends otherwise than for lack of space
    /// ([`StorageError::is_no_space`]), waiting between tries until writes
    /// work again. Unlike the blocking retries it does not stop when the
    /// storage closes: its task ends with the runtime.
    pub async fn patiently<T>(
        &self,
        mut op: impl FnMut() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        loop {
            match op() {
                Err(e) if e.is_no_space() => self.inner.disk.writable().await,
                other => return other,
            }
        }
    }

    /// Waits until writes work again after [`StorageError::is_no_space`]
    /// (returns at once if the disk has room).
    pub async fn writable(&self) {
        self.inner.disk.writable().await
    }

    /// Whether RocksDB refuses writes for lack of space (the last write
    /// found it so and no write or probe has succeeded since). Reads go on.
    pub fn disk_full(&self) -> bool {
        self.inner.disk.full()
    }

    /// Persists everything written so far, unlogged writes included: flushes
    /// every memtable (atomically) and syncs the WAL.
    pub fn persist(&self) -> Result<(), StorageError> {
        let cfs: Vec<&ColumnFamily> = Cf::ALL.iter().map(|cf| self.cf(*cf)).collect();
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        self.inner
            .disk
            .outcome(self.inner.db.flush_cfs_opt(&cfs, &opts))?;
        self.sync()
    }

    /// [`Storage::persist`], waiting out a full disk (blocking).
    pub fn persist_patiently_blocking(&self) -> Result<(), StorageError> {
        self.inner.disk.retry_blocking(|| self.persist())
    }

    /// Writes now (waiting out a full disk) and calls `done` once the WAL
    /// holding the write is on disk. Callbacks queued while a sync runs
    /// share the next one (group commit).
    pub async fn write_then_sync(
        &self,
        batch: WriteBatch,
        done: SyncCallback,
    ) -> Result<(), StorageError> {
        self.write_patiently(batch, Durability::Buffered).await?;
        self.inner.syncer.enqueue(done);
        Ok(())
    }

    /// Holds back the group commit until the returned guard is dropped:
    /// writes go on, but no callback of [`Storage::write_then_sync`] runs
    /// meanwhile. For tests that check a write waits for the syncer instead
    /// of syncing on its caller's thread.
    pub fn hold_syncs(&self) -> SyncHold {
        self.inner.syncer.hold()
    }

    /// Waits until everything written so far is on disk.
    pub fn sync(&self) -> Result<(), StorageError> {
        if self.inner.syncer.policy() == FsyncPolicy::Always {
            sync_wal(&self.inner.db, &self.inner.disk)?;
        }
        Ok(())
    }

    /// [`Storage::sync`], waiting out a full disk (blocking).
    pub fn sync_patiently_blocking(&self) -> Result<(), StorageError> {
        self.inner.disk.retry_blocking(|| self.sync())
    }

    /// Forward iteration over `cf` from `from` (inclusive) to `to` (exclusive).
    pub fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StorageError>> + '_ {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to.to_vec());
        self.inner
            .db
            .iterator_cf_opt(
                self.cf(cf),
                opts,
                IteratorMode::From(from, Direction::Forward),
            )
            .map(|r| r.map_err(StorageError::from))
    }

    /// A read view of the whole database as it is now, unchanged by later
    /// writes (a RocksDB snapshot).
    pub fn view(&self) -> View<'_> {
        View {
            storage: self,
            snapshot: self.inner.db.snapshot(),
        }
    }

    /// Backward iteration over `cf` from just below `to` down to `from` (inclusive).
    pub fn scan_rev(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StorageError>> + '_ {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(from.to_vec());
        opts.set_iterate_upper_bound(to.to_vec());
        self.inner
            .db
            .iterator_cf_opt(self.cf(cf), opts, IteratorMode::End)
            .map(|r| r.map_err(StorageError::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_batch_writes_the_same_on_every_attempt() {
        let mut batch = WriteBatch::default();
        batch.put(b"k", b"v");
        let data = batch.data().to_vec();
        let mut retried = RetriedBatch::new(batch);
        assert_eq!(retried.attempt().data(), data);
        assert_eq!(retried.attempt().data(), data, "a copy after the first");
    }

    #[test]
    fn multi_get_answers_in_the_order_asked_from_memtable_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).unwrap();
        let put = |key: &[u8], value: &[u8]| {
            let mut batch = WriteBatch::default();
            batch.put_cf(storage.cf(Cf::Rows), key, value);
            storage.write(batch).unwrap();
        };
        put(b"a", b"in a file");
        put(b"c", b"in a file too");
        storage.persist().unwrap();
        put(b"b", b"in the memtable");
        let keys = [&b"c"[..], b"missing", b"a", b"b"].map(<[u8]>::to_vec);
        let got = storage.multi_get(Cf::Rows, &keys).unwrap();
        let want: [Option<&[u8]>; 4] = [
            Some(b"in a file too"),
            None,
            Some(b"in a file"),
            Some(b"in the memtable"),
        ];
        assert_eq!(got, want.map(|v| v.map(<[u8]>::to_vec)));
        assert!(storage.multi_get(Cf::Rows, &[]).unwrap().is_empty());
    }

    #[tokio::test]
    async fn write_then_sync_calls_back_after_sync_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            for i in 0..100u64 {
                let mut batch = WriteBatch::default();
                batch.put_cf(storage.cf(Cf::RaftLog), keys::log_key(7, i), b"entry");
                let tx = tx.clone();
                storage
                    .write_then_sync(batch, Box::new(move |r| tx.send(r.is_ok()).unwrap()))
                    .await
                    .unwrap();
            }
            for _ in 0..100 {
                assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
            }
        }
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        let (from, to) = keys::group_bounds(7);
        assert_eq!(storage.scan(Cf::RaftLog, &from, &to).count(), 100);
    }

    #[test]
    fn a_close_without_persist_loses_unlogged_writes_as_a_crash_does() {
        let dir = tempfile::tempdir().unwrap();
        let put = |storage: &Storage, key: &[u8], how: Durability| {
            let mut batch = WriteBatch::default();
            batch.put_cf(storage.cf(Cf::Rows), key, b"v");
            storage.write_as(batch, how).unwrap();
        };
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        put(&storage, b"unlogged", Durability::Unlogged);
        put(&storage, b"logged", Durability::Durable);
        drop(storage);
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        assert_eq!(storage.get(Cf::Rows, b"unlogged").unwrap(), None);
        assert!(storage.get(Cf::Rows, b"logged").unwrap().is_some());
        put(&storage, b"persisted", Durability::Unlogged);
        storage.persist().unwrap();
        drop(storage);
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        assert!(storage.get(Cf::Rows, b"persisted").unwrap().is_some());
    }

    /// Writes 200 synced 1 KiB entries and returns the WAL file holding them.
    fn synced_wal(dir: &Path) -> std::path::PathBuf {
        let storage = Storage::open(dir, FsyncPolicy::Always).unwrap();
        for i in 0..200u64 {
            let mut batch = WriteBatch::default();
            batch.put_cf(storage.cf(Cf::RaftLog), keys::log_key(7, i), [7u8; 1024]);
            storage.write_durable(batch).unwrap();
        }
        drop(storage);
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .expect("a WAL file")
    }

    #[test]
    fn damage_inside_the_wal_refuses_to_open_instead_of_dropping_synced_data() {
        let dir = tempfile::tempdir().unwrap();
        let wal = synced_wal(dir.path());
        let mut bytes = std::fs::read(&wal).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        std::fs::write(&wal, bytes).unwrap();
        let err = Storage::open(dir.path(), FsyncPolicy::Always)
            .err()
            .expect("a damaged WAL must not open");
        assert!(err.to_string().contains("Corruption"), "{err}");
    }

    #[test]
    fn a_torn_last_record_is_a_crash_and_opens_with_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let wal = synced_wal(dir.path());
        let len = std::fs::metadata(&wal).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .unwrap()
            .set_len(len - 500)
            .unwrap();
        let storage = Storage::open(dir.path(), FsyncPolicy::Always).unwrap();
        let (from, to) = keys::group_bounds(7);
        assert_eq!(storage.scan(Cf::RaftLog, &from, &to).count(), 199);
    }
}
