//! The `admin_request` fuzz target's body over its seed corpus, on stable.

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

#[test]
fn admin_request_target_over_seed_corpus() {
    let files = seed_corpus::seeds("admin_request");
    for data in &files {
        proxy::admin::fuzz_request(data);
    }
    assert!(proxy::admin::parse_request_line(&files[0]).is_ok() || files.len() > 1);
}
