//! Fuzzes the DNS proxy's query path: any bytes as a pod's query. No panics; whatever is
//! answered parses as a response carrying the query's id.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proxy::dns::fuzz_query(data);
});
