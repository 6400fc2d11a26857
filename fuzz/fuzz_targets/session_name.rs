#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chipsite_fuzz_targets::session_name(data));
