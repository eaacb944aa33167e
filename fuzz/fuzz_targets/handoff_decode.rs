//! Fuzzes the decoder of the handoff format between an old and a new proxy: any bytes as an
//! offer, an answer and a moved connection. No panics; a connection that decodes encodes back
//! to the same state.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proxy::handoff::fuzz_decode(data);
});
