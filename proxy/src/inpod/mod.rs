//! Shared mode: one proxy per node serving every pod the node agent hands over.
//!
//! The agent (ours or Istio's istio-cni) sends each captured pod over the ZDS socket
//! (DESIGN.md "Netns handoff") with a descriptor of the pod's network namespace. For each pod the
//! proxy:
//! - enters the namespace on a helper thread ([`netns::PodNetns`]) and binds there
//!   127.0.0.1:15001 (outbound, behind the pod's capture rule), 0.0.0.0:15006 (plaintext
//!   inbound) and 0.0.0.0:15008 (HBONE inbound), and where the pod has IPv6 the same on `[::1]`
//!   and `[::]` (IPv6 only: one socket per family);
//! - starts fetching the pod's certificate (identity from the handoff's namespace and service
//!   account), served by the HBONE listener and presented by the pod's outbound tunnels;
//! - dials everything (tunnels, passthrough, the app) from inside the namespace, marked with
//!   `SO_MARK` so the capture rules let it through; tunnels therefore leave from the pod's own
//!   address, and the app is called from the client's address (a transparent socket; the node
//!   agent's return route brings the app's replies back), unless
//!   [`SharedConfig::original_source`] is off;
//! - finds the pod's xDS workload by name, namespace, service account and node at each
//!   connection (the pod may reach the proxy before its workload reaches xDS; until then its
//!   connections are refused).
//!
//! A deleted pod is drained: its listeners close at once, its open connections get up to the
//! termination deadline, then are cut. On a new ZDS connection, pods the agent does not replay
//! (add or keep) before `SnapshotSent` are drained too.
//!
//! Bad messages are refused with the reason in the ack, and the proxy goes on serving (Istio's
//! ztunnel exits on some of them): an add without workload info or without a namespace
//! descriptor, a descriptor that is not a network namespace, a second `SnapshotSent`, a keep
//! after the snapshot or for an unknown pod, an undecodable datagram.

mod handoff;
pub mod netns;

pub use handoff::{HandedOff, TookOver};

use std::collections::{BTreeMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use identity::SpiffeId;
use redirect::zds::ZdsClient;
use redirect::zds::proto::{Payload, WorkloadInfo, WorkloadRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::PodStatus;
use crate::assembly::{Assembled, Listeners, Parts, assemble};
use crate::certs::{CertWatch, Certificates};
use crate::connections::Connections;
use crate::serve::Tracker;
use crate::state::{LocalWorkload, StateStore};
use crate::telemetry::metrics::Metrics;
use netns::{InPodConnector, PodNetns};

/// Settings of a shared-mode proxy.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SharedConfig {
    /// This node's name (workloads are matched on it; empty: any node).
    pub node: String,
    /// The mesh's trust domain (pods' identities: `spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
    /// `SO_MARK` of the proxy's sockets in pods (Istio: 0x539).
    pub mark: Option<u32>,
    /// HBONE settings.
    pub hbone: hbone::Config,
    /// How long a deleted pod's connections may take to finish before they are cut.
    pub termination_deadline: Duration,
    /// The in-pod listeners (Istio's ports).
    pub outbound_port: u16,
    /// Plaintext inbound.
    pub inbound_plain_port: u16,
    /// HBONE inbound.
    pub inbound_port: u16,
    /// Bind the in-pod listeners with `SO_REUSEPORT` (Istio's `INPOD_PORT_REUSE`, default on), so
    /// a new proxy can serve a pod beside the old one during a rolling update; the kernel spreads
    /// new connections over both until the old one closes its listeners.
    pub port_reuse: bool,
    /// Connect to each pod's app from the client's address (Istio: on by default), which needs
    /// the return route the node agent installs in the pod (`redirect::ReturnRoute`); when
    /// false, from the pod's own address.
    pub original_source: bool,
    /// How long a pod handed over waits for its certificate before its listeners are bound
    /// anyway (the ack to the node agent waits as long).
    pub certificate_wait: Duration,
    /// The DNS proxy served in each pod (on 127.0.0.1, UDP and TCP, where the node agent's DNS
    /// capture sends the pod's queries), or none.
    pub dns: Option<DnsSettings>,
}

/// The DNS proxy of each pod.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// The port (Istio: 15053).
    pub port: u16,
    /// How names are answered.
    pub config: crate::dns::DnsConfig,
    /// Where other names go (the node's resolvers).
    pub upstream: crate::dns::Upstream,
    /// Search domains besides the pod's own (`<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`).
    pub search_domains: Vec<String>,
}

impl DnsSettings {
    /// Who asks, for a pod of `namespace`.
    pub fn asker(&self, namespace: &str) -> crate::dns::Asker {
        let domain = self.config.cluster_domain.trim_end_matches('.');
        let mut search_domains = vec![
            format!("{namespace}.svc.{domain}"),
            format!("svc.{domain}"),
            domain.to_owned(),
        ];
        for extra in &self.search_domains {
            if !search_domains.contains(extra) {
                search_domains.push(extra.clone());
            }
        }
        crate::dns::Asker {
            namespace: namespace.to_owned(),
            search_domains,
        }
    }
}

impl SharedConfig {
    /// Istio's ports and mark for node `node` in trust domain `trust_domain`.
    pub fn new(node: &str, trust_domain: &str) -> Self {
        SharedConfig {
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
            mark: Some(common::PACKET_MARK),
            hbone: hbone::Config::default(),
            termination_deadline: Duration::from_secs(5),
            outbound_port: common::ports::OUTBOUND,
            inbound_plain_port: common::ports::INBOUND_PLAINTEXT,
            inbound_port: common::ports::HBONE,
            port_reuse: true,
            original_source: true,
            certificate_wait: Duration::from_secs(5),
            dns: None,
        }
    }
}

/// Why a pod stops being served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// The pod was deleted (or handed over again with another namespace): CONNECTs that still
    /// arrive for it are refused (503).
    PodGone,
    /// This proxy is stopping (a rolling update: the pod stays, served by the new proxy). Its
    /// connections go away gracefully and every tunnel they carry is still served, until the
    /// termination deadline.
    ProxyStopping,
}

/// One served pod.
struct Pod {
    info: WorkloadInfo,
    id: SpiffeId,
    netns_inode: u64,
    cert: CertWatch,
    stop: CancellationToken,
    tracker: Tracker,
    connections: Arc<Connections>,
    draining: Arc<AtomicBool>,
    go_away: Box<dyn Fn() + Send + Sync>,
    handoff: crate::assembly::PodHandoff,
}

/// The shared-mode proxy: the pods handed over, and what serves them.
pub struct SharedProxy<C> {
    config: SharedConfig,
    state: Arc<StateStore>,
    certificates: Arc<C>,
    pods: Mutex<BTreeMap<String, Pod>>,
    metrics: Arc<Metrics>,
    /// Whether a node agent has sent its snapshot (`SnapshotSent`): until then the pods it will
    /// hand over are not all served, and the proxy is not ready.
    snapshot_served: AtomicBool,
}

impl<C> std::fmt::Debug for SharedProxy<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedProxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C: Certificates> SharedProxy<C> {
    /// A proxy with no pods yet, counting its connections into `metrics`.
    pub fn new(
        config: SharedConfig,
        state: Arc<StateStore>,
        certificates: Arc<C>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(SharedProxy {
            config,
            state,
            certificates,
            pods: Mutex::default(),
            metrics,
            snapshot_served: AtomicBool::new(false),
        })
    }

    /// The metrics of every pod's connections.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pod>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pods served now.
    pub fn pods(&self) -> Vec<PodStatus> {
        let state = self.state.snapshot();
        self.lock()
            .iter()
            .map(|(uid, pod)| PodStatus {
                uid: uid.clone(),
                namespace: pod.info.namespace.clone(),
                name: pod.info.name.clone(),
                identity: pod.id.to_string(),
                workload_uid: state
                    .local(&self.local_of(&pod.info))
                    .map(|w| w.uid.clone()),
                cert_expiry: pod.cert.borrow().as_ref().map(|c| c.not_after()),
                open_connections: pod.tracker.active() + pod.connections.len(),
            })
            .collect()
    }

    /// Ready (`/healthz/ready`) once there is state to serve the pods with, the node agent has
    /// handed over every pod of the node (its first snapshot, `SnapshotSent`, is served), and
    /// every pod holds a valid certificate; otherwise why not. A rolling update waits on it
    /// before it stops the old proxy.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.state.snapshot().is_synced() {
            return Err("no workloads and policies received yet".into());
        }
        if !self.snapshot_served.load(Ordering::Acquire) {
            return Err(
                "waiting for the node agent's first snapshot of this node's pods (ZDS)".into(),
            );
        }
        let now = SystemTime::now();
        let pods = self.lock();
        let waiting = pods.values().find(|pod| {
            !pod.cert
                .borrow()
                .as_ref()
                .is_some_and(|c| c.is_valid_at(now))
        });
        match waiting {
            Some(pod) => Err(format!(
                "pod {}/{} has no valid certificate for {} yet",
                pod.info.namespace, pod.info.name, pod.id
            )),
            None => Ok(()),
        }
    }

    /// Answers readiness probes on `listener` (port 15021) from [`SharedProxy::readiness`].
    pub async fn serve_readiness(self: Arc<Self>, listener: tokio::net::TcpListener) {
        crate::admin::serve(listener, crate::admin::readiness(move || self.readiness())).await;
    }

    fn local_of(&self, info: &WorkloadInfo) -> LocalWorkload {
        LocalWorkload::Pod {
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            service_account: info.service_account.clone(),
            node: self.config.node.clone(),
        }
    }

    /// Starts serving a pod: `uid` is the agent's key, `info` who the pod is, `netns` its network
    /// namespace. An error says why it is not served (for the ack).
    pub async fn add_pod(
        self: &Arc<Self>,
        uid: &str,
        info: WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<(), String> {
        if info.namespace.is_empty() || info.name.is_empty() || info.service_account.is_empty() {
            return Err(format!(
                "pod {uid}: workload info lacks the namespace, name or service account ({info:?})"
            ));
        }
        let id = SpiffeId::istio(
            &self.config.trust_domain,
            &info.namespace,
            &info.service_account,
        )
        .map_err(|e| format!("pod {uid}: no valid identity: {e}"))?;
        let label = format!("{}/{}", info.namespace, info.name);
        let netns = Arc::new(
            PodNetns::enter(netns, &info.name).map_err(|e| format!("pod {label} ({uid}): {e}"))?,
        );
        if let Some(existing) = self.lock().get(uid)
            && existing.netns_inode == netns.inode()
        {
            info!(pod = %label, uid, "pod handed over again (same namespace): kept");
            return Ok(());
        }
        let mark = self.config.mark;
        let reuse = self.config.port_reuse;
        // The pod's certificate first: with SO_REUSEPORT the kernel hands a listener its share
        // of new connections as soon as it is bound, and beside an older proxy (a rolling
        // update) this one must not take connections it cannot yet serve. Bounded, so a CA
        // that does not answer does not hold the agent's handoff: the pod is then served as
        // soon as the certificate comes.
        let cert = self.certificates.watch(&id);
        let mut arriving = cert.clone();
        let valid = async {
            arriving
                .wait_for(|c| c.as_ref().is_some_and(|c| c.is_valid_at(SystemTime::now())))
                .await
                .is_ok()
        };
        let waited = tokio::time::timeout(self.config.certificate_wait, valid).await;
        if !matches!(waited, Ok(true)) {
            warn!(pod = %label, uid, identity = %id, waited = ?self.config.certificate_wait, "no certificate yet: serving the pod without one until it comes");
        }
        // IPv6 is served where the pod has it: its loopback holds ::1.
        let ipv6 = netns.run(crate::sockets::has_ipv6).await.unwrap_or(false);
        let families: &[bool] = if ipv6 { &[false, true] } else { &[false] };
        let bind = |port: u16, loopback: bool| {
            let (netns, label) = (netns.clone(), label.clone());
            async move {
                let mut listeners = Vec::new();
                for &v6 in families {
                    let addr = crate::sockets::family_addr(v6, loopback, port);
                    listeners.push(netns.listen(addr, reuse).await.map_err(|e| {
                        format!("pod {label}: cannot listen on {addr} in its namespace: {e}")
                    })?);
                }
                Ok::<_, String>(listeners)
            }
        };
        let outbound_listener = bind(self.config.outbound_port, true).await?;
        let plain_listener = bind(self.config.inbound_plain_port, false).await?;
        let inbound_listener = bind(self.config.inbound_port, false).await?;
        if reuse {
            // When a proxy's listener closes, the connections still in its accept queue move to
            // another listener of the port instead of being reset (Linux 5.14+; per network
            // namespace). Best effort: where /proc/sys is read-only (a container), the node
            // agent or the node's configuration sets it.
            let migrate = netns
                .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))
                .await;
            if let Ok(Err(e)) | Err(e) = migrate {
                debug!(pod = %label, error = %e, "cannot set net.ipv4.tcp_migrate_req in the pod's namespace");
            }
        }

        let local = self.local_of(&info);
        let mut tls = identity::tls::server_config_following(
            Arc::new(identity::tls::WatchResolver::new(cert.clone())),
            self.certificates.trust_roots().clone(),
            &self.config.trust_domain,
        )
        .map_err(|e| format!("pod {label}: {e}"))?;
        if self.config.hbone.movable {
            // The connections' traffic secrets, kept in memory for a handoff (`handoff`).
            tls.key_log = hbone::handoff::traffic_secret_log();
        }
        let connector = InPodConnector {
            netns: netns.clone(),
            mark,
            original_source: self.config.original_source,
        };
        let Assembled {
            serve,
            tracker,
            connections,
            draining,
            go_away,
            handoff,
        } = assemble(
            Parts {
                state: self.state.clone(),
                certificates: self.certificates.clone(),
                local,
                tls: Arc::new(tls),
                hbone: self.config.hbone.clone(),
                metrics: self.metrics.clone(),
                app_connector: connector.clone(),
                peer_connector: connector,
            },
            Listeners {
                outbound: outbound_listener,
                inbound: inbound_listener,
                plain: plain_listener,
            },
        );
        let stop = CancellationToken::new();
        if let Some(dns) = &self.config.dns {
            // Bound before the pod is acknowledged: the agent's DNS capture sends the pod's
            // queries here from then on.
            // On each family's loopback: the capture redirects a pod's IPv6 queries to ::1.
            for &v6 in families {
                let addr = crate::sockets::family_addr(v6, true, dns.port);
                let sockets = netns
                    .run(move || {
                        Ok::<_, std::io::Error>((
                            crate::sockets::udp_socket(addr, reuse, None)?,
                            crate::sockets::listener(addr, reuse)?,
                        ))
                    })
                    .await
                    .and_then(|r| r)
                    .and_then(|(udp, tcp)| {
                        Ok((
                            tokio::net::UdpSocket::from_std(udp)?,
                            tokio::net::TcpListener::from_std(tcp)?,
                        ))
                    })
                    .map_err(|e| {
                        format!("pod {label}: cannot serve DNS on {addr} in its namespace: {e}")
                    })?;
                let server = crate::dns::DnsServer::new(
                    self.state.clone(),
                    dns.config.clone(),
                    dns.upstream.clone(),
                    dns.asker(&info.namespace),
                    self.metrics.dns.clone(),
                );
                tokio::spawn(server.serve(sockets.0, sockets.1, stop.clone()));
            }
        }
        let stopped = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve => {}
                () = stopped.cancelled() => {}
            }
        });
        let families = if ipv6 { "IPv4 and IPv6" } else { "IPv4" };
        info!(pod = %label, uid, identity = %id, netns = netns.inode(), "pod added: listening on 15001, 15006 and 15008 in its namespace ({families})");
        let pod = Pod {
            info,
            id,
            netns_inode: netns.inode(),
            cert,
            stop,
            tracker,
            connections,
            draining,
            go_away,
            handoff,
        };
        let replaced = self.lock().insert(uid.to_owned(), pod);
        if let Some(old) = replaced {
            info!(
                uid,
                "pod handed over with a new namespace: draining the old one"
            );
            drop(self.drain(uid.to_owned(), old, Drain::PodGone));
        }
        Ok(())
    }

    /// Stops serving a pod: listeners close now, open connections get the termination deadline.
    /// Returns whether it was served.
    pub fn remove_pod(&self, uid: &str) -> bool {
        let Some(pod) = self.lock().remove(uid) else {
            return false;
        };
        drop(self.drain(uid.to_owned(), pod, Drain::PodGone));
        true
    }

    fn drain(&self, uid: String, pod: Pod, why: Drain) -> tokio::task::JoinHandle<usize> {
        // The identity's certificate is no longer refreshed once no local pod has it.
        if !self.lock().values().any(|p| p.id == pod.id) {
            self.certificates.forget(&pod.id);
        }
        pod.stop.cancel();
        // Clients with a connection to this pod open their next tunnels elsewhere: the proxy
        // that replaces this one, or nowhere for a pod that is gone.
        (pod.go_away)();
        if why == Drain::PodGone {
            pod.draining.store(true, Ordering::SeqCst);
        }
        let deadline = self.config.termination_deadline;
        let label = format!("{}/{}", pod.info.namespace, pod.info.name);
        tokio::spawn(async move {
            let open = || pod.tracker.active() + pod.connections.len();
            info!(pod = %label, uid, open = open(), ?deadline, "pod removed: listeners closed, draining its connections");
            let cut = pod.tracker.drain(deadline, open).await;
            info!(pod = %label, uid, cut, "pod drained");
            cut
        })
    }

    /// Stops serving every pod (the proxy is shutting down): listeners close now, connections
    /// get the termination deadline. Returns how many connections were still open at the
    /// deadline and were cut.
    pub async fn drain_all(&self) -> usize {
        let pods = std::mem::take(&mut *self.lock());
        let drains: Vec<_> = pods
            .into_iter()
            .map(|(uid, pod)| self.drain(uid, pod, Drain::ProxyStopping))
            .collect();
        let mut cut = 0;
        for d in drains {
            cut += d.await.unwrap_or(0);
        }
        cut
    }

    /// Serves the agent at `path` for ever: connects (retrying with backoff while it is not
    /// there), follows its requests, and reconnects when the connection ends.
    pub async fn run_zds(self: Arc<Self>, path: PathBuf) {
        // Pods are taken only once there are workloads and policies to serve them with: beside
        // an older proxy (SO_REUSEPORT), a pod served before would have its connections refused
        // (the source or the destination unknown) instead of served by the older one.
        let mut changes = self.state.subscribe();
        if !self.state.snapshot().is_synced() {
            info!(socket = %path.display(), "ZDS: waiting for workloads and policies before taking pods");
            while !self.state.snapshot().is_synced() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.clone().zds_session(path.clone()).await {
                Ok(()) => {
                    info!(socket = %path.display(), "ZDS: the node agent closed the connection; reconnecting");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    warn!(socket = %path.display(), error = %e, retry_in = ?backoff, "ZDS: no connection to the node agent");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// One ZDS connection, until it ends.
    async fn zds_session(self: Arc<Self>, path: PathBuf) -> std::io::Result<()> {
        type Request = (
            std::io::Result<(WorkloadRequest, Option<OwnedFd>)>,
            tokio::sync::oneshot::Sender<String>,
        );
        let client = ZdsClient::connect(&path)?;
        info!(socket = %path.display(), "ZDS: connected to the node agent");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Request>(1);
        // Blocking socket I/O on a thread of its own; each request waits for its ack text.
        let reader = std::thread::spawn(move || -> std::io::Result<()> {
            loop {
                let received = match client.recv() {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(e),
                    Err(e) => return Err(e),
                };
                let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
                if tx.blocking_send((received, ack_tx)).is_err() {
                    return Ok(());
                }
                let error = ack_rx
                    .blocking_recv()
                    .unwrap_or_else(|_| "the proxy is stopping".to_owned());
                client.ack(&error)?;
            }
        });
        let mut snapshot_done = false;
        let mut replayed: HashSet<String> = HashSet::new();
        while let Some((received, ack)) = rx.recv().await {
            let result = match received {
                Err(e) => Err(e.to_string()),
                Ok((request, fd)) => {
                    self.zds_request(request, fd, &mut snapshot_done, &mut replayed)
                        .await
                }
            };
            if let Err(e) = &result {
                warn!(error = %e, "ZDS: request refused");
            }
            let _ = ack.send(result.err().unwrap_or_default());
        }
        match tokio::task::spawn_blocking(move || reader.join()).await {
            Ok(Ok(result)) => result,
            _ => Err(std::io::Error::other("the ZDS reader thread panicked")),
        }
    }

    async fn zds_request(
        self: &Arc<Self>,
        request: WorkloadRequest,
        fd: Option<OwnedFd>,
        snapshot_done: &mut bool,
        replayed: &mut HashSet<String>,
    ) -> Result<(), String> {
        match request.payload {
            None => Err("ZDS request without a payload".into()),
            Some(Payload::Add(add)) => {
                let Some(info) = add.workload_info else {
                    return Err(format!(
                        "add of pod {} without workload info: cannot tell its identity; not served",
                        add.uid
                    ));
                };
                let Some(fd) = fd else {
                    return Err(format!(
                        "add of pod {} ({}/{}) without a network-namespace descriptor; not served",
                        add.uid, info.namespace, info.name
                    ));
                };
                self.add_pod(&add.uid, info, fd).await?;
                replayed.insert(add.uid);
                Ok(())
            }
            Some(Payload::Keep(keep)) => {
                if *snapshot_done {
                    return Err(format!("keep of pod {} after the snapshot", keep.uid));
                }
                if !self.lock().contains_key(&keep.uid) {
                    return Err(format!(
                        "keep of pod {}, which this proxy does not serve",
                        keep.uid
                    ));
                }
                replayed.insert(keep.uid);
                Ok(())
            }
            Some(Payload::Del(del)) => {
                if !self.remove_pod(&del.uid) {
                    info!(uid = %del.uid, "ZDS: delete of a pod not served (already gone)");
                }
                replayed.remove(&del.uid);
                Ok(())
            }
            Some(Payload::SnapshotSent(_)) => {
                if *snapshot_done {
                    return Err("a second SnapshotSent on one connection".into());
                }
                *snapshot_done = true;
                let stale: Vec<String> = self
                    .lock()
                    .keys()
                    .filter(|uid| !replayed.contains(*uid))
                    .cloned()
                    .collect();
                for uid in &stale {
                    info!(uid, "ZDS: pod not in the agent's snapshot: removing it");
                    self.remove_pod(uid);
                }
                // Every pod of the snapshot was served (or refused, with the reason acked) as
                // its message came: the node's pods are all here.
                self.snapshot_served.store(true, Ordering::Release);
                info!(
                    pods = self.lock().len(),
                    dropped = stale.len(),
                    "ZDS: snapshot complete"
                );
                Ok(())
            }
        }
    }
}
