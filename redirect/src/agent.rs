//! The node agent: captures the pods of this node that are in ambient mode.
//!
//! It looks at the pods a [`PodSource`] reports, decides which must be captured ([`Enablement`],
//! istio-cni's rules: on this node, not in an excluded namespace (`kube-system` by default), no
//! sidecar, not labelled `istio.io/dataplane-mode=none`, and labelled `ambient` itself or in a
//! namespace labelled so; network namespace known), and converges: rules applied in newly captured pods, removed
//! from released ones, and every capture and release reported to a [`Handoff`] (the proxy). At
//! start-up it reconciles every captured pod (applying is idempotent), so a restarted agent
//! neither duplicates rules nor forgets pods.
//!
//! Failing closed: a pod's namespace is opened once and held for as long as the pod is captured
//! (rules go in and come out through that descriptor); an ambiguous namespace is never guessed;
//! a failed capture or release is retried with backoff and never reported as done.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cni::server::{Posted, Stage};
use crate::cni::{CniAnswer, CniBoard, CniEvent};
use crate::host::{PROBE_SOURCE, PROBE_SOURCE_V6, ProbeSnat};
use crate::{Backend, RuleSet, apply, fd_path, remove};

/// The label that puts a namespace in the mesh (`ambient`) or takes a pod out (`none`).
pub use common::k8s::DATAPLANE_MODE_LABEL;

/// What the agent knows about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's uid (`metadata.uid`).
    pub uid: String,
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// Its namespace's labels.
    pub namespace_labels: BTreeMap<String, String>,
    /// The node it runs on.
    pub node: String,
    /// Its network namespace, if known; when not, the agent looks for the namespace that holds
    /// one of `ips` ([`crate::netns::find_by_ip`]).
    pub netns: Option<PathBuf>,
    /// The pod's IPs (`status.podIPs`).
    pub ips: Vec<IpAddr>,
    /// The pod's annotations (a sidecar's `sidecar.istio.io/status` keeps it out).
    pub annotations: BTreeMap<String, String>,
}

impl PodInfo {
    /// Whether the pod must be captured on `node` under the default [`Enablement`].
    pub fn wants_capture(&self, node: &str) -> bool {
        self.netns.is_some() && self.in_ambient(node)
    }

    /// Whether the default [`Enablement`] admits the pod on `node` (its network namespace
    /// aside).
    pub fn in_ambient(&self, node: &str) -> bool {
        self.admitted_by(&Enablement::default(), node).is_ok()
    }
}

pub use common::k8s::{DEFAULT_EXCLUDED_NAMESPACES, Enablement, SIDECAR_STATUS_ANNOTATION, Skip};

impl PodInfo {
    /// Whether `enablement` admits this pod on `node` ([`Skip::OtherNode`] first, then
    /// [`Enablement::admits`]).
    pub fn admitted_by(&self, enablement: &Enablement, node: &str) -> Result<(), Skip> {
        if self.node != node {
            return Err(Skip::OtherNode);
        }
        enablement.admits(
            &self.namespace,
            &self.labels,
            &self.annotations,
            &self.namespace_labels,
        )
    }
}

/// Where pods come from (Kubernetes, or the local mesh's manifests).
pub trait PodSource: Send + Sync {
    /// The current pods (of every node; the agent filters).
    fn pods(&self) -> Result<Vec<PodInfo>, String>;

    /// Records on `pod` whether its traffic is redirected ([`REDIRECTION_ANNOTATION`]; `None`
    /// removes it). The agent calls it when the annotation the source last reported differs
    /// from the pod's state, so a source must tolerate repeats until its view catches up. The
    /// default records nothing (sources with no place for it, such as manifests).
    fn annotate(&self, pod: &PodInfo, redirection: Option<Redirection>) {
        let _ = (pod, redirection);
    }
}

pub use common::k8s::{REDIRECTION_ANNOTATION, Redirection};

/// Receives the captured pods' network namespaces (the proxy, in process or over a socket).
pub trait Handoff: Send + Sync {
    /// A pod was captured. `netns` is its network namespace, held open by the agent for as long
    /// as the pod is captured (hand this descriptor on, never re-open the pod's path: a path can
    /// come to name another namespace).
    fn add(&self, pod: &PodInfo, netns: &Arc<File>);
    /// Whether the pod `uid`, last [`add`](Self::add)ed, is served (its proxy acknowledged
    /// it): the CNI plugin lets a new pod start only then.
    fn served(&self, uid: &str) -> bool;
    /// A pod was released (its rules are gone).
    fn remove(&self, uid: &str);
    /// The agent completed a full pass: every pod it captures has been [`add`](Self::add)ed.
    /// Called after every pass; a handoff may hold what it tells a newly connected proxy until
    /// the first (the ZDS server does: a snapshot taken earlier would be partial).
    fn synced(&self) {}
}

/// A handoff that does nothing (rules only).
#[derive(Debug, Default)]
pub struct NoHandoff;

impl Handoff for NoHandoff {
    fn add(&self, _pod: &PodInfo, _netns: &Arc<File>) {}
    /// Rules only: a captured pod counts as served.
    fn served(&self, _uid: &str) -> bool {
        true
    }
    fn remove(&self, _uid: &str) {}
}

/// A captured pod: what the source said, and its network namespace, held open.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The pod as the source reported it when it was captured.
    pub pod: PodInfo,
    /// The namespace the rules were applied in, open: rules are removed through this descriptor,
    /// so a reused PID or a recreated namespace at the same path can never redirect the removal
    /// to another pod.
    pub netns: Arc<File>,
    /// (device, inode) of that namespace.
    pub identity: (u64, u64),
}

/// When a failed capture or release of a pod is tried again.
#[derive(Debug, Clone, Copy)]
struct Retry {
    attempts: u32,
    next: Instant,
}

/// The node agent's state.
pub struct NodeAgent<S, H> {
    node: String,
    backend: Backend,
    rules: RuleSet,
    source: S,
    handoff: H,
    captured: HashMap<String, Captured>,
    /// Pods whose namespace was looked for and not found or ambiguous (warned once per cause).
    unresolved: HashMap<String, String>,
    /// Backoff of failed captures and releases, by uid.
    retries: HashMap<String, Retry>,
    /// Which pods join the mesh.
    enablement: Enablement,
    /// The CNI plugin's requests, when the agent serves it.
    cni: Option<Arc<CniBoard>>,
    /// The node's kubelet-probe rewrite, when the agent keeps it.
    probes: Option<Probes>,
    /// How a pod's network namespace is found when nothing names it.
    lookup: NetnsLookup,
    /// What the agent reports about itself.
    status: Arc<AgentStatus>,
    /// Remove istio-cni's rules from a pod before capturing it.
    take_over: bool,
}

/// How the agent finds the network namespace of a pod that its source and the runtime did not
/// name (a pod that was running before the agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsLookup {
    /// The one namespace that holds the pod's IP ([`crate::netns::addresses_under`]): for
    /// namespaces no container runtime made (the local mesh).
    ByIp {
        /// Where the host's file system is (`/`, or `/host` in a container).
        root: PathBuf,
    },
    /// The namespace of the processes whose cgroup names the pod's uid, checked to hold the
    /// pod's IP ([`crate::netns::find_by_uid`]): as istio-cni does in a cluster.
    ByUid {
        /// Where the host's file system is (`/`, or `/host` in a container).
        root: PathBuf,
    },
}

impl Default for NetnsLookup {
    fn default() -> Self {
        NetnsLookup::ByIp {
            root: PathBuf::from("/"),
        }
    }
}

/// What the agent reports about itself (readiness and metrics), updated on every pass; shared
/// with whoever serves it ([`NodeAgent::status`]).
#[derive(Debug, Default)]
pub struct AgentStatus {
    synced: AtomicBool,
    captured: AtomicU64,
    captures: AtomicU64,
    capture_failures: AtomicU64,
    releases: AtomicU64,
    release_failures: AtomicU64,
    source_failures: AtomicU64,
}

impl AgentStatus {
    /// Whether a pass has completed with the source's full view (the agent is in charge).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// How many pods are captured now.
    pub fn captured(&self) -> u64 {
        self.captured.load(Ordering::SeqCst)
    }

    /// The Prometheus text of these numbers (metric names `ztunnel_node_agent_*`).
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!(
                "# HELP ztunnel_node_agent_{name} {help}\n# TYPE ztunnel_node_agent_{name} {kind}\nztunnel_node_agent_{name} {value}\n"
            ));
        };
        metric(
            "synced",
            "gauge",
            "1 once a pass completed with the pod source's full view.",
            u64::from(self.synced()),
        );
        metric(
            "pods_captured",
            "gauge",
            "Pods captured now.",
            self.captured(),
        );
        metric(
            "captures_total",
            "counter",
            "Pods captured.",
            get(&self.captures),
        );
        metric(
            "capture_failures_total",
            "counter",
            "Failed attempts to capture a pod.",
            get(&self.capture_failures),
        );
        metric(
            "releases_total",
            "counter",
            "Pods released.",
            get(&self.releases),
        );
        metric(
            "release_failures_total",
            "counter",
            "Failed attempts to release a pod.",
            get(&self.release_failures),
        );
        metric(
            "source_failures_total",
            "counter",
            "Passes the pod source could not serve.",
            get(&self.source_failures),
        );
        out
    }
}

/// Why [`NodeAgent::hand_back`] did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandBackError {
    /// The pod source could not list the pods (a Kubernetes source that has not listed yet):
    /// nothing was changed.
    Source(String),
    /// These pods' rules could not be removed (one line each).
    Pods(Vec<String>),
}

impl std::fmt::Display for HandBackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandBackError::Source(e) => write!(f, "the pod source cannot list the pods: {e}"),
            HandBackError::Pods(errors) => f.write_str(&errors.join("; ")),
        }
    }
}

impl std::error::Error for HandBackError {}

/// The probe rewrite and what the agent last put in place.
struct Probes {
    snat: ProbeSnat,
    /// The pods last applied (`None`: unknown, apply at the next pass).
    applied: Option<BTreeSet<IpAddr>>,
    /// When the live rules were last compared with what was applied.
    checked: Instant,
    /// After a failure, not before this.
    retry_at: Option<Instant>,
}

/// How often the node's probe rules are compared with what the agent applied (repairing drift).
const PROBE_CHECK: Duration = Duration::from_secs(10);

/// First and longest delay before a failed capture or release is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl<S: PodSource, H: Handoff> NodeAgent<S, H> {
    /// An agent for `node`.
    pub fn new(node: &str, backend: Backend, rules: RuleSet, source: S, handoff: H) -> Self {
        NodeAgent {
            node: node.to_owned(),
            backend,
            rules,
            source,
            handoff,
            enablement: Enablement::default(),
            cni: None,
            probes: None,
            lookup: NetnsLookup::default(),
            status: Arc::default(),
            take_over: false,
            captured: HashMap::new(),
            unresolved: HashMap::new(),
            retries: HashMap::new(),
        }
    }

    /// Which pods join the mesh (default: [`Enablement::default`]).
    pub fn with_enablement(mut self, enablement: Enablement) -> Self {
        self.enablement = enablement;
        self
    }

    /// Works off the CNI plugin's requests posted on `board` (by a
    /// [`crate::cni::CniServer`]): a pod the runtime announces is captured in the network
    /// namespace the runtime gives, and a pod it deletes is released. [`run`](Self::run) then
    /// wakes for each new request.
    pub fn with_cni(mut self, board: Arc<CniBoard>) -> Self {
        self.cni = Some(board);
        self
    }

    /// Keeps the node's kubelet-probe rewrite ([`ProbeSnat`]) naming exactly the captured pods'
    /// IPv4 addresses: applied when they change, compared with the live rules every 10 s and
    /// repaired, removed by [`shutdown`](Self::shutdown).
    pub fn with_probe_snat(mut self, snat: ProbeSnat) -> Self {
        self.probes = Some(Probes {
            snat,
            applied: None,
            checked: Instant::now(),
            retry_at: None,
        });
        self
    }

    /// Takes pods over from istio-cni: before a pod is captured, istio-cni's rules are removed
    /// from its namespace ([`crate::takeover::remove_istio_pod_rules`]), so no pod holds two
    /// rule sets. (The node's own istio-cni rules and plugin are the caller's to remove, once.)
    pub fn with_takeover(mut self, take_over: bool) -> Self {
        self.take_over = take_over;
        self
    }

    /// Hands the node back (to istio-cni): removes our rules from every pod of this node the
    /// source lists whose namespace can be found (whether or not it is captured now), tells the
    /// handoff each captured pod is gone, and removes the node-level rules. Returns how many
    /// pods were gone through, or why not: the source could not list the pods (nothing was
    /// done; try again), or the pods whose rules could not be removed (every pod is tried).
    pub fn hand_back(&mut self) -> Result<usize, HandBackError> {
        let mut pods = self.source.pods().map_err(HandBackError::Source)?;
        pods.retain(|p| p.node == self.node);
        // Every pod of the node, whatever its labels say now: look for each one's namespace
        // (an empty selector matches every pod; sidecars' pods are looked at too).
        let everyone = std::mem::replace(
            &mut self.enablement,
            Enablement {
                excluded_namespaces: Default::default(),
                selectors: Some(vec![Default::default()]),
            },
        );
        for pod in pods.iter_mut() {
            pod.annotations.remove(SIDECAR_STATUS_ANNOTATION);
        }
        self.resolve_netns(&mut pods);
        self.enablement = everyone;
        let mut errors = Vec::new();
        let mut released = 0;
        let mut namespaces: Vec<(String, PathBuf)> = pods
            .iter()
            .filter_map(|p| p.netns.clone().map(|n| (p.uid.clone(), n)))
            .collect();
        for (uid, c) in &self.captured {
            namespaces.push((uid.clone(), fd_path(c.netns.as_fd())));
        }
        namespaces.sort();
        namespaces.dedup();
        for (uid, path) in namespaces {
            // Removing is exact and idempotent: a pod without our rules is left as it is.
            match remove(&path, self.backend, &self.rules) {
                Ok(()) => released += 1,
                Err(e) => errors.push(format!("pod {uid}: {e}")),
            }
        }
        for uid in self.captured.keys() {
            self.handoff.remove(uid);
        }
        self.captured.clear();
        self.shutdown();
        if errors.is_empty() {
            Ok(released)
        } else {
            Err(HandBackError::Pods(errors))
        }
    }

    /// Readiness and metrics, updated on every pass.
    pub fn status(&self) -> Arc<AgentStatus> {
        self.status.clone()
    }

    /// How pods' network namespaces are found when nothing names them (default: by IP, on
    /// this process's view of the host).
    pub fn with_netns_lookup(mut self, lookup: NetnsLookup) -> Self {
        self.lookup = lookup;
        self
    }

    /// Stops keeping node-level rules: removes the probe rewrite (the pods' own rules stay, so
    /// a restarted agent finds its pods captured). Call it when the agent exits.
    pub fn shutdown(&mut self) {
        if let Some(probes) = self.probes.take() {
            match probes.snat.remove() {
                Ok(()) => info!("removed the node's kubelet-probe rules"),
                Err(e) => warn!(error = %e, "could not remove the node's kubelet-probe rules"),
            }
        }
    }

    /// The pods captured now, by uid (including those whose release is being retried).
    pub fn captured(&self) -> &HashMap<String, Captured> {
        &self.captured
    }

    /// One convergence pass: captures and releases what changed. A pod whose capture or release
    /// fails is logged and tried again with backoff on later passes; until its rules are gone a
    /// pod stays captured and handed off (never announced as released). A failing source changes
    /// nothing.
    pub fn sync(&mut self) -> Result<(), String> {
        let posted = self.cni.as_ref().map(|b| b.take()).unwrap_or_default();
        let mut pods = self.source.pods().inspect_err(|_| {
            self.status.source_failures.fetch_add(1, Ordering::SeqCst);
        })?;
        let deleted = self.apply_posted(&posted, &mut pods);
        self.resolve_netns(&mut pods);
        let now = Instant::now();
        let wanted: HashMap<&str, &PodInfo> = pods
            .iter()
            .filter(|p| {
                p.netns.is_some()
                    && p.admitted_by(&self.enablement, &self.node).is_ok()
                    && !deleted.contains(&p.uid)
            })
            .map(|p| (p.uid.as_str(), p))
            .collect();
        let mut capture_errors: HashMap<String, String> = HashMap::new();
        // A wanted pod's namespace is compared by identity (a stat, no descriptor) with the one
        // captured; only a capture opens it, and from then on the rules go into (and later come
        // out of) that very namespace, whatever its path names. Never the agent's own.
        let own = std::fs::metadata("/proc/self/ns/net")
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let mut to_capture: Vec<(&PodInfo, Arc<File>, (u64, u64))> = Vec::new();
        for pod in pods.iter().filter(|p| wanted.contains_key(p.uid.as_str())) {
            let path = pod.netns.as_ref().expect("wants_capture checked the netns");
            let unusable = |e: std::io::Error| {
                // Keep a capture whose path went away; capture nothing new through it.
                if !self.captured.contains_key(&pod.uid) {
                    warn!(pod = %pod.name, netns = %path.display(), error = %e, "cannot open the pod's network namespace; will retry");
                }
            };
            let identity = match std::fs::metadata(path) {
                Ok(meta) => (meta.dev(), meta.ino()),
                Err(e) => {
                    unusable(e);
                    continue;
                }
            };
            let previous = self.captured.get(&pod.uid);
            if previous.is_some_and(|c| c.identity == identity) {
                continue;
            }
            if let Some(c) = previous
                && c.pod.netns.as_ref() == Some(path)
                && path.starts_with("/proc")
            {
                // The process that held the pod's namespace is gone and its PID now names
                // another namespace: keep the capture we hold, capture nothing new through it.
                warn!(pod = %pod.name, netns = %path.display(), "the pod's namespace path now names another namespace (a reused PID); keeping the captured one");
                continue;
            }
            if !self.due(&pod.uid, now) {
                continue;
            }
            // The descriptor's own identity is what counts (the path may have changed since).
            let opened = File::open(path).and_then(|f| {
                let meta = f.metadata()?;
                Ok((Arc::new(f), (meta.dev(), meta.ino())))
            });
            let (file, identity) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    unusable(e);
                    continue;
                }
            };
            if Some(identity) == own {
                warn!(pod = %pod.name, netns = %path.display(), "refusing to capture the agent's own network namespace");
                continue;
            }
            to_capture.push((pod, file, identity));
        }
        // Released: no longer wanted, or moved to another namespace (its sandbox was recreated).
        let mut released: Vec<String> = self
            .captured
            .iter()
            .filter(|(uid, c)| {
                !wanted.contains_key(uid.as_str())
                    || to_capture
                        .iter()
                        .any(|(p, _, id)| &p.uid == *uid && *id != c.identity)
            })
            .map(|(uid, _)| uid.clone())
            .filter(|uid| self.due(uid, now) || wanted.contains_key(uid.as_str()))
            .collect();
        released.sort();
        // Rules are changed in parallel (the cost is starting the tools), then reported in order.
        let releasing: Vec<&Captured> = released.iter().map(|uid| &self.captured[uid]).collect();
        let results = in_parallel(&releasing, |c| {
            remove(&fd_path(c.netns.as_fd()), self.backend, &self.rules)
        });
        for (uid, result) in released.iter().zip(results) {
            match result {
                Ok(()) => {
                    let c = self.captured.remove(uid).expect("present");
                    self.retries.remove(uid);
                    self.status.releases.fetch_add(1, Ordering::SeqCst);
                    info!(
                        "Removing pod '{}/{}' ({}) from ambient",
                        c.pod.name, c.pod.namespace, c.pod.uid
                    );
                    if !wanted.contains_key(uid.as_str()) {
                        self.handoff.remove(uid);
                    }
                }
                Err(e) => {
                    self.status.release_failures.fetch_add(1, Ordering::SeqCst);
                    let retry = self.failed(uid, now);
                    warn!(pod = %self.captured[uid].pod.name, error = %e, retry_in = ?retry, "could not remove capture rules; the pod stays captured, will retry");
                }
            }
        }
        // A pod whose old namespace still has rules is not captured anew until they are gone.
        to_capture
            .retain(|(p, _, _)| !self.captured.contains_key(&p.uid) || !released.contains(&p.uid));
        let results = in_parallel(&to_capture, |(pod, file, _)| {
            let path = fd_path(file.as_fd());
            if self.take_over {
                let removed = crate::takeover::remove_istio_pod_rules(&path)?;
                if !removed.is_empty() {
                    info!(pod = %pod.name, removed = ?removed, "took the pod over from istio-cni: its rules removed");
                    // Its connections' entries carry istio-cni's redirects: they stay.
                    return crate::reapply(&path, self.backend, &self.rules);
                }
            }
            apply(&path, self.backend, &self.rules)
        });
        for ((pod, file, identity), result) in to_capture.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    info!(
                        "Adding pod '{}/{}' ({}) to ambient",
                        pod.name, pod.namespace, pod.uid
                    );
                    self.retries.remove(&pod.uid);
                    self.status.captures.fetch_add(1, Ordering::SeqCst);
                    self.handoff.add(pod, &file);
                    self.captured.insert(
                        pod.uid.clone(),
                        Captured {
                            pod: pod.clone(),
                            netns: file,
                            identity,
                        },
                    );
                }
                Err(e) => {
                    self.status.capture_failures.fetch_add(1, Ordering::SeqCst);
                    let retry = self.failed(&pod.uid, now);
                    warn!(pod = %pod.name, error = %e, retry_in = ?retry, "could not capture pod; will retry");
                    capture_errors.insert(pod.uid.clone(), e.to_string());
                }
            }
        }
        // Forget the backoff of pods that are neither wanted nor captured any more.
        self.retries
            .retain(|uid, _| wanted.contains_key(uid.as_str()) || self.captured.contains_key(uid));
        self.annotate(&pods);
        self.keep_probes(&pods);
        self.status
            .captured
            .store(self.captured.len() as u64, Ordering::SeqCst);
        self.status.synced.store(true, Ordering::SeqCst);
        self.handoff.synced();
        if let Some(board) = &self.cni {
            board.update(|key, now_posted| {
                match posted.get(key) {
                    Some(seen) if seen.seq == now_posted.seq => {
                        self.judge(key, now_posted, &pods, &capture_errors)
                    }
                    // Posted after this pass began: the next pass sees it.
                    _ => true,
                }
            });
        }
        Ok(())
    }

    /// The CNI plugin's requests, applied to the source's pods: an announced pod that joins
    /// the mesh takes the runtime's network namespace (and addresses, when the source has none
    /// yet); the uids of deleted pods are returned (they are not captured, whatever the source
    /// says, until the runtime announces them again).
    fn apply_posted(
        &self,
        posted: &BTreeMap<(String, String), Posted>,
        pods: &mut [PodInfo],
    ) -> HashSet<String> {
        let mut deleted = HashSet::new();
        for pod in pods.iter_mut() {
            let Some(request) = posted_for(posted, pod) else {
                continue;
            };
            match request.event {
                CniEvent::Del => {
                    deleted.insert(pod.uid.clone());
                }
                CniEvent::Add if pod.admitted_by(&self.enablement, &self.node).is_ok() => {
                    pod.netns = Some(request.netns.clone());
                    if pod.ips.is_empty() {
                        pod.ips = request.ips.clone();
                    }
                }
                CniEvent::Add => {}
            }
        }
        deleted
    }

    /// Where a CNI request stands after a pass; `false` when it no longer matters (its pod has
    /// gone from the source and it was answered in an earlier pass).
    fn judge(
        &self,
        key: &(String, String),
        request: &mut Posted,
        pods: &[PodInfo],
        capture_errors: &HashMap<String, String>,
    ) -> bool {
        let pod = pods.iter().find(|p| {
            (&p.namespace, &p.name) == (&key.0, &key.1)
                && request.uid.as_ref().is_none_or(|uid| *uid == p.uid)
        });
        let answered = matches!(request.stage, Stage::Done(_) | Stage::Captured(_));
        let captured_under_key =
            |c: &&Captured| (&c.pod.namespace, &c.pod.name) == (&key.0, &key.1);
        match (request.event, pod) {
            (CniEvent::Add, None) => !answered,
            (CniEvent::Add, Some(pod)) => {
                match pod.admitted_by(&self.enablement, &self.node) {
                    Err(Skip::OtherNode) => {
                        request.stage = Stage::Done(CniAnswer::Refused {
                            reason: format!(
                                "the pod source places pod {}/{} on node {:?}, not {:?}",
                                pod.namespace, pod.name, pod.node, self.node
                            ),
                        })
                    }
                    Err(skip) => {
                        request.stage = Stage::Done(CniAnswer::NotInMesh {
                            reason: skip.to_string(),
                        })
                    }
                    Ok(()) => {
                        let identity = std::fs::metadata(&request.netns)
                            .ok()
                            .map(|m| (m.dev(), m.ino()));
                        let here = self
                            .captured
                            .get(&pod.uid)
                            .is_some_and(|c| Some(c.identity) == identity);
                        if here && request.stage == Stage::Waiting {
                            request.stage = Stage::Captured(pod.uid.clone());
                        } else if let Some(error) = capture_errors.get(&pod.uid) {
                            request.last_error = Some(error.clone());
                        }
                    }
                }
                true
            }
            (CniEvent::Del, pod) => {
                if !self.captured.values().any(|c| captured_under_key(&c)) {
                    request.stage = Stage::Done(CniAnswer::Released);
                }
                pod.is_some() || !answered
            }
        }
    }

    /// Brings each pod's redirection annotation (as the source reports it) to its state here:
    /// `enabled` once captured and served, `pending` while captured and not (yet) served, none
    /// when not captured. Only this node's pods.
    fn annotate(&self, pods: &[PodInfo]) {
        for pod in pods.iter().filter(|p| p.node == self.node) {
            let desired = self.captured.get(&pod.uid).map(|_| {
                if self.handoff.served(&pod.uid) {
                    Redirection::Enabled
                } else {
                    Redirection::Pending
                }
            });
            let current = pod
                .annotations
                .get(REDIRECTION_ANNOTATION)
                .map(String::as_str);
            if current != desired.map(Redirection::as_str) {
                self.source.annotate(pod, desired);
            }
        }
    }

    /// The probe rewrite names the captured pods' IPv4 addresses (as the source lists them now,
    /// else as they were when captured).
    fn keep_probes(&mut self, pods: &[PodInfo]) {
        let Some(probes) = &mut self.probes else {
            return;
        };
        let wanted: BTreeSet<IpAddr> = self
            .captured
            .iter()
            .flat_map(|(uid, c)| {
                let ips = pods
                    .iter()
                    .find(|p| &p.uid == uid && !p.ips.is_empty())
                    .map_or(&c.pod.ips, |p| &p.ips);
                ips.iter().copied()
            })
            .collect();
        if probes.applied.as_ref() == Some(&wanted) && probes.checked.elapsed() < PROBE_CHECK
            || probes.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        if probes.applied.as_ref() == Some(&wanted) {
            probes.checked = Instant::now();
            match probes.snat.live() {
                Ok(Some(live)) if live == wanted => return,
                Ok(_) => warn!("the node's kubelet-probe rules drifted; putting them back"),
                Err(e) => {
                    warn!(error = %e, "cannot read the node's kubelet-probe rules");
                    return;
                }
            }
        }
        match probes.snat.apply(&wanted) {
            Ok(()) => {
                info!(
                    pods = wanted.len(),
                    "kubelet probes to the captured pods are rewritten to {PROBE_SOURCE} (IPv6: {PROBE_SOURCE_V6})"
                );
                probes.applied = Some(wanted);
                probes.checked = Instant::now();
                probes.retry_at = None;
            }
            Err(e) => {
                warn!(error = %e, "cannot set the node's kubelet-probe rules; will retry in 2 s");
                probes.applied = None;
                probes.retry_at = Some(Instant::now() + Duration::from_secs(2));
            }
        }
    }

    /// Between passes: a captured pod whose proxy has acknowledged it is answered.
    fn settle_cni(&self) {
        if let Some(board) = &self.cni {
            board.update(|_, request| {
                if let Stage::Captured(uid) = &request.stage
                    && self.handoff.served(uid)
                {
                    request.stage = Stage::Done(CniAnswer::Captured);
                }
                true
            });
        }
    }

    /// Waits `interval` before the next pass, or less when the CNI plugin posts a request;
    /// while a captured pod awaits its proxy's acknowledgement, looks every few milliseconds.
    fn pause(&self, interval: Duration) {
        let Some(board) = &self.cni else {
            std::thread::sleep(interval);
            return;
        };
        let deadline = Instant::now() + interval;
        loop {
            self.settle_cni();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let step = if board.awaits_proxy() {
                left.min(Duration::from_millis(10))
            } else {
                left
            };
            if board.wait_for_request(step) {
                return;
            }
        }
    }

    /// Whether `uid`'s next attempt is due (no failure pending, or its backoff elapsed).
    fn due(&self, uid: &str, now: Instant) -> bool {
        self.retries.get(uid).is_none_or(|r| r.next <= now)
    }

    /// Records a failure of `uid`; returns the delay before the next attempt.
    fn failed(&mut self, uid: &str, now: Instant) -> Duration {
        let retry = self.retries.entry(uid.to_owned()).or_insert(Retry {
            attempts: 0,
            next: now,
        });
        retry.attempts += 1;
        let delay = RETRY_FIRST
            .saturating_mul(1 << retry.attempts.min(16).saturating_sub(1))
            .min(RETRY_MAX);
        retry.next = now + delay;
        delay
    }

    /// Fills in the network namespace of ambient pods whose source did not give one: the one
    /// already captured for that uid, or the single namespace that holds the pod's IP (one scan
    /// per pass, only when some pod needs it). A pod whose IP more than one namespace holds is
    /// not captured: the agent logs the candidates and never guesses.
    fn resolve_netns(&mut self, pods: &mut [PodInfo]) {
        let mut scan: Option<HashMap<IpAddr, Vec<PathBuf>>> = None;
        for pod in pods
            .iter_mut()
            .filter(|p| p.netns.is_none() && p.admitted_by(&self.enablement, &self.node).is_ok())
        {
            if let Some(known) = self
                .captured
                .get(&pod.uid)
                .and_then(|c| c.pod.netns.clone())
                && known.exists()
            {
                pod.netns = Some(known);
                continue;
            }
            if pod.ips.is_empty() {
                continue;
            }
            let outcome = match &self.lookup {
                NetnsLookup::ByIp { root } => {
                    let all = scan.get_or_insert_with(|| crate::netns::addresses_under(root));
                    crate::netns::choose(all, &pod.ips).map_err(crate::netns::Unresolved::from)
                }
                NetnsLookup::ByUid { root } => crate::netns::find_by_uid(root, &pod.uid, &pod.ips),
            };
            let cause = match &outcome {
                Ok(Some(path)) => {
                    info!(
                        pod = %pod.name, netns = %path.display(),
                        "found the pod's network namespace"
                    );
                    pod.netns = Some(path.clone());
                    self.unresolved.remove(&pod.uid);
                    continue;
                }
                Ok(None) => "none".to_owned(),
                Err(unresolved) => unresolved.to_string(),
            };
            if self.unresolved.get(&pod.uid) != Some(&cause) {
                match &outcome {
                    Err(unresolved) => warn!(
                        pod = %pod.name, error = %unresolved,
                        "not capturing the pod: its network namespace is not certain"
                    ),
                    _ => warn!(
                        pod = %pod.name, ips = ?pod.ips,
                        "no network namespace holds the pod's IP yet; will look again"
                    ),
                }
                self.unresolved.insert(pod.uid.clone(), cause);
            }
        }
        self.unresolved
            .retain(|uid, _| pods.iter().any(|p| &p.uid == uid && p.netns.is_none()));
    }

    /// Converges every `interval`, forever (blocking; run it on its own thread).
    /// A failing source is logged when its error first appears or changes, not on every pass.
    pub fn run(self, interval: Duration) -> ! {
        self.run_while(interval, || true);
        unreachable!("run_while returns only when told to stop")
    }

    /// Like [`run`](Self::run), while `keep_going()` says so (checked after each pass); returns
    /// the agent (its captures still in place).
    pub fn run_while(mut self, interval: Duration, keep_going: impl Fn() -> bool) -> Self {
        let mut last_error: Option<String> = None;
        while keep_going() {
            match self.sync() {
                Err(e) if last_error.as_ref() != Some(&e) => {
                    warn!(error = %e, "pod source failed; keeping the current captures");
                    last_error = Some(e);
                }
                Err(_) => {}
                Ok(()) => {
                    if last_error.take().is_some() {
                        info!("pod source recovered");
                    }
                }
            }
            self.pause(interval);
        }
        self
    }
}

/// The CNI request posted for `pod` (by namespace and name, and uid when the runtime gave one).
fn posted_for<'a>(
    posted: &'a BTreeMap<(String, String), Posted>,
    pod: &PodInfo,
) -> Option<&'a Posted> {
    posted
        .get(&(pod.namespace.clone(), pod.name.clone()))
        .filter(|p| p.uid.as_ref().is_none_or(|uid| *uid == pod.uid))
}

/// How many pods' rules are changed at once.
const PARALLEL: usize = 8;

/// `f` over `items` on up to [`PARALLEL`] threads; results in the items' order.
fn in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PARALLEL.min(items.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a capture worker panicked"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}
