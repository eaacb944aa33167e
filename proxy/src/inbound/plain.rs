//! The plaintext inbound path (port 15006): a connection to a local workload that did not come
//! through HBONE (a client outside the mesh), redirected here by the pod's capture rules. Policy
//! decides with no client identity (so only policies that do not need one can allow it), then
//! the bytes go to the app. The admission is the HBONE path's ([`super::admit`]); the outcome is
//! reported with the status HBONE would have answered (200, 400, 401, 503).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{InboundOutcome, Refusal, admit, copy_until_closed, dial_app, log_refusal};
use crate::addr::{ClientAddr, OrigDst};
use crate::connections::Connections;
use crate::sockets::Connector;
use crate::state::{LocalWorkload, StateStore};
use crate::telemetry::metrics::{Flow, Metrics};

/// The plaintext inbound path of one local workload; made by [`super::Inbound::plain`], beside
/// the HBONE path of the same workload.
pub struct PlainInbound<C> {
    pub(super) state: Arc<StateStore>,
    pub(super) connections: Arc<Connections>,
    pub(super) local: LocalWorkload,
    pub(super) connector: C,
    pub(super) connect_timeout: Duration,
    pub(super) draining: Arc<AtomicBool>,
    pub(super) metrics: Arc<Metrics>,
}

impl<C> std::fmt::Debug for PlainInbound<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainInbound")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> PlainInbound<C> {
    /// Checks and forwards one redirected connection from `source` that was going to
    /// `destination`, until both sides are done (or a policy change closes it).
    pub async fn serve(
        &self,
        client: TcpStream,
        source: ClientAddr,
        destination: OrigDst,
    ) -> InboundOutcome {
        let outcome = self.forward(client, source, destination).await;
        self.metrics.finished(&outcome);
        outcome
    }

    async fn forward(
        &self,
        mut client: TcpStream,
        source: ClientAddr,
        destination: OrigDst,
    ) -> InboundOutcome {
        let started = Instant::now();
        let mut outcome = InboundOutcome::new(source.0, destination.to_string(), false);
        let refuse = |outcome: InboundOutcome, refusal: Refusal| outcome.refused(&refusal, started);
        // Both ends are named in the record (the access log, the metrics) whatever happens next.
        let state = self.state.snapshot();
        outcome.source_workload = state.workload_at("", source.ip()).cloned();
        outcome.destination_workload = state.local(&self.local).cloned();
        if self.draining.load(Ordering::SeqCst) {
            return refuse(outcome, Refusal::Draining);
        }
        let (local, connection) = match admit(&state, &self.local, source.0, destination.0, None) {
            Ok(admitted) => (admitted.workload, admitted.connection),
            Err(refusal) => {
                log_refusal(&refusal, source.0, destination.0, None);
                return refuse(outcome, refusal);
            }
        };
        outcome.destination_workload = Some(local.clone());
        let registered = self.connections.register(connection, &local.uid);
        let connect = Box::pin(dial_app(
            &self.connector,
            destination.0,
            self.connect_timeout,
        ));
        let app = match connect.await {
            Ok(app) => app,
            Err(refusal) => return refuse(outcome, refusal),
        };
        let open = self.metrics.open(&outcome);
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
