#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| splitserve_kv::fuzz::wire(data));
