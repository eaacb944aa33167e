//! The record layer and handshake driver against rustls and against themselves.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, duplex};

use super::aead::AeadImpl;
use super::fuzz::{fuzz_configs, self_signed_configs};
use super::keys::Keys;
use super::stream::SPARE_WBUF;
use super::*;
use crate::transport::Io;

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

fn sizes() -> Sizes {
    crate::Config::default().tls_sizes()
}

/// Our client against a rustls server (tokio-rustls) over an in-memory pipe.
async fn ours_to_rustls(
    io_ours: DuplexStream,
    io_theirs: DuplexStream,
) -> (
    TlsStream<DuplexStream>,
    tokio_rustls::server::TlsStream<DuplexStream>,
) {
    let (server, client) = fuzz_configs();
    let theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(io_theirs));
    let ours = connect(client, name(), io_ours, sizes()).await.unwrap();
    (ours, theirs.await.unwrap().unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

async fn send_and_check<A, B>(from: &mut A, to: &mut B, data: &[u8])
where
    A: AsyncWrite + Unpin,
    B: AsyncRead + Unpin,
{
    let (mut got, written) = tokio::join!(
        async {
            let mut got = vec![0u8; data.len()];
            to.read_exact(&mut got).await.unwrap();
            got
        },
        async {
            from.write_all(data).await.unwrap();
            from.flush().await.unwrap();
        }
    );
    let () = written;
    assert!(got == data, "{} bytes arrived changed", data.len());
    got.clear();
}

#[tokio::test]
async fn data_crosses_both_ways_with_a_rustls_peer_in_records_of_every_size() {
    let (a, b) = duplex(1 << 20);
    let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
    for len in [
        1,
        100,
        MAX_PLAINTEXT - 1,
        MAX_PLAINTEXT,
        MAX_PLAINTEXT + 1,
        300_000,
    ] {
        send_and_check(&mut ours, &mut theirs, &pattern(len, 1)).await;
        send_and_check(&mut theirs, &mut ours, &pattern(len, 2)).await;
    }
    // A vectored write of many slices, larger than one record.
    let parts: Vec<Vec<u8>> = (0..40).map(|i| pattern(1000 + i, i as u8)).collect();
    let slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let n = std::future::poll_fn(|cx| Pin::new(&mut ours).poll_write_vectored(cx, &slices))
        .await
        .unwrap();
    let total: usize = parts.iter().map(Vec::len).sum();
    assert_eq!(n, total);
    ours.flush().await.unwrap();
    let mut got = vec![0u8; total];
    theirs.read_exact(&mut got).await.unwrap();
    assert_eq!(got, parts.concat());
}

#[tokio::test]
async fn a_write_less_than_a_record_over_the_limit_is_sealed_whole() {
    let (a, b) = duplex(4 << 20);
    let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
    let limit = ours.write_limit;
    let head = pattern(9, 1);
    let body = pattern(limit, 2);
    async fn write(ours: &mut TlsStream<DuplexStream>, head: &[u8], body: &[u8]) -> usize {
        let slices = [io::IoSlice::new(head), io::IoSlice::new(body)];
        std::future::poll_fn(|cx| Pin::new(&mut *ours).poll_write_vectored(cx, &slices))
            .await
            .unwrap()
    }
    // A frame header and a body of the limit: all of it, in one go.
    let n = write(&mut ours, &head, &body).await;
    assert_eq!(n, limit + 9, "the last 9 bytes were left for another write");
    // A record or more over the limit: up to the limit, as before.
    let over = pattern(limit + MAX_PLAINTEXT, 3);
    let m = write(&mut ours, &head, &over).await;
    assert_eq!(
        m, limit,
        "a write a record over the limit was not held to it"
    );
    ours.flush().await.unwrap();
    let mut got = vec![0u8; n + m];
    theirs.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..9], &head[..]);
    assert_eq!(&got[9..n], &body[..]);
    assert_eq!(&got[n..n + 9], &head[..]);
    assert_eq!(&got[n + 9..], &over[..m - 9]);
}

#[tokio::test]
async fn a_bulk_writer_reuses_the_threads_spare_buffer_and_a_quiet_connection_keeps_none() {
    let (a, b) = duplex(1 << 20);
    let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
    drop(SPARE_WBUF.take());
    send_and_check(&mut ours, &mut theirs, &pattern(300_000, 1)).await;
    assert_eq!(
        ours.wbuf.capacity(),
        0,
        "a quiet connection kept its write buffer"
    );
    let spare = SPARE_WBUF.take();
    assert!(
        spare.capacity() > KEEP,
        "the emptied buffer was freed, not kept as the spare"
    );
    let at = spare.as_ptr();
    SPARE_WBUF.set(spare);
    send_and_check(&mut ours, &mut theirs, &pattern(300_000, 2)).await;
    assert_eq!(ours.wbuf.capacity(), 0);
    let spare = SPARE_WBUF.take();
    assert_eq!(
        spare.as_ptr(),
        at,
        "the next bulk write allocated a buffer of its own"
    );
}

/// Forwards bytes in pieces of at most the given sizes, in turn (what has arrived, if less),
/// so records arrive split anywhere (inside a header, a body, a tag) and several at once.
async fn chop(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, pieces: &[usize]) {
    let mut buf = vec![0u8; pieces.iter().copied().max().unwrap_or(1)];
    for size in pieces.iter().cycle() {
        match from.read(&mut buf[..*size]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test]
async fn records_opened_in_the_readers_buffer_arrive_whole_and_in_order() {
    let (ours_io, near) = duplex(1 << 20);
    let (far, theirs_io) = duplex(1 << 20);
    let (mut near_read, mut near_write) = tokio::io::split(near);
    let (far_read, mut far_write) = tokio::io::split(far);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut near_read, &mut far_write).await;
        let _ = far_write.shutdown().await;
    });
    tokio::spawn(async move {
        chop(
            far_read,
            &mut near_write,
            &[1, 3, 7, 4096, 5, 16_389, 70_000, 2, 30_000],
        )
        .await;
    });
    let (server, client) = fuzz_configs();
    let theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(theirs_io));
    let mut ours = connect(client, name(), ours_io, sizes()).await.unwrap();
    let mut theirs = theirs.await.unwrap().unwrap();

    let messages: Vec<Vec<u8>> = [
        1,
        100,
        MAX_PLAINTEXT,
        MAX_PLAINTEXT + 1,
        0,
        300_000,
        5,
        77_777,
    ]
    .iter()
    .enumerate()
    .map(|(i, len)| pattern(*len, i as u8))
    .collect();
    let sent = messages.concat();
    let writer = async {
        for (i, m) in messages.iter().enumerate() {
            theirs.write_all(m).await.unwrap();
            theirs.flush().await.unwrap();
            if i == 3 {
                // A KeyUpdate in the middle (rustls asks for ours back); what follows opens
                // only with the next key.
                theirs.get_mut().1.refresh_traffic_keys().unwrap();
            }
        }
        theirs.shutdown().await.unwrap();
        theirs
    };
    let reader = async {
        // The reader keeps part of what it got before each read, as the HTTP/2 layer keeps
        // the start of an unfinished frame: new data is appended after it.
        let (mut taken, mut buf) = (Vec::new(), BytesMut::new());
        let mut reads = 0;
        loop {
            let n = std::future::poll_fn(|cx| ours.poll_read_into(cx, &mut buf, 0))
                .await
                .unwrap();
            if n == 0 {
                break;
            }
            let keep = buf.len() / 3;
            taken.extend_from_slice(&buf.split_to(buf.len() - keep));
            reads += 1;
            if reads % 2 == 0 {
                // Now and then the reader moves what it keeps to a new buffer: an
                // unfinished record can no longer rejoin it in place.
                buf = BytesMut::from(&buf[..]);
            }
        }
        taken.extend_from_slice(&buf);
        taken
    };
    let (_theirs, got) = tokio::join!(writer, reader);
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the bytes arrived changed");
    assert!(
        ours.rbuf.is_empty(),
        "{} bytes left unopened",
        ours.rbuf.len()
    );
}

#[tokio::test]
async fn key_updates_from_the_peer_and_our_own_keep_the_stream_going() {
    let (a, b) = duplex(1 << 20);
    let (mut ours, mut theirs) = ours_to_rustls(a, b).await;
    send_and_check(&mut theirs, &mut ours, b"before").await;
    // rustls asks for an update back: our receive key and then our send key move on.
    theirs.get_mut().1.refresh_traffic_keys().unwrap();
    send_and_check(&mut theirs, &mut ours, b"after their update").await;
    assert_eq!(ours.rx.seq, 1, "the receive key was not updated");
    send_and_check(&mut ours, &mut theirs, b"after our answer").await;
    assert_eq!(ours.tx.seq, 1, "the send key was not updated");
    // Our own limit: a KeyUpdate every 3 records, 10 updates in a row.
    ours.set_tx_limit(3);
    for i in 0..20u8 {
        send_and_check(&mut ours, &mut theirs, &pattern(5000, i)).await;
    }
    assert!(ours.tx.seq < 3);
    send_and_check(&mut theirs, &mut ours, b"still both ways").await;
}

#[tokio::test]
async fn our_server_takes_a_rustls_client_and_its_key_updates() {
    let (server, client) = fuzz_configs();
    let (a, b) = duplex(1 << 20);
    let theirs = tokio::spawn(async move {
        tokio_rustls::TlsConnector::from(client)
            .connect(name(), b)
            .await
            .unwrap()
    });
    let mut ours = accept(server, a, &[], sizes(), None).await.unwrap();
    let mut theirs = theirs.await.unwrap();
    assert_eq!(
        ours.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    send_and_check(&mut theirs, &mut ours, &pattern(70_000, 3)).await;
    send_and_check(&mut ours, &mut theirs, &pattern(70_000, 4)).await;
    theirs.get_mut().1.refresh_traffic_keys().unwrap();
    send_and_check(&mut theirs, &mut ours, b"x").await;
    send_and_check(&mut ours, &mut theirs, b"y").await;
    // close_notify both ways: each side reads a clean end of file.
    ours.shutdown().await.unwrap();
    let mut rest = Vec::new();
    theirs.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    theirs.shutdown().await.unwrap();
    assert_eq!(ours.read(&mut [0u8; 8]).await.unwrap(), 0);
    // Writing after our close_notify is an error, not a silent loss.
    assert!(ours.write_all(b"late").await.is_err());
}

#[tokio::test]
async fn an_end_without_close_notify_is_an_error() {
    let (a, b) = duplex(1 << 20);
    let (mut ours, theirs) = ours_to_rustls(a, b).await;
    drop(theirs);
    let err = ours.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    // And it stays failed.
    assert!(ours.read(&mut [0u8; 8]).await.is_err());
}

/// Forwards bytes; while `corrupt` is set, flips a bit of what passes.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    corrupt: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if corrupt.load(Ordering::SeqCst) {
            buf[n - 1] ^= 1;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_changed_record_fails_the_stream_and_never_reaches_the_reader() {
    let (ours_io, relay_ours) = duplex(1 << 20);
    let (relay_theirs, theirs_io) = duplex(1 << 20);
    let (from_ours, to_ours) = tokio::io::split(relay_ours);
    let (from_theirs, to_theirs) = tokio::io::split(relay_theirs);
    let corrupt = Arc::new(AtomicBool::new(false));
    tokio::spawn(relay(from_theirs, to_ours, corrupt.clone()));
    tokio::spawn(relay(from_ours, to_theirs, Arc::default()));
    let (mut ours, mut theirs) = ours_to_rustls(ours_io, theirs_io).await;
    send_and_check(&mut theirs, &mut ours, b"intact").await;
    corrupt.store(true, Ordering::SeqCst);
    theirs.write_all(b"changed on the way").await.unwrap();
    theirs.flush().await.unwrap();
    let mut buf = [0u8; 64];
    let err = ours.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("bad_record_mac"), "{err}");
    assert_eq!(buf, [0u8; 64], "changed bytes reached the reader");
}

/// Our client and our server over an in-memory pipe.
async fn ours_to_ours() -> (TlsStream<DuplexStream>, TlsStream<DuplexStream>) {
    let (server, client) = fuzz_configs();
    let (a, b) = duplex(1 << 20);
    let server = tokio::spawn(accept(server, b, &[], sizes(), None));
    let client = connect(client, name(), a, sizes()).await.unwrap();
    (client, server.await.unwrap().unwrap())
}

#[tokio::test]
async fn a_fatal_alert_from_the_peer_is_named_and_close_notify_is_a_clean_end() {
    let (mut client, mut server) = ours_to_ours().await;
    send_and_check(&mut client, &mut server, &pattern(40_000, 5)).await;
    send_and_check(&mut server, &mut client, &pattern(40_000, 6)).await;
    // bad_certificate (42), as a server that refused a certificate would send it.
    server.seal_record(ALERT, &[&[2, 42]]).unwrap();
    server.flush().await.unwrap();
    let err = client.read(&mut [0u8; 8]).await.unwrap_err();
    assert!(err.to_string().contains("BadCertificate"), "{err}");
    let (mut client, mut server) = ours_to_ours().await;
    client.shutdown().await.unwrap();
    assert_eq!(server.read(&mut [0u8; 8]).await.unwrap(), 0);
    // The other direction still works after one side's close_notify.
    send_and_check(&mut server, &mut client, b"half closed").await;
}

#[tokio::test]
async fn records_that_break_the_rules_are_refused_with_the_reason() {
    for (bytes, reason) in [
        (vec![23, 3, 3, 0x48, 0x01], "at most"),
        (vec![22, 3, 3, 0, 5, 1, 2, 3, 4, 5], "content type 22"),
        (vec![20, 3, 3, 0, 1, 1], "change_cipher_spec"),
        (vec![23, 3, 3, 0, 3, 1, 2, 3], "protected record of 3 bytes"),
    ] {
        let (mut client, mut server) = ours_to_ours().await;
        server.io.write_all(&bytes).await.unwrap();
        let err = client.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(err.to_string().contains(reason), "{bytes:?}: {err}");
        let _ = server.shutdown().await;
    }
}

#[test]
fn both_aead_implementations_open_what_the_other_seals() {
    let secrets = |aes: bool| {
        let key = rustls::crypto::cipher::AeadKey::from([9u8; 32]);
        let iv = rustls::crypto::cipher::Iv::from([3u8; 12]);
        if aes {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        }
    };
    for aes in [true, false] {
        for (from, to) in [
            (AeadImpl::Ring, AeadImpl::AwsLc),
            (AeadImpl::AwsLc, AeadImpl::Ring),
        ] {
            let mut sealer = Keys::with(from, (5, secrets(aes))).unwrap();
            let mut opener = Keys::with(to, (5, secrets(aes))).unwrap();
            // Opened in place, and moved down by a header, by a header and a tag, and by
            // a great deal (the plaintext goes to the start while the ciphertext lies later).
            for (len, shift) in [(0, 0), (1, 5), (1000, 21), (MAX_PLAINTEXT, 0), (4097, 5000)] {
                let plain = pattern(len, len as u8);
                let mut sealed = plain.clone();
                let header = [APPLICATION_DATA, 3, 3, 0, 0];
                let nonce = sealer.next_nonce().unwrap();
                let tag = sealer.cipher.seal(nonce, header, &mut sealed).unwrap();
                assert!(
                    len == 0 || sealed != plain,
                    "{from:?} left {len} bytes in the clear"
                );
                let mut buf = vec![0xee; shift];
                buf.extend_from_slice(&sealed);
                buf.extend_from_slice(&tag);
                let nonce = opener.next_nonce().unwrap();
                let n = opener
                    .cipher
                    .open_within(nonce, header, &mut buf, shift)
                    .unwrap();
                assert_eq!(
                    &buf[..n],
                    &plain[..],
                    "{from:?} -> {to:?}, aes {aes}, {len} moved by {shift}"
                );
            }
        }
    }
}

#[tokio::test]
async fn handshake_messages_that_span_records_both_ways() {
    // Certificates of 40 KB each (a large extension): each side's Certificate message spans
    // three records, which rustls joins across the records it is given.
    let big = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 4, 1, 99999, 1],
                vec![0x04; 40_000],
            ));
        let cert = params.self_signed(&key).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (cert.der().clone(), der)
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (server_cert, server_key) = big("localhost");
    let (client_cert, client_key) = big("client");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_cert.clone()).unwrap();
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots.add(client_cert.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert], server_key)
        .unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client_cert], client_key)
        .unwrap();
    // Every round a full handshake, certificates and all.
    let mut client = client;
    client.resumption = rustls::client::Resumption::disabled();
    let (server, client) = (Arc::new(server), Arc::new(client));
    // Pipes of a few sizes: each read ends somewhere inside a record, so rustls is given
    // records in part, and where the next one starts must come from the record headers (a
    // stall once, when the ciphertext under a guessed header read as a short record).
    for (round, pipe) in [1 << 20, 40_000, 20_000, 12_000]
        .into_iter()
        .cycle()
        .take(32)
        .enumerate()
    {
        let (a, b) = duplex(pipe);
        let server = tokio::spawn(accept(server.clone(), b, &[], sizes(), None));
        let handshakes = async {
            let client = connect(client.clone(), name(), a, sizes()).await;
            (client, server.await.unwrap())
        };
        let (client, server) = tokio::time::timeout(std::time::Duration::from_secs(5), handshakes)
            .await
            .unwrap_or_else(|_| panic!("handshake {round} stalled, pipe of {pipe} bytes"));
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        assert_eq!(server.peer_certificates().len(), 1);
        send_and_check(&mut client, &mut server, b"through").await;
        send_and_check(&mut server, &mut client, b"and back").await;
    }
}

#[tokio::test]
async fn chacha20_poly1305_with_a_rustls_peer() {
    let mut only_chacha = rustls::crypto::aws_lc_rs::default_provider();
    only_chacha
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    let (server, client) = self_signed_configs(only_chacha);
    let (a, b) = duplex(1 << 20);
    let theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(b));
    let mut ours = connect(client, name(), a, sizes()).await.unwrap();
    let mut theirs = theirs.await.unwrap().unwrap();
    assert_eq!(
        theirs
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
    );
    send_and_check(&mut ours, &mut theirs, &pattern(50_000, 7)).await;
    send_and_check(&mut theirs, &mut ours, &pattern(50_000, 8)).await;
}

/// `configs` with their traffic secrets logged to us (so connections can move).
fn logging(
    (server, client): (Arc<ServerConfig>, Arc<ClientConfig>),
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let mut server = (*server).clone();
    server.key_log = traffic_secret_log();
    let mut client = (*client).clone();
    client.key_log = traffic_secret_log();
    (Arc::new(server), Arc::new(client))
}

#[tokio::test]
async fn a_connection_moves_to_new_keys_state_and_goes_on_with_a_rustls_peer_in_every_suite() {
    for suite in [
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        let (server, client) = logging(self_signed_configs(provider));
        let (a, b) = duplex(1 << 20);
        let theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(b));
        let mut ours = connect(client, name(), a, sizes()).await.unwrap();
        let mut theirs = theirs.await.unwrap().unwrap();
        assert!(
            ours.kernel.secrets.is_some(),
            "{suite:?}: secrets not captured"
        );
        send_and_check(&mut ours, &mut theirs, &pattern(40_000, 1)).await;
        // A KeyUpdate before the move: our copy of the secrets follows rustls's schedule.
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        send_and_check(&mut theirs, &mut ours, b"their update").await;
        send_and_check(&mut ours, &mut theirs, b"our answer").await;
        // Bytes in flight both ways at the move: sent to us but not read, and half a read.
        theirs.write_all(&pattern(30_000, 2)).await.unwrap();
        theirs.flush().await.unwrap();
        let mut first = vec![0u8; 10_000];
        ours.read_exact(&mut first).await.unwrap();
        let (io, state) = ours.into_state().map_err(|b| b.1).unwrap();
        assert_eq!(state.suite, u16::from(suite), "{state:?}");
        assert!(
            state.rx_seq >= 2 && !state.plaintext.is_empty(),
            "{state:?}"
        );
        let mut moved = TlsStream::from_state(io, state, sizes()).unwrap();
        let mut rest = vec![0u8; 20_000];
        moved.read_exact(&mut rest).await.unwrap();
        first.extend_from_slice(&rest);
        assert!(
            first == pattern(30_000, 2),
            "{suite:?}: bytes changed across the move"
        );
        send_and_check(&mut moved, &mut theirs, &pattern(70_000, 3)).await;
        // KeyUpdates after the move run on our schedule alone; rustls checks every record.
        theirs.get_mut().1.refresh_traffic_keys().unwrap();
        send_and_check(&mut theirs, &mut moved, b"their update after").await;
        send_and_check(&mut moved, &mut theirs, b"our answer after").await;
        moved.set_tx_limit(2);
        for i in 0..6u8 {
            send_and_check(&mut moved, &mut theirs, &pattern(20_000, i)).await;
        }
        moved.shutdown().await.unwrap();
        let mut end = Vec::new();
        theirs.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty());
    }
}

#[tokio::test]
async fn a_connection_without_captured_secrets_cannot_move_and_bad_states_are_refused() {
    let (a, b) = duplex(1 << 20);
    let (ours, _theirs) = ours_to_rustls(a, b).await;
    let (_, e) = *ours.into_state().expect_err("refused");
    assert!(e.to_string().contains("traffic_secret_log"), "{e}");

    let (server, client) = logging(fuzz_configs());
    let (a, b) = duplex(1 << 20);
    let _theirs = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(b));
    let ours = connect(client, name(), a, sizes()).await.unwrap();
    let (io, good) = ours.into_state().map_err(|b| b.1).unwrap();
    let refused = |change: &dyn Fn(&mut TlsState)| {
        let mut state = good.clone();
        change(&mut state);
        let (x, _) = duplex(16);
        TlsStream::from_state(x, state, sizes())
            .err()
            .expect("refused")
            .to_string()
    };
    assert!(refused(&|s| s.suite = 0x1304).contains("0x1304"));
    assert!(refused(&|s| s.tx_secret.push(0)).contains("traffic secret"));
    assert!(refused(&|s| s.rx_secret.clear()).contains("traffic secret"));
    assert!(refused(&|s| s.ciphertext = vec![22, 3, 3, 0, 1, 0]).contains("content type 22"));
    assert!(refused(&|s| s.unsent = vec![0; 1 << 20]).contains("unsent data"));
    assert!(refused(&|s| s.plaintext = vec![0; 1 << 20]).contains("received data"));
    assert!(refused(&|s| s.handshake = vec![0; 1 << 20]).contains("handshake"));
    assert!(refused(&|s| s.peer_certificates = vec![vec![0; 10]; 100]).contains("certificates"));
    assert!(refused(&|s| s.answer_pending = true).contains("KeyUpdate"));
    // The good state still goes together.
    TlsStream::from_state(io, good, sizes()).unwrap();
}
