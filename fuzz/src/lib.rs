//! What the fuzz targets of stateful replicas share: the split of an input
//! into log entries and one scratch storage for a whole run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use kinesin_storage::{FsyncPolicy, Storage};

/// The entries an input holds, each after a length byte (the last one is
/// cut short where the input ends), so that a crash reproduces from its
/// input alone.
pub fn entries(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&len, rest) = data.split_first()?;
        let (entry, rest) = rest.split_at(usize::from(len).min(rest.len()));
        data = rest;
        Some(entry)
    })
}

/// The run's storage (opening RocksDB for each input would be most of the
/// time; replicas delete their rows when dropped) and `count` group numbers
/// no input used before.
pub fn scratch(count: u64) -> (&'static Storage, u64) {
    static STORAGE: LazyLock<(tempfile::TempDir, Storage)> = LazyLock::new(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let storage = Storage::open(dir.path(), FsyncPolicy::NeverUnsafe).expect("storage");
        (dir, storage)
    });
    static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);
    (&STORAGE.1, NEXT_GROUP.fetch_add(count, Ordering::Relaxed))
}
