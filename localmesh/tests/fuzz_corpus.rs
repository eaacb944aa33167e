//! The `local_manifests` fuzz target's body over its seed corpus, on stable.

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

#[test]
fn local_manifests_target_over_seed_corpus() {
    let files = seed_corpus::seeds("local_manifests");
    for data in &files {
        localmesh::plan::fuzz_manifests(data);
    }
    // The seeds are real meshes, not only refusals.
    let apps = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/local_manifests/apps.yaml"),
    )
    .unwrap();
    assert!(
        localmesh::plan::parse_docs(&apps, "apps.yaml")
            .unwrap()
            .len()
            > 10
    );
}
