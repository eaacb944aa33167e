//! The `cni_config` fuzz target's body over its seed corpus, on stable.

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

#[test]
fn cni_config_target_over_seed_corpus() {
    let files = seed_corpus::seeds("cni_config");
    assert!(files.len() >= 5);
    for data in &files {
        ztunnel_cni::fuzz_config(data);
    }
}
