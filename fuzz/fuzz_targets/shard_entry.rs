#![no_main]

use std::sync::LazyLock;

use kinesin_shard::fuzzing::Replica;

/// One replica for the whole run (opening RocksDB per input would be most
/// of the time); its applied state lives in memory, its storage is unused.
static REPLICA: LazyLock<(tempfile::TempDir, Replica)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temporary directory");
    let replica = Replica::open(dir.path());
    (dir, replica)
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| REPLICA.1.entry(data));
