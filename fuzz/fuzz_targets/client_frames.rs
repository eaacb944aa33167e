//! Fuzzes the HBONE client with the HTTP/2 frames of a hostile server (after TLS): no panic, no
//! hang after the server closes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbone::fuzz_client_frames(data);
});
