//! Loads a fuzz target's seed corpus for the ordinary tests that run each target's body on
//! stable Rust. Included by those tests with `#[path]`; fails loudly if the corpus is missing.

/// Every file of `fuzz/corpus/<target>`, read whole.
pub(crate) fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let files: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {} is missing: {e}", dir.display()))
        .map(|entry| entry.expect("readable corpus directory").path())
        .filter(|path| path.is_file())
        .map(|path| std::fs::read(path).expect("readable seed"))
        .collect();
    assert!(!files.is_empty(), "seed corpus {} is empty", dir.display());
    files
}
