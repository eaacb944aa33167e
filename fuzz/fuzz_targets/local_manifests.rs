//! Fuzzes the local mesh's documents: refused with an error, or planned and rendered without
//! panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    localmesh::plan::fuzz_manifests(data);
});
