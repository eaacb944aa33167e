//! Fuzzes AuthorizationPolicy YAML parsing and evaluation: no panics, explanations agree.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    authz::fuzz_yaml(data);
});
