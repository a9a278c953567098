#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kinesin_gateway::fuzzing::token(data));
