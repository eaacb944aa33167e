//! Runs the body of every fuzz target in `fuzz/` over its seed corpus, so CI exercises it on
//! stable Rust without cargo-fuzz.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {} is missing: {e}", dir.display()));
    let files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect();
    assert!(!files.is_empty(), "seed corpus {} is empty", dir.display());
    files
}

#[test]
fn authority_target_over_seed_corpus() {
    let files = corpus("authority");
    let mut accepted = 0;
    for (_path, data) in &files {
        hbone::fuzz_authority(data);
        if std::str::from_utf8(data).is_ok_and(|s| hbone::Authority::parse(s).is_ok()) {
            accepted += 1;
        }
    }
    // The corpus holds both kinds, so both paths of the target run.
    assert!(
        accepted > 0 && accepted < files.len(),
        "{accepted} of {} accepted",
        files.len()
    );
}
