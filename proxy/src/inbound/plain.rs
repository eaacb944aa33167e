//! The plaintext inbound path (port 15006): a connection to a local workload that did not come
//! through HBONE (a client outside the mesh), redirected here by the pod's capture rules. Policy
//! decides with no client identity (so only policies that do not need one can allow it), then
//! the bytes go to the app. The admission is the HBONE path's ([`super::admit`]); the outcome is
//! reported with the status HBONE would have answered (200, 400, 401, 503).

use std::time::Instant;

use tokio::net::TcpStream;

use super::{Ended, InboundOutcome, Refusal, Serving, copy_until_closed};
use crate::addr::{ClientAddr, OrigDst};
use crate::sockets::Connector;
use crate::telemetry::metrics::Flow;
use hbone::handoff::Copied;

/// The plaintext inbound path of one local workload; made by [`super::Inbound::plain`], beside
/// the HBONE path of the same workload.
pub struct PlainInbound<C> {
    pub(super) serving: Serving<C>,
}

impl<C> std::fmt::Debug for PlainInbound<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainInbound")
            .field("local", &self.serving.local)
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
        self.serving.metrics.finished(&outcome);
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
        let state = match self.serving.begin(&mut outcome) {
            Ok(state) => state,
            Err(refusal) => return refuse(outcome, refusal),
        };
        let admitted = self
            .serving
            .admit_and_dial(&state, &mut outcome, destination.0, None)
            .await;
        let (registered, app) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => return refuse(outcome, refusal),
        };
        let open = self.serving.metrics.open(&outcome);
        drop(state);
        let mut app = open.count(app, Flow::Sent);
        outcome.status = 200;
        let ended = {
            let copy = std::pin::pin!(async {
                hbone::copy_bidirectional(&mut client, &mut app)
                    .await
                    .map(Copied::Done)
            });
            copy_until_closed(copy, &registered, &mut outcome).await
        };
        if ended == Ended::Aborted {
            crate::sockets::reset_on_close(&client);
            crate::sockets::reset_on_close(app.get_ref());
        }
        outcome.duration = started.elapsed();
        outcome
    }
}
