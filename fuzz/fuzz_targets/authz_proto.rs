//! Fuzzes `istio.security.Authorization` decoding: no panics; accepted policies round-trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    authz::proto::fuzz_decode(data);
});
