//! Group commit: writers put their batches into RocksDB without syncing and
//! queue a callback here; one thread fsyncs the WAL once for everything
//! queued so far and then completes every callback. While one sync runs, the
//! next batch of callbacks accumulates, so under load one fsync covers the
//! appends of many Raft groups.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use rocksdb::DB;

use crate::disk::Disk;

/// Called with the outcome of the sync that made the write durable.
pub type SyncCallback = Box<dyn FnOnce(Result<(), String>) + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Acknowledge only after the WAL is fsynced (the default).
    Always,
    /// Acknowledge after the write reached the OS: faster, but a power loss
    /// can lose acknowledged writes on every replica at once.
    NeverUnsafe,
}

pub(crate) struct Syncer {
    policy: FsyncPolicy,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    callbacks: Vec<SyncCallback>,
    closed: bool,
    /// Live [`SyncHold`]s: no sync starts while there is one.
    holds: usize,
}

/// Keeps the syncer from starting a sync until it is dropped (see
/// [`crate::Storage::hold_syncs`]).
pub struct SyncHold {
    shared: Arc<Shared>,
}

impl Drop for SyncHold {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("syncer lock").holds -= 1;
        self.shared.wake.notify_one();
    }
}

impl Syncer {
    pub(crate) fn start(db: Arc<DB>, disk: Arc<Disk>, policy: FsyncPolicy) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let thread = (policy == FsyncPolicy::Always).then(|| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("kinesin-syncer".into())
                .spawn(move || run(db, disk, shared))
                .expect("spawn syncer thread")
        });
        Syncer {
            policy,
            shared,
            thread,
        }
    }

    pub(crate) fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    pub(crate) fn enqueue(&self, callback: SyncCallback) {
        if self.policy == FsyncPolicy::NeverUnsafe {
            callback(Ok(()));
            return;
        }
        let mut q = self.shared.queue.lock().expect("syncer lock");
        q.callbacks.push(callback);
        drop(q);
        self.shared.wake.notify_one();
    }

    pub(crate) fn hold(&self) -> SyncHold {
        self.shared.queue.lock().expect("syncer lock").holds += 1;
        SyncHold {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("syncer lock").closed = true;
        self.shared.wake.notify_one();
        // The thread holds the last handle to the database: once it has
        // exited, the database is closed and its directory can be reopened.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(db: Arc<DB>, disk: Arc<Disk>, shared: Arc<Shared>) {
    loop {
        let batch = {
            let mut q = shared.queue.lock().expect("syncer lock");
            while (q.callbacks.is_empty() || q.holds > 0) && !q.closed {
                q = shared.wake.wait(q).expect("syncer lock");
            }
            if q.callbacks.is_empty() && q.closed {
                return;
            }
            std::mem::take(&mut q.callbacks)
        };
        let started = Instant::now();
        // A full disk is waited out: the writes stay readable and RocksDB
        // persists them when it resumes (see `disk`), after which the sync
        // succeeds. Giving up would stop every waiting group for good.
        // Every write the batch's callbacks stand for returned before they
        // were queued, so a sync of the WAL file as it is now covers them.
        let result = disk
            .retry_blocking(|| crate::sync_wal(&db, &disk))
            .map_err(|e| e.to_string());
        metrics::histogram!("kinesin_storage_fsync_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("kinesin_storage_fsync_batch_size").record(batch.len() as f64);
        if let Err(e) = &result {
            tracing::error!(error = %e, "WAL sync failed");
        }
        for callback in batch {
            callback(result.clone());
        }
    }
}
