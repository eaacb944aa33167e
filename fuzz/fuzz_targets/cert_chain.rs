//! Fuzzes certificate-chain parsing (PEM and DER): no panics on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    identity::fuzz_cert_chain(data);
});
