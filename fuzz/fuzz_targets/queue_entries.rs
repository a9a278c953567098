#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use kinesin_queue::fuzzing::{storage, Replicas};
use kinesin_storage::Storage;

static STORAGE: LazyLock<(tempfile::TempDir, Storage)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temporary directory");
    let storage = storage(dir.path());
    (dir, storage)
});
static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

// Each input is a fresh pair of queues and a sequence of log entries, each
// after a length byte, so that a crash reproduces from its input alone.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let first = NEXT_GROUP.fetch_add(2, Ordering::Relaxed);
    let mut replicas = Replicas::open(&STORAGE.1, first);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (entry, tail) = tail.split_at(usize::from(len).min(tail.len()));
        replicas.entry(entry);
        rest = tail;
    }
});
