//! Dedicated mode: one workload's proxy in the current network namespace (for simple setups and
//! benchmarks). Outbound on 127.0.0.1:15001 behind the capture rule (original destination from
//! `SO_ORIGINAL_DST`, own sockets marked), inbound HBONE on 0.0.0.0:15008 with the workload's
//! certificate, readiness on 15021 (`/healthz/ready`: 200 once policies are synced, the workload
//! is known and its certificate is valid).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use common::ports;
use tokio::net::TcpListener;
use tracing::info;

use crate::assembly::{Assembled, Listeners, Parts, assemble};
use crate::certs::StaticCert;
use crate::connections::Connections;
use crate::inbound::DirectConnector;
use crate::serve::Tracker;
use crate::sockets::Marked;
use crate::state::{LocalWorkload, StateStore};

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
    /// Where connections are counted.
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl DedicatedConfig {
    /// Istio's ports for `workload_uid`, mark 0x539.
    pub fn new(workload_uid: &str) -> Self {
        DedicatedConfig {
            workload_uid: workload_uid.to_owned(),
            outbound: SocketAddr::from(([127, 0, 0, 1], ports::OUTBOUND)),
            inbound: SocketAddr::from(([0, 0, 0, 0], ports::HBONE)),
            readiness: SocketAddr::from(([0, 0, 0, 0], ports::READINESS)),
            mark: Some(common::PACKET_MARK),
            hbone: hbone::Config::default(),
            metrics: crate::telemetry::metrics::Metrics::new(Duration::from_secs(300)),
        }
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
    tracker: Tracker,
    inbound: Arc<Connections>,
    draining: Arc<AtomicBool>,
    go_away: Box<dyn Fn() + Send + Sync>,
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
            tracker,
            inbound,
            draining,
            go_away,
        } = self;
        tokio::select! {
            () = serve => {}
            () = shutdown => {}
        }
        // Clients open their next tunnels elsewhere (GOAWAY); a CONNECT that crosses it on an
        // HBONE connection that stays open is refused.
        go_away();
        draining.store(true, Ordering::SeqCst);
        let open = || tracker.active() + inbound.len();
        info!(
            open = open(),
            ?deadline,
            "draining: listeners closed, waiting for open connections"
        );
        let cut = tracker.drain(deadline, open).await;
        info!(cut, "drained");
        Drained { cut }
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
    let tls = identity::tls::server_config_following(
        identity::tls::single_cert(creds.chain.clone(), creds.key.clone_key())?,
        certs.roots.clone(),
        certs.cert.id().trust_domain(),
    )?;
    let assembled = assemble(
        Parts {
            state: state.clone(),
            certificates: Arc::new(certs.clone()),
            local: LocalWorkload::Uid(config.workload_uid.clone()),
            tls: Arc::new(tls),
            hbone: config.hbone.clone(),
            metrics: config.metrics.clone(),
            app_connector: DirectConnector::default(),
            peer_connector: Marked { mark: config.mark },
        },
        Listeners {
            outbound: vec![outbound_listener],
            inbound: vec![inbound_listener],
            plain: Vec::new(),
        },
    );
    let uid = config.workload_uid.clone();
    let cert = certs.cert.clone();
    let ready_state = state.clone();
    let serve_readiness = crate::admin::serve(
        readiness_listener,
        crate::admin::readiness(move || {
            let s = ready_state.snapshot();
            if !s.is_synced() {
                Err("the state is not loaded yet".into())
            } else if s.workload(&uid).is_none() {
                Err(format!("the workload {uid} is not in the state"))
            } else if !cert.is_valid_at(SystemTime::now()) {
                Err(format!("the certificate of {} is not valid now", cert.id()))
            } else {
                Ok(())
            }
        }),
    );
    // Dedicated mode has no successor to hand its connections to: an upgrade drains.
    let Assembled {
        serve,
        tracker,
        connections,
        draining,
        go_away,
        handoff: _,
    } = assembled;
    let serve = async move {
        tokio::join!(serve, serve_readiness);
    };
    Ok((
        bound,
        Running {
            serve: Box::pin(serve),
            tracker,
            inbound: connections,
            draining,
            go_away,
        },
    ))
}
