//! The plaintext inbound path (port 15006): a connection to a local workload that did not come
//! through HBONE (a client outside the mesh), redirected here by the pod's capture rules. Policy
//! decides with no client identity (so only policies that do not need one can allow it), then
//! the bytes go to the app. The checks are the HBONE path's ([`crate::inbound`]); the outcome is
//! reported with the status HBONE would have answered (200, 400, 401, 503).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::addr::{ClientAddr, OrigDst};
use crate::connections::Connections;
use crate::inbound::{
    DESTINATION, InboundOutcome, authorize, copy_until_closed, dial_app, failure_flags,
};
use crate::metrics::{Ends, Flow, Metrics};
use crate::sockets::Connector;
use crate::state::{LocalWorkload, StateStore};

/// The plaintext inbound path of one local workload.
pub struct PlainInbound<C> {
    state: Arc<StateStore>,
    connections: Arc<Connections>,
    local: LocalWorkload,
    connector: C,
    connect_timeout: Duration,
    draining: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl<C> std::fmt::Debug for PlainInbound<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainInbound")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> PlainInbound<C> {
    /// Serves `local`, reaching its app through `connector`; `draining` set means new
    /// connections are refused (the HBONE path's drain switch).
    pub fn new(
        state: Arc<StateStore>,
        connections: Arc<Connections>,
        local: LocalWorkload,
        connector: C,
        draining: Arc<AtomicBool>,
    ) -> Self {
        PlainInbound {
            state,
            connections,
            local,
            connector,
            connect_timeout: Duration::from_secs(10),
            draining,
            metrics: Metrics::new(Duration::from_secs(300)),
        }
    }

    /// Counts connections into `metrics` (reporter `destination`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks and forwards one redirected connection from `source` that was going to
    /// `destination`, until both sides are done (or a policy change closes it).
    pub async fn serve(
        &self,
        mut client: TcpStream,
        source: ClientAddr,
        destination: OrigDst,
    ) -> InboundOutcome {
        let started = Instant::now();
        let mut outcome = InboundOutcome {
            source: source.0,
            source_identity: None,
            destination: destination.to_string(),
            destination_uid: None,
            status: 0,
            error: None,
            bytes: (0, 0),
            duration: Duration::ZERO,
        };
        let refuse = |mut outcome: InboundOutcome, status: u16, why: String| {
            outcome.status = status;
            outcome.error = Some(why);
            outcome.duration = started.elapsed();
            outcome
        };
        if self.draining.load(Ordering::SeqCst) {
            let why = "the proxy is draining (shutting down)".to_owned();
            return refuse(outcome, 503, why);
        }
        let state = self.state.snapshot();
        let source_workload = state.workload_at("", source.ip()).cloned();
        let mut ends = Ends {
            source: source_workload.as_deref(),
            destination: state.local(&self.local).map(|w| &**w),
            ..Ends::default()
        };
        let (local, connection) =
            match authorize(&state, &self.local, source.0, destination.0, None) {
                Ok(allowed) => allowed,
                Err((status, why)) => {
                    self.metrics
                        .failed(DESTINATION, ends, failure_flags(status));
                    return refuse(outcome, status.as_u16(), why);
                }
            };
        ends.destination = Some(&local);
        outcome.destination_uid = Some(local.uid.clone());
        let registered = self.connections.register(connection, &local.uid);
        let connect = Box::pin(dial_app(
            &self.connector,
            destination.0,
            self.connect_timeout,
        ));
        let app = match connect.await {
            Ok(app) => app,
            Err(why) => {
                self.metrics.failed(DESTINATION, ends, "CONNECT");
                return refuse(outcome, 503, why);
            }
        };
        let open = self.metrics.opened(DESTINATION, ends);
        drop(state);
        let mut app = open.count(app, Flow::Sent);
        outcome.status = 200;
        let aborted = {
            let copy = std::pin::pin!(hbone::copy_bidirectional(&mut client, &mut app));
            copy_until_closed(copy, &registered, &mut outcome).await
        };
        if aborted {
            crate::sockets::reset_on_close(&client);
            crate::sockets::reset_on_close(app.get_ref());
        }
        outcome.duration = started.elapsed();
        outcome
    }
}
