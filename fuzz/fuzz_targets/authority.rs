//! Fuzzes HBONE `:authority` parsing: no panics, and every accepted value round-trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbone::fuzz_authority(data);
});
