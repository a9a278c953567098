#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use kinesin_shard::fuzzing::{storage, Replica};
use kinesin_storage::Storage;

static STORAGE: LazyLock<(tempfile::TempDir, Storage)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temporary directory");
    let storage = storage(dir.path());
    (dir, storage)
});
static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

// Each input is an empty shard and a sequence of log entries, each after a
// length byte, so that a crash reproduces from its input alone.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let group = NEXT_GROUP.fetch_add(1, Ordering::Relaxed);
    let mut replica = Replica::open(&STORAGE.1, group);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (entry, tail) = tail.split_at(usize::from(len).min(tail.len()));
        replica.entry(entry);
        rest = tail;
    }
});
