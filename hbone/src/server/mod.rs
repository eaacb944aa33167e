//! The server side: terminate mTLS + HTTP/2 and hand each `CONNECT` to a handler.
//!
//! The handler is a plain async trait, [`ConnectHandler`], not a `tower::Service`: a tunnel is a
//! long-lived conversation (decide, dial the destination, answer, copy bytes), which reads best as
//! one `async fn` that owns the request from start to end. Closures implement it too.
//!
//! The server answers by itself, without calling the handler: `400` for a request that is not
//! `CONNECT` or whose `:authority` is not `ip:port`, `[ipv6]:port` or `host:port`. A handler that
//! drops the request without answering makes the server answer `503`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::Config;
use crate::authority::Authority;
use crate::error::{Error, Http2Error, Side, Stage};
use crate::keepalive::{KeepaliveFailure, keepalive};
use crate::pool::{check_session, tls_failure};
use crate::tunnel::{Tunnel, failure_to_io};
use crate::wire::conn::{Connection, Request, StreamRef};
use crate::wire::session::{Failure, Limits, Role};

pub(crate) mod handoff;

/// A TLS record header: what the server reads of a new connection before it allocates anything.
const TLS_RECORD_HEADER: usize = 5;

/// Handles the CONNECT requests of an HBONE [`Server`].
///
/// Called once per stream, in its own task. The handler decides (answer with
/// [`InboundConnect::accept`] or [`InboundConnect::reject`]) and then owns the tunnel until it is
/// done with it.
pub trait ConnectHandler: Send + Sync + 'static {
    /// Handles one CONNECT stream.
    fn handle(&self, request: InboundConnect) -> impl Future<Output = ()> + Send;
}

impl<F, Fut> ConnectHandler for F
where
    F: Fn(InboundConnect) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn handle(&self, request: InboundConnect) -> impl Future<Output = ()> + Send {
        self(request)
    }
}

/// Where the server takes its TLS configuration from, read again for every new connection.
#[derive(Debug, Clone)]
pub enum ServerTls {
    /// One fixed configuration.
    Static(Arc<ServerConfig>),
    /// The latest value of a watch channel, so certificates can rotate without a restart.
    Watch(watch::Receiver<Arc<ServerConfig>>),
}

impl ServerTls {
    fn current(&self) -> Arc<ServerConfig> {
        match self {
            ServerTls::Static(c) => c.clone(),
            ServerTls::Watch(rx) => rx.borrow().clone(),
        }
    }
}

impl From<Arc<ServerConfig>> for ServerTls {
    fn from(config: Arc<ServerConfig>) -> Self {
        ServerTls::Static(config)
    }
}

impl From<ServerConfig> for ServerTls {
    fn from(config: ServerConfig) -> Self {
        ServerTls::Static(Arc::new(config))
    }
}

impl From<watch::Receiver<Arc<ServerConfig>>> for ServerTls {
    fn from(rx: watch::Receiver<Arc<ServerConfig>>) -> Self {
        ServerTls::Watch(rx)
    }
}

/// An HBONE server. Cheap to clone.
pub struct Server<H> {
    inner: Arc<ServerInner<H>>,
}

impl<H> Clone for Server<H> {
    fn clone(&self) -> Self {
        Server {
            inner: self.inner.clone(),
        }
    }
}

impl<H> std::fmt::Debug for Server<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct ServerInner<H> {
    config: Config,
    tls: ServerTls,
    handler: H,
    /// One permit per TLS handshake being computed (`Config::max_concurrent_handshakes`).
    handshakes: Semaphore,
    /// Set by [`Server::go_away`]: every connection goes away gracefully.
    going_away: watch::Sender<bool>,
    /// The connections being served, for a handoff.
    live: handoff::Live,
}

/// How often a connection that has gone away checks whether its last stream is done.
const GONE_AWAY_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// The client of one HBONE connection: its certificate chain, and one value derived from it.
#[derive(Debug)]
struct PeerInfo {
    certificates: Arc<[CertificateDer<'static>]>,
    memo: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
}

impl PeerInfo {
    fn memo<T: Clone + Send + Sync + 'static>(
        &self,
        derive: impl FnOnce(&[CertificateDer<'static>]) -> T,
    ) -> T {
        if let Some(known) = self.memo.get() {
            return match known.downcast_ref::<T>() {
                Some(value) => value.clone(),
                None => derive(&self.certificates),
            };
        }
        let value = derive(&self.certificates);
        // Another stream may have set it meanwhile; both derived the same value from the same chain.
        let _ = self.memo.set(Box::new(value.clone()));
        value
    }
}

/// One CONNECT request, waiting for the handler's answer.
///
/// A pointer-sized handle: the request's parts live on the heap until it is answered, so a
/// handler future that holds or moves it stays small for the connection's whole life.
#[derive(Debug)]
pub struct InboundConnect {
    inner: Box<ConnectParts>,
}

#[derive(Debug)]
struct ConnectParts {
    authority: Authority,
    headers: HeaderMap,
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
    peer: Arc<PeerInfo>,
    /// `None` once answered.
    stream: Option<StreamRef>,
}

impl<H: ConnectHandler> Server<H> {
    /// Creates a server. The TLS configuration must require client certificates and offer ALPN
    /// `h2`; connections that end up without either are refused.
    pub fn new(config: Config, tls: impl Into<ServerTls>, handler: H) -> Self {
        let handshakes = Semaphore::new(config.max_concurrent_handshakes.max(1));
        Server {
            inner: Arc::new(ServerInner {
                config,
                tls: tls.into(),
                handler,
                handshakes,
                going_away: watch::Sender::new(false),
                live: handoff::Live::default(),
            }),
        }
    }

    /// Asks every connection, open now or accepted later, to go away gracefully: each sends
    /// GOAWAY (NO_ERROR) naming the last stream its client opened; those streams go on, later
    /// ones are refused unprocessed (REFUSED_STREAM, which a client may send again on a new
    /// connection, as the pool does), and the connection closes once its streams are done. For
    /// a server that is being replaced: its clients move their new tunnels elsewhere while the
    /// tunnels they have finish here.
    pub fn go_away(&self) {
        self.inner.going_away.send_replace(true);
    }

    /// How many connections hold a handshake slot right now: rustls is working on their bytes (at
    /// most `Config::max_concurrent_handshakes`; the others wait for a slot).
    pub fn handshakes_in_progress(&self) -> usize {
        self.inner.config.max_concurrent_handshakes.max(1)
            - self.inner.handshakes.available_permits()
    }

    /// Accepts connections until the listener fails. Each connection runs in its own task;
    /// dropping this future (or aborting its task) closes every connection it accepted.
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) if is_transient_accept_error(&e) => {
                    warn!(error = %e, "HBONE server: accept failed, continuing");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let server = self.clone();
            connections.spawn(async move {
                if let Err(e) = server.serve_connection(tcp).await {
                    debug!(%peer, error = %e, "HBONE server: connection ended with an error");
                }
            });
        }
    }

    /// Serves one accepted TCP connection to its end: TLS, ALPN check, HTTP/2, CONNECT streams.
    pub async fn serve_connection(&self, tcp: TcpStream) -> Result<(), Error> {
        let peer = tcp.peer_addr().map_err(|source| Error::SocketAddress {
            which: "peer",
            source,
        })?;
        let local = tcp.local_addr().map_err(|source| Error::SocketAddress {
            which: "local",
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        self.serve_io(tcp, local, peer).await
    }

    /// Serves one connection over any byte stream (for callers that accept sockets themselves,
    /// e.g. inside another network namespace).
    pub async fn serve_io<T>(&self, io: T, local: SocketAddr, peer: SocketAddr) -> Result<(), Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner.config;
        let timed_out = |stage, after| Error::HandshakeTimeout {
            side: Side::Server,
            peer,
            stage,
            after,
        };
        let deadline = tokio::time::Instant::now() + cfg.tls_handshake_timeout;
        let refused = |e: Error| {
            info!(%peer, error = %e, "HBONE server: refused connection");
            e
        };
        // Until the client's first bytes arrive, a connection costs this small future and its
        // socket: no buffer, no TLS state, no handshake slot (slowloris). Its other phases are
        // boxed, so they take memory only once they start.
        // Only a connection over TCP can move to another process (its socket goes along).
        let live = (std::any::TypeId::of::<T>() == std::any::TypeId::of::<TcpStream>())
            .then(|| self.inner.live.settling(peer));
        let mut first = [0u8; TLS_RECORD_HEADER];
        let mut io = io;
        let n = match tokio::time::timeout_at(deadline, io.read(&mut first)).await {
            Err(_) => return Err(refused(timed_out(Stage::Tls, cfg.tls_handshake_timeout))),
            Ok(Err(source)) => return Err(refused(tls_failure(Side::Server, peer, source))),
            Ok(Ok(0)) => {
                let source = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the client closed the connection before the TLS handshake",
                );
                return Err(refused(tls_failure(Side::Server, peer, source)));
            }
            Ok(Ok(n)) => n,
        };
        let tls_handshake = async {
            // A slot is held only while rustls computes on the client's bytes, never while we
            // wait for them; waiting for a slot counts against the TLS limit.
            let slots = Some(&self.inner.handshakes);
            let config = self.inner.tls.current();
            let tls = crate::tls::accept(config, io, &first[..n], cfg.tls_sizes(), slots)
                .await
                .map_err(|source| tls_failure(Side::Server, peer, source))?;
            check_session(
                tls.protocol_version(),
                tls.alpn_protocol(),
                Side::Server,
                peer,
            )?;
            if tls.peer_certificates().is_empty() {
                return Err(Error::NoPeerCertificate {
                    side: Side::Server,
                    peer,
                });
            }
            let certs = tls.peer_certificates().clone();
            Ok((tls, certs))
        };
        let (tls, certs) = Box::pin(tokio::time::timeout_at(deadline, tls_handshake))
            .await
            .map_err(|_| timed_out(Stage::Tls, cfg.tls_handshake_timeout))
            .and_then(|r| r)
            .map_err(refused)?;
        Box::pin(self.serve_h2(tls, local, peer, certs, live)).await
    }

    /// Serves HTTP/2 CONNECT streams over an established (decrypted) byte stream whose client
    /// presented `certs`.
    pub(crate) async fn serve_h2<T>(
        &self,
        io: T,
        local: SocketAddr,
        peer: SocketAddr,
        certs: Arc<[CertificateDer<'static>]>,
        live: Option<handoff::LiveGuard<'_>>,
    ) -> Result<(), Error>
    where
        T: crate::transport::Io,
    {
        let peer_info = Arc::new(PeerInfo {
            certificates: certs,
            memo: std::sync::OnceLock::new(),
        });
        let connection = Connection::new(Role::Server, Limits::from_config(&self.inner.config), io);
        if let Some(live) = &live {
            live.serve(&connection);
        }
        self.run(connection, live, local, peer, peer_info).await
    }

    /// Serves an HTTP/2 connection, new or handed over, to its end.
    async fn run(
        &self,
        connection: Connection,
        _live: Option<handoff::LiveGuard<'_>>,
        local: SocketAddr,
        peer: SocketAddr,
        peer_info: Arc<PeerInfo>,
    ) -> Result<(), Error> {
        let cfg = &self.inner.config;
        let drive = connection.drive();
        tokio::pin!(drive);
        // The client's preface and SETTINGS must arrive within the HTTP/2 handshake limit.
        let handshake = async {
            tokio::time::sleep(cfg.h2_handshake_timeout).await;
            if !connection.got_settings() {
                return;
            }
            std::future::pending::<()>().await
        };
        let keepalive = async {
            match cfg.keepalive_interval {
                Some(interval) => keepalive(&connection, interval, cfg.keepalive_timeout).await,
                None => std::future::pending().await,
            }
        };
        // Going away: GOAWAY once, then the connection closes when its last stream is done.
        let mut going_away = self.inner.going_away.subscribe();
        let go_away = async {
            let _ = going_away.wait_for(|away| *away).await;
            connection.go_away();
            while connection.open_streams() > 0 {
                tokio::time::sleep(GONE_AWAY_CHECK).await;
            }
        };
        tokio::pin!(handshake, keepalive, go_away);
        let ended = loop {
            tokio::select! {
                biased;
                failure = &mut drive => break Err(failure),
                () = &mut go_away => {
                    connection.close();
                    break Ok(None);
                }
                next = connection.accept() => match next {
                    // Checked here, so the stream's task holds only the handler's future.
                    Some(request) => {
                        if let Some(inbound) = check_stream(request, local, peer, peer_info.clone()) {
                            let server = self.clone();
                            tokio::spawn(async move { server.inner.handler.handle(inbound).await });
                        }
                    }
                    None => continue,
                },
                () = &mut handshake => {
                    connection.close();
                    let error = Error::HandshakeTimeout {
                        side: Side::Server,
                        peer,
                        stage: Stage::Http2,
                        after: cfg.h2_handshake_timeout,
                    };
                    info!(%peer, error = %error, "HBONE server: refused connection");
                    break Ok(Some(error));
                }
                failure = &mut keepalive => {
                    connection.close();
                    break Ok(Some(keepalive_error(failure, Side::Server, peer)));
                }
            }
        };
        match ended {
            // Handed over to another process, which serves it from now on.
            Err(_) if connection.has_moved() => Ok(()),
            // Closed by us: give the driver a moment to send the GOAWAY.
            Ok(Some(error)) => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drive).await;
                Err(error)
            }
            // Gone away with every stream done: a normal end.
            Ok(None) => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drive).await;
                Ok(())
            }
            // The client closed the connection: the normal end.
            Err(Failure::Io {
                kind: std::io::ErrorKind::UnexpectedEof,
                ..
            }) => Ok(()),
            Err(Failure::GoAway {
                remote: true,
                reason,
            }) if reason.0 == 0 => Ok(()),
            Err(source) => Err(Error::Connection {
                side: Side::Server,
                peer,
                source: Http2Error(source),
            }),
        }
    }
}

/// Answers 400 to a stream that is not a CONNECT with a usable `:authority`; otherwise the
/// request for the handler.
fn check_stream(
    request: Request,
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
    peer: Arc<PeerInfo>,
) -> Option<InboundConnect> {
    let Request { incoming, stream } = request;
    let head = incoming.head;
    if head.method != b"CONNECT" {
        debug!(%peer_addr, method = %String::from_utf8_lossy(&head.method), "HBONE server: 400, not a CONNECT");
        send_status(&stream, StatusCode::BAD_REQUEST);
        return None;
    }
    let authority = match head.authority.as_deref().map(Authority::parse) {
        Some(Ok(authority)) => authority,
        Some(Err(e)) => {
            debug!(%peer_addr, error = %e, "HBONE server: 400, bad authority");
            send_status(&stream, StatusCode::BAD_REQUEST);
            return None;
        }
        None => {
            debug!(%peer_addr, "HBONE server: 400, CONNECT without :authority");
            send_status(&stream, StatusCode::BAD_REQUEST);
            return None;
        }
    };
    Some(InboundConnect {
        inner: Box::new(ConnectParts {
            authority,
            headers: head.headers,
            local_addr,
            peer_addr,
            peer,
            stream: Some(stream),
        }),
    })
}

impl InboundConnect {
    /// The parsed `:authority`: where the client wants its bytes to go.
    pub fn authority(&self) -> &Authority {
        &self.inner.authority
    }

    /// The request headers (`forwarded`, `baggage`, `traceparent`, ...).
    pub fn headers(&self) -> &HeaderMap {
        &self.inner.headers
    }

    /// The server socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The client's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer_addr
    }

    /// The client's certificate chain, leaf first, as verified by the TLS configuration.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.inner.peer.certificates
    }

    /// What `derive` makes of the client's certificate chain, computed once per HBONE connection
    /// and shared by all its CONNECTs (the chain cannot change within a TLS connection), so a
    /// handler that needs, say, the client's SPIFFE id parses the certificate once, not once per
    /// tunnel. One type is memoized per connection: asking for another `T` on the same
    /// connection calls `derive` every time.
    pub fn peer_memo<T: Clone + Send + Sync + 'static>(
        &self,
        derive: impl FnOnce(&[CertificateDer<'static>]) -> T,
    ) -> T {
        self.inner.peer.memo(derive)
    }

    /// Answers `200` and returns the tunnel.
    ///
    /// The answer is written when the calling task next waits, or with the tunnel's first write
    /// if that comes sooner: a handler that hands the bytes which came with the CONNECT to its
    /// destination in the same turn gets them there before the answer's write, and an answer
    /// and the first reply in the same turn share one write.
    pub fn accept(self) -> std::io::Result<Tunnel> {
        self.accept_with(HeaderMap::new())
    }

    /// Answers `200` with extra response headers and returns the tunnel.
    pub fn accept_with(mut self, headers: HeaderMap) -> std::io::Result<Tunnel> {
        let stream = self.inner.stream.take().expect("answered once");
        stream
            .respond(StatusCode::OK, &headers, false)
            .map_err(failure_to_io)?;
        Ok(Tunnel::new(stream, None))
    }

    /// Refuses the tunnel with `status` (for example 401 for a policy denial, 503 when the
    /// destination cannot be reached).
    pub fn reject(mut self, status: StatusCode) {
        if let Some(stream) = self.inner.stream.take() {
            send_status(&stream, status);
        }
    }
}

impl Drop for InboundConnect {
    fn drop(&mut self) {
        if let Some(stream) = self.inner.stream.take() {
            debug!(authority = %self.inner.authority, "HBONE server: handler dropped the request, 503");
            send_status(&stream, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

fn send_status(stream: &StreamRef, status: StatusCode) {
    let _ = stream.respond(status, &HeaderMap::new(), true);
}

/// The error for a connection whose keepalive gave up: a PING that went unanswered is a
/// timeout; a PING that could not be sent means the connection had already closed.
fn keepalive_error(failure: KeepaliveFailure, side: Side, peer: SocketAddr) -> Error {
    match failure {
        KeepaliveFailure::Timeout(after) => {
            warn!(%peer, %side, "HBONE: closing connection, peer is unresponsive");
            Error::KeepaliveTimeout { side, peer, after }
        }
        KeepaliveFailure::Closed(source) => Error::Connection {
            side,
            peer,
            source: Http2Error(source),
        },
    }
}

/// Errors from `accept` that concern one connection or a momentary shortage, not the listener.
fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    ) || matches!(e.raw_os_error(), Some(23 | 24 | 12 | 105)) // ENFILE, EMFILE, ENOMEM, ENOBUFS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_memo_derives_once_per_connection_and_per_type() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let peer = PeerInfo {
            certificates: vec![CertificateDer::from(vec![1u8, 2, 3])].into(),
            memo: std::sync::OnceLock::new(),
        };
        let calls = AtomicUsize::new(0);
        let derive = |chain: &[CertificateDer<'static>]| {
            calls.fetch_add(1, Ordering::SeqCst);
            chain[0].len()
        };
        assert_eq!(peer.memo(derive), 3);
        assert_eq!(peer.memo(derive), 3);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "derived again on the same connection"
        );
        // Another type is not mixed up with the memoized one: derived each time.
        assert_eq!(peer.memo(|_| "other".to_owned()), "other");
        assert_eq!(peer.memo(derive), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_ping_on_a_closed_connection_is_reported_as_closed_not_as_a_timeout() {
        let peer = SocketAddr::from(([127, 0, 0, 1], 15008));
        let closed = keepalive_error(
            KeepaliveFailure::Closed(Failure::GoAway {
                reason: crate::wire::frame::Reason::NO_ERROR,
                remote: true,
            }),
            Side::Server,
            peer,
        );
        assert!(matches!(closed, Error::Connection { .. }), "{closed}");
        assert!(!closed.to_string().contains("keepalive"), "{closed}");
        let timeout = keepalive_error(
            KeepaliveFailure::Timeout(std::time::Duration::from_secs(1)),
            Side::Server,
            peer,
        );
        assert!(
            matches!(timeout, Error::KeepaliveTimeout { .. }),
            "{timeout}"
        );
    }
}
