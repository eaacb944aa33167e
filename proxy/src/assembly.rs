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

use hbone::handoff::MovedPlain;
use tokio::net::TcpListener;
use tracing::warn;

use crate::addr::{ClientAddr, OrigDst};
use crate::certs::Certificates;
use crate::connections::Connections;
use crate::handoff::{Handed, PlainKind};
use crate::inbound::Inbound;
use crate::inbound::PlainInbound;
use crate::outbound::{Outbound, OutboundHandOff};
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
    /// Moves the live connections out of this process and in from another.
    pub(crate) handoff: PodHandoff,
}

/// A data path's live connections moving between processes (an upgrade): the inbound HBONE
/// ones its server accepted, the outbound ones its pool dialed, and the plain ones (passthrough,
/// inbound plaintext).
pub(crate) struct PodHandoff {
    /// Hands every inbound HBONE connection out (`hbone::Server::hand_off`), and, when the
    /// second argument says so (the successor takes version 2), every outbound and plain one
    /// too, waiting at most this long for each to settle.
    pub(crate) hand_off: Box<dyn Fn(std::time::Duration, bool) -> HandingOff + Send + Sync>,
    /// Takes a connection in (its pod aside): an inbound HBONE one into the server, an outbound
    /// one into the pool under its key, a plain one into its path: served here from now on, its
    /// copies resumed (counted by the tracker). Returns how many copies go on.
    pub(crate) adopt: Box<dyn Fn(Handed) -> Result<usize, String> + Send + Sync>,
}

/// What a data path handed out, and what stayed.
#[derive(Debug, Default)]
pub(crate) struct PodHandedOff {
    /// The inbound HBONE connections.
    pub(crate) inbound: hbone::handoff::HandOff,
    /// The outbound HBONE and passthrough connections.
    pub(crate) outbound: OutboundHandOff,
    /// The inbound plaintext connections' copies.
    pub(crate) plain: Vec<MovedPlain>,
    /// Plain copies of either direction that stayed (why).
    pub(crate) plain_stayed: Vec<String>,
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
    let handoff = pod_handoff(&server, &outbound, &plain, resumer, &tracker, &local);
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
                    let served = plain
                        .serve(stream, ClientAddr(peer), OrigDst(destination.0))
                        .await;
                    // None: it moved to another process, which logs it when it ends.
                    if let Some(o) = served {
                        crate::telemetry::access_log::log_inbound(&o);
                    }
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

/// How a data path's connections move out and in (see [`PodHandoff`]).
fn pod_handoff<C, A, P, H>(
    server: &hbone::Server<H>,
    outbound: &Arc<Outbound<C, P>>,
    plain: &Arc<PlainInbound<A>>,
    inbound: Arc<Inbound<A>>,
    tracker: &Tracker,
    local: &LocalWorkload,
) -> PodHandoff
where
    C: Certificates,
    A: Connector + Clone,
    P: Connector,
    H: hbone::ConnectHandler,
{
    let (server_out, outbound_out, plain_out) = (server.clone(), outbound.clone(), plain.clone());
    let (server_in, outbound_in, plain_in) = (server.clone(), outbound.clone(), plain.clone());
    let (resumes, source) = (tracker.clone(), Arc::new(local.clone()));
    PodHandoff {
        hand_off: Box::new(move |patience, everything| {
            let (server, outbound, plain) =
                (server_out.clone(), outbound_out.clone(), plain_out.clone());
            Box::pin(async move {
                if !everything {
                    let inbound = server.hand_off(patience).await;
                    return PodHandedOff {
                        inbound,
                        ..PodHandedOff::default()
                    };
                }
                let (inbound, outbound, (plain, mut plain_stayed)) = tokio::join!(
                    server.hand_off(patience),
                    outbound.hand_off(patience),
                    plain.hand_off(patience)
                );
                plain_stayed.extend(outbound.plain_stayed.iter().cloned());
                PodHandedOff {
                    inbound,
                    outbound,
                    plain,
                    plain_stayed,
                }
            })
        }),
        adopt: Box::new(move |handed| match handed {
            Handed::Connection {
                outbound: None,
                connection,
                ..
            } => {
                let (tunnels, serving) = server_in
                    .adopt_serving(connection)
                    .map_err(|e| e.to_string())?;
                // Where the pod's accepted connections run: its removal ends it too.
                resumes.spawn_uncounted(serving);
                let n = tunnels.len();
                for tunnel in tunnels {
                    let inbound = inbound.clone();
                    resumes.spawn_counted(async move { inbound.resume(tunnel).await });
                }
                Ok(n)
            }
            Handed::Connection {
                outbound: Some(key),
                connection,
                ..
            } => {
                let tunnels = outbound_in
                    .adopt(key.clone(), connection)
                    .map_err(|e| e.to_string())?;
                let n = tunnels.len();
                let key = Arc::new(key);
                for tunnel in tunnels {
                    let (outbound, key, source) =
                        (outbound_in.clone(), key.clone(), source.clone());
                    resumes.spawn_counted(async move {
                        if let Some(o) = outbound.resume(tunnel, &key, &source).await {
                            crate::telemetry::access_log::log_outbound(&o);
                        }
                    });
                }
                Ok(n)
            }
            Handed::Plain {
                kind: PlainKind::Passthrough,
                copy,
                ..
            } => {
                let (outbound, source) = (outbound_in.clone(), source.clone());
                resumes.spawn_counted(async move {
                    if let Some(o) = outbound.resume_passthrough(copy, &source).await {
                        crate::telemetry::access_log::log_outbound(&o);
                    }
                });
                Ok(1)
            }
            Handed::Plain {
                kind: PlainKind::InboundPlaintext,
                copy,
                ..
            } => {
                let plain = plain_in.clone();
                resumes.spawn_counted(async move {
                    if let Some(o) = plain.resume(copy).await {
                        crate::telemetry::access_log::log_inbound(&o);
                    }
                });
                Ok(1)
            }
        }),
    }
}
