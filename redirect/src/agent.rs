//! The node agent: captures the pods of this node whose namespace is in ambient mode.
//!
//! It looks at the pods a [`PodSource`] reports, decides which must be captured (namespace label
//! `istio.io/dataplane-mode=ambient`, pod not labelled `istio.io/dataplane-mode=none`, on this
//! node, network namespace known), and converges: rules applied in newly captured pods, removed
//! from released ones, and every capture and release reported to a [`Handoff`] (the proxy). At
//! start-up it reconciles every captured pod (applying is idempotent), so a restarted agent
//! neither duplicates rules nor forgets pods.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;

use tracing::{info, warn};

use crate::{Backend, Error, RuleSet, apply, remove};

/// The label that puts a namespace in the mesh (`ambient`) or takes a pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

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
}

impl PodInfo {
    /// Whether the pod must be captured on `node`.
    pub fn wants_capture(&self, node: &str) -> bool {
        self.netns.is_some() && self.in_ambient(node)
    }

    /// Whether the pod is on `node` in an ambient namespace and not opted out (its network
    /// namespace aside).
    pub fn in_ambient(&self, node: &str) -> bool {
        self.node == node
            && self
                .namespace_labels
                .get(DATAPLANE_MODE_LABEL)
                .is_some_and(|v| v == "ambient")
            && self
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .is_none_or(|v| v != "none")
    }
}

/// Where pods come from (Kubernetes, or the local mesh's manifests).
pub trait PodSource: Send + Sync {
    /// The current pods (of every node; the agent filters).
    fn pods(&self) -> Result<Vec<PodInfo>, String>;
}

/// Receives the captured pods' network namespaces (the proxy, in process or over a socket).
pub trait Handoff: Send + Sync {
    /// A pod was captured.
    fn add(&self, pod: &PodInfo);
    /// A pod was released.
    fn remove(&self, uid: &str);
}

/// A handoff that does nothing (rules only).
#[derive(Debug, Default)]
pub struct NoHandoff;

impl Handoff for NoHandoff {
    fn add(&self, _pod: &PodInfo) {}
    fn remove(&self, _uid: &str) {}
}

/// The node agent's state.
pub struct NodeAgent<S, H> {
    node: String,
    backend: Backend,
    rules: RuleSet,
    source: S,
    handoff: H,
    captured: HashMap<String, PodInfo>,
    /// Pods whose namespace was looked for and not found (warned once).
    unresolved: HashSet<String>,
}

impl<S: PodSource, H: Handoff> NodeAgent<S, H> {
    /// An agent for `node`.
    pub fn new(node: &str, backend: Backend, rules: RuleSet, source: S, handoff: H) -> Self {
        NodeAgent {
            node: node.to_owned(),
            backend,
            rules,
            source,
            handoff,
            captured: HashMap::new(),
            unresolved: HashSet::new(),
        }
    }

    /// The pods captured now, by uid.
    pub fn captured(&self) -> &HashMap<String, PodInfo> {
        &self.captured
    }

    /// One convergence pass: captures and releases what changed. Errors for single pods are
    /// logged and retried on the next pass; a failing source changes nothing.
    pub fn sync(&mut self) -> Result<(), String> {
        let mut pods = self.source.pods()?;
        self.resolve_netns(&mut pods);
        let wanted: HashMap<&str, &PodInfo> = pods
            .iter()
            .filter(|p| p.wants_capture(&self.node))
            .map(|p| (p.uid.as_str(), p))
            .collect();
        let mut released: Vec<String> = self
            .captured
            .keys()
            .filter(|uid| !wanted.contains_key(uid.as_str()))
            .cloned()
            .collect();
        released.sort();
        // The rules are changed in parallel (the cost is starting the tools), then reported in
        // order.
        let released: Vec<PodInfo> = released
            .iter()
            .map(|uid| self.captured.remove(uid).expect("present"))
            .collect();
        let results = in_parallel(&released, |pod| match &pod.netns {
            Some(netns) if netns.exists() => remove(netns, self.backend, &self.rules),
            _ => Ok(()),
        });
        for (pod, result) in released.iter().zip(results) {
            info!(
                "Removing pod '{}/{}' ({}) from ambient",
                pod.name, pod.namespace, pod.uid
            );
            if let Err(e) = result {
                warn!(pod = %pod.name, error = %e, "could not remove capture rules");
            }
            self.handoff.remove(&pod.uid);
        }
        // In the source's order, so captures are reported deterministically.
        let to_capture: Vec<&PodInfo> = pods
            .iter()
            .filter(|p| wanted.contains_key(p.uid.as_str()))
            .filter(|p| {
                self.captured
                    .get(&p.uid)
                    .is_none_or(|known| known.netns != p.netns)
            })
            .collect();
        let results = in_parallel(&to_capture, |pod| self.capture(pod));
        for (pod, result) in to_capture.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    info!(
                        "Adding pod '{}/{}' ({}) to ambient",
                        pod.name, pod.namespace, pod.uid
                    );
                    self.handoff.add(pod);
                    self.captured.insert(pod.uid.clone(), pod.clone());
                }
                Err(e) => warn!(pod = %pod.name, error = %e, "could not capture pod; will retry"),
            }
        }
        Ok(())
    }

    /// Fills in the network namespace of ambient pods whose source did not give one: the one
    /// already captured for that uid, or the namespace that holds the pod's IP (one scan per
    /// pass, only when some pod needs it).
    fn resolve_netns(&mut self, pods: &mut [PodInfo]) {
        let mut scan: Option<HashMap<IpAddr, PathBuf>> = None;
        for pod in pods
            .iter_mut()
            .filter(|p| p.netns.is_none() && p.in_ambient(&self.node))
        {
            if let Some(known) = self.captured.get(&pod.uid).and_then(|p| p.netns.clone())
                && known.exists()
            {
                pod.netns = Some(known);
                continue;
            }
            if pod.ips.is_empty() {
                continue;
            }
            let all = scan.get_or_insert_with(crate::netns::addresses);
            pod.netns = pod.ips.iter().find_map(|ip| all.get(ip).cloned());
            match &pod.netns {
                Some(path) => info!(
                    pod = %pod.name, netns = %path.display(),
                    "found the pod's network namespace by its IP"
                ),
                None if self.unresolved.insert(pod.uid.clone()) => warn!(
                    pod = %pod.name, ips = ?pod.ips,
                    "no network namespace holds the pod's IP yet; will look again"
                ),
                None => {}
            }
        }
        self.unresolved
            .retain(|uid| pods.iter().any(|p| &p.uid == uid && p.netns.is_none()));
    }

    /// Converges every `interval`, forever (blocking; run it on its own thread).
    /// A failing source is logged when its error first appears or changes, not on every pass.
    pub fn run(mut self, interval: std::time::Duration) -> ! {
        let mut last_error: Option<String> = None;
        loop {
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
            std::thread::sleep(interval);
        }
    }

    fn capture(&self, pod: &PodInfo) -> Result<(), Error> {
        let netns = pod.netns.as_ref().expect("wants_capture checked the netns");
        apply(netns, self.backend, &self.rules)
    }
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
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
