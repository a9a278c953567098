//! Reads that scan RocksDB (a shard's records, a group's query) run on
//! blocking threads so that they never hold one of the runtime's few worker
//! threads; this bounds how many run at once. Without a bound, a burst of
//! GetRecords calls over many shards would start up to tokio's 512 blocking
//! threads, each holding a scan of up to 10 MiB.

use std::io;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Reads that may run at once on one node; later ones wait their turn (in
/// order). 32 scans of GetRecords' 10 MiB hold at most 320 MiB.
pub const MAX_BLOCKING_READS: usize = 32;

#[derive(Clone)]
pub struct BlockingReads {
    permits: Arc<Semaphore>,
}

impl BlockingReads {
    pub fn new(max: usize) -> Self {
        BlockingReads {
            permits: Arc::new(Semaphore::new(max)),
        }
    }

    /// Runs `read` on a blocking thread once fewer than the maximum run. The
    /// permit goes with the read: a caller that stops waiting (its client
    /// went away) does not free the room while the scan still runs.
    pub async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the read permits are never closed");
        tokio::task::spawn_blocking(move || {
            let out = read();
            drop(permit);
            out
        })
        .await
        .map_err(|e| io::Error::other(format!("the read stopped: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_reads_than_the_maximum_run_at_once_and_all_finish() {
        let reads = BlockingReads::new(3);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        // Every read waits until released, so that as many as are let in
        // are running together when they are counted.
        let released = Arc::new(AtomicBool::new(false));
        let mut calls = Vec::new();
        for i in 0..10 {
            let (reads, running, most, released) = (
                reads.clone(),
                running.clone(),
                most.clone(),
                released.clone(),
            );
            calls.push(tokio::spawn(async move {
                reads
                    .run(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        while !released.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        running.fetch_sub(1, Ordering::SeqCst);
                        i
                    })
                    .await
                    .unwrap()
            }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "3 reads never ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        released.store(true, Ordering::SeqCst);
        let mut done = Vec::new();
        for call in calls {
            done.push(call.await.unwrap());
        }
        assert_eq!(done, (0..10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_abandoned_read_keeps_its_permit_until_it_finishes() {
        let reads = BlockingReads::new(1);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let reads = reads.clone();
            tokio::spawn(async move {
                reads
                    .run(move || {
                        started_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                    })
                    .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        // The caller gives up; the scan itself still runs.
        first.abort();
        let second = tokio::time::timeout(Duration::from_millis(200), reads.run(|| ()));
        assert!(second.await.is_err(), "a second read ran beside the first");
        release_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), reads.run(|| ()))
            .await
            .expect("the permit came back when the scan finished")
            .unwrap();
    }
}
