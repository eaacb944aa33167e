//! Fuzzes our TLS record layer with what a hostile peer sends after the handshake, raw or sealed
//! with the right keys: no panic, no hang.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbone::fuzz_tls_records(data);
});
