//! The plain copies of one data path (passthrough and inbound plaintext connections: no HBONE
//! on either side) that may move to another process in an upgrade: each registers its
//! [`PlainMover`] while it runs, and a handoff takes them all.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use hbone::handoff::{MovedPlain, PlainMover, PlainNotMoved};
use tokio::net::TcpStream;

/// The running plain copies of a data path.
#[derive(Debug, Default)]
pub(crate) struct PlainCopies {
    next: AtomicU64,
    live: Mutex<HashMap<u64, PlainMover>>,
}

/// A running copy's place in [`PlainCopies`]; gone with it.
pub(crate) struct Tracked<'a> {
    copies: &'a PlainCopies,
    id: u64,
    /// The copy's mover, to give to `hbone::handoff::copy_movable`.
    pub(crate) mover: PlainMover,
}

impl PlainCopies {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, PlainMover>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy about to run.
    pub(crate) fn track(&self) -> Tracked<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mover = PlainMover::new();
        self.lock().insert(id, mover.clone());
        Tracked {
            copies: self,
            id,
            mover,
        }
    }

    /// Takes every running copy (each ends here as moved), waiting at most `patience` for each
    /// to stop between two steps; the ones that do not stay, with why.
    pub(crate) async fn hand_off(&self, patience: Duration) -> (Vec<MovedPlain>, Vec<String>) {
        let movers: Vec<PlainMover> = self.lock().values().cloned().collect();
        let mut taking = tokio::task::JoinSet::new();
        for mover in movers {
            taking.spawn(async move { mover.hand_off(patience).await });
        }
        let (mut moved, mut stayed) = (Vec::new(), Vec::new());
        while let Some(t) = taking.join_next().await {
            let Ok(t) = t else {
                stayed.push("a copy's move panicked".to_owned());
                continue;
            };
            match t {
                Ok(m) => moved.push(m),
                // Ended meanwhile, or not begun: nothing to move.
                Err(PlainNotMoved::NotRunning) => {}
                Err(e) => stayed.push(e.to_string()),
            }
        }
        (moved, stayed)
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.copies.lock().remove(&self.id);
    }
}

/// When something that began `age` ago began, as the memo a moving copy carries says it (in
/// milliseconds since the Unix epoch, the one clock both processes share), told at `now`.
pub(crate) fn started_unix_ms(now: SystemTime, age: Duration) -> u64 {
    now.checked_sub(age)
        .unwrap_or(now)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A moment a memo gives (wall time) on this process's monotonic clock: now less its age.
pub(crate) fn started_here(started: SystemTime) -> Instant {
    let age = SystemTime::now()
        .duration_since(started)
        .unwrap_or_default();
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// A moved plain copy's two sockets, ready for the runtime; `None` (logged with `what`) when
/// either cannot be used: then both close.
pub(crate) fn plain_sockets(
    moved_a: OwnedFd,
    moved_b: OwnedFd,
    what: &str,
) -> Option<(TcpStream, TcpStream)> {
    let sockets = [moved_a, moved_b].map(|fd| {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(std))
    });
    match sockets {
        [Ok(a), Ok(b)] => Some((a, b)),
        [a, b] => {
            let e = a
                .err()
                .or(b.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            tracing::warn!(error = %e, "{what}: a moved connection's sockets cannot be used; it is closed");
            None
        }
    }
}

/// Resets both ends of a moved plain connection that is refused here.
pub(crate) fn reset_both(a: &TcpStream, b: &TcpStream) {
    crate::sockets::reset_on_close(a);
    crate::sockets::reset_on_close(b);
}

/// An adopted tunnel's memo, read by `read`; when it does not read, the tunnel and its app
/// socket are reset and the refusal logged (`side`: "inbound" or "outbound"), and `None`.
pub(crate) fn memo_or_refuse<M>(
    adopted: hbone::handoff::AdoptedTunnel,
    read: impl FnOnce(&[u8]) -> Result<M, String>,
    side: &str,
) -> Option<(M, hbone::handoff::AdoptedTunnel)> {
    match read(&adopted.memo) {
        Ok(m) => Some((m, adopted)),
        Err(e) => {
            tracing::warn!(hbone = %adopted.peer_addr, error = %e, "{side}: a moved tunnel was refused");
            adopted.tunnel.abort();
            if let Ok(app) = TcpStream::from_std(adopted.app) {
                crate::sockets::reset_on_close(&app);
            }
            None
        }
    }
}
