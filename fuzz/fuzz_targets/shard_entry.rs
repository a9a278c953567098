#![no_main]

use kinesin_shard::fuzzing::Replica;

// Each input is an empty shard and the log entries it applies.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (storage, group) = kinesin_fuzz::scratch(1);
    let mut replica = Replica::open(storage, group);
    kinesin_fuzz::entries(data).for_each(|entry| replica.entry(entry));
});
