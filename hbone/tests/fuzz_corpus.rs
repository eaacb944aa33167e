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

/// A real ClientHello (one record), as a rustls client sends it.
fn client_hello() -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// The handshake message of a one-record flight, cut into records of `size` bytes.
fn in_records_of(flight: &[u8], size: usize) -> Vec<u8> {
    let (header, message) = flight.split_at(5);
    let mut out = Vec::new();
    for part in message.chunks(size) {
        out.extend_from_slice(&header[..3]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[test]
fn tls_handshake_target_over_seed_corpus() {
    use hbone::HandshakeProgress::*;
    let files = seed_corpus::seeds("tls_handshake");
    let outcomes: Vec<_> = files.iter().map(|d| hbone::fuzz_tls_handshake(d)).collect();
    // The corpus reaches all three outcomes, so every comparison runs.
    for kind in [Refused, Answered, Waiting] {
        assert!(
            outcomes.contains(&kind),
            "no seed ends {kind:?}: {outcomes:?}"
        );
    }
}

#[test]
fn a_client_hello_in_records_and_pieces_of_any_size_is_answered() {
    use hbone::HandshakeProgress::*;
    let hello = client_hello();
    let message = hello.len() - 5;
    for record in [1, 2, 3, 4, 5, 7, 16, 100, 255, 256, message - 1, message] {
        let flight = in_records_of(&hello, record);
        for mode in [0u8, 1, 2, 3, 5, 6, 7, 13, 64, 127, 0x80, 0x81, 0x85, 0xff] {
            let mut data = vec![mode];
            data.extend_from_slice(&flight);
            assert_eq!(
                hbone::fuzz_tls_handshake(&data),
                Answered,
                "records of {record}, mode {mode:#x}"
            );
            // Cut short by one byte, it waits; with the first byte of another record behind,
            // it answers all the same.
            assert_eq!(hbone::fuzz_tls_handshake(&data[..data.len() - 1]), Waiting);
            data.push(22);
            assert_eq!(hbone::fuzz_tls_handshake(&data), Answered);
        }
    }
    // A record of length 0 and a record longer than TLS allows are refused at once.
    let mut data = vec![0u8];
    data.extend_from_slice(&[22, 3, 1, 0, 0]);
    assert_eq!(hbone::fuzz_tls_handshake(&data), Refused);
    let mut data = vec![0u8];
    data.extend_from_slice(&[22, 3, 1, 0xff, 0xff, 1, 0, 0]);
    assert_eq!(hbone::fuzz_tls_handshake(&data), Refused);
}
