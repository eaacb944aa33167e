//! Fuzzes xDS resource decoding (istio.workload.Address, istio.security.Authorization): no panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    xds_client::resources::fuzz_resources(data);
});
