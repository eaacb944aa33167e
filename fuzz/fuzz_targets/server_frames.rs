//! Fuzzes the HBONE server with the HTTP/2 frames of a hostile client (after TLS): no panic, no
//! hang after the client closes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbone::fuzz_server_frames(data);
});
