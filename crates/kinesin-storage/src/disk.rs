//! A full disk. When a write (or a flush) fails for lack of space, RocksDB
//! refuses every write until it has recovered: its file manager checks the
//! free space every 5 seconds and resumes the database (flushing the
//! memtables, so that writes whose WAL sync failed are persisted) once
//! there is room. Reads go on meanwhile.
//!
//! This module remembers that the disk is full, so that callers can refuse
//! new work early, and runs a probe that tries a tiny write every second
//! while it is, so that everyone waiting learns when writes work again.
//! The retries rely on RocksDB's `paranoid_checks` (on by default): a failed
//! WAL write or sync stops the database, and only a resume (which flushes
//! the memtables) lets a probe succeed, so a sync retried after the probe
//! cannot report data as durable that the failed one lost. Near a full
//! disk, syncs are synced writes (`sync_in_write_queue`), which the
//! stopped database refuses with its no-space error, never a bare sync of
//! the WAL file a failure left behind.
//!
//! Away from it a sync fsyncs the WAL file beside the write queue
//! (`flush_wal(true)`), so that writes go on during the fsync. That is safe
//! only while no WAL write has failed, and RocksDB checks for a failed one
//! when the sync starts. [`Disk::sync_beside_writes`] therefore runs only
//! while no write of this process has ever failed and the file system has
//! [`SYNC_BESIDE_ROOM`] free just before the sync starts. Logged writes of
//! [`LARGE_WRITE`] or more wait for such a sync to end (and it for them),
//! so the writes that can race its start (a RocksDB write group is at most
//! one batch plus 1 MiB) cannot fill that room.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use rocksdb::{WriteBatch, WriteOptions, DB};
use tokio::sync::watch;

use crate::{Cf, StorageError};

/// How often the probe tries a write while the disk is full.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The probe's key in [`Cf::Node`]: a counter of probes.
const PROBE_KEY: &[u8] = b"disk-probe";
/// The free space below which syncs go through the write queue.
const SYNC_BESIDE_ROOM: u64 = 64 << 20;
/// Logged writes this large exclude a sync beside the write queue.
const LARGE_WRITE: usize = 16 << 20;

/// Whether RocksDB's error says it lacks space (`Status::NoSpace`, which
/// prints as the operating system's ENOSPC message).
pub(crate) fn is_no_space(e: &rocksdb::Error) -> bool {
    e.as_ref().contains("No space left on device")
}

/// The space of the file system that holds `dir`, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct DiskSpace {
    /// What an unprivileged writer can still use (`f_bavail`).
    pub available: u64,
    /// The file system's size.
    pub total: u64,
}

/// [`DiskSpace`] of the file system that holds `dir` (`statvfs`); `None`
/// if it cannot say.
pub fn disk_space(dir: &Path) -> Option<DiskSpace> {
    let fs = rustix::fs::statvfs(dir).ok()?;
    Some(DiskSpace {
        available: fs.f_bavail.saturating_mul(fs.f_frsize),
        total: fs.f_blocks.saturating_mul(fs.f_frsize),
    })
}

pub(crate) struct Disk {
    /// The data directory.
    dir: PathBuf,
    /// True while writes fail for lack of space.
    full: watch::Sender<bool>,
    /// Set for good once any write (or sync) has failed.
    failed: AtomicBool,
    /// Read-held by a sync beside the write queue, write-held by a logged
    /// write of [`LARGE_WRITE`] or more.
    large_writes: RwLock<()>,
    /// Set when the storage closes: the probe thread ends.
    closed: Mutex<bool>,
    wake: Condvar,
    probe: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Disk {
    /// Starts the probe thread; it holds the database only while probing.
    pub(crate) fn start(db: &Arc<DB>, dir: &Path) -> Arc<Disk> {
        let disk = Arc::new(Disk {
            dir: dir.to_path_buf(),
            full: watch::channel(false).0,
            failed: AtomicBool::new(false),
            large_writes: RwLock::new(()),
            closed: Mutex::new(false),
            wake: Condvar::new(),
            probe: Mutex::new(None),
        });
        let (weak_db, probing) = (Arc::downgrade(db), disk.clone());
        let thread = std::thread::Builder::new()
            .name("kinesin-disk-probe".into())
            .spawn(move || probe(weak_db, probing))
            .expect("spawn disk probe thread");
        *disk.probe.lock().expect("probe lock") = Some(thread);
        disk
    }

    pub(crate) fn full(&self) -> bool {
        *self.full.borrow()
    }

    /// Writes `batch`, noting the outcome.
    pub(crate) fn write(
        &self,
        db: &DB,
        batch: WriteBatch,
        opts: &WriteOptions,
        logged: bool,
    ) -> Result<(), StorageError> {
        let _gate = (logged && batch.size_in_bytes() >= LARGE_WRITE)
            .then(|| self.large_writes.write().expect("large-write gate"));
        self.outcome(db.write_opt(batch, opts))
    }

    /// Fsyncs the WAL file beside RocksDB's write queue (`flush_wal(true)`)
    /// if that is safe now (see the module's documentation); `None` if not:
    /// a write of this process has failed, or the data directory's file
    /// system has less than [`SYNC_BESIDE_ROOM`] free or cannot say.
    pub(crate) fn sync_beside_writes(&self, db: &DB) -> Option<Result<(), StorageError>> {
        let _gate = self.large_writes.read().expect("large-write gate");
        let roomy = !self.failed.load(Ordering::Acquire)
            && disk_space(&self.dir).is_some_and(|s| s.available >= SYNC_BESIDE_ROOM);
        roomy.then(|| self.outcome(db.flush_wal(true)))
    }

    /// Notes what a write's outcome says about the disk and passes it on.
    pub(crate) fn outcome(&self, result: Result<(), rocksdb::Error>) -> Result<(), StorageError> {
        match result {
            Ok(()) => {
                if self.full() && self.full.send_replace(false) {
                    tracing::warn!("writes succeed again: the data directory's disk has room");
                }
                Ok(())
            }
            Err(e) => {
                self.failed.store(true, Ordering::Release);
                if is_no_space(&e) && !self.full.send_replace(true) {
                    tracing::error!(
                        error = %e,
                        "the data directory's disk is full: writes are refused or wait until space is freed"
                    );
                }
                Err(e.into())
            }
        }
    }

    /// Waits until writes work again (returns at once if they do).
    pub(crate) async fn writable(&self) {
        let _ = self.full.subscribe().wait_for(|full| !full).await;
    }

    /// [`Disk::writable`] for blocking threads; false if the storage
    /// closed first.
    pub(crate) fn writable_blocking(&self) -> bool {
        let mut closed = self.closed.lock().expect("disk lock");
        while self.full() && !*closed {
            closed = self
                .wake
                .wait_timeout(closed, PROBE_EVERY / 4)
                .expect("disk lock")
                .0;
        }
        !*closed
    }

    /// Runs `op` until it ends otherwise than for lack of space, waiting
    /// (blocking) between tries until writes work again; the no-space
    /// error is returned if the storage closes first.
    pub(crate) fn retry_blocking<T>(
        &self,
        mut op: impl FnMut() -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        loop {
            match op() {
                Err(e) if e.is_no_space() && self.writable_blocking() => {}
                other => return other,
            }
        }
    }

    /// Ends the probe thread (the storage is closing).
    pub(crate) fn close(&self) {
        *self.closed.lock().expect("disk lock") = true;
        self.wake.notify_all();
        if let Some(thread) = self.probe.lock().expect("probe lock").take() {
            let _ = thread.join();
        }
    }
}

fn probe(db: Weak<DB>, disk: Arc<Disk>) {
    let mut tries = 0u64;
    loop {
        {
            let closed = disk.closed.lock().expect("disk lock");
            let (closed, _) = disk
                .wake
                .wait_timeout_while(closed, PROBE_EVERY, |closed| !*closed)
                .expect("disk lock");
            if *closed {
                return;
            }
        }
        if !disk.full() {
            continue;
        }
        let Some(db) = db.upgrade() else {
            return;
        };
        let Some(cf) = db.cf_handle(Cf::Node.name()) else {
            return;
        };
        tries += 1;
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, PROBE_KEY, tries.to_le_bytes());
        let _ = disk.outcome(db.write_opt(batch, &WriteOptions::default()));
        disk.wake.notify_all();
    }
}
