//! The Kubernetes pod source (feature `kube`): watches the Namespaces and this node's Pods.
//!
//! [`KubeSource::start`] runs two watches (Namespaces; Pods with `spec.nodeName=<node>`) on the
//! current Tokio runtime and keeps what they report in a [`KubeState`]. Until both watches have
//! listed everything once, [`PodSource::pods`] fails, so the agent changes nothing on a partial
//! view (a pod missing from a half-finished list must not be released). After a watch restarts,
//! the previous view keeps being served until the new list is complete.
//!
//! A Pod becomes a [`PodInfo`] through [`pod_info`]: host-network pods (nothing to capture) and
//! finished pods (`Succeeded`/`Failed`; their IPs may already belong to another pod) are left out,
//! as are unscheduled ones. The network namespace is left unknown: the agent finds it by the
//! pod's IP (`crate::netns`), as istio-cni does for running pods.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::agent::{PodInfo, PodSource, REDIRECTION_ANNOTATION, Redirection};

/// The pod as the agent needs it, or `None` when it is not a candidate for capture (host network,
/// finished, not scheduled, no uid). Namespace labels are filled in later from the Namespace.
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    if status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
    {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    Some(PodInfo {
        uid: meta.uid.clone()?,
        name: meta.name.clone()?,
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        namespace_labels: BTreeMap::new(),
        node: spec.node_name.clone()?,
        netns: None,
        ips,
    })
}

/// One watched kind: the current view, the list being received after a (re)start, and whether a
/// complete list has been seen.
#[derive(Debug)]
struct Store<V> {
    current: HashMap<String, V>,
    listing: Option<HashMap<String, V>>,
    synced: bool,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Store {
            current: HashMap::new(),
            listing: None,
            synced: false,
        }
    }
}

impl<V> Store<V> {
    fn apply<K>(&mut self, event: Event<K>, key_value: impl Fn(K) -> (String, Option<V>)) {
        match event {
            Event::Init => self.listing = Some(HashMap::new()),
            Event::InitApply(obj) => {
                let (key, value) = key_value(obj);
                if let (Some(listing), Some(value)) = (self.listing.as_mut(), value) {
                    listing.insert(key, value);
                }
            }
            Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.current = listing;
                }
                self.synced = true;
            }
            Event::Apply(obj) => {
                let (key, value) = key_value(obj);
                match value {
                    Some(value) => self.current.insert(key, value),
                    None => self.current.remove(&key),
                };
            }
            Event::Delete(obj) => {
                let (key, _) = key_value(obj);
                self.current.remove(&key);
            }
        }
    }
}

/// What the watches have reported so far.
#[derive(Debug, Default)]
pub struct KubeState {
    pods: Store<PodInfo>,
    namespaces: Store<BTreeMap<String, String>>,
}

impl KubeState {
    /// Takes in one event of the Pod watch.
    pub fn pod_event(&mut self, event: Event<Pod>) {
        self.pods.apply(event, |pod| {
            let key = pod_key(&pod);
            (key, pod_info(&pod))
        });
    }

    /// Takes in one event of the Namespace watch.
    pub fn namespace_event(&mut self, event: Event<Namespace>) {
        self.namespaces.apply(event, |ns| {
            let labels = ns.metadata.labels.unwrap_or_default();
            (ns.metadata.name.unwrap_or_default(), Some(labels))
        });
    }

    /// The pods with their namespaces' labels, in a stable order; an error until both watches
    /// have listed everything once.
    pub fn pods(&self) -> Result<Vec<PodInfo>, String> {
        match (self.pods.synced, self.namespaces.synced) {
            (true, true) => {}
            (false, _) => return Err("the Kubernetes Pod watch has not listed yet".into()),
            (_, false) => return Err("the Kubernetes Namespace watch has not listed yet".into()),
        }
        let mut pods: Vec<PodInfo> = self
            .pods
            .current
            .values()
            .map(|p| {
                let mut p = p.clone();
                p.namespace_labels = self
                    .namespaces
                    .current
                    .get(&p.namespace)
                    .cloned()
                    .unwrap_or_default();
                p
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(pods)
    }
}

/// Pods are keyed by namespace and name: a Delete event of a pod that was filtered out (no uid)
/// must still find what an earlier Apply stored.
fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Pods from a Kubernetes API server; the redirection annotation written back through
/// `pods/status` (a merge patch, as istio-cni writes it; RBAC: `patch` on `pods/status`).
#[derive(Clone)]
pub struct KubeSource {
    state: Arc<Mutex<KubeState>>,
    client: Client,
    runtime: tokio::runtime::Handle,
    /// Patches sent and not yet seen in the watch: by uid, the value and when it was sent (sent
    /// again after [`PATCH_PATIENCE`] if the watch still shows otherwise).
    patched: Arc<Mutex<Patched>>,
}

/// By pod uid: the annotation value last patched and when.
type Patched = HashMap<String, (Option<Redirection>, Instant)>;

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

/// How long a patch is given to show in the watch before it is sent again.
const PATCH_PATIENCE: Duration = Duration::from_secs(5);

impl KubeSource {
    /// Connects with the default configuration (`KUBECONFIG`, `~/.kube/config`, or the in-cluster
    /// service account) and starts watching; see [`KubeSource::start`].
    pub async fn connect(node: &str) -> Result<Self, kube::Error> {
        let client = Client::try_default().await?;
        Ok(Self::start(client, node))
    }

    /// Starts watching Namespaces and the Pods of `node` through `client`, on the current Tokio
    /// runtime. Watch errors are logged and retried with backoff.
    pub fn start(client: Client, node: &str) -> Self {
        let state = Arc::new(Mutex::new(KubeState::default()));
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let pods: Api<Pod> = Api::all(client.clone());
        let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));

        let st = state.clone();
        tokio::spawn(async move {
            let mut events = watcher::watcher(namespaces, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => st.lock().expect("lock").namespace_event(event),
                    Err(e) => warn!(error = %e, "Kubernetes Namespace watch failed; retrying"),
                }
            }
        });
        let st = state.clone();
        tokio::spawn(async move {
            let mut events = watcher::watcher(pods, pod_config).default_backoff().boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => st.lock().expect("lock").pod_event(event),
                    Err(e) => warn!(error = %e, "Kubernetes Pod watch failed; retrying"),
                }
            }
        });
        KubeSource {
            state,
            client,
            runtime: tokio::runtime::Handle::current(),
            patched: Arc::default(),
        }
    }
}

impl PodSource for KubeSource {
    fn pods(&self) -> Result<Vec<PodInfo>, String> {
        self.state.lock().expect("lock").pods()
    }

    fn annotate(&self, pod: &PodInfo, redirection: Option<Redirection>) {
        {
            let mut patched = self.patched.lock().expect("lock");
            if let Some((value, sent)) = patched.get(&pod.uid)
                && *value == redirection
                && sent.elapsed() < PATCH_PATIENCE
            {
                return;
            }
            patched.insert(pod.uid.clone(), (redirection, Instant::now()));
            // Forget patches of other pods that are long done.
            patched.retain(|_, (_, sent)| sent.elapsed() < PATCH_PATIENCE * 4);
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let (name, uid) = (pod.name.clone(), pod.uid.clone());
        let value = redirection.map(Redirection::as_str);
        let patched = self.patched.clone();
        self.runtime.spawn(async move {
            // The uid as a precondition: a pod recreated under the same name is not touched.
            let patch = serde_json::json!({
                "metadata": {"uid": uid, "annotations": {REDIRECTION_ANNOTATION: value}}
            });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => info!(pod = %name, annotation = ?value, "pod annotated ({REDIRECTION_ANNOTATION})"),
                Err(e) => {
                    warn!(pod = %name, error = %e, "cannot annotate the pod ({REDIRECTION_ANNOTATION}); will retry");
                    patched.lock().expect("lock").remove(&uid);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::agent::DATAPLANE_MODE_LABEL;

    fn pod(name: &str, ip: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                uid: Some(format!("uid-{name}")),
                labels: Some(BTreeMap::from([("app".into(), name.into())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                service_account_name: Some("web-sa".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                pod_ips: Some(vec![
                    PodIP { ip: ip.into() },
                    PodIP {
                        ip: "fd00::9".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn namespace(name: &str, ambient: bool) -> Namespace {
        let labels = ambient
            .then(|| BTreeMap::from([(DATAPLANE_MODE_LABEL.to_owned(), "ambient".to_owned())]));
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn converts_a_pod() {
        let info = pod_info(&pod("web", "10.244.0.5")).unwrap();
        assert_eq!(info.uid, "uid-web");
        assert_eq!(info.namespace, "shop");
        assert_eq!(info.service_account, "web-sa");
        assert_eq!(info.node, "node-a");
        assert_eq!(
            info.ips,
            vec![
                "10.244.0.5".parse::<IpAddr>().unwrap(),
                "fd00::9".parse().unwrap()
            ]
        );
        assert_eq!(info.netns, None);
    }

    #[test]
    fn leaves_out_pods_that_cannot_be_captured() {
        let mut host = pod("host", "10.0.0.1");
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(pod_info(&host).is_none());
        let mut done = pod("done", "10.244.0.6");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(pod_info(&done).is_none());
        let mut pending = pod("pending", "10.244.0.7");
        pending.spec.as_mut().unwrap().node_name = None;
        assert!(pod_info(&pending).is_none());
        let mut no_sa = pod("plain", "10.244.0.8");
        no_sa.spec.as_mut().unwrap().service_account_name = None;
        no_sa.status.as_mut().unwrap().pod_ips = None;
        let info = pod_info(&no_sa).unwrap();
        assert_eq!(info.service_account, "default");
        assert_eq!(info.ips, vec!["10.244.0.8".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn serves_nothing_until_both_watches_listed() {
        let mut state = KubeState::default();
        state.pod_event(Event::Init);
        state.pod_event(Event::InitApply(pod("web", "10.244.0.5")));
        assert!(state.pods().is_err(), "pods still listing");
        state.pod_event(Event::InitDone);
        let err = state.pods().unwrap_err();
        assert!(err.contains("Namespace"), "{err}");
        state.namespace_event(Event::Init);
        state.namespace_event(Event::InitApply(namespace("shop", true)));
        state.namespace_event(Event::InitDone);
        let pods = state.pods().unwrap();
        assert_eq!(pods.len(), 1);
        assert!(pods[0].in_ambient("node-a"));
    }

    #[test]
    fn follows_label_flips_deletes_and_relists() {
        let mut state = KubeState::default();
        for e in [
            Event::Init,
            Event::InitApply(namespace("shop", false)),
            Event::InitDone,
        ] {
            state.namespace_event(e);
        }
        for e in [
            Event::Init,
            Event::InitApply(pod("web", "10.244.0.5")),
            Event::InitApply(pod("api", "10.244.0.6")),
            Event::InitDone,
        ] {
            state.pod_event(e);
        }
        let ambient = |s: &KubeState| -> Vec<String> {
            s.pods()
                .unwrap()
                .into_iter()
                .filter(|p| p.in_ambient("node-a"))
                .map(|p| p.name)
                .collect()
        };
        assert!(ambient(&state).is_empty());
        state.namespace_event(Event::Apply(namespace("shop", true)));
        assert_eq!(ambient(&state), ["api", "web"]);

        // The pod finishes: gone from the view, as when deleted.
        let mut done = pod("api", "10.244.0.6");
        done.status.as_mut().unwrap().phase = Some("Failed".into());
        state.pod_event(Event::Apply(done));
        assert_eq!(ambient(&state), ["web"]);
        state.pod_event(Event::Delete(pod("web", "10.244.0.5")));
        assert!(ambient(&state).is_empty());

        // A restarted watch keeps serving the old view until its new list is complete.
        state.pod_event(Event::Apply(pod("old", "10.244.0.7")));
        state.pod_event(Event::Init);
        state.pod_event(Event::InitApply(pod("new", "10.244.0.8")));
        assert_eq!(ambient(&state), ["old"]);
        state.pod_event(Event::InitDone);
        assert_eq!(ambient(&state), ["new"]);
    }
}
