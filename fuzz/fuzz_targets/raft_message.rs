#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kinesin_raft::fuzzing::peer_message(data));
