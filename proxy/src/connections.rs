//! The registry of live inbound connections, so that a policy change re-checks them and closes
//! those no longer allowed (Istio: "connection closed due to policy change").
//!
//! Each connection registers what it was authorized as (the `authz::Connection` and the uid of
//! the destination workload) and gets a [`Registered`] guard: dropping it unregisters, and its
//! [`closed`](Registered::closed) future resolves when a re-check denies the connection (the
//! data path then stops copying). Re-checks use the destination workload as the current state
//! has it, so a workload that now names another policy is judged by that one; a workload that is
//! gone is denied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::state::State;

/// Live connections, by id.
#[derive(Debug, Default)]
pub struct Connections {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    connection: authz::Connection,
    destination_uid: String,
    close: Arc<Closer>,
}

/// Set once, wakes the connection's data path.
#[derive(Debug, Default)]
struct Closer {
    notify: Notify,
    reason: Mutex<Option<String>>,
}

/// A registered connection; unregisters when dropped.
#[derive(Debug)]
pub struct Registered {
    id: u64,
    registry: Arc<Connections>,
    close: Arc<Closer>,
}

impl Connections {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Registers a connection that was allowed to reach `destination_uid`.
    pub fn register(
        self: &Arc<Self>,
        connection: authz::Connection,
        destination_uid: &str,
    ) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Closer::default());
        self.lock().insert(
            id,
            Entry {
                connection,
                destination_uid: destination_uid.to_owned(),
                close: close.clone(),
            },
        );
        Registered {
            id,
            registry: self.clone(),
            close,
        }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-checks every connection against `state`; closes (and unregisters) those now denied.
    /// Returns how many were closed.
    pub fn reauthorize(&self, state: &State) -> usize {
        let mut entries = self.lock();
        let denied: Vec<(u64, String)> = entries
            .iter()
            .filter_map(|(id, e)| {
                let reason = match state.workload(&e.destination_uid) {
                    None => "the destination workload is gone".to_owned(),
                    Some(w) => {
                        let decision = state
                            .policies()
                            .decide(&e.connection, &crate::authz_workload(w));
                        if decision.allowed {
                            return None;
                        }
                        decision.reason.to_string()
                    }
                };
                Some((*id, reason))
            })
            .collect();
        for (id, reason) in &denied {
            if let Some(e) = entries.remove(id) {
                tracing::info!(
                    src = %e.connection.source,
                    dst = %e.connection.destination,
                    src_identity = e.connection.peer.as_ref().map(|p| p.principal.to_string()).unwrap_or_default(),
                    %reason,
                    "connection closed due to policy change"
                );
                *e.close.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                e.close.notify.notify_one();
            }
        }
        denied.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Registered {
    /// Resolves with the reason when a policy change denies this connection.
    pub async fn closed(&self) -> String {
        self.close.notify.notified().await;
        self.close
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
