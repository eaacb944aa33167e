//! What both modes do with their listeners: accept loops that back off on transient errors, and
//! the tracking of live connection tasks so a drain can wait for them and then cut the rest.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Live connection tasks of one proxy (or one pod): counted ones keep a drain waiting; all of
/// them end when the tracker is cut.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracker {
    active: Arc<AtomicUsize>,
    cut: CancellationToken,
}

/// Counts a live connection while it exists.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Tracker {
    /// Runs `task` until it ends or the tracker is cut; a drain waits for it.
    pub(crate) fn spawn_counted(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.active.fetch_add(1, Ordering::SeqCst);
        let active = Active(self.active.clone());
        let cut = self.cut.clone();
        // Boxed: moved into the select below, an inline task would be stored twice in the
        // wrapper (as the captured value and as the select's operand) for the connection's life.
        let task = Box::pin(task);
        tokio::spawn(async move {
            let _active = active;
            tokio::select! {
                () = task => {}
                () = cut.cancelled() => {}
            }
        });
    }

    /// Runs `task` until it ends or the tracker is cut; a drain does not wait for it (an HBONE
    /// connection, whose tunnels are counted on their own).
    pub(crate) fn spawn_uncounted(&self, task: impl Future<Output = ()> + Send + 'static) {
        let cut = self.cut.clone();
        let task = Box::pin(task);
        tokio::spawn(async move {
            tokio::select! {
                () = task => {}
                () = cut.cancelled() => {}
            }
        });
    }

    /// Counted tasks still running.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Waits until `open()` is 0 or `deadline` passed, then ends every task; returns how many
    /// were still open.
    pub(crate) async fn drain(&self, deadline: Duration, open: impl Fn() -> usize) -> usize {
        let until = tokio::time::Instant::now() + deadline;
        while open() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = open();
        self.cut.cancel();
        left
    }
}

/// Runs every future in `futures` to its end, polled together (the accept loops of each
/// listener); dropping it drops them all.
pub(crate) async fn all(mut futures: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>) {
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Accepts forever, handing each connection to `on_accept`; a failed accept (out of descriptors
/// for a moment) is logged and retried after a pause instead of spinning.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    what: &'static str,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => on_accept(stream, peer),
            Err(e) => {
                warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HBONE on `listener`: each TCP connection runs in a task of its own (uncounted: its
/// tunnels are counted by the inbound registry), so closing the listener leaves them. A refused
/// handshake (wrong or missing certificate, no h2, too slow) is logged with the reason.
pub(crate) async fn serve_hbone<H: hbone::ConnectHandler>(
    listener: TcpListener,
    server: hbone::Server<H>,
    tracker: Tracker,
) {
    accept_loop(listener, "inbound", move |tcp, peer| {
        let server = server.clone();
        tracker.spawn_uncounted(async move {
            match server.serve_connection(tcp).await {
                Ok(()) => {}
                Err(
                    e @ (hbone::Error::Tls { .. }
                    | hbone::Error::Alpn { .. }
                    | hbone::Error::TlsVersion { .. }
                    | hbone::Error::NoPeerCertificate { .. }
                    | hbone::Error::HandshakeTimeout { .. }),
                ) => tracing::info!(src = %peer, error = %e, "inbound: HBONE connection refused"),
                Err(e) => {
                    tracing::debug!(src = %peer, error = %e, "inbound: HBONE connection ended")
                }
            }
        });
    })
    .await
}

/// Serves the outbound listener: each captured connection (its original destination from
/// `SO_ORIGINAL_DST`) is routed by `outbound` as workload `local`'s, counted by `tracker` and
/// logged. A connection to the listener itself (not redirected, or a loop) is refused.
pub(crate) async fn serve_outbound<C: crate::certs::Certificates, N: crate::sockets::Connector>(
    listener: TcpListener,
    outbound: Arc<crate::outbound::Outbound<C, N>>,
    local: crate::state::LocalWorkload,
    tracker: Tracker,
) {
    let own = listener.local_addr().ok();
    // Shared, not cloned per connection: each connection's task holds a pointer.
    let local = Arc::new(local);
    accept_loop(listener, "outbound", move |stream, peer| {
        // Small writes back to the app must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (outbound, local) = (outbound.clone(), local.clone());
        tracker.spawn_counted(async move {
            let destination = match crate::sockets::original_dst(&stream, peer) {
                Ok(d) if Some(d.0) == own => {
                    warn!(src = %peer, "outbound: refusing a connection to the proxy itself");
                    return;
                }
                Ok(d) => d,
                Err(e) => {
                    warn!(src = %peer, error = %e, "outbound: no original destination (not redirected by the capture rule?)");
                    return;
                }
            };
            let served = outbound
                .serve(stream, crate::addr::ClientAddr(peer), destination, &local)
                .await;
            // None: it moved to another process, which logs it when it ends.
            if let Some(o) = served {
                crate::telemetry::access_log::log_outbound(&o);
            }
        });
    })
    .await
}
