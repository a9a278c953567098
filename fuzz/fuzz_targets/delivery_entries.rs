#![no_main]

use kinesin_firehose::fuzzing::Replicas;

// Each input is a fresh pair of delivery streams and the log entries they apply.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (storage, first) = kinesin_fuzz::scratch(2);
    let mut replicas = Replicas::open(storage, first);
    kinesin_fuzz::entries(data).for_each(|entry| replicas.entry(entry));
});
