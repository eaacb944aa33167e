//! One workload's data path, assembled the same way in both modes: the inbound handler with its
//! access log, the drain switch, the HBONE server, outbound, the connection tracker, the accept
//! loops (outbound, inbound HBONE, and inbound plaintext where there is a listener for it) and
//! the loop that re-checks open connections when the state changes. Dedicated mode
//! ([`crate::dedicated`]) assembles its one workload; shared mode ([`crate::inpod`]) one per pod
//! handed over. What differs between them comes in as data: the listeners, how sockets are made,
//! the TLS configuration.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use hbone::handoff::{MovedConnection, PoolHandOff};
use tokio::net::TcpListener;
use tracing::warn;

use crate::addr::{ClientAddr, OrigDst};
use crate::certs::Certificates;
use crate::connections::Connections;
use crate::inbound::Inbound;
use crate::outbound::{Outbound, PoolKey};
use crate::serve::{Tracker, accept_loop, serve_hbone, serve_outbound};
use crate::sockets::Connector;
use crate::state::{LocalWorkload, StateStore};
use crate::telemetry::metrics::Metrics;

/// What one workload's data path is made of.
pub(crate) struct Parts<C, A, P> {
    /// The state every decision reads.
    pub(crate) state: Arc<StateStore>,
    /// Where the workload's certificates come from (outbound presents them).
    pub(crate) certificates: Arc<C>,
    /// The workload served.
    pub(crate) local: LocalWorkload,
    /// The TLS configuration of the inbound HBONE server (the workload's identity).
    pub(crate) tls: Arc<rustls::ServerConfig>,
    /// HBONE settings, both directions.
    pub(crate) hbone: hbone::Config,
    /// Where connections are counted.
    pub(crate) metrics: Arc<Metrics>,
    /// How the inbound paths reach the app.
    pub(crate) app_connector: A,
    /// How outbound reaches peers (HBONE and passthrough).
    pub(crate) peer_connector: P,
}

/// Where the workload's connections arrive: one listener per address family served.
pub(crate) struct Listeners {
    /// Captured outbound connections (15001).
    pub(crate) outbound: Vec<TcpListener>,
    /// Inbound HBONE (15008).
    pub(crate) inbound: Vec<TcpListener>,
    /// Inbound plaintext (15006), in shared mode (none in dedicated mode).
    pub(crate) plain: Vec<TcpListener>,
}

/// An assembled data path: `serve` runs its accept loops and the policy re-check until dropped;
/// the rest is what a drain needs.
pub(crate) struct Assembled {
    /// The accept loops and the re-check loop.
    pub(crate) serve: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The live connection tasks.
    pub(crate) tracker: Tracker,
    /// The open inbound connections (re-checked on policy change).
    pub(crate) connections: Arc<Connections>,
    /// Set: new inbound connections are refused (draining).
    pub(crate) draining: Arc<AtomicBool>,
    /// Tells every inbound HBONE connection to go away gracefully (`hbone::Server::go_away`):
    /// clients open their new tunnels elsewhere, the tunnels here finish.
    pub(crate) go_away: Box<dyn Fn() + Send + Sync>,
    /// Moves the HBONE connections out of this process and in from another.
    pub(crate) handoff: PodHandoff,
}

/// A data path's HBONE connections moving between processes (an upgrade): the inbound ones
/// the HBONE server accepted, the outbound ones its pool dialed.
pub(crate) struct PodHandoff {
    /// Hands every inbound connection out (`hbone::Server::hand_off`), and every outbound one
    /// too when the second argument says so (`hbone::Pool::hand_off`), waiting at most this long
    /// for each to settle.
    pub(crate) hand_off: Box<dyn Fn(std::time::Duration, bool) -> HandingOff + Send + Sync>,
    /// Takes a connection in, an inbound one (no key) into the HBONE server, an outbound one
    /// into the pool under its key: served here from now on, each of its tunnels resumed
    /// (counted by the tracker). Returns how many tunnels go on.
    pub(crate) adopt:
        Box<dyn Fn(Option<PoolKey>, MovedConnection) -> Result<usize, hbone::Error> + Send + Sync>,
}

/// What a data path handed out, and what stayed.
#[derive(Debug, Default)]
pub(crate) struct PodHandedOff {
    /// The inbound connections.
    pub(crate) inbound: hbone::handoff::HandOff,
    /// The outbound ones.
    pub(crate) outbound: PoolHandOff<PoolKey>,
}

/// A handoff under way: resolves with what moved and what stayed.
pub(crate) type HandingOff = Pin<Box<dyn Future<Output = PodHandedOff> + Send>>;

/// Wires `parts` to `listeners`.
pub(crate) fn assemble<C, A, P>(parts: Parts<C, A, P>, listeners: Listeners) -> Assembled
where
    C: Certificates,
    A: Connector + Clone,
    P: Connector,
{
    let Parts {
        state,
        certificates,
        local,
        tls,
        hbone,
        metrics,
        app_connector,
        peer_connector,
    } = parts;
    let connections = Connections::new();
    let inbound = Inbound::new(
        state.clone(),
        connections.clone(),
        local.clone(),
        app_connector,
        |o| crate::telemetry::access_log::log_inbound(&o),
    )
    .with_metrics(metrics.clone())
    .movable(hbone.movable);
    let draining = inbound.drain_switch();
    let plain = Arc::new(inbound.plain());
    let resumer = Arc::new(inbound.clone());
    let server = hbone::Server::new(hbone.clone(), tls, inbound);
    let going = server.clone();
    let go_away = Box::new(move || going.go_away());
    let tracker = Tracker::default();
    let outbound = Arc::new(
        Outbound::with_connector(state.clone(), certificates, hbone, peer_connector)
            .with_metrics(metrics),
    );
    let (handing, handing_out) = (server.clone(), outbound.clone());
    let (adopting, adopting_out) = (server.clone(), outbound.clone());
    let (resumes, source) = (tracker.clone(), Arc::new(local.clone()));
    let handoff = PodHandoff {
        hand_off: Box::new(move |patience, with_outbound| {
            let (server, outbound) = (handing.clone(), handing_out.clone());
            Box::pin(async move {
                let (inbound, outbound) = tokio::join!(server.hand_off(patience), async {
                    if with_outbound {
                        outbound.hand_off(patience).await
                    } else {
                        PoolHandOff::default()
                    }
                });
                PodHandedOff { inbound, outbound }
            })
        }),
        adopt: Box::new(move |key, moved| {
            let Some(key) = key else {
                let tunnels = adopting.adopt(moved)?;
                let n = tunnels.len();
                for tunnel in tunnels {
                    let resumer = resumer.clone();
                    resumes.spawn_counted(async move { resumer.resume(tunnel).await });
                }
                return Ok(n);
            };
            let tunnels = adopting_out.adopt(key.clone(), moved)?;
            let n = tunnels.len();
            let key = Arc::new(key);
            for tunnel in tunnels {
                let (outbound, key, source) = (adopting_out.clone(), key.clone(), source.clone());
                resumes.spawn_counted(async move {
                    if let Some(o) = outbound.resume(tunnel, &key, &source).await {
                        crate::telemetry::access_log::log_outbound(&o);
                    }
                });
            }
            Ok(n)
        }),
    };
    // Connections run in tasks of their own, so closing the listeners (at a drain) leaves them.
    let mut loops: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();
    for listener in listeners.outbound {
        loops.push(Box::pin(serve_outbound(
            listener,
            outbound.clone(),
            local.clone(),
            tracker.clone(),
        )));
    }
    for listener in listeners.inbound {
        loops.push(Box::pin(serve_hbone(
            listener,
            server.clone(),
            tracker.clone(),
        )));
    }
    for listener in listeners.plain {
        let (t, plain) = (tracker.clone(), plain.clone());
        loops.push(Box::pin(accept_loop(
            listener,
            "inbound plaintext",
            move |stream, peer| {
                let plain = plain.clone();
                t.spawn_counted(async move {
                    let destination = match crate::sockets::original_dst(&stream, peer) {
                        Ok(d) => d,
                        Err(e) => {
                            warn!(src = %peer, error = %e, "inbound plaintext: no original destination");
                            return;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let o = plain
                        .serve(stream, ClientAddr(peer), OrigDst(destination.0))
                        .await;
                    crate::telemetry::access_log::log_inbound(&o);
                });
            },
        )));
    }
    // Every state change (an xDS or manifest update) re-checks the open inbound connections.
    let mut changes = state.subscribe();
    let recheck_connections = connections.clone();
    let recheck = async move {
        while changes.changed().await.is_ok() {
            recheck_connections.reauthorize(&state.snapshot());
        }
    };
    loops.push(Box::pin(recheck));
    let serve = crate::serve::all(loops);
    Assembled {
        serve: Box::pin(serve),
        tracker,
        connections,
        draining,
        go_away,
        handoff,
    }
}
