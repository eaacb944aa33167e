//! A server's side of a handoff: its connections, with their tunnels, out to another process
//! ([`Server::hand_off`]) and in from one ([`Server::adopt`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use super::{ConnectHandler, PeerInfo, Server};
use crate::error::{Error, Side};
use crate::moving::{CopyState, MovedTunnel};
use crate::tunnel::Tunnel;
use crate::wire::conn::{Connection, ConnectionState};
use crate::wire::session::Limits;

/// The connections a server is serving over TCP: what a handoff moves. A connection is
/// settling (no HTTP/2 connection yet: its TLS handshake is under way) until it is serving.
#[derive(Debug, Default)]
pub(crate) struct Live {
    connections: Mutex<HashMap<u64, (Option<Connection>, SocketAddr)>>,
    next: AtomicU64,
}

/// A connection's place in [`Live`]; gone with it.
pub(crate) struct LiveGuard<'a> {
    live: &'a Live,
    id: u64,
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (Option<Connection>, SocketAddr)>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection from `peer` whose handshake begins.
    pub(crate) fn settling(&self, peer: SocketAddr) -> LiveGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (None, peer));
        LiveGuard { live: self, id }
    }

    /// The connections served now, and how many are still settling.
    fn serving(&self) -> (Vec<(Connection, SocketAddr)>, usize) {
        let live = self.lock();
        let serving: Vec<_> = live
            .values()
            .filter_map(|(c, peer)| c.clone().map(|c| (c, *peer)))
            .collect();
        let settling = live.len() - serving.len();
        (serving, settling)
    }
}

impl LiveGuard<'_> {
    /// The connection's HTTP/2 connection: it is serving from now on.
    pub(crate) fn serve(&self, connection: &Connection) {
        if let Some(entry) = self.live.lock().get_mut(&self.id) {
            entry.0 = Some(connection.clone());
        }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

/// A connection handed out of this process: its socket, its state and its tunnels. Send it
/// (the socket and each tunnel's application socket as descriptors) to the process that goes on
/// with it, which gives it to [`Server::adopt`].
#[derive(Debug)]
pub struct MovedConnection {
    /// The TCP connection with the client.
    pub socket: std::net::TcpStream,
    /// Its TLS and HTTP/2 state.
    pub state: ConnectionState,
    /// Its tunnels, in stream order. A stream of the state without a tunnel here is reset by the
    /// adopting process (its copy was gone when the connection moved).
    pub tunnels: Vec<MovedTunnel>,
}

/// What [`Server::hand_off`] did.
#[derive(Debug, Default)]
pub struct HandOff {
    /// The connections handed out: this process no longer serves them.
    pub moved: Vec<MovedConnection>,
    /// The connections that stay here (the client and why): a handshake in progress, a stream
    /// not yet answered, a copy that did not pause in time. They go on as before; a server being
    /// replaced lets them [go away](Server::go_away).
    pub stayed: Vec<(SocketAddr, String)>,
}

/// One tunnel of an adopted connection, for the application to go on copying (with
/// [`copy_tunnel_movable`](crate::handoff::copy_tunnel_movable) and `copy`).
#[derive(Debug)]
pub struct AdoptedTunnel {
    /// The tunnel.
    pub tunnel: Tunnel,
    /// The application's socket (non-blocking).
    pub app: std::net::TcpStream,
    /// Where its copy stood.
    pub copy: CopyState,
    /// What the application attached to the copy in the old process.
    pub memo: Vec<u8>,
    /// The client of the HBONE connection.
    pub peer_addr: SocketAddr,
    /// The client's certificate chain, its own first.
    pub peer_certificates: Arc<[CertificateDer<'static>]>,
}

impl<H: ConnectHandler> Server<H> {
    /// Hands every connection this server serves over TCP out of this process, with its tunnels
    /// (those whose application copies with
    /// [`copy_tunnel_movable`](crate::handoff::copy_tunnel_movable); the server's configuration
    /// must be [`movable`](crate::Config::movable)). Each connection's copies pause, and once
    /// they all have and its session has settled it is taken apart: from then on nothing of it
    /// is read or written here, and each copy ends with
    /// [`Copied::Moved`](crate::handoff::Copied::Moved). A connection that does not settle within
    /// `patience` stays (see [`HandOff::stayed`]).
    pub async fn hand_off(&self, patience: Duration) -> HandOff {
        // Handshakes under way finish first (within `patience`), so their connections move too:
        // a caller that stopped accepting before this leaves none behind.
        let deadline = tokio::time::Instant::now() + patience;
        let (connections, settling) = loop {
            let (serving, settling) = self.inner.live.serving();
            if settling == 0 || tokio::time::Instant::now() >= deadline {
                break (serving, settling);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let attempts = connections.iter().map(|(connection, peer)| async move {
            let moved = connection.hand_off(patience).await;
            (*peer, moved)
        });
        let mut done = HandOff::default();
        if settling > 0 {
            let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
            let why = format!("{settling} connection(s) still in their TLS handshake");
            done.stayed.push((unknown, why));
        }
        for (peer, moved) in futures_util::future::join_all(attempts).await {
            let moved = match moved {
                Ok(moved) => moved,
                Err(e) => {
                    done.stayed.push((peer, e.to_string()));
                    continue;
                }
            };
            // The live set holds connections over TCP only (see `serve_h2`).
            let socket = match moved.socket.downcast::<tokio::net::TcpStream>() {
                Ok(tcp) => tcp.into_std(),
                Err(_) => Err(std::io::Error::other("not a TCP connection")),
            };
            match socket {
                Ok(socket) => done.moved.push(MovedConnection {
                    socket,
                    state: moved.state,
                    tunnels: moved.tunnels,
                }),
                // Taken apart already: it can neither stay nor go. Its client sees it end.
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "HBONE handoff: a connection's socket could not be handed over; it is lost");
                }
            }
        }
        done
    }

    /// Takes on a connection another process handed out ([`Server::hand_off`] there): serves it
    /// from now on (new streams go to this server's handler) and returns its tunnels for the
    /// application to go on copying. Refused, the connection closed, when its state does not
    /// check out. Must be called within a Tokio runtime.
    pub fn adopt(&self, moved: MovedConnection) -> Result<Vec<AdoptedTunnel>, Error> {
        let MovedConnection {
            socket,
            state,
            mut tunnels,
        } = moved;
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let refused = |peer, reason: String| Error::Adopt {
            side: Side::Server,
            peer,
            reason,
        };
        let peer = socket.peer_addr().map_err(|e| {
            refused(
                unknown,
                format!("the socket has no peer (is it connected?): {e}"),
            )
        })?;
        let local = socket
            .local_addr()
            .map_err(|e| refused(peer, format!("the socket has no local address: {e}")))?;
        if state.session.client {
            return Err(refused(
                peer,
                "the state is a client's, and this is a server".into(),
            ));
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| refused(peer, format!("the socket cannot be made non-blocking: {e}")))?;
        let tcp = tokio::net::TcpStream::from_std(socket)
            .map_err(|e| refused(peer, format!("the socket cannot be registered: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let certificates: Arc<[CertificateDer<'static>]> = state
            .tls
            .peer_certificates
            .iter()
            .map(|der| CertificateDer::from(der.clone()))
            .collect();
        if certificates.is_empty() {
            return Err(refused(peer, "the client presented no certificate".into()));
        }
        let config = &self.inner.config;
        let tls = crate::tls::TlsStream::from_state(tcp, state.tls, config.tls_sizes())
            .map_err(|e| refused(peer, format!("its TLS state: {e}")))?;
        let sent_eof: HashMap<u32, bool> = state
            .session
            .streams
            .iter()
            .map(|s| (s.id, s.send_eof))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in &tunnels {
            if !sent_eof.contains_key(&t.stream_id) {
                return Err(refused(
                    peer,
                    format!("a tunnel on stream {}, which is not open", t.stream_id),
                ));
            }
            if !seen.insert(t.stream_id) {
                return Err(refused(
                    peer,
                    format!("two tunnels on stream {}", t.stream_id),
                ));
            }
        }
        let (connection, streams) = Connection::put_together(
            state.session,
            state.received,
            Limits::from_config(config),
            tls,
        )
        .map_err(|e| refused(peer, format!("its HTTP/2 state: {e}")))?;
        let peer_info = Arc::new(PeerInfo {
            certificates: certificates.clone(),
            memo: std::sync::OnceLock::new(),
        });
        let mut adopted = Vec::with_capacity(tunnels.len());
        for stream in streams {
            let id = stream.id();
            let Some(at) = tunnels.iter().position(|t| t.stream_id == id) else {
                // Its copy did not come along: the client's end must not wait for it.
                tracing::info!(%peer, stream = id, "HBONE handoff: a moved stream came without its tunnel; reset");
                Tunnel::new(stream, None).abort();
                continue;
            };
            let t = tunnels.swap_remove(at);
            let write_closed = sent_eof.get(&id).copied().unwrap_or(false);
            adopted.push(AdoptedTunnel {
                tunnel: Tunnel::moved(stream, t.copy.to_app_eof, write_closed),
                app: std::net::TcpStream::from(t.app),
                copy: t.copy,
                memo: t.memo,
                peer_addr: peer,
                peer_certificates: certificates.clone(),
            });
        }
        let server = self.clone();
        tokio::spawn(async move {
            let live = server.inner.live.settling(peer);
            live.serve(&connection);
            if let Err(e) = server
                .run(connection, Some(live), local, peer, peer_info)
                .await
            {
                tracing::debug!(%peer, error = %e, "HBONE server: an adopted connection ended with an error");
            }
        });
        Ok(adopted)
    }
}
