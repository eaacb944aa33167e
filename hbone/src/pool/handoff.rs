//! A pool's side of a handoff: its connections, with their tunnels, out to another process
//! ([`Pool::hand_off`]) and in from one ([`Pool::adopt`]), where they serve new tunnels of
//! their key as any connection the pool dialed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::{ConnDriver, Dialer, Pool, PooledConn};
use crate::adopt::{AdoptedTunnel, MovedConnection, reassemble};
use crate::error::{Error, Side};
use crate::tunnel::StreamSlot;

/// A pooled connection handed out of this process, with the key it was dialed for (the
/// adopting pool serves new tunnels of that key on it).
#[derive(Debug)]
pub struct MovedPooled<K> {
    /// The caller's key of the connection.
    pub key: K,
    /// The connection (its socket's peer is the server it was dialed to).
    pub connection: MovedConnection,
}

/// What [`Pool::hand_off`] did.
#[derive(Debug)]
pub struct PoolHandOff<K> {
    /// The connections handed out: this pool no longer holds them.
    pub moved: Vec<MovedPooled<K>>,
    /// The connections that stay here (the server and why): a dial in progress, a CONNECT not
    /// yet answered, a copy that did not pause in time. They go on as before, in the pool.
    pub stayed: Vec<(SocketAddr, String)>,
}

impl<K> Default for PoolHandOff<K> {
    fn default() -> Self {
        PoolHandOff {
            moved: Vec::new(),
            stayed: Vec::new(),
        }
    }
}

/// How often a handoff waiting for dials to finish looks again.
const DIAL_CHECK: Duration = Duration::from_millis(10);

impl<K, D> Pool<K, D>
where
    K: Clone + Eq + std::hash::Hash + Send + Sync + std::fmt::Debug + 'static,
    D: Dialer<K>,
{
    /// Hands every connection of the pool out of this process, with its tunnels (those whose
    /// application copies with [`copy_tunnel_movable`](crate::handoff::copy_tunnel_movable); the
    /// pool's configuration must be [`movable`](crate::Config::movable) and its dialer's rustls
    /// configurations must log to [`traffic_secret_log`](crate::handoff::traffic_secret_log)).
    /// Dials under way finish first (within `patience`); then each connection's copies pause,
    /// and once they all have and its session has settled it is taken apart, as
    /// [`Server::hand_off`](crate::Server::hand_off) does. A connection that does not settle
    /// within `patience` stays (see [`PoolHandOff::stayed`]). The caller stops asking for new
    /// tunnels first: a connection dialed after the dials were counted stays too.
    pub async fn hand_off(&self, patience: Duration) -> PoolHandOff<K> {
        let deadline = Instant::now() + patience;
        let (connections, dialing) = loop {
            let (connections, dialing) = {
                let keys = self.inner.keys();
                let dialing = keys.values().filter(|s| s.dialing.is_some()).count();
                let connections: Vec<(K, Arc<PooledConn>)> = keys
                    .iter()
                    .flat_map(|((key, _), state)| {
                        state
                            .conns
                            .iter()
                            .filter(|c| !c.is_dead())
                            .map(move |c| (key.clone(), c.clone()))
                    })
                    .collect();
                (connections, dialing)
            };
            if dialing == 0 || Instant::now() >= deadline {
                break (connections, dialing);
            }
            tokio::time::sleep(DIAL_CHECK).await;
        };
        let mut done = PoolHandOff::default();
        if dialing > 0 {
            let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
            let why = format!("{dialing} connection(s) still being dialed");
            done.stayed.push((unknown, why));
        }
        let attempts = connections.into_iter().map(|(key, conn)| async move {
            let moved = conn.conn.hand_off(patience).await;
            (key, conn, moved)
        });
        for (key, conn, moved) in futures_util::future::join_all(attempts).await {
            let moved = match moved {
                Ok(moved) => moved,
                Err(e) => {
                    done.stayed.push((conn.peer, e.to_string()));
                    continue;
                }
            };
            // No checkout takes it any more; its driver sees it gone and forgets it.
            conn.dead.store(true, Ordering::Release);
            match MovedConnection::from_moved(moved) {
                Ok(connection) => done.moved.push(MovedPooled { key, connection }),
                // Taken apart already: it can neither stay nor go. Its server sees it end.
                Err(e) => {
                    tracing::warn!(peer = %conn.peer, error = %e, "HBONE handoff: a pooled connection's socket could not be handed over; it is lost");
                }
            }
        }
        done
    }

    /// Takes on a connection another process's pool handed out ([`Pool::hand_off`] there) as a
    /// connection of `key` to its socket's peer: new tunnels of that key may ride it, as on a
    /// connection dialed here, and it is pinged and closed when idle the same way; but when the
    /// pool already has a connection of the key open to new tunnels (its own, dialed while the
    /// other process still served, or one adopted before), it retires: it takes no new tunnel
    /// and closes once its last tunnel ends. Returns its
    /// tunnels for the application to go on copying (each holds a stream slot of it). Refused,
    /// the connection closed, when its state does not check out. Must be called within a Tokio
    /// runtime.
    pub fn adopt(&self, key: K, moved: MovedConnection) -> Result<Vec<AdoptedTunnel>, Error> {
        let mut r = reassemble(moved, &self.inner.config, Side::Client)?;
        let conn = PooledConn::new(&self.inner, r.peer, r.connection.clone());
        let adopted = r.adopted_tunnels(|| {
            conn.active.fetch_add(1, Ordering::AcqRel);
            Some(StreamSlot::new(conn.clone()))
        });
        let key = (key, r.peer);
        let retiring = {
            let mut keys = self.inner.keys();
            let state = keys.entry(key.clone()).or_default();
            let retiring = state.conns.iter().any(|c| c.is_open_to_new());
            conn.retiring.store(retiring, Ordering::Release);
            state.conns.push(conn.clone());
            retiring
        };
        tracing::debug!(conn = conn.id, peer = %r.peer, key = ?key.0, tunnels = adopted.len(), retiring, "HBONE connection adopted from another process");
        let driver = ConnDriver {
            pool: Arc::downgrade(&self.inner),
            key,
            conn,
        };
        tokio::spawn(driver.run(None));
        Ok(adopted)
    }
}
