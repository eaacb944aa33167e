//! Fuzzes our server's TLS handshake driver with what a hostile client sends, in pieces of any
//! size, against rustls's own server given the same bytes: same outcome, no panic, no hang.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbone::fuzz_tls_handshake(data);
});
