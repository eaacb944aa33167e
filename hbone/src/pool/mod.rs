//! The client side: a pool of HBONE connections, keyed by what makes two tunnels shareable.
//!
//! Why a pool with a caller-chosen key: two tunnels may share one mTLS connection only when they
//! would present the same client identity and accept the same server identities at the same
//! address. The caller's key says which identities (DESIGN.md: source identity, destination
//! identities); the pool never looks inside it, and always adds the destination address itself,
//! so a tunnel for one address can never ride a connection dialed to another.
//!
//! Behaviour:
//! - a tunnel reuses a live connection of its key that has a free stream slot (slots = the lower
//!   of `Config::max_concurrent_streams` and the peer's SETTINGS_MAX_CONCURRENT_STREAMS);
//! - only one task dials per key at a time; the others wait for that dial and share its result;
//! - a connection with no open tunnel for `Config::idle_timeout` is closed;
//! - a connection adopted from another process ([`Pool::adopt`]) for a key that already has a
//!   connection open to new tunnels retires: it takes no new tunnel and closes once its last
//!   tunnel ends (so repeated upgrades leave a key one connection, not one per upgrade);
//! - a keepalive PING that is not answered within `Config::keepalive_timeout` kills the
//!   connection, which fails its tunnels at once and removes it from the pool;
//! - a failed dial leaves nothing in the pool's maps, and a panic in any task that holds the
//!   pool's lock (there should be none) does not poison the pool for other callers.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::authority::Authority;
use crate::error::{BoxError, Error, Http2Error, Side, Stage};
use crate::keepalive::{KeepaliveFailure, keepalive};
use crate::tunnel::{Slot, StreamSlot, Tunnel};
use crate::wire::conn::Connection;
use crate::wire::session::{Failure, Limits, Role};
use crate::{Config, H2_ALPN};

pub(crate) mod handoff;

/// How the pool opens connections: which TLS settings a key uses, and how to open the socket.
///
/// Implement this to present per-identity certificates (look them up by key) or to dial from
/// another network namespace with a socket mark. [`StaticTls`] covers the simple case.
pub trait Dialer<K>: Send + Sync + 'static {
    /// The rustls client configuration for connections of `key`. It must offer ALPN `h2`
    /// (connections that do not negotiate it are refused) and should verify the server's
    /// identity; the pool adds nothing to it.
    fn client_config(
        &self,
        key: &K,
    ) -> impl Future<Output = Result<Arc<ClientConfig>, BoxError>> + Send;

    /// Opens the TCP connection to `target`. The default is a plain `TcpStream::connect`.
    fn connect_tcp(
        &self,
        key: &K,
        target: SocketAddr,
    ) -> impl Future<Output = std::io::Result<TcpStream>> + Send {
        let _ = key;
        TcpStream::connect(target)
    }
}

/// A [`Dialer`] that uses one client configuration for every key.
#[derive(Debug, Clone)]
pub struct StaticTls(pub Arc<ClientConfig>);

impl<K: Sync> Dialer<K> for StaticTls {
    async fn client_config(&self, _key: &K) -> Result<Arc<ClientConfig>, BoxError> {
        Ok(self.0.clone())
    }
}

/// A pool of HBONE client connections. Cheap to clone; clones share the connections.
pub struct Pool<K, D> {
    inner: Arc<PoolInner<K, D>>,
}

impl<K, D> Clone for Pool<K, D> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<K, D> std::fmt::Debug for Pool<K, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct PoolInner<K, D> {
    config: Config,
    dialer: D,
    keys: Mutex<HashMap<(K, SocketAddr), KeyState>>,
    next_conn_id: AtomicU64,
}

impl<K, D> PoolInner<K, D> {
    /// The pool's lock. No code panics while holding it; should one ever do so, the maps are
    /// still consistent (every change is a single insert, remove or retain), so the poison flag
    /// is ignored rather than turning one failure into a failure of every caller.
    fn keys(&self) -> MutexGuard<'_, HashMap<(K, SocketAddr), KeyState>> {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Locks a connection's timestamp (a plain value: a poisoned lock still holds a valid one).
fn lock_time(m: &Mutex<Instant>) -> MutexGuard<'_, Instant> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct KeyState {
    conns: Vec<Arc<PooledConn>>,
    /// Set while one task dials for this key; others wait for the outcome.
    dialing: Option<watch::Receiver<Option<DialOutcome>>>,
}

/// What `checkout` does when no connection has a free slot.
enum Checkout {
    Dial(watch::Sender<Option<DialOutcome>>),
    Wait(watch::Receiver<Option<DialOutcome>>),
}

/// What waiting tasks learn about a dial they did not make.
#[derive(Clone)]
enum DialOutcome {
    Connected,
    Failed(Arc<str>),
}

#[derive(Debug)]
struct PooledConn {
    id: u64,
    peer: SocketAddr,
    conn: Connection,
    active: AtomicUsize,
    cap: usize,
    dead: AtomicBool,
    /// Takes no new tunnel; closed once its last tunnel ends (an adopted connection of a key
    /// that has another).
    retiring: AtomicBool,
    last_active: Mutex<Instant>,
    /// Tells the connection's driver to close it now (it can carry no stream at all).
    close: tokio::sync::Notify,
    /// Woken when the connection's last tunnel ends.
    emptied: tokio::sync::Notify,
}

impl<K, D> Pool<K, D>
where
    K: Clone + Eq + Hash + Send + Sync + std::fmt::Debug + 'static,
    D: Dialer<K>,
{
    /// Creates an empty pool. Must be called within a Tokio runtime when connections are made.
    pub fn new(config: Config, dialer: D) -> Self {
        Pool {
            inner: Arc::new(PoolInner {
                config,
                dialer,
                keys: Mutex::new(HashMap::new()),
                next_conn_id: AtomicU64::new(1),
            }),
        }
    }

    /// Opens a tunnel to `authority` through the HBONE server at `target`, over a connection of
    /// (`key`, `target`) (reused, or dialed if none has a free slot). `headers` are sent with the
    /// CONNECT (for example `forwarded`, `baggage`, `traceparent`; see [`crate::headers`]).
    ///
    /// Returns [`Error::Status`] when the server answers anything but 200,
    /// [`Error::ConnectTimeout`] when it does not answer within `Config::connect_timeout`, and
    /// [`Error::NoStreamCapacity`] when it allows no streams at all.
    pub async fn connect(
        &self,
        key: K,
        target: SocketAddr,
        authority: &Authority,
        headers: HeaderMap,
    ) -> Result<Tunnel, Error> {
        self.connect_with_data(key, target, authority, headers, Bytes::new())
            .await
    }

    /// Like [`Pool::connect`], sending `first` (bytes the tunnel's client has already sent)
    /// right behind the CONNECT, in the same write, instead of after the response: a client
    /// that speaks first saves a round trip between the proxies. The server reads them only once
    /// it has accepted the tunnel; if it refuses, it drops them with the stream, and so do we
    /// (the error says so). The bytes the stream's window does not take at once (more than the
    /// peer's initial window or frame size) are sent after the response, before this returns.
    ///
    /// Errors as [`Pool::connect`]; a retry on a fresh connection sends `first` again, which is
    /// safe for the same reason as the retry (the server never processed the stream).
    pub async fn connect_with_data(
        &self,
        key: K,
        target: SocketAddr,
        authority: &Authority,
        headers: HeaderMap,
        first: Bytes,
    ) -> Result<Tunnel, Error> {
        let authority = authority.to_string();
        let key = (key, target);
        let timeout = self.inner.config.connect_timeout;
        let mut retried = false;
        loop {
            let (conn, slot, reused) = match self.checkout(&key).await {
                Ok(checked_out) => checked_out,
                // The server closed or went away right after the TLS handshake: it is stopping
                // (an old proxy during an upgrade). Nothing was sent; dial once more.
                Err(Error::H2Handshake { source, .. })
                    if !retried && source.0.is_peer_leaving() =>
                {
                    debug!(%target, error = %source, "dialing again: the server left during the HTTP/2 handshake");
                    retried = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let sent = send_connect(
                &conn,
                slot,
                target,
                &authority,
                headers.clone(),
                &first,
                timeout,
            );
            match sent.await {
                Ok(tunnel) => return Ok(tunnel),
                Err(Error::Stream { source, .. })
                    if !retried
                        && (reused && source.0.is_retryable() || source.0.is_unprocessed()) =>
                {
                    // The peer went away between checkout and CONNECT, or refused the stream
                    // unprocessed (with `first`, if it went along; also on a connection made
                    // for it, whose server began to go away meanwhile), so one retry on another
                    // connection is safe.
                    debug!(conn = conn.id, %target, error = %source, "retrying CONNECT on a new connection");
                    conn.dead.store(true, Ordering::Release);
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How many live connections the pool holds, over all keys.
    pub fn connection_count(&self) -> usize {
        let keys = self.inner.keys();
        keys.values().map(KeyState::live).sum()
    }

    /// How many live connections the pool holds for `key`, over all destination addresses.
    pub fn connection_count_for(&self, key: &K) -> usize {
        let keys = self.inner.keys();
        keys.iter()
            .filter(|((k, _), _)| k == key)
            .map(|(_, state)| state.live())
            .sum()
    }

    /// How many (key, destination) entries the pool tracks: those with a connection or a dial in
    /// progress. For diagnostics and leak checks; failed dials leave no entry behind.
    pub fn tracked_entries(&self) -> usize {
        self.inner.keys().len()
    }

    /// Finds a connection with a free slot for `key`, dialing one (alone) if needed.
    async fn checkout(
        &self,
        key: &(K, SocketAddr),
    ) -> Result<(Arc<PooledConn>, StreamSlot, bool), Error> {
        let target = key.1;
        loop {
            let next = {
                let mut keys = self.inner.keys();
                let state = keys.entry(key.clone()).or_default();
                state.conns.retain(|c| !c.is_dead());
                if let Some((conn, slot)) = state
                    .conns
                    .iter()
                    .find_map(|c| c.try_reserve().map(|s| (c.clone(), s)))
                {
                    return Ok((conn, slot, true));
                }
                match &state.dialing {
                    Some(rx) => Checkout::Wait(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        state.dialing = Some(rx);
                        Checkout::Dial(tx)
                    }
                }
            };
            match next {
                Checkout::Dial(tx) => return self.dial_as_leader(key, tx).await,
                Checkout::Wait(mut rx) => {
                    // Err: the dialing task was cancelled and its guard cleared the flag; retry.
                    let outcome = rx.wait_for(Option::is_some).await.map(|o| o.clone());
                    if let Ok(Some(DialOutcome::Failed(reason))) = outcome {
                        return Err(Error::SharedDial {
                            peer: target,
                            reason: reason.to_string(),
                        });
                    }
                }
            }
        }
    }

    async fn dial_as_leader(
        &self,
        key: &(K, SocketAddr),
        tx: watch::Sender<Option<DialOutcome>>,
    ) -> Result<(Arc<PooledConn>, StreamSlot, bool), Error> {
        // Clears the `dialing` flag (and an entry left empty) even if this future is dropped
        // half-way.
        let guard = DialGuard {
            pool: &self.inner,
            key,
        };
        // A new connection must have room for our stream: a server that allows none (SETTINGS
        // MAX_CONCURRENT_STREAMS = 0) is an error, and its connection is closed at once.
        let result = self
            .dial(key)
            .await
            .and_then(|conn| match conn.try_reserve() {
                Some(slot) => Ok((conn, slot)),
                None => {
                    conn.dead.store(true, Ordering::Release);
                    conn.close.notify_one();
                    Err(Error::NoStreamCapacity { peer: key.1 })
                }
            });
        let mut keys = self.inner.keys();
        let outcome = match result {
            Ok((conn, slot)) => {
                let state = keys.entry(key.clone()).or_default();
                state.dialing = None;
                state.conns.push(conn.clone());
                Ok((conn, slot, false))
            }
            Err(e) => {
                if let Some(state) = keys.get_mut(key) {
                    state.dialing = None;
                    state.conns.retain(|c| !c.is_dead());
                    if state.conns.is_empty() {
                        keys.remove(key);
                    }
                }
                Err(e)
            }
        };
        drop(keys);
        std::mem::forget(guard);
        let _ = tx.send(Some(match &outcome {
            Ok(_) => DialOutcome::Connected,
            Err(e) => DialOutcome::Failed(Arc::from(error_chain(e))),
        }));
        outcome
    }

    /// TCP connect, TLS, ALPN check, HTTP/2 handshake; then spawns the connection's driver.
    async fn dial(&self, key: &(K, SocketAddr)) -> Result<Arc<PooledConn>, Error> {
        let cfg = &self.inner.config;
        let (user_key, target) = (&key.0, key.1);
        let timed_out = |stage, after| Error::HandshakeTimeout {
            side: Side::Client,
            peer: target,
            stage,
            after,
        };
        let tls_handshake = async {
            let tls_config = self
                .inner
                .dialer
                .client_config(user_key)
                .await
                .map_err(|source| Error::TlsConfig {
                    peer: target,
                    source,
                })?;
            let tcp = self
                .inner
                .dialer
                .connect_tcp(user_key, target)
                .await
                .map_err(|source| Error::Connect {
                    peer: target,
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            // HBONE needs no SNI; an IP server name makes rustls send none. Identity is checked
            // by the configuration's verifier (URI SANs), not by this name.
            let name = ServerName::IpAddress(target.ip().into());
            let tls = crate::tls::connect(tls_config, name, tcp, cfg.tls_sizes())
                .await
                .map_err(|source| tls_failure(Side::Client, target, source))?;
            check_session(
                tls.protocol_version(),
                tls.alpn_protocol(),
                Side::Client,
                target,
            )?;
            Ok(tls)
        };
        let tls = tokio::time::timeout(cfg.tls_handshake_timeout, tls_handshake)
            .await
            .map_err(|_| timed_out(Stage::Tls, cfg.tls_handshake_timeout))??;
        let h2_handshake = async {
            let connection = Connection::new(Role::Client, Limits::from_config(cfg), tls);
            let conn = PooledConn::new(&self.inner, target, connection);
            let driver = ConnDriver {
                pool: Arc::downgrade(&self.inner),
                key: key.clone(),
                conn: conn.clone(),
            };
            let (ready_tx, ready_rx) = oneshot::channel();
            tokio::spawn(driver.run(Some(ready_tx)));
            // In TLS 1.3 the server judges our certificate after our handshake is done, and its
            // SETTINGS may still be in flight: wait for the answer to a first PING, so a refused
            // certificate is a dial error and the stream limit is known before first use.
            match ready_rx.await {
                Ok(Ok(())) => Ok(conn),
                Ok(Err(source)) => Err(Error::H2Handshake {
                    side: Side::Client,
                    peer: target,
                    source: Http2Error(source),
                }),
                Err(_) => Err(Error::ConnectionLost {
                    side: Side::Client,
                    peer: target,
                }),
            }
        };
        let conn = tokio::time::timeout(cfg.h2_handshake_timeout, h2_handshake)
            .await
            .map_err(|_| timed_out(Stage::Http2, cfg.h2_handshake_timeout))??;
        debug!(conn = conn.id, %target, key = ?user_key, "HBONE connection established");
        Ok(conn)
    }
}

/// Sends the CONNECT on `conn` and waits for the answer, at most `timeout` (dropping the
/// request on timeout resets the stream and frees its slot).
async fn send_connect(
    conn: &Arc<PooledConn>,
    slot: StreamSlot,
    target: SocketAddr,
    authority: &str,
    headers: HeaderMap,
    first: &Bytes,
    timeout: std::time::Duration,
) -> Result<Tunnel, Error> {
    let connect = conn.conn.connect(authority, &headers, first);
    let (response, stream, sent) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| Error::ConnectTimeout {
            peer: target,
            authority: authority.to_owned(),
            after: timeout,
        })?
        .map_err(|source| Error::Stream {
            peer: target,
            authority: authority.to_owned(),
            source: Http2Error(source),
        })?;
    if response.status != StatusCode::OK {
        return Err(Error::Status {
            peer: target,
            authority: authority.to_owned(),
            status: response.status,
        });
    }
    let mut tunnel = Tunnel::new(stream, Some(slot));
    if sent < first.len() {
        tunnel
            .send_bytes(first.slice(sent..))
            .await
            .map_err(|source| Error::FirstBytes {
                peer: target,
                authority: authority.to_owned(),
                source,
            })?;
    }
    Ok(tunnel)
}

/// The error and its sources on one line, for tasks that shared a failed dial.
fn error_chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The error of a failed TLS handshake: [`Error::TlsVersion`] when it settled on a version other
/// than 1.3, else [`Error::Tls`].
pub(crate) fn tls_failure(side: Side, peer: SocketAddr, source: std::io::Error) -> Error {
    match source
        .get_ref()
        .and_then(|e| e.downcast_ref::<crate::tls::NotTls13>())
    {
        Some(crate::tls::NotTls13(version)) => version_refused(side, peer, *version),
        None => Error::Tls { side, peer, source },
    }
}

fn version_refused(
    side: Side,
    peer: SocketAddr,
    version: Option<rustls::ProtocolVersion>,
) -> Error {
    Error::TlsVersion {
        side,
        peer,
        version: version.map_or("no version".to_owned(), |v| format!("{v:?}")),
    }
}

/// Fails closed unless the session is TLS 1.3 with ALPN `h2`.
pub(crate) fn check_session(
    version: Option<rustls::ProtocolVersion>,
    alpn: Option<&[u8]>,
    side: Side,
    peer: SocketAddr,
) -> Result<(), Error> {
    if version != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Err(version_refused(side, peer, version));
    }
    if alpn != Some(H2_ALPN) {
        return Err(Error::Alpn {
            side,
            peer,
            negotiated: describe_alpn(alpn),
        });
    }
    Ok(())
}

fn describe_alpn(alpn: Option<&[u8]>) -> String {
    match alpn {
        None => "none".to_owned(),
        Some(p) => format!("{:?}", String::from_utf8_lossy(p)),
    }
}

impl KeyState {
    fn live(&self) -> usize {
        self.conns.iter().filter(|c| !c.is_dead()).count()
    }
}

impl PooledConn {
    /// A connection of `pool` to `peer`, without tunnels yet.
    fn new<K, D>(pool: &PoolInner<K, D>, peer: SocketAddr, conn: Connection) -> Arc<Self> {
        Arc::new(PooledConn {
            id: pool.next_conn_id.fetch_add(1, Ordering::Relaxed),
            peer,
            conn,
            active: AtomicUsize::new(0),
            cap: pool.config.max_concurrent_streams.max(1) as usize,
            dead: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
            last_active: Mutex::new(Instant::now()),
            close: tokio::sync::Notify::new(),
            emptied: tokio::sync::Notify::new(),
        })
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whether new tunnels may still be placed on it (it may be full).
    fn is_open_to_new(&self) -> bool {
        !self.is_dead() && !self.retiring.load(Ordering::Acquire) && self.conn.can_open()
    }

    /// Takes a stream slot if the connection is alive and below both stream limits.
    fn try_reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        if !self.is_open_to_new() {
            return None;
        }
        let limit = self.cap.min(self.conn.peer_max_streams() as usize);
        let mut current = self.active.load(Ordering::Acquire);
        loop {
            if current >= limit {
                return None;
            }
            match self.active.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    *lock_time(&self.last_active) = Instant::now();
                    return Some(StreamSlot::new(self.clone()));
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// A tunnel's stream slot on this connection, given back when the tunnel is gone.
impl Slot for PooledConn {
    fn release(&self) {
        *lock_time(&self.last_active) = Instant::now();
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.emptied.notify_one();
        }
    }
}

/// Resets `KeyState::dialing` (and removes an entry left empty) if the dialing task is
/// cancelled before it finishes.
struct DialGuard<'a, K: Eq + Hash, D> {
    pool: &'a PoolInner<K, D>,
    key: &'a (K, SocketAddr),
}

impl<K: Eq + Hash, D> Drop for DialGuard<'_, K, D> {
    fn drop(&mut self) {
        let mut keys = self.pool.keys();
        if let Some(state) = keys.get_mut(self.key) {
            state.dialing = None;
            if state.conns.is_empty() {
                keys.remove(self.key);
            }
        }
    }
}

/// Drives one HTTP/2 client connection: polls it, pings it, closes it when idle.
struct ConnDriver<K, D> {
    pool: Weak<PoolInner<K, D>>,
    key: (K, SocketAddr),
    conn: Arc<PooledConn>,
}

impl<K, D> ConnDriver<K, D>
where
    K: Clone + Eq + Hash + Send + Sync + std::fmt::Debug + 'static,
    D: Send + Sync + 'static,
{
    /// Drives the connection; `ready` (a new connection's) learns how its first PING round
    /// trip went; an adopted connection has none.
    async fn run(self, ready: Option<oneshot::Sender<Result<(), Failure>>>) {
        let Some(config) = self.pool.upgrade().map(|pool| pool.config.clone()) else {
            return;
        };
        let id = self.conn.id;
        let peer = self.conn.peer;
        let connection = self.conn.conn.clone();
        let drive = connection.drive();
        tokio::pin!(drive);
        if let Some(mut ready) = ready {
            // Startup: the first PING round trip, or the connection's early death.
            let started = tokio::select! {
                biased;
                failure = &mut drive => Err(Some(failure)),
                first = connection.ping() => first.map_err(Some),
                // The dialer gave up (its HTTP/2 handshake timeout): close the connection.
                () = ready.closed() => Err(None),
            };
            match started {
                Ok(()) => {
                    let _ = ready.send(Ok(()));
                }
                Err(failure) => {
                    if let Some(failure) = failure {
                        let _ = ready.send(Err(failure));
                    }
                    self.conn.dead.store(true, Ordering::Release);
                    connection.close();
                    return;
                }
            }
        }
        let keepalive = async {
            match config.keepalive_interval {
                Some(interval) => keepalive(&connection, interval, config.keepalive_timeout).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            biased;
            failure = &mut drive => {
                debug!(conn = id, %peer, reason = %failure, "HBONE connection ended");
                true
            }
            failure = keepalive => {
                match failure {
                    KeepaliveFailure::Timeout(_) => {
                        warn!(conn = id, %peer, reason = %failure, "HBONE client: closing connection, peer is unresponsive");
                    }
                    KeepaliveFailure::Closed(_) => {
                        debug!(conn = id, %peer, reason = %failure, "HBONE connection closed");
                    }
                }
                false
            }
            () = self.idle(config.idle_timeout) => {
                let retired = self.conn.retiring.load(Ordering::Acquire);
                debug!(conn = id, %peer, retired, "HBONE connection closed after being idle");
                false
            }
            () = self.conn.close.notified() => {
                debug!(conn = id, %peer, "HBONE connection closed: the server allows no streams");
                false
            }
        };
        self.conn.dead.store(true, Ordering::Release);
        self.forget();
        if !ended {
            // GOAWAY, fail every stream still on it, and let the driver write it and close.
            connection.close();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drive).await;
        }
    }

    /// Resolves once the connection has had no tunnel for `timeout` (a retiring one: no tunnel
    /// at all); marks it dead then, under the pool lock, so no checkout can race with the close.
    async fn idle(&self, timeout: std::time::Duration) {
        loop {
            if self.conn.retiring.load(Ordering::Acquire) {
                // No checkout takes it: its count of tunnels only goes down.
                if self.conn.active.load(Ordering::Acquire) == 0 {
                    self.conn.dead.store(true, Ordering::Release);
                    return;
                }
                self.conn.emptied.notified().await;
                continue;
            }
            let last = *lock_time(&self.conn.last_active);
            tokio::time::sleep_until(last + timeout).await;
            let Some(pool) = self.pool.upgrade() else {
                return;
            };
            let _keys = pool.keys();
            let last = *lock_time(&self.conn.last_active);
            if self.conn.active.load(Ordering::Acquire) == 0 && last + timeout <= Instant::now() {
                self.conn.dead.store(true, Ordering::Release);
                return;
            }
            if self.conn.active.load(Ordering::Acquire) > 0 {
                drop(_keys);
                // Busy: look again in a quarter of the period, so that a connection whose last
                // tunnel closes now is closed at most a quarter period late (a full period made
                // it up to twice the timeout).
                tokio::time::sleep(timeout / 4).await;
            }
        }
    }

    fn forget(&self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut keys = pool.keys();
        if let Some(state) = keys.get_mut(&self.key) {
            state.conns.retain(|c| !Arc::ptr_eq(c, &self.conn));
            if state.conns.is_empty() && state.dialing.is_none() {
                keys.remove(&self.key);
            }
        }
    }
}
