//! Differential fuzzing of our HTTP/2 server against one made of the `h2` crate: the same client
//! bytes to both; neither may panic, and a stream ours forwards must be one `h2` hands to its
//! application.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hbone::fuzz_h2_differential(data);
});
