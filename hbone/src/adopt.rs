//! What both ends of a handoff share: a connection taken apart in one process
//! ([`MovedConnection`]), checked and put together in another ([`reassemble`]), and its tunnels
//! handed to the application there ([`AdoptedTunnel`]). The server's side is
//! [`Server::hand_off`](crate::Server::hand_off) and [`Server::adopt`](crate::Server::adopt);
//! the client's, [`Pool::hand_off`](crate::Pool::hand_off) and
//! [`Pool::adopt`](crate::Pool::adopt).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

use crate::Config;
use crate::error::{Error, Side};
use crate::moving::{CopyState, MovedTunnel};
use crate::tunnel::Tunnel;
use crate::wire::conn::{Connection, ConnectionState, Moved, StreamRef};
use crate::wire::session::Limits;

/// A connection handed out of this process: its socket, its state and its tunnels. Send it
/// (the socket and each tunnel's application socket as descriptors) to the process that goes on
/// with it, which gives it to [`Server::adopt`](crate::Server::adopt) or
/// [`Pool::adopt`](crate::Pool::adopt), as its state's side says.
#[derive(Debug)]
pub struct MovedConnection {
    /// The TCP connection with the peer.
    pub socket: std::net::TcpStream,
    /// Its TLS and HTTP/2 state.
    pub state: ConnectionState,
    /// Its tunnels, in stream order. A stream of the state without a tunnel here is reset by the
    /// adopting process (its copy was gone when the connection moved).
    pub tunnels: Vec<MovedTunnel>,
}

impl MovedConnection {
    /// A connection just taken apart, its socket out of the runtime. Err: the socket could not
    /// leave it (then the connection is lost: it was taken apart already).
    pub(crate) fn from_moved(moved: Moved) -> std::io::Result<MovedConnection> {
        let socket = match moved.socket.downcast::<tokio::net::TcpStream>() {
            Ok(tcp) => tcp.into_std()?,
            Err(_) => return Err(std::io::Error::other("not a TCP connection")),
        };
        Ok(MovedConnection {
            socket,
            state: moved.state,
            tunnels: moved.tunnels,
        })
    }
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
    /// The other end of the HBONE connection (the client on a server, the server on a client).
    pub peer_addr: SocketAddr,
    /// That end's certificate chain, its own first.
    pub peer_certificates: Arc<[CertificateDer<'static>]>,
}

/// A moved connection put together again, not yet running.
pub(crate) struct Reassembled {
    pub(crate) connection: Connection,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) certificates: Arc<[CertificateDer<'static>]>,
    /// Each tunnel with its stream and whether our end of it was sent (END_STREAM).
    pub(crate) tunnels: Vec<(StreamRef, MovedTunnel, bool)>,
}

/// Checks `moved` (its socket connected, its state `side`'s, a certificate from the peer, each
/// tunnel on an open stream of its own) and puts it together under `config`; a stream that came
/// without its tunnel is reset. Must be called within a Tokio runtime.
pub(crate) fn reassemble(
    moved: MovedConnection,
    config: &Config,
    side: Side,
) -> Result<Reassembled, Error> {
    let MovedConnection {
        socket,
        state,
        mut tunnels,
    } = moved;
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let refused = |peer, reason: String| Error::Adopt { side, peer, reason };
    let peer = socket.peer_addr().map_err(|e| {
        refused(
            unknown,
            format!("the socket has no peer (is it connected?): {e}"),
        )
    })?;
    let local = socket
        .local_addr()
        .map_err(|e| refused(peer, format!("the socket has no local address: {e}")))?;
    let client = side == Side::Client;
    if state.session.client != client {
        let (theirs, ours) = if client {
            ("a server's", "a client")
        } else {
            ("a client's", "a server")
        };
        return Err(refused(
            peer,
            format!("the state is {theirs}, and this is {ours}"),
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
        let whom = if client { "server" } else { "client" };
        return Err(refused(
            peer,
            format!("the {whom} presented no certificate"),
        ));
    }
    let tls = crate::tls::TlsStream::from_state(tcp, state.tls, config.tls_sizes())
        .map_err(|e| refused(peer, format!("its TLS state: {e}")))?;
    let sent_eof: HashMap<u32, bool> = state
        .session
        .streams
        .iter()
        .map(|s| (s.id, s.send_eof))
        .collect();
    let mut seen = HashSet::new();
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
    let mut joined = Vec::with_capacity(tunnels.len());
    for stream in streams {
        let id = stream.id();
        let Some(at) = tunnels.iter().position(|t| t.stream_id == id) else {
            // Its copy did not come along: the peer's end must not wait for it.
            tracing::info!(%peer, stream = id, "HBONE handoff: a moved stream came without its tunnel; reset");
            Tunnel::new(stream, None).abort();
            continue;
        };
        let t = tunnels.swap_remove(at);
        let write_closed = sent_eof.get(&id).copied().unwrap_or(false);
        joined.push((stream, t, write_closed));
    }
    Ok(Reassembled {
        connection,
        peer,
        local,
        certificates,
        tunnels: joined,
    })
}

impl Reassembled {
    /// The tunnels for the application, each holding `slot()` (a pooled connection's stream
    /// count) while it lives.
    pub(crate) fn adopted_tunnels(
        &mut self,
        mut slot: impl FnMut() -> Option<crate::tunnel::StreamSlot>,
    ) -> Vec<AdoptedTunnel> {
        std::mem::take(&mut self.tunnels)
            .into_iter()
            .map(|(stream, t, write_closed)| AdoptedTunnel {
                tunnel: Tunnel::moved(stream, t.copy.to_app_eof, write_closed, slot()),
                app: std::net::TcpStream::from(t.app),
                copy: t.copy,
                memo: t.memo,
                peer_addr: self.peer,
                peer_certificates: self.certificates.clone(),
            })
            .collect()
    }
}
