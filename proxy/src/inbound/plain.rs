//! The plaintext inbound path (port 15006): a connection to a local workload that did not come
//! through HBONE (a client outside the mesh), redirected here by the pod's capture rules. Policy
//! decides with no client identity (so only policies that do not need one can allow it), then
//! the bytes go to the app. The admission is the HBONE path's ([`super::admit`]); the outcome is
//! reported with the status HBONE would have answered (200, 400, 401, 503).

use std::time::{Duration, Instant, SystemTime};

use hbone::handoff::MovedPlain;
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::memo::{memo, read_memo};
use super::{Ended, InboundOutcome, Refusal, Serving, copy_until_closed};
use crate::addr::{ClientAddr, OrigDst};
use crate::sockets::Connector;
use crate::telemetry::metrics::{Flow, Open};
use hbone::handoff::Copied;

/// The plaintext inbound path of one local workload; made by [`super::Inbound::plain`], beside
/// the HBONE path of the same workload.
pub struct PlainInbound<C> {
    pub(super) serving: Serving<C>,
    /// The copies running, when movable.
    pub(super) copies: crate::moving::PlainCopies,
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
    /// `destination`, until both sides are done (or a policy change closes it). `None`: it moved
    /// to another process ([`PlainInbound::hand_off`]), which records it when it ends.
    pub async fn serve(
        &self,
        client: TcpStream,
        source: ClientAddr,
        destination: OrigDst,
    ) -> Option<InboundOutcome> {
        let outcome = self.forward(client, source, destination).await?;
        self.serving.metrics.finished(&outcome);
        Some(outcome)
    }

    /// Hands every running connection's copy out of this process (when movable), waiting at
    /// most `patience` for each to stop: the copies, and why some stayed.
    pub async fn hand_off(&self, patience: Duration) -> (Vec<MovedPlain>, Vec<String>) {
        self.copies.hand_off(patience).await
    }

    /// Goes on with a connection moved here from another process (its client's socket first),
    /// until it ends or moves again; then records it (metrics) and returns its outcome, with the
    /// bytes and duration of its whole life. The connection is admitted again first, under the
    /// policy in force here: one no longer allowed (or whose memo does not read) is reset, as a
    /// policy change would have closed it.
    pub async fn resume(&self, moved: MovedPlain) -> Option<InboundOutcome> {
        let MovedPlain { a, b, copy, memo } = moved;
        let (mut client, app) = crate::moving::plain_sockets(a, b, "inbound plaintext")?;
        let m = match read_memo(&memo) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "inbound plaintext: a moved connection was refused");
                crate::moving::reset_both(&client, &app);
                return None;
            }
        };
        let started = crate::moving::started_here(m.started);
        let mut outcome = InboundOutcome::new(m.source, m.authority, false);
        outcome.status = 200;
        outcome.bytes = (copy.transferred.a_to_b, copy.transferred.b_to_a);
        let admitted = self.serving.begin(&mut outcome).and_then(|state| {
            self.serving
                .admit_and_register(&state, &mut outcome, m.destination, None)
        });
        let registered = match admitted {
            Ok(registered) => registered,
            Err(refusal) => {
                crate::moving::reset_both(&client, &app);
                outcome.error = Some(format!("a moved connection was closed: {refusal}"));
                outcome.duration = started.elapsed();
                warn!(src = %m.source, dst = %m.destination, %refusal, "inbound plaintext: a moved connection was refused");
                self.serving.metrics.finished(&outcome);
                return Some(outcome);
            }
        };
        let open = self.serving.metrics.open(&outcome);
        let mut app = open.count(app, Flow::Sent);
        info!(src = %m.source, dst = %m.destination, "inbound plaintext: a moved connection goes on here");
        let ended = {
            let tracked = self.copies.track();
            let copy = std::pin::pin!(hbone::handoff::copy_movable(
                &mut client,
                &mut app,
                &tracked.mover,
                memo,
                Some(copy)
            ));
            copy_until_closed(copy, &registered, &mut outcome).await
        };
        drop(after_copy(ended, open, &client, app.get_ref())?);
        outcome.duration = started.elapsed();
        self.serving.metrics.finished(&outcome);
        Some(outcome)
    }

    async fn forward(
        &self,
        mut client: TcpStream,
        source: ClientAddr,
        destination: OrigDst,
    ) -> Option<InboundOutcome> {
        let started = Instant::now();
        let mut outcome = InboundOutcome::new(source.0, destination.to_string(), false);
        let refuse = |outcome: InboundOutcome, refusal: Refusal| outcome.refused(&refusal, started);
        let state = match self.serving.begin(&mut outcome) {
            Ok(state) => state,
            Err(refusal) => return Some(refuse(outcome, refusal)),
        };
        let admitted = self
            .serving
            .admit_and_dial(&state, &mut outcome, destination.0, None)
            .await;
        let (registered, app) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => return Some(refuse(outcome, refusal)),
        };
        let open = self.serving.metrics.open(&outcome);
        drop(state);
        let mut app = open.count(app, Flow::Sent);
        outcome.status = 200;
        let ended = if self.serving.movable {
            let tracked = self.copies.track();
            let memo = memo(&outcome, SystemTime::now());
            let copy = std::pin::pin!(hbone::handoff::copy_movable(
                &mut client,
                &mut app,
                &tracked.mover,
                memo,
                None
            ));
            copy_until_closed(copy, &registered, &mut outcome).await
        } else {
            let copy = std::pin::pin!(async {
                hbone::copy_bidirectional(&mut client, &mut app)
                    .await
                    .map(Copied::Done)
            });
            copy_until_closed(copy, &registered, &mut outcome).await
        };
        let _open = after_copy(ended, open, &client, app.get_ref())?;
        outcome.duration = started.elapsed();
        Some(outcome)
    }
}

/// What is left of a plain connection whose copy ended as `ended`: `None` when it moved (the
/// other process records it), else its metrics' `open` to drop once it is recorded. An aborted
/// one has both its sockets reset.
fn after_copy(ended: Ended, open: Open, client: &TcpStream, app: &TcpStream) -> Option<Open> {
    match ended {
        Ended::Moved => {
            open.moved();
            return None;
        }
        Ended::Aborted => crate::moving::reset_both(client, app),
        Ended::Closed => {}
    }
    Some(open)
}
