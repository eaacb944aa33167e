//! Runs the authz fuzz targets' bodies over their seed corpora (CI runs them on stable), and
//! keeps the proto seeds current.

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn authz_yaml_target_over_seed_corpus() {
    let files = seed_corpus::seeds("authz_yaml");
    let parsed = files
        .iter()
        .inspect(|d| authz::fuzz_yaml(d))
        .filter(|d| {
            authz::parse_policies(std::str::from_utf8(d).unwrap_or(""), "seed", "istio-system")
                .is_ok()
        })
        .count();
    assert!(
        parsed > 0 && parsed < files.len(),
        "{parsed} of {} parsed",
        files.len()
    );
}

#[test]
fn authz_proto_target_over_seed_corpus() {
    // The committed seeds (the tutorial's policies, encoded, and junk), plus fresh encodings of
    // the tutorial, so the target also sees what the current code produces.
    let yaml =
        std::fs::read_to_string(corpus_dir("authz_yaml").join("seed-tutorial.yaml")).unwrap();
    let t = authz::parse_policies(&yaml, "tutorial", "istio-system").unwrap();
    let mut files = seed_corpus::seeds("authz_proto");
    files.extend(
        t.policies
            .iter()
            .map(|p| prost::Message::encode_to_vec(&authz::proto::to_proto(p))),
    );
    let decoded = files
        .iter()
        .inspect(|d| authz::proto::fuzz_decode(d))
        .filter(|d| authz::proto::decode(d).is_ok())
        .count();
    assert!(
        decoded > 0 && decoded < files.len(),
        "{decoded} of {} decoded",
        files.len()
    );
}
