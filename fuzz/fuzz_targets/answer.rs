//! Fuzz target: `pgfire::fuzz::answer` must never panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgfire::fuzz::answer(data));
