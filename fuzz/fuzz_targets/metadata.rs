#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kinesin_meta::fuzzing::metadata_bytes(data);
    kinesin_meta::fuzzing::metadata_commands(kinesin_fuzz::entries(data));
});
