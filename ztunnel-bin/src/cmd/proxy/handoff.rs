//! `--handoff-socket`: the upgrade that drops nothing, as a proxy process lives it. Once this
//! proxy serves every pod (ready), it takes over from the proxy listening at the socket, if
//! there is one; then it listens there itself, and when its own successor connects it hands
//! its live connections over and returns, so the caller drains what could not move and exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proxy::certs::Certificates;
use proxy::handoff::{Channel, Listener};
use proxy::inpod::SharedProxy;
use tracing::{info, warn};

/// How long each connection may take to settle (its copies to pause, its session to reach a
/// frame's end) before it stays behind and drains instead.
const PATIENCE: Duration = Duration::from_secs(2);

/// Takes over from the proxy at `path` once ready, then waits there for a successor; returns
/// once this proxy has handed over to it (or tried: a successor that came means an upgrade).
pub(super) async fn session<C: Certificates>(shared: Arc<SharedProxy<C>>, path: PathBuf) {
    while shared.readiness().is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connecting = path.clone();
    match tokio::task::spawn_blocking(move || Channel::connect(&connecting)).await {
        Ok(Ok(channel)) => match shared.take_over(channel).await {
            Ok(took) => {
                info!(socket = %path.display(), connections = took.connections, tunnels = took.tunnels, refused = took.refused.len(), "handoff: took over from the old proxy")
            }
            Err(e) => {
                warn!(socket = %path.display(), error = %e, "handoff: taking over from the old proxy ended early")
            }
        },
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            info!(socket = %path.display(), "handoff: no proxy to take over from")
        }
        Ok(Err(e)) => {
            warn!(socket = %path.display(), error = %e, "handoff: cannot reach the old proxy; its connections drain there")
        }
        Err(e) => warn!(error = %e, "handoff: the connecting task failed"),
    }
    let listener = match Listener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(error = %e, "handoff: cannot listen for a successor; an upgrade will drain this proxy's connections");
            return std::future::pending().await;
        }
    };
    info!(socket = %path.display(), "handoff: waiting for a successor");
    // A thread of its own, not the runtime's blocking pool: it may block in `accept` until the
    // process exits, which the runtime's shutdown would wait for.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        loop {
            match listener.accept() {
                Ok(channel) => {
                    let _ = tx.send(channel);
                    return;
                }
                Err(e) => warn!(error = %e, "handoff: a would-be successor was refused"),
            }
        }
    });
    let Ok(channel) = rx.await else {
        return std::future::pending().await;
    };
    match shared.hand_off(channel, PATIENCE).await {
        Ok(handed) => {
            for why in &handed.stayed {
                info!(%why, "handoff: a connection stays and drains here");
            }
        }
        Err(e) => {
            warn!(error = %e, "handoff: handing over failed; this proxy's connections drain")
        }
    }
}
