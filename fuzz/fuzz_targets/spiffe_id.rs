//! Fuzzes SPIFFE id parsing: no panics; accepted ids print back to themselves and obey the rules.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    identity::fuzz_spiffe_id(data);
});
