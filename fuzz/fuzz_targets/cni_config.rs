//! Fuzzes the CNI plugin's network configuration (stdin) through ADD, DEL and CHECK, and the
//! enablement selector parser: no panics, every answer well-formed JSON.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ztunnel_cni::fuzz_config(data);
});
