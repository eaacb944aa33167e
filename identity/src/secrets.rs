//! The secret manager: the current certificate of every identity the proxy serves, fetched once,
//! refreshed before expiry, never handed out expired.
//!
//! One background task per identity owns the fetching: concurrent `get`s for a new identity wait
//! for the same first fetch; afterwards the task sleeps until about half of the certificate's
//! remaining life (with jitter, so a node's pods do not all renew at once), fetches again, and
//! publishes the new certificate on a watch channel that subscribers (TLS resolvers, the admin
//! dump) follow. Failed fetches are retried with capped exponential backoff while the old
//! certificate, if still valid, keeps being served.
//!
//! Timers run on the monotonic clock, which stops while a machine is suspended, but certificates
//! expire by the wall clock. So a `get` that finds the certificate expired wakes the identity's
//! task at once and waits for that fetch: a machine that slept past expiry recovers on its next
//! connection, not when the old timer finally fires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::ca::CertificateSource;
use crate::{Error, SpiffeId, WorkloadCert};

/// What a [`SecretManager`] holds for one identity ([`SecretManager::held`]).
#[derive(Debug, Clone)]
pub struct HeldCertificate {
    /// The identity.
    pub id: SpiffeId,
    /// Its current certificate (`None` before the first arrives).
    pub cert: Option<Arc<WorkloadCert>>,
    /// Why the last fetch failed, when it did.
    pub last_error: Option<String>,
}

/// Refresh and retry timing of a [`SecretManager`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SecretManagerConfig {
    /// Renew after this fraction of the time between receipt and expiry (Istio: one half).
    pub refresh_fraction: f64,
    /// Random spread applied to each refresh delay, as a fraction of it (0.1 = ±10%).
    pub jitter: f64,
    /// First retry delay after a failed fetch.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for SecretManagerConfig {
    fn default() -> Self {
        SecretManagerConfig {
            refresh_fraction: 0.5,
            jitter: 0.1,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
        }
    }
}

/// Current certificates per identity. Cheap to clone. Must be used within a Tokio runtime.
#[derive(Clone)]
pub struct SecretManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretManager")
            .field("identities", &self.identities())
            .finish()
    }
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    config: SecretManagerConfig,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

/// Receives each new certificate of an identity.
type CertWatch = watch::Receiver<Option<Arc<WorkloadCert>>>;
/// The last fetch error of an identity; cleared by a success.
type SharedError = Arc<Mutex<Option<String>>>;

struct Entry {
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    last_error: SharedError,
    /// Wakes the refresh task out of its sleep (a `get` found the certificate expired).
    wake: Arc<Notify>,
    task: AbortHandle,
}

impl SecretManager {
    /// A manager that fetches from `source` (an [`IstioCaClient`](crate::ca::IstioCaClient) or
    /// any other [`CertificateSource`]).
    pub fn new(source: Arc<dyn CertificateSource>, config: SecretManagerConfig) -> Self {
        SecretManager {
            inner: Arc::new(Inner {
                source,
                config,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The current certificate of `id`, fetching it first if this identity is new.
    ///
    /// Fails closed: it never returns an expired certificate. A certificate found expired makes
    /// the identity's task fetch at once, and this waits for that fetch; if it fails too (or the
    /// first fetch failed), this returns [`Error::NoCertificate`] with the reason.
    pub async fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, Error> {
        let (mut rx, last_error, wake) = self.watch(id);
        let mut woke_refresher = false;
        loop {
            let current = rx.borrow_and_update().clone();
            if let Some(cert) = current {
                if cert.is_valid_at(SystemTime::now()) {
                    return Ok(cert);
                }
                let ca = lock(&last_error).clone();
                if !woke_refresher && ca.is_none() {
                    // The last fetch succeeded, yet its certificate expired before the renewal
                    // timer fired (a suspended machine): fetch now and wait for the outcome.
                    // While fetches are failing the task retries on its own backoff instead.
                    woke_refresher = true;
                    wake.notify_one();
                    if rx.changed().await.is_err() {
                        return Err(forgotten(id));
                    }
                    continue;
                }
                return Err(Error::NoCertificate {
                    id: id.clone(),
                    reason: format!(
                        "the certificate expired at {} and has not been renewed{}",
                        crate::fmt_time(cert.not_after()),
                        ca.map(|e| format!(" (last CA error: {e})"))
                            .unwrap_or_default()
                    ),
                });
            }
            if let Some(error) = lock(&last_error).clone() {
                return Err(Error::NoCertificate {
                    id: id.clone(),
                    reason: error,
                });
            }
            if rx.changed().await.is_err() {
                return Err(forgotten(id));
            }
        }
    }

    /// Follows the certificates of `id` (starting its fetch if needed): the receiver sees each
    /// rotation. `None` until the first certificate arrives.
    pub fn subscribe(&self, id: &SpiffeId) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
        self.watch(id).0
    }

    /// Stops refreshing `id` and drops its certificate; pending `get`s fail.
    pub fn forget(&self, id: &SpiffeId) {
        if let Some(entry) = self.inner.entries.lock().expect("lock").remove(id) {
            entry.task.abort();
            info!(%id, "secret manager: forgot identity");
        }
    }

    /// The identities currently managed.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self
            .inner
            .entries
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// Every managed identity (in order) with its current certificate and the error of its
    /// last failed fetch, if the last fetch failed; starts nothing.
    pub fn held(&self) -> Vec<HeldCertificate> {
        let entries = self.inner.entries.lock().expect("lock");
        let mut held: Vec<_> = entries
            .iter()
            .map(|(id, entry)| HeldCertificate {
                id: id.clone(),
                cert: entry.tx.borrow().clone(),
                last_error: lock(&entry.last_error).clone(),
            })
            .collect();
        held.sort_by(|a, b| a.id.cmp(&b.id));
        held
    }

    fn watch(&self, id: &SpiffeId) -> (CertWatch, SharedError, Arc<Notify>) {
        let mut entries = self.inner.entries.lock().expect("lock");
        let entry = entries.entry(id.clone()).or_insert_with(|| {
            let (tx, _) = watch::channel(None);
            let last_error = Arc::new(Mutex::new(None));
            let wake = Arc::new(Notify::new());
            let task = tokio::spawn(refresh_loop(
                id.clone(),
                self.inner.source.clone(),
                self.inner.config.clone(),
                tx.clone(),
                last_error.clone(),
                wake.clone(),
            ));
            Entry {
                tx,
                last_error,
                wake,
                task: task.abort_handle(),
            }
        });
        (
            entry.tx.subscribe(),
            entry.last_error.clone(),
            entry.wake.clone(),
        )
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(entries) = self.entries.lock() {
            for entry in entries.values() {
                entry.task.abort();
            }
        }
    }
}

fn forgotten(id: &SpiffeId) -> Error {
    Error::NoCertificate {
        id: id.clone(),
        reason: "the identity was forgotten while waiting for its certificate".into(),
    }
}

/// The last error (a plain value: a poisoned lock still holds a valid one).
fn lock(m: &Mutex<Option<String>>) -> std::sync::MutexGuard<'_, Option<String>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fetches, publishes, sleeps until the refresh point (or until woken); retries failures with
/// backoff.
async fn refresh_loop(
    id: SpiffeId,
    source: Arc<dyn CertificateSource>,
    config: SecretManagerConfig,
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    last_error: Arc<Mutex<Option<String>>>,
    wake: Arc<Notify>,
) {
    let renewal_pause = |delay: Duration| {
        let wake = wake.clone();
        async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = wake.notified() => {}
            }
        }
    };
    let mut backoff = config.initial_backoff;
    loop {
        match source.fetch(&id).await {
            Ok(cert) => {
                *lock(&last_error) = None;
                let delay = refresh_delay(&cert, &config, SystemTime::now());
                info!(%id, not_after = %crate::fmt_time(cert.not_after()), refresh_in = ?delay, "secret manager: new certificate");
                tx.send_replace(Some(Arc::new(cert)));
                backoff = config.initial_backoff;
                renewal_pause(delay).await;
            }
            Err(e) => {
                let still_valid = tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|c| c.is_valid_at(SystemTime::now()));
                warn!(%id, error = %e, retry_in = ?backoff, still_valid, "secret manager: fetch failed");
                *lock(&last_error) = Some(e.to_string());
                // Wake waiters so a first `get` fails fast instead of hanging.
                tx.send_modify(|_| {});
                // Not woken by `get`s: while the CA fails, each connection must not cause a
                // fetch of its own.
                tokio::time::sleep(jittered(backoff, config.jitter)).await;
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
}

/// Time from `now` until the refresh point: `refresh_fraction` of the way from receipt to expiry,
/// with jitter; never negative.
pub(crate) fn refresh_delay(
    cert: &WorkloadCert,
    config: &SecretManagerConfig,
    now: SystemTime,
) -> Duration {
    let life = cert
        .not_after()
        .duration_since(cert.received_at())
        .unwrap_or_default();
    let target =
        cert.received_at() + jittered(life.mul_f64(config.refresh_fraction), config.jitter);
    target.duration_since(now).unwrap_or_default()
}

fn jittered(d: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return d;
    }
    let factor = rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter));
    d.mul_f64(factor.max(0.0))
}
