//! The bodies of the `tls_records` and `tls_handshake` fuzz targets, and the certificate their
//! handshakes (and this module's tests) use.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::transport::Io;

use super::handshake::server_config_with_secrets;
use super::*;

/// A self-signed certificate (`localhost`, valid until 2126) for the handshakes of the fuzz target
/// and of this module's tests only; it is public and trusts nothing else.
#[cfg(any(test, feature = "fuzzing"))]
pub(super) const FUZZ_CERT: &[u8] = include_bytes!("fuzz_cert/cert.pem");
#[cfg(any(test, feature = "fuzzing"))]
pub(super) const FUZZ_KEY: &[u8] = include_bytes!("fuzz_cert/key.pem");

/// A server presenting the certificate above (TLS 1.3, no client authentication: the record layer
/// is the same either way) and a client trusting it that offers what `client` has.
#[cfg(any(test, feature = "fuzzing"))]
pub(super) fn self_signed_configs(
    client: rustls::crypto::CryptoProvider,
) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_slice(FUZZ_CERT).expect("the fuzz certificate");
    let key = PrivateKeyDer::from_pem_slice(FUZZ_KEY).expect("the fuzz key");
    let server = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key)
    .expect("the fuzz certificate and key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("the fuzz certificate as a root");
    let client = ClientConfig::builder_with_provider(Arc::new(client))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

#[cfg(any(test, feature = "fuzzing"))]
pub(super) fn fuzz_configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    static CONFIGS: std::sync::OnceLock<(Arc<ServerConfig>, Arc<ClientConfig>)> =
        std::sync::OnceLock::new();
    CONFIGS
        .get_or_init(|| self_signed_configs(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The body of the `tls_records` fuzz target: after a real handshake, a hostile peer sends our
/// record layer (client side) what `data` says, and the reader must neither panic nor hang.
///
/// `data[0]` picks the mode: bit 0 clear, the rest goes to the socket as it is (record headers,
/// lengths, content types, bad tags); bit 0 set, the rest is a script of records the peer seals
/// with the right keys (`[inner content type][length][payload]`, so alerts, post-handshake
/// messages, padding and content types are reached past the tag check; a well-formed KeyUpdate
/// also moves the peer's key on). Bit 1 set, the peer ends without `close_notify`. Bit 2 set,
/// the reader takes records opened in its own buffer (`poll_read_into`, as the HTTP/2
/// connection reads), else it reads through `AsyncRead`; both must deliver the same. Returns how
/// many bytes of application data the reader got.
#[cfg(feature = "fuzzing")]
pub fn fuzz_tls_records(data: &[u8]) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async {
        let (server_config, client_config) = fuzz_configs();
        let sizes = crate::Config::default().tls_sizes();
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(accept(server_config, b, &[], sizes, None));
        let name = ServerName::try_from("localhost").expect("a DNS name");
        let mut client = connect(client_config, name, a, sizes)
            .await
            .expect("the fuzz handshake");
        let mut peer = server
            .await
            .expect("the server task")
            .expect("the fuzz handshake");
        let (mode, script) = data.split_first().unwrap_or((&0, &[]));
        let writer = async move {
            if mode & 1 == 0 {
                let _ = peer.io.write_all(script).await;
            } else {
                let mut rest = script;
                while let [kind, len, tail @ ..] = rest {
                    let n = usize::from(*len).min(tail.len());
                    let (payload, more) = tail.split_at(n);
                    rest = more;
                    let sealed = if *kind == HANDSHAKE && payload == [KEY_UPDATE, 0, 0, 1, 0] {
                        peer.update_tx_key()
                    } else {
                        peer.seal_record(*kind, &[payload])
                    };
                    if sealed.is_err() || peer.flush().await.is_err() {
                        break;
                    }
                }
            }
            if mode & 2 == 0 {
                let _ = peer.shutdown().await;
            }
        };
        let reader = async {
            let mut got = 0;
            let mut buf = [0u8; 4096];
            let mut opened_here = BytesMut::new();
            loop {
                // Bit 2 of the mode: records opened in the reader's buffer (as the HTTP/2
                // connection reads), else copied out through `AsyncRead`.
                let read = async {
                    if mode & 4 == 0 {
                        client.read(&mut buf).await
                    } else {
                        let n = std::future::poll_fn(|cx| {
                            client.poll_read_into(cx, &mut opened_here, 0)
                        })
                        .await;
                        opened_here.clear();
                        n
                    }
                };
                match tokio::time::timeout(std::time::Duration::from_secs(5), read)
                    .await
                    .expect("the record layer hung on its peer's input")
                {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        // A stream that ended or failed still answers writes and shutdown without panicking.
        let _ = client.write_all(b"after").await;
        let _ = client.shutdown().await;
        got
    })
}

/// How a handshake stood once a hostile client's bytes were all in (see [`fuzz_tls_handshake`]).
#[cfg(feature = "fuzzing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeProgress {
    /// The server refused the bytes (an error; an alert may have gone out).
    Refused,
    /// The server answered (its first flight went out) and waits for more.
    Answered,
    /// The server waits for more without having answered.
    Waiting,
}

/// The body of the `tls_handshake` fuzz target: a hostile client sends our server's handshake
/// driver what `data` says, and the driver must get exactly as far as rustls's own (buffered)
/// server given the same bytes at once: refuse what it refuses, answer what it answers, and wait
/// only where it waits (a driver that loses track of where a record starts stalls here, which a
/// client that keeps its connection open sees as a hung handshake). No panic, no hang.
///
/// `data[0]` is the mode: its low 7 bits, when not 0, are the size of the pieces the rest
/// arrives in (the driver runs between pieces); bit 7 set, the first 5 bytes are handed over as
/// already read, as our server does once it has seen a record header. The rest (at most
/// 32 KiB) is the client's bytes: records, plaintext as a ClientHello is, or not.
#[cfg(feature = "fuzzing")]
pub fn fuzz_tls_handshake(data: &[u8]) -> HandshakeProgress {
    use std::task::Waker;
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let rest = &rest[..rest.len().min(32 * 1024)];
    let (server_config, _) = fuzz_configs();

    // rustls's own server, given everything at once.
    let reference = {
        let mut conn =
            rustls::ServerConnection::new(server_config_with_secrets(server_config.clone()))
                .expect("a rustls server");
        let mut input = rest;
        let mut refused = false;
        while !input.is_empty() && !refused {
            match conn.read_tls(&mut input) {
                Ok(0) => break,
                Ok(_) => refused = conn.process_new_packets().is_err(),
                Err(_) => refused = true,
            }
        }
        match (refused, conn.wants_write()) {
            (true, _) => HandshakeProgress::Refused,
            (false, true) => HandshakeProgress::Answered,
            (false, false) => HandshakeProgress::Waiting,
        }
    };

    // Ours, polled by hand between pieces: everything is in memory, so one poll runs the driver
    // until it needs bytes that are not there.
    let mut cx = Context::from_waker(Waker::noop());
    let (mut client, server_io) = tokio::io::duplex(1 << 20);
    let sizes = crate::Config::default().tls_sizes();
    let (first, rest) = if mode & 0x80 != 0 {
        rest.split_at(rest.len().min(HEADER_LEN))
    } else {
        (&[][..], rest)
    };
    let mut server = Box::pin(accept(server_config, server_io, first, sizes, None));
    let piece = match usize::from(mode & 0x7f) {
        0 => rest.len().max(1),
        n => n,
    };
    let mut outcome = Poll::Pending;
    for chunk in std::iter::once(&[][..]).chain(rest.chunks(piece)) {
        let mut written = 0;
        while written < chunk.len() {
            match Pin::new(&mut client).poll_write(&mut cx, &chunk[written..]) {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                other => panic!("the in-memory pipe refused a write: {other:?}"),
            }
        }
        outcome = server.as_mut().poll(&mut cx);
        if outcome.is_ready() {
            break;
        }
    }
    let ours = match outcome {
        Poll::Ready(Err(_)) => HandshakeProgress::Refused,
        Poll::Ready(Ok(_)) => panic!("a handshake completed with a fuzzer's bytes"),
        Poll::Pending => {
            let mut answer = [0u8; 1];
            let mut buf = ReadBuf::new(&mut answer);
            match Pin::new(&mut client).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => HandshakeProgress::Answered,
                _ => HandshakeProgress::Waiting,
            }
        }
    };
    assert_eq!(
        ours,
        reference,
        "our handshake driver and rustls's server disagree on {} bytes in pieces of {piece}",
        rest.len()
    );
    ours
}
