//! Dedicated mode: one workload's proxy in the current network namespace (for simple setups and
//! benchmarks). Outbound on 127.0.0.1:15001 behind the capture rule (original destination from
//! `SO_ORIGINAL_DST`, own sockets marked), inbound HBONE on 0.0.0.0:15008 with the workload's
//! certificate, readiness on 15021 (`/healthz/ready`: 200 once policies are synced, the workload
//! is known and its certificate is valid).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use identity::{SpiffeId, WorkloadCert};
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::addr::ClientAddr;
use crate::connections::Connections;
use crate::inbound::{DirectConnector, Inbound};
use crate::outbound::{Certificates, Outbound};
use crate::state::StateStore;

/// Settings of a dedicated-mode proxy.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DedicatedConfig {
    /// The workload's xDS uid.
    pub workload_uid: String,
    /// Outbound listener (Istio: 127.0.0.1:15001).
    pub outbound: SocketAddr,
    /// Inbound HBONE listener (Istio: 0.0.0.0:15008).
    pub inbound: SocketAddr,
    /// Readiness listener (Istio: 0.0.0.0:15021).
    pub readiness: SocketAddr,
    /// `SO_MARK` of the proxy's own sockets (Istio: 0x539).
    pub mark: Option<u32>,
    /// HBONE settings.
    pub hbone: hbone::Config,
}

impl DedicatedConfig {
    /// Istio's ports for `workload_uid`, mark 0x539.
    pub fn new(workload_uid: &str) -> Self {
        DedicatedConfig {
            workload_uid: workload_uid.to_owned(),
            outbound: SocketAddr::from(([127, 0, 0, 1], 15001)),
            inbound: SocketAddr::from(([0, 0, 0, 0], 15008)),
            readiness: SocketAddr::from(([0, 0, 0, 0], 15021)),
            mark: Some(0x539),
            hbone: hbone::Config::default(),
        }
    }
}

/// One fixed certificate (from files) and the trust roots.
#[derive(Debug, Clone)]
pub struct StaticCert {
    /// The workload's certificate.
    pub cert: Arc<WorkloadCert>,
    /// The mesh's roots.
    pub roots: Arc<RootCertStore>,
}

impl Certificates for StaticCert {
    fn get(
        &self,
        id: &SpiffeId,
    ) -> impl Future<Output = Result<Arc<WorkloadCert>, identity::Error>> + Send {
        let result = if self.cert.id() != id {
            Err(identity::Error::NoCertificate {
                id: id.clone(),
                reason: format!(
                    "this proxy only holds the certificate of {}",
                    self.cert.id()
                ),
            })
        } else if !self.cert.is_valid_at(SystemTime::now()) {
            Err(identity::Error::NoCertificate {
                id: id.clone(),
                reason: "the certificate file has expired".into(),
            })
        } else {
            Ok(self.cert.clone())
        };
        std::future::ready(result)
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
}

/// The addresses a started proxy listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Outbound.
    pub outbound: SocketAddr,
    /// Inbound HBONE.
    pub inbound: SocketAddr,
    /// Readiness.
    pub readiness: SocketAddr,
}

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate cannot serve TLS.
    #[error("the workload certificate cannot be used: {0}")]
    Certificate(#[from] identity::Error),
}

/// A started proxy: serve it with [`Running::run_until`].
pub struct Running {
    serve: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    outbound_active: Arc<AtomicUsize>,
    inbound: Arc<Connections>,
    draining: Arc<AtomicBool>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").finish_non_exhaustive()
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open when the deadline passed (0: all finished by themselves).
    pub cut: usize,
}

impl Running {
    /// Serves until `shutdown` resolves; then stops accepting (the listeners close) and waits for
    /// the open connections to finish, at most `deadline` (Istio's
    /// `CONNECTION_TERMINATION_DEADLINE`); whatever is still open then is cut when the caller
    /// exits.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
        deadline: Duration,
    ) -> Drained {
        let Running {
            serve,
            outbound_active,
            inbound,
            draining,
        } = self;
        tokio::select! {
            () = serve => {}
            () = shutdown => {}
        }
        // New CONNECTs on HBONE connections that stay open are refused from now on.
        draining.store(true, Ordering::SeqCst);
        let open = || outbound_active.load(Ordering::SeqCst) + inbound.len();
        info!(
            open = open(),
            ?deadline,
            "draining: listeners closed, waiting for open connections"
        );
        let until = tokio::time::Instant::now() + deadline;
        while open() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cut = open();
        info!(cut, "drained");
        Drained { cut }
    }
}

/// Counts a live outbound connection while it exists.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Active(counter.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Binds the three listeners; serve them with [`Running::run_until`].
pub async fn start(
    config: DedicatedConfig,
    state: Arc<StateStore>,
    certs: StaticCert,
) -> Result<(Bound, Running), StartError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })
    };
    let outbound_listener = bind(config.outbound).await?;
    let inbound_listener = bind(config.inbound).await?;
    let readiness_listener = bind(config.readiness).await?;
    let local = |l: &TcpListener, addr: SocketAddr| l.local_addr().unwrap_or(addr);
    let bound = Bound {
        outbound: local(&outbound_listener, config.outbound),
        inbound: local(&inbound_listener, config.inbound),
        readiness: local(&readiness_listener, config.readiness),
    };
    let creds = certs.cert.credentials();
    let tls = identity::tls::server_config(
        creds.chain.clone(),
        creds.key.clone_key(),
        certs.roots.clone(),
        certs.cert.id().trust_domain(),
    )?;
    let inbound_connections = Connections::new();
    let inbound = Inbound::new(
        state.clone(),
        inbound_connections.clone(),
        &config.workload_uid,
        DirectConnector,
        |o| {
            info!(
                direction = "inbound",
                src.addr = %o.source,
                src.identity = o.source_identity.as_deref().unwrap_or("-"),
                dst.addr = %o.destination,
                status = o.status,
                bytes_recv = o.bytes.0,
                bytes_sent = o.bytes.1,
                duration_ms = o.duration.as_millis() as u64,
                error = o.error.as_deref().unwrap_or("-"),
                "connection complete"
            )
        },
    );
    let draining = inbound.drain_switch();
    let server = hbone::Server::new(config.hbone.clone(), Arc::new(tls), inbound);
    let outbound = Arc::new(Outbound::new(
        state.clone(),
        Arc::new(certs.clone()),
        config.hbone.clone(),
        config.mark,
    ));
    let uid = config.workload_uid.clone();
    let outbound_addr = bound.outbound;
    let outbound_active = Arc::new(AtomicUsize::new(0));
    let active = outbound_active.clone();
    let serve_outbound = async move {
        loop {
            let (stream, peer) = match outbound_listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory for a moment: back off instead of spinning.
                    warn!(error = %e, "outbound: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small writes back to the app must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let outbound = outbound.clone();
            let uid = uid.clone();
            let active = Active::new(&active);
            tokio::spawn(async move {
                let _active = active;
                let destination = match crate::sockets::original_dst(&stream) {
                    Ok(d) if d.0 == outbound_addr => {
                        warn!(src = %peer, "outbound: refusing a connection to the proxy itself");
                        return;
                    }
                    Ok(d) => d,
                    Err(e) => {
                        warn!(src = %peer, error = %e, "outbound: no original destination (not redirected by the capture rule?)");
                        return;
                    }
                };
                let o = outbound
                    .serve(stream, ClientAddr(peer), destination, &uid)
                    .await;
                info!(
                    direction = "outbound",
                    src.addr = %o.source,
                    dst.addr = %o.destination,
                    dst.hbone_addr = o.hbone_target.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    dst.workload = o.destination_uid.as_deref().unwrap_or("-"),
                    mtls = o.mtls,
                    bytes_sent = o.bytes.0,
                    bytes_recv = o.bytes.1,
                    duration_ms = o.duration.as_millis() as u64,
                    error = o.error.as_deref().unwrap_or("-"),
                    "connection complete"
                );
            });
        }
    };
    let uid = config.workload_uid.clone();
    let cert = certs.cert.clone();
    let ready_state = state.clone();
    let serve_readiness = async move {
        loop {
            let Ok((mut stream, _)) = readiness_listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let ready = {
                let s = ready_state.snapshot();
                s.is_synced() && s.workload(&uid).is_some() && cert.is_valid_at(SystemTime::now())
            };
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&request[..n]);
                let path_ok = text.starts_with("GET /healthz/ready ");
                let status = match (path_ok, ready) {
                    (false, _) => "404 Not Found",
                    (true, true) => "200 OK",
                    (true, false) => "503 Service Unavailable",
                };
                let response =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    };
    // Connections run in tasks of their own, so closing the listener (at a drain) leaves them.
    let serve_inbound = async move {
        loop {
            match inbound_listener.accept().await {
                Ok((tcp, _)) => {
                    let server = server.clone();
                    tokio::spawn(async move {
                        if let Err(e) = server.serve_connection(tcp).await {
                            tracing::debug!(error = %e, "inbound: HBONE connection ended");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "inbound: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    // Every state change (a manifest or xDS update) re-checks the open inbound connections.
    let mut changes = state.subscribe();
    let (recheck_state, recheck_connections) = (state.clone(), inbound_connections.clone());
    let recheck = async move {
        while changes.changed().await.is_ok() {
            recheck_connections.reauthorize(&recheck_state.snapshot());
        }
    };
    let serve = async move {
        tokio::join!(serve_outbound, serve_inbound, serve_readiness, recheck);
    };
    Ok((
        bound,
        Running {
            serve: Box::pin(serve),
            outbound_active,
            inbound: inbound_connections,
            draining,
        },
    ))
}
