//! Runs the body of each identity fuzz target in `fuzz/` over its seed corpus, so CI exercises
//! them on stable Rust without cargo-fuzz.

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

#[test]
fn spiffe_id_target_over_seed_corpus() {
    let files = seed_corpus::seeds("spiffe_id");
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
    let files = seed_corpus::seeds("cert_chain");
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
