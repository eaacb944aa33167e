//! Fuzzes the proxy's admin/metrics/readiness request parsing: no panics on any request head.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proxy::admin::fuzz_request(data);
});
