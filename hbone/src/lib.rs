//! HBONE: TCP connections tunneled as HTTP/2 `CONNECT` streams over mutual TLS.
//!
//! A [`Server`] terminates TLS and HTTP/2 and hands each `CONNECT` to your [`ConnectHandler`]; a
//! [`Pool`] dials, multiplexes and keeps alive client connections. Both sides yield a [`Tunnel`]
//! (`AsyncRead + AsyncWrite`), and [`copy_bidirectional`] joins a tunnel to a socket with
//! half-close and byte counts. The crate knows nothing of SPIFFE or policy: it takes rustls
//! configurations and reports the peer's certificate chain. The wire protocol is specified in
//! `SPEC.md` next to this crate. HTTP/2 is implemented here, the part of RFC 9113 that HBONE uses,
//! so that a tunnel's writes are framed, encrypted and sent in the writer's own task; errors of
//! that layer reach you as [`Http2Error`]. TLS is rustls's handshake followed by our own TLS 1.3
//! record layer (records sealed and opened in place; key updates, session tickets and
//! `close_notify` handled): the configurations you pass get `enable_secret_extraction` (a copy is
//! made if yours lacks it). `HBONE_TLS_AEAD=ring|aws-lc` overrides which AEAD implementation
//! seals the records (by default the faster one for the CPU).
//!
//! ```
//! # use std::sync::Arc;
//! use hbone::{Authority, Config, InboundConnect, Pool, Server, StaticTls};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (server_tls, client_tls) = certs();
//! // An echo server: accept every CONNECT and send the bytes back.
//! let server = Server::new(Config::default(), server_tls, |req: InboundConnect| async move {
//!     println!("CONNECT {} from {}", req.authority(), req.peer_addr());
//!     let mut tunnel = req.accept().expect("answer 200");
//!     let (mut rd, mut wr) = tokio::io::split(&mut tunnel);
//!     let _ = tokio::io::copy(&mut rd, &mut wr).await;
//!     let _ = wr.shutdown().await;
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(async move { server.serve(listener).await });
//!
//! // A client pool; the key says which tunnels may share a connection.
//! let pool = Pool::new(Config::default(), StaticTls(client_tls));
//! let authority: Authority = "10.0.0.7:8080".parse()?;
//! let mut tunnel = pool.connect("my-key", addr, &authority, Default::default()).await?;
//! tunnel.write_all(b"hello").await?;
//! tunnel.shutdown().await?; // half-close: END_STREAM
//! let mut echoed = Vec::new();
//! tunnel.read_to_end(&mut echoed).await?;
//! assert_eq!(echoed, b"hello");
//! # Ok(())
//! # }
//! # fn certs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
//! #     use rcgen::{CertificateParams, KeyPair, SanType, IsCa, BasicConstraints};
//! #     let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
//! #     let ca_key = KeyPair::generate().unwrap();
//! #     let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
//! #     ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
//! #     let ca_cert = ca.self_signed(&ca_key).unwrap();
//! #     let leaf = |uri: &str| {
//! #         let key = KeyPair::generate().unwrap();
//! #         let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
//! #         p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap()), SanType::IpAddress([127,0,0,1].into())];
//! #         let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
//! #         (vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
//! #     };
//! #     let mut roots = rustls::RootCertStore::empty();
//! #     roots.add(ca_cert.der().clone()).unwrap();
//! #     let roots = Arc::new(roots);
//! #     let (chain, key) = leaf("spiffe://cluster.local/ns/default/sa/server");
//! #     let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build().unwrap();
//! #     let mut server = rustls::ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(&[&rustls::version::TLS13]).unwrap()
//! #         .with_client_cert_verifier(verifier).with_single_cert(chain, key).unwrap();
//! #     server.alpn_protocols = vec![b"h2".to_vec()];
//! #     let (chain, key) = leaf("spiffe://cluster.local/ns/default/sa/client");
//! #     let mut client = rustls::ClientConfig::builder_with_provider(provider).with_protocol_versions(&[&rustls::version::TLS13]).unwrap()
//! #         .with_root_certificates(roots).with_client_auth_cert(chain, key).unwrap();
//! #     client.alpn_protocols = vec![b"h2".to_vec()];
//! #     (Arc::new(server), Arc::new(client))
//! # }
//! ```
#![forbid(unsafe_code)]

mod adopt;
mod authority;
mod config;
mod copy;
mod error;
#[cfg(feature = "fuzzing")]
mod fuzz;
pub mod headers;
mod keepalive;
mod moving;
mod pool;
mod server;
mod tls;
mod transport;
mod tunnel;
mod wire;

#[cfg(feature = "fuzzing")]
pub use authority::fuzz_authority;
pub use authority::{Authority, AuthorityError};
pub use config::{Allowance, Config};
pub use copy::{
    CopyError, Direction, Operation, Transferred, copy_bidirectional, copy_tunnel_bidirectional,
};
pub use error::{BoxError, Error, Http2Error, Side, Stage};
#[cfg(feature = "fuzzing")]
pub use fuzz::{Differential, fuzz_client_frames, fuzz_h2_differential, fuzz_server_frames};
pub use pool::{Dialer, Pool, StaticTls};
pub use server::{ConnectHandler, InboundConnect, Server, ServerTls};
#[cfg(feature = "fuzzing")]
pub use tls::{HandshakeProgress, fuzz_tls_handshake, fuzz_tls_records};
pub use tunnel::Tunnel;

/// Moving live connections to another process (a proxy upgraded without dropping them).
///
/// The old process calls [`Server::hand_off`]: each connection's tunnels, joined to their
/// application sockets by [`handoff::copy_tunnel_movable`], pause between two steps; the
/// connection is taken apart into a [`handoff::MovedConnection`] (its socket, its TLS and HTTP/2
/// state, each tunnel's copy state and a duplicate of its application socket), and the copies
/// end with [`handoff::Copied::Moved`]. Sending that to the new process is the caller's part;
/// there [`Server::adopt`] serves the connection again and returns its tunnels, whose copies go
/// on from where they stopped. A connection can move only when the server's [`Config::movable`]
/// is set and its rustls configuration logs its traffic secrets to
/// [`handoff::traffic_secret_log`] (set it as the configuration's `key_log`; nothing is written
/// anywhere by it). A connection that cannot move in time (a handshake or a request in
/// progress, a tunnel copied some other way) stays, and goes on as before.
///
/// The client's side is the same with [`Pool::hand_off`] and [`Pool::adopt`]: each pooled
/// connection leaves with its key ([`handoff::MovedPooled`]), and the adopting pool serves new
/// tunnels of that key on it. The pool's configuration must be movable and its dialer's rustls
/// configurations must log to [`handoff::traffic_secret_log`].
///
/// A plain copy between two sockets (a proxy's passthrough or plaintext connection) moves with
/// [`handoff::copy_movable`] and its [`handoff::PlainMover`]: the copy stops, and hands over
/// duplicates of both sockets and the bytes it held ([`handoff::MovedPlain`]).
pub mod handoff {
    pub use crate::adopt::{AdoptedTunnel, MovedConnection};
    pub use crate::copy::{copy_movable, copy_tunnel_movable};
    pub use crate::moving::{
        Copied, CopyState, MovedPlain, MovedTunnel, PlainMover, PlainNotMoved,
    };
    pub use crate::pool::handoff::{MovedPooled, PoolHandOff};
    pub use crate::server::handoff::{AdoptedServing, HandOff};
    pub use crate::tls::{TlsState, traffic_secret_log};
    pub use crate::wire::conn::ConnectionState;
    pub use crate::wire::session::{SessionState, StreamState};
}

/// The ALPN protocol id HBONE requires: HTTP/2 over TLS.
pub const H2_ALPN: &[u8] = b"h2";

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
