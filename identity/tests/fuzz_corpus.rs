//! Runs the body of each identity fuzz target in `fuzz/` over its seed corpus, so CI exercises
//! them on stable Rust without cargo-fuzz.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {} is missing: {e}", dir.display()));
    let files: Vec<Vec<u8>> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(!files.is_empty(), "seed corpus {} is empty", dir.display());
    files
}

#[test]
fn spiffe_id_target_over_seed_corpus() {
    let files = corpus("spiffe_id");
    let accepted = files
        .iter()
        .inspect(|data| identity::fuzz_spiffe_id(data))
        .filter(|data| {
            std::str::from_utf8(data).is_ok_and(|s| identity::SpiffeId::parse(s).is_ok())
        })
        .count();
    assert!(
        accepted > 0 && accepted < files.len(),
        "{accepted} of {} accepted",
        files.len()
    );
}

#[test]
fn cert_chain_target_over_seed_corpus() {
    let files = corpus("cert_chain");
    let parsed = files
        .iter()
        .inspect(|data| identity::fuzz_cert_chain(data))
        .filter(|data| identity::parse_pem_chain(data, "seed").is_ok())
        .count();
    assert!(
        parsed > 0 && parsed < files.len(),
        "{parsed} of {} parsed",
        files.len()
    );
}
