//! Fuzz target: `pgfire::fuzz::pgoutput` must never panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgfire::fuzz::pgoutput(data));
