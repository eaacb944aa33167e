//! Runs the body of every fuzz target in `fuzz/` over its seed corpus, so CI exercises it on
//! stable Rust without cargo-fuzz.

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

#[test]
fn authority_target_over_seed_corpus() {
    let files = seed_corpus::seeds("authority");
    let accepted = files
        .iter()
        .inspect(|data| hbone::fuzz_authority(data))
        .filter(|data| std::str::from_utf8(data).is_ok_and(|s| hbone::Authority::parse(s).is_ok()))
        .count();
    // The corpus holds both kinds, so both paths of the target run.
    assert!(
        accepted > 0 && accepted < files.len(),
        "{accepted} of {} accepted",
        files.len()
    );
}

#[test]
fn server_frames_target_over_seed_corpus() {
    let files = seed_corpus::seeds("server_frames");
    let handled: usize = files
        .iter()
        .map(|data| hbone::fuzz_server_frames(data))
        .sum();
    // Some seeds carry well-formed CONNECTs, so the handler path runs too.
    assert!(handled >= 3, "only {handled} CONNECTs reached the handler");
}

#[test]
fn client_frames_target_over_seed_corpus() {
    let files = seed_corpus::seeds("client_frames");
    let answered = files
        .iter()
        .filter(|data| hbone::fuzz_client_frames(data))
        .count();
    // Some seeds answer 200, so the tunnel's read and write paths run too; others do not.
    assert!(
        answered >= 3 && answered < files.len(),
        "{answered} of {} seeds answered 200",
        files.len()
    );
}

#[test]
fn tls_records_target_over_seed_corpus() {
    let files = seed_corpus::seeds("tls_records");
    let mut delivered = 0;
    for data in &files {
        let got = hbone::fuzz_tls_records(data);
        delivered += usize::from(got > 0);
        // The other way of reading (bit 2 of the mode) delivers exactly as much.
        let mut other = data.clone();
        if let Some(mode) = other.first_mut() {
            *mode ^= 4;
        }
        assert_eq!(hbone::fuzz_tls_records(&other), got, "{data:?}");
    }
    // Some seeds deliver application data (past padding, key updates, tickets), others are
    // refused before any does.
    assert!(
        delivered >= 4 && delivered < files.len(),
        "{delivered} of {} seeds delivered data",
        files.len()
    );
}

#[test]
fn h2_differential_target_over_seed_corpus() {
    let files = seed_corpus::seeds("h2_differential");
    let mut forwarded = 0;
    for data in &files {
        forwarded += hbone::fuzz_h2_differential(data).ours;
    }
    // Some seeds carry well-formed CONNECTs, so the comparison runs on forwarded streams too.
    assert!(forwarded >= 3, "only {forwarded} CONNECTs forwarded");
}
