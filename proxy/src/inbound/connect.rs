//! The HBONE inbound path (port 15008): each CONNECT admitted, then joined to the app.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use hbone::{ConnectHandler, InboundConnect};
use tracing::info;

use super::{
    DirectConnector, Ended, InboundOutcome, PlainInbound, Refusal, Serving, copy_until_closed,
};
use crate::connections::{Connections, Registered};
use crate::sockets::Connector;
use crate::state::{LocalWorkload, StateStore};
use crate::telemetry::Counted;
use crate::telemetry::metrics::{Flow, Metrics, Open};
use hbone::handoff::Copied;

mod moved;

/// The inbound handler of one local workload.
pub struct Inbound<C = DirectConnector> {
    serving: Serving<C>,
    on_done: Arc<dyn Fn(InboundOutcome) + Send + Sync>,
}

/// Another handler of the same workload: the same state, registry, drain switch, metrics and
/// access log (for the tunnels an upgrade hands over, [`Inbound::resume`]).
impl<C: Clone> Clone for Inbound<C> {
    fn clone(&self) -> Self {
        Inbound {
            serving: self.serving.clone(),
            on_done: self.on_done.clone(),
        }
    }
}

impl<C> std::fmt::Debug for Inbound<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("local", &self.serving.local)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> Inbound<C> {
    /// Serves the workload `local` of `state`, reaching its app through `connector`.
    /// `on_done` receives every connection's outcome (the access log; metrics).
    pub fn new(
        state: Arc<StateStore>,
        connections: Arc<Connections>,
        local: impl Into<LocalWorkload>,
        connector: C,
        on_done: impl Fn(InboundOutcome) + Send + Sync + 'static,
    ) -> Self {
        Inbound {
            serving: Serving {
                state,
                connections,
                local: local.into(),
                connector,
                connect_timeout: Duration::from_secs(10),
                draining: Arc::default(),
                metrics: Metrics::new(Duration::from_secs(300)),
                movable: false,
            },
            on_done: Arc::new(on_done),
        }
    }

    /// Counts connections into `metrics` (reporter `destination`) instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.serving.metrics = metrics;
        self
    }

    /// Copies tunnels so that they can move to another process with their HBONE connection
    /// (`hbone::Server::hand_off`; the server's configuration must be movable too). Each
    /// carries what [`Inbound::resume`] needs there: the client, the authority, when it began.
    pub fn movable(mut self, movable: bool) -> Self {
        self.serving.movable = movable;
        self
    }

    /// The plaintext inbound path (port 15006) of the same workload: the same state, connection
    /// registry, drain switch, metrics and a clone of the connector.
    pub fn plain(&self) -> PlainInbound<C>
    where
        C: Clone,
    {
        PlainInbound {
            serving: self.serving.clone(),
            copies: crate::moving::PlainCopies::default(),
        }
    }

    /// A switch that, once set, makes every new CONNECT (also on connections already open) a
    /// 503: the proxy is draining. Tunnels already established continue.
    pub fn drain_switch(&self) -> Arc<AtomicBool> {
        self.serving.draining.clone()
    }

    /// Checks the CONNECT, dials the app and accepts the tunnel. Kept apart from the copy (and
    /// boxed by the caller) so the request, the state snapshot and the dial do not stay in the
    /// connection's task while the bytes flow.
    async fn establish(
        &self,
        req: InboundConnect,
        started: Instant,
    ) -> Result<(InboundOutcome, Established), InboundOutcome> {
        let mut outcome = InboundOutcome::new(req.peer_addr(), req.authority().to_string(), true);
        let refuse = |req: InboundConnect, outcome: InboundOutcome, refusal: Refusal| {
            req.reject(refusal.status());
            outcome.refused(&refusal, started)
        };
        let state = match self.serving.begin(&mut outcome) {
            Ok(state) => state,
            Err(refusal) => return Err(refuse(req, outcome, refusal)),
        };
        // Parsed once per HBONE connection (7% of the server's cycles with 8 clients connecting
        // in a loop, when it was parsed for every CONNECT).
        let peer = match req
            .peer_memo(|chain| identity::tls::peer_spiffe_id(chain).map_err(|e| e.to_string()))
        {
            Ok(id) => id,
            Err(e) => return Err(refuse(req, outcome, Refusal::NoPeerIdentity(e))),
        };
        outcome.source_identity = Some(peer.as_str().to_owned());
        let Some(destination) = req.authority().socket_addr() else {
            let refusal = Refusal::BadAuthority(req.authority().to_string());
            return Err(refuse(req, outcome, refusal));
        };
        let admitted = self
            .serving
            .admit_and_dial(&state, &mut outcome, destination, Some(&peer))
            .await;
        let (registered, app) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => return Err(refuse(req, outcome, refusal)),
        };
        let open = self.serving.metrics.open(&outcome);
        drop(state);
        let tunnel = match req.accept() {
            Ok(t) => t,
            Err(e) => {
                outcome.status = 200;
                outcome.error = Some(format!("the client went away before the answer: {e}"));
                outcome.duration = started.elapsed();
                return Err(outcome);
            }
        };
        outcome.status = 200;
        let app = open.count(app, Flow::Sent);
        Ok((
            outcome,
            Established {
                tunnel,
                app,
                registered,
                _open: open,
            },
        ))
    }

    async fn serve(&self, req: InboundConnect) -> Option<InboundOutcome> {
        let started = Instant::now();
        let (mut outcome, mut established) = match Box::pin(self.establish(req, started)).await {
            Ok(ok) => ok,
            Err(refused) => return Some(refused),
        };
        // Used in place: moving the parts out would keep them twice in the task.
        let Established {
            tunnel,
            app,
            registered,
            ..
        } = &mut established;
        let ended = if self.serving.movable {
            let memo = super::memo::memo(&outcome, SystemTime::now());
            let copy = std::pin::pin!(hbone::handoff::copy_tunnel_movable(
                tunnel, &mut *app, memo, None
            ));
            copy_until_closed(copy, registered, &mut outcome).await
        } else {
            let copy = std::pin::pin!(async {
                hbone::copy_tunnel_bidirectional(tunnel, &mut *app)
                    .await
                    .map(Copied::Done)
            });
            copy_until_closed(copy, registered, &mut outcome).await
        };
        match ended {
            Ended::Moved => {
                established._open.moved();
                return None;
            }
            Ended::Aborted => crate::sockets::reset_on_close(app.get_ref()),
            Ended::Closed => {}
        }
        outcome.duration = started.elapsed();
        Some(outcome)
    }

    /// Records how a connection ended: the log line (when it did not go well) and the metrics,
    /// then the access log.
    fn finish(&self, outcome: InboundOutcome) {
        if let Some(error) = &outcome.error {
            info!(src = %outcome.source, dst = %outcome.destination, status = outcome.status, %error, "inbound connection ended");
        }
        self.serving.metrics.finished(&outcome);
        (self.on_done)(outcome);
    }
}

/// What an allowed connection keeps while its bytes flow.
struct Established {
    tunnel: hbone::Tunnel,
    app: Counted<tokio::net::TcpStream>,
    registered: Registered,
    _open: Open,
}

impl<C: Connector> ConnectHandler for Inbound<C> {
    async fn handle(&self, request: InboundConnect) {
        // None: it moved to another process, which records it when it ends.
        if let Some(outcome) = self.serve(request).await {
            self.finish(outcome);
        }
    }
}
