//! A server's side of a handoff: its connections, with their tunnels, out to another process
//! ([`Server::hand_off`]) and in from one ([`Server::adopt`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{ConnectHandler, PeerInfo, Server};
use crate::adopt::{AdoptedTunnel, MovedConnection, Reassembled, reassemble};
use crate::error::{Error, Side};
use crate::wire::conn::Connection;

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

/// An adopted connection's serving ([`Server::adopt_serving`]): run it to its end.
pub type AdoptedServing = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

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
            match MovedConnection::from_moved(moved) {
                Ok(moved) => done.moved.push(moved),
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
        let (tunnels, serving) = self.adopt_serving(moved)?;
        tokio::spawn(serving);
        Ok(tunnels)
    }

    /// [`Server::adopt`], handing the connection's serving to the caller instead of spawning
    /// it: run the future (it ends when the connection does) where the connections accepted by
    /// this server run, so that whatever ends them (a workload going away, a drain's deadline)
    /// ends this one too.
    pub fn adopt_serving(
        &self,
        moved: MovedConnection,
    ) -> Result<(Vec<AdoptedTunnel>, AdoptedServing), Error> {
        let mut r = reassemble(moved, &self.inner.config, Side::Server)?;
        let adopted = r.adopted_tunnels(|| None);
        let Reassembled {
            connection,
            peer,
            local,
            certificates,
            ..
        } = r;
        let peer_info = Arc::new(PeerInfo {
            certificates,
            memo: std::sync::OnceLock::new(),
        });
        let server = self.clone();
        let serving = Box::pin(async move {
            let live = server.inner.live.settling(peer);
            live.serve(&connection);
            if let Err(e) = server
                .run(connection, Some(live), local, peer, peer_info)
                .await
            {
                tracing::debug!(%peer, error = %e, "HBONE server: an adopted connection ended with an error");
            }
        });
        Ok((adopted, serving))
    }
}
