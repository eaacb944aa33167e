//! What the local mesh should look like, as data: the Kubernetes documents it was given, where
//! each pod runs and at which address, the service VIPs, and what that means for the control
//! plane's manifests, the pods' name lookup and the nodes' service rules. No I/O here, so every
//! rule is tested in memory.
//!
//! Addresses (a `base` of `[10, 250]`): the nodes share `10.250.0.0/24` with the host at `.1`
//! and node *i* at `.10+i`; node *i*'s pods live in `10.250.(1+i).0/24` behind its bridge at
//! `.1`, from `.10` up. Services get VIPs in `10.96.0.0/16` (kept when a document sets
//! `spec.clusterIP`). A pod's address never changes while it exists.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde_yaml::Value;

/// The annotation the node agent reads a pod's network namespace from.
pub use common::k8s::NETNS_ANNOTATION;

/// A malformed or unsupported document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}, document {index}: {reason}")]
pub struct ManifestError {
    /// The file (or "built-in tutorial").
    pub source_name: String,
    /// 1-based position of the document in it.
    pub index: usize,
    /// What is wrong.
    pub reason: String,
}

/// One Kubernetes document.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` (empty for namespaces).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The whole document.
    pub value: Value,
}

impl Doc {
    /// What identifies it: (kind, namespace, name).
    pub fn key(&self) -> (String, String, String) {
        (self.kind.clone(), self.namespace.clone(), self.name.clone())
    }
}

/// The kinds the local mesh understands.
pub const KINDS: [&str; 5] = [
    "Namespace",
    "ServiceAccount",
    "Deployment",
    "Service",
    "AuthorizationPolicy",
];

/// Parses a multi-document YAML text (empty documents are skipped).
pub fn parse_docs(text: &str, source_name: &str) -> Result<Vec<Doc>, ManifestError> {
    let mut docs = Vec::new();
    for (index, value) in common::k8s::documents(text) {
        let err = |reason: String| ManifestError {
            source_name: source_name.to_owned(),
            index,
            reason,
        };
        let value = value.map_err(|e| err(format!("not YAML: {e}")))?;
        let kind = str_at(&value, &["kind"])
            .ok_or_else(|| err("no kind".into()))?
            .to_owned();
        if !KINDS.contains(&kind.as_str()) {
            return Err(err(format!(
                "kind {kind} is not supported here (supported: {})",
                KINDS.join(", ")
            )));
        }
        let name = str_at(&value, &["metadata", "name"])
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err(format!("{kind} without metadata.name")))?
            .to_owned();
        let namespace = if kind == "Namespace" {
            String::new()
        } else {
            str_at(&value, &["metadata", "namespace"])
                .unwrap_or("default")
                .to_owned()
        };
        let doc = Doc {
            kind,
            namespace,
            name,
            value,
        };
        check(&doc).map_err(err)?;
        docs.push(doc);
    }
    Ok(docs)
}

/// Kind-specific checks, so that a typo is refused before anything changes.
fn check(doc: &Doc) -> Result<(), String> {
    let what = format!("{} {}/{}", doc.kind, doc.namespace, doc.name);
    match doc.kind.as_str() {
        "Deployment" => {
            let replicas = doc.value.get("spec").and_then(|s| s.get("replicas"));
            if let Some(r) = replicas
                && !matches!(r.as_u64(), Some(0..=16))
            {
                return Err(format!("{what}: replicas must be 0 to 16"));
            }
            app_spec(doc)
                .map(|_| ())
                .map_err(|e| format!("{what}: {e}"))
        }
        "Service" => {
            let ports = doc
                .value
                .get("spec")
                .and_then(|s| s.get("ports"))
                .and_then(Value::as_sequence);
            for p in ports.into_iter().flatten() {
                if !matches!(p.get("port").and_then(Value::as_u64), Some(1..=65535)) {
                    return Err(format!("{what}: a port needs `port` between 1 and 65535"));
                }
            }
            if let Some(ip) = str_at(&doc.value, &["spec", "clusterIP"])
                && ip.parse::<Ipv4Addr>().is_err()
            {
                return Err(format!("{what}: clusterIP {ip:?} is not an IPv4 address"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for p in path {
        v = v.get(p)?;
    }
    v.as_str()
}

fn labels_at(value: &Value, path: &[&str]) -> BTreeMap<String, String> {
    let mut v = value;
    for p in path {
        match v.get(p) {
            Some(next) => v = next,
            None => return BTreeMap::new(),
        }
    }
    v.as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar(v)?)))
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What a pod runs, from its Deployment's first container (`image` and `env`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum App {
    /// `image: ambient.local/http-app`: answers HTTP on `PORT` (default 8080) with its name, and
    /// first calls `UPSTREAM` (a URL) when set, including the answer.
    Http {
        /// Port.
        port: u16,
        /// URL to call for each request.
        upstream: Option<String>,
    },
    /// `image: ambient.local/gateway`: forwards requests whose `Host` is in `ROUTES`
    /// (`host=url,...`) on `PORT` (default 80); 404 otherwise.
    Gateway {
        /// Port.
        port: u16,
        /// Host -> URL.
        routes: Vec<(String, String)>,
    },
    /// Any other image (`ambient.local/client` for a client pod): nothing runs; commands are run
    /// in the pod with `ztunnel local exec`.
    Idle,
}

fn app_spec(doc: &Doc) -> Result<App, String> {
    let container = doc
        .value
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("spec"))
        .and_then(|s| s.get("containers"))
        .and_then(|c| c.get(0));
    let Some(container) = container else {
        return Ok(App::Idle);
    };
    let image = container.get("image").and_then(Value::as_str).unwrap_or("");
    let env: BTreeMap<String, String> = container
        .get("env")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e.get("name")?.as_str()?.to_owned(),
                scalar(e.get("value")?)?,
            ))
        })
        .collect();
    let port = |default: u16| -> Result<u16, String> {
        match env.get("PORT") {
            None => Ok(default),
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("env PORT {p:?} is not a port")),
        }
    };
    let image = image.split(':').next().unwrap_or("");
    match image {
        "ambient.local/http-app" => Ok(App::Http {
            port: port(8080)?,
            upstream: env.get("UPSTREAM").cloned().filter(|u| !u.is_empty()),
        }),
        "ambient.local/gateway" => {
            let mut routes = Vec::new();
            for route in env
                .get("ROUTES")
                .map(String::as_str)
                .unwrap_or("")
                .split(',')
            {
                if route.trim().is_empty() {
                    continue;
                }
                let (host, url) = route
                    .split_once('=')
                    .ok_or_else(|| format!("env ROUTES entry {route:?} is not host=url"))?;
                routes.push((host.trim().to_owned(), url.trim().to_owned()));
            }
            Ok(App::Gateway {
                port: port(80)?,
                routes,
            })
        }
        _ => Ok(App::Idle),
    }
}

/// Where one pod runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// Namespace.
    pub namespace: String,
    /// Pod name (`<deployment>-<n>`).
    pub name: String,
    /// The Deployment it belongs to.
    pub deployment: String,
    /// Node name.
    pub node: String,
    /// Its address.
    pub ip: Ipv4Addr,
}

/// A pod as the mesh runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    /// Where it runs.
    pub placement: Placement,
    /// Its labels (the Deployment template's).
    pub labels: BTreeMap<String, String>,
    /// Its service account.
    pub service_account: String,
    /// What it runs.
    pub app: App,
}

/// A service with its VIP and endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// VIP.
    pub vip: Ipv4Addr,
    /// (port, target port).
    pub ports: Vec<(u16, u16)>,
    /// Endpoint addresses (pods whose labels match the selector).
    pub endpoints: Vec<Ipv4Addr>,
}

/// The whole mesh: documents and placements. Serialized into the run directory between
/// commands.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mesh {
    /// The first two octets of every address (`[10, 250]`).
    pub base: [u8; 2],
    /// Node names, in order.
    pub nodes: Vec<String>,
    /// The documents, as YAML texts (kept in the order they came).
    docs: Vec<String>,
    /// Where each pod runs.
    pub placements: Vec<Placement>,
}

impl Mesh {
    /// An empty mesh of `nodes` under `base`.
    pub fn new(base: [u8; 2], nodes: &[&str]) -> Self {
        Mesh {
            base,
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            docs: Vec::new(),
            placements: Vec::new(),
        }
    }

    /// The documents.
    pub fn docs(&self) -> Vec<Doc> {
        self.docs
            .iter()
            .filter_map(|t| parse_docs(t, "state").ok())
            .flatten()
            .collect()
    }

    fn set_docs(&mut self, docs: &[Doc]) {
        self.docs = docs
            .iter()
            .map(|d| serde_yaml::to_string(&d.value).unwrap_or_default())
            .collect();
    }

    /// The host's address on the nodes' network.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.base[0], self.base[1], 0, 1)
    }

    /// Node `i`'s address on the nodes' network.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.base[0], self.base[1], 0, 10 + i as u8)
    }

    /// Node `i`'s pod subnet gateway (its bridge).
    pub fn pod_gateway(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.base[0], self.base[1], 1 + i as u8, 1)
    }

    /// Index of node `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n == name)
    }

    /// Adds or replaces documents (by kind, namespace and name), then places new pods and
    /// removes the pods of Deployments that went away or shrank. Services get a VIP if they
    /// have none. Returns what changed, for the progress output.
    pub fn apply(&mut self, incoming: Vec<Doc>) -> Vec<String> {
        let mut docs = self.docs();
        let mut changes = Vec::new();
        for mut doc in incoming {
            if doc.kind == "Service" && str_at(&doc.value, &["spec", "clusterIP"]).is_none() {
                let vip = self.free_vip(&docs);
                if let Some(spec) = doc.value.get_mut("spec").and_then(Value::as_mapping_mut) {
                    spec.insert("clusterIP".into(), vip.to_string().into());
                }
            }
            let verb = match docs.iter().position(|d| d.key() == doc.key()) {
                Some(i) => {
                    let same = docs[i].value == doc.value;
                    docs[i] = doc.clone();
                    if same { "unchanged" } else { "configured" }
                }
                None => {
                    docs.push(doc.clone());
                    "created"
                }
            };
            changes.push(format!(
                "{} {}/{} {verb}",
                doc.kind, doc.namespace, doc.name
            ));
        }
        self.set_docs(&docs);
        self.place();
        changes
    }

    /// Removes documents (by kind, namespace and name); pods of removed Deployments go.
    pub fn delete(&mut self, gone: &[Doc]) -> Vec<String> {
        let mut docs = self.docs();
        let mut changes = Vec::new();
        for g in gone {
            match docs.iter().position(|d| d.key() == g.key()) {
                Some(i) => {
                    docs.remove(i);
                    changes.push(format!("{} {}/{} deleted", g.kind, g.namespace, g.name));
                }
                None => changes.push(format!("{} {}/{} not found", g.kind, g.namespace, g.name)),
            }
        }
        self.set_docs(&docs);
        self.place();
        changes
    }

    /// Sets (`k=v`) or removes (`k-`) labels of namespace `ns` (creating the Namespace document
    /// if only implied by other documents).
    pub fn label_namespace(&mut self, ns: &str, changes: &[String]) -> Result<String, String> {
        let mut docs = self.docs();
        let i = match docs
            .iter()
            .position(|d| d.kind == "Namespace" && d.name == ns)
        {
            Some(i) => i,
            None if docs.iter().any(|d| d.namespace == ns) => {
                let text = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
                docs.extend(parse_docs(&text, "label").map_err(|e| e.to_string())?);
                docs.len() - 1
            }
            None => return Err(format!("namespace {ns} not found")),
        };
        let metadata = docs[i]
            .value
            .get_mut("metadata")
            .and_then(Value::as_mapping_mut)
            .ok_or("the Namespace has no metadata")?;
        if !metadata.contains_key("labels") {
            metadata.insert("labels".into(), Value::Mapping(Default::default()));
        }
        let labels = metadata
            .get_mut("labels")
            .and_then(Value::as_mapping_mut)
            .ok_or("metadata.labels is not a mapping")?;
        for change in changes {
            if let Some(key) = change.strip_suffix('-') {
                labels.remove(key);
            } else if let Some((k, v)) = change.split_once('=') {
                if k.is_empty() {
                    return Err(format!("label {change:?} has no key"));
                }
                labels.insert(k.into(), v.into());
            } else {
                return Err(format!(
                    "label change {change:?} is neither key=value nor key-"
                ));
            }
        }
        self.set_docs(&docs);
        Ok(format!("namespace/{ns} labeled"))
    }

    fn free_vip(&self, docs: &[Doc]) -> Ipv4Addr {
        let used: BTreeSet<String> = docs
            .iter()
            .filter_map(|d| str_at(&d.value, &["spec", "clusterIP"]).map(str::to_owned))
            .collect();
        (10..=u16::MAX)
            .map(|n| Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8))
            .find(|ip| !used.contains(&ip.to_string()))
            .expect("a free VIP")
    }

    /// Places every Deployment replica that has no place yet; drops the places of pods that
    /// no longer exist. Nodes are chosen round robin (`nodeName` in the template pins one).
    fn place(&mut self) {
        let docs = self.docs();
        let mut wanted: Vec<(String, String, String, Option<String>)> = Vec::new();
        for d in docs.iter().filter(|d| d.kind == "Deployment") {
            let replicas = d
                .value
                .get("spec")
                .and_then(|s| s.get("replicas"))
                .and_then(Value::as_u64)
                .unwrap_or(1);
            let pinned = str_at(&d.value, &["spec", "template", "spec", "nodeName"])
                .filter(|n| self.nodes.iter().any(|x| x == n))
                .map(str::to_owned);
            for r in 0..replicas {
                wanted.push((
                    d.namespace.clone(),
                    format!("{}-{r}", d.name),
                    d.name.clone(),
                    pinned.clone(),
                ));
            }
        }
        self.placements.retain(|p| {
            wanted.iter().any(|(ns, name, dep, _)| {
                *ns == p.namespace && *name == p.name && *dep == p.deployment
            })
        });
        let mut next = self.placements.len();
        for (ns, name, deployment, pinned) in wanted {
            if self
                .placements
                .iter()
                .any(|p| p.namespace == ns && p.name == name)
            {
                continue;
            }
            let node = pinned.unwrap_or_else(|| self.nodes[next % self.nodes.len()].clone());
            next += 1;
            let i = self.node_index(&node).unwrap_or(0);
            let used: BTreeSet<Ipv4Addr> = self.placements.iter().map(|p| p.ip).collect();
            let ip = (10..=250)
                .map(|h| Ipv4Addr::new(self.base[0], self.base[1], 1 + i as u8, h))
                .find(|ip| !used.contains(ip))
                .expect("fewer than 240 pods per node");
            self.placements.push(Placement {
                namespace: ns,
                name,
                deployment,
                node,
                ip,
            });
        }
    }

    /// Every pod, with what it runs.
    pub fn pods(&self) -> Vec<PodPlan> {
        let docs = self.docs();
        self.placements
            .iter()
            .filter_map(|p| {
                let d = docs.iter().find(|d| {
                    d.kind == "Deployment" && d.namespace == p.namespace && d.name == p.deployment
                })?;
                Some(PodPlan {
                    placement: p.clone(),
                    labels: labels_at(&d.value, &["spec", "template", "metadata", "labels"]),
                    service_account: str_at(
                        &d.value,
                        &["spec", "template", "spec", "serviceAccountName"],
                    )
                    .unwrap_or("default")
                    .to_owned(),
                    app: app_spec(d).unwrap_or(App::Idle),
                })
            })
            .collect()
    }

    /// The pod named `name` (a pod name, or a Deployment name for its first pod), in `ns`.
    pub fn pod(&self, ns: &str, name: &str) -> Option<PodPlan> {
        let pods = self.pods();
        pods.iter()
            .find(|p| p.placement.namespace == ns && p.placement.name == name)
            .or_else(|| {
                pods.iter()
                    .find(|p| p.placement.namespace == ns && p.placement.deployment == name)
            })
            .cloned()
    }

    /// Every service with its VIP and endpoints.
    pub fn services(&self) -> Vec<ServicePlan> {
        let pods = self.pods();
        self.docs()
            .iter()
            .filter(|d| d.kind == "Service")
            .filter_map(|d| {
                let vip = str_at(&d.value, &["spec", "clusterIP"])?.parse().ok()?;
                let selector = labels_at(&d.value, &["spec", "selector"]);
                let ports = d
                    .value
                    .get("spec")
                    .and_then(|s| s.get("ports"))
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        let port = p.get("port")?.as_u64()? as u16;
                        let target = p
                            .get("targetPort")
                            .and_then(Value::as_u64)
                            .map_or(port, |t| t as u16);
                        Some((port, target))
                    })
                    .collect();
                let endpoints = pods
                    .iter()
                    .filter(|p| {
                        p.placement.namespace == d.namespace
                            && !selector.is_empty()
                            && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                    })
                    .map(|p| p.placement.ip)
                    .collect();
                Some(ServicePlan {
                    namespace: d.namespace.clone(),
                    name: d.name.clone(),
                    vip,
                    ports,
                    endpoints,
                })
            })
            .collect()
    }

    /// The network namespace name of a pod.
    pub fn pod_netns(prefix: &str, p: &Placement) -> String {
        format!("{prefix}-pod-{}-{}", p.namespace, p.name)
    }

    /// The control plane's manifests: every document, plus one Pod per placement (address,
    /// node, service account, labels, and the annotation naming its network namespace).
    pub fn manifests_yaml(&self, prefix: &str) -> String {
        let mut out = String::new();
        for d in self.docs() {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&d.value).unwrap_or_default());
        }
        for p in self.pods() {
            let labels: String = p
                .labels
                .iter()
                .map(|(k, v)| format!("{}: {}", yaml_str(k), yaml_str(v)))
                .collect::<Vec<_>>()
                .join(", ");
            let pl = &p.placement;
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels: {{{labels}}}\n  annotations: {{{NETNS_ANNOTATION}: /var/run/netns/{}}}\nspec: {{serviceAccountName: {}, nodeName: {}}}\nstatus: {{podIP: {}, conditions: [{{type: Ready, status: \"True\"}}]}}\n",
                yaml_str(&pl.name),
                yaml_str(&pl.namespace),
                yaml_str(&format!("local-{}-{}", pl.namespace, pl.name)),
                Self::pod_netns(prefix, pl),
                yaml_str(&p.service_account),
                yaml_str(&pl.node),
                pl.ip
            ));
        }
        out
    }

    /// `/etc/hosts` for a pod in `ns`: every service by its full name, `name.ns`, and (in the
    /// pod's own namespace) its short name, as the cluster DNS search path would resolve them.
    pub fn hosts_file(&self, ns: &str) -> String {
        let mut out = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for s in self.services() {
            let full = format!("{}.{}.svc.cluster.local", s.name, s.namespace);
            let mut names = vec![
                full,
                format!("{}.{}.svc", s.name, s.namespace),
                format!("{}.{}", s.name, s.namespace),
            ];
            if s.namespace == ns {
                names.push(s.name.clone());
            }
            out.push_str(&format!("{} {}\n", s.vip, names.join(" ")));
        }
        out
    }

    /// The nodes' service rules (what kube-proxy does): `iptables-restore --noflush` input for
    /// the nat table, sending each VIP:port to an endpoint (spread evenly over several). Only
    /// traffic outside the mesh needs them: a captured pod's proxy resolves VIPs itself.
    pub fn service_rules(&self, chain: &str) -> String {
        let mut out = format!("*nat\n:{chain} - [0:0]\n-F {chain}\n");
        for s in self.services() {
            for (port, target) in &s.ports {
                let n = s.endpoints.len();
                for (i, ep) in s.endpoints.iter().enumerate() {
                    let spread = if n - i > 1 {
                        format!(" -m statistic --mode nth --every {} --packet 0", n - i)
                    } else {
                        String::new()
                    };
                    out.push_str(&format!(
                        "-A {chain} -d {}/32 -p tcp --dport {port}{spread} -j DNAT --to-destination {ep}:{target}\n",
                        s.vip
                    ));
                }
            }
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// The body of the `local_manifests` fuzz target (also run over its seed corpus by `cargo
/// test`): any text either is refused with an error or becomes a mesh whose pods, services,
/// manifests, hosts files and rules can all be computed without panicking, and whose rendered
/// manifests are YAML again.
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub fn fuzz_manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = parse_docs(text, "fuzz") else {
        return;
    };
    let mut mesh = Mesh::new([10, 250], &["node-a", "node-b"]);
    mesh.apply(docs.clone());
    let _ = mesh.label_namespace("default", &["istio.io/dataplane-mode=ambient".into()]);
    let rendered = mesh.manifests_yaml("zl");
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        <Value as serde::Deserialize>::deserialize(doc).expect("rendered manifests are YAML");
    }
    let _ = mesh.hosts_file("default");
    let _ = mesh.service_rules("ZL-SERVICES");
    mesh.delete(&docs);
    assert!(
        mesh.pods().is_empty(),
        "deleting every document leaves no pod"
    );
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 2\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      serviceAccountName: web\n      containers: [{name: web, image: ambient.local/http-app, env: [{name: UPSTREAM, value: \"http://db:8080/\"}]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n";

    fn mesh() -> Mesh {
        let mut m = Mesh::new([10, 250], &["node-a", "node-b"]);
        m.apply(parse_docs(TEXT, "t").unwrap());
        m
    }

    #[test]
    fn deployments_become_pods_spread_over_nodes_with_stable_addresses() {
        let m = mesh();
        let pods = m.pods();
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].placement.node, "node-a");
        assert_eq!(pods[1].placement.node, "node-b");
        assert_eq!(pods[0].placement.ip, Ipv4Addr::new(10, 250, 1, 10));
        assert_eq!(pods[1].placement.ip, Ipv4Addr::new(10, 250, 2, 10));
        assert_eq!(
            pods[0].app,
            App::Http {
                port: 8080,
                upstream: Some("http://db:8080/".into())
            }
        );
        // Re-applying changes nothing; a round trip through JSON neither.
        let mut again = m.clone();
        let changes = again.apply(parse_docs(TEXT, "t").unwrap());
        assert!(changes.iter().any(|c| c.contains("Deployment default/web")));
        assert_eq!(again.placements, m.placements);
        let json = serde_json::to_string(&m).unwrap();
        let back: Mesh = serde_json::from_str(&json).unwrap();
        assert_eq!(back.pods(), m.pods());
    }

    #[test]
    fn services_get_a_vip_endpoints_names_and_rules() {
        let m = mesh();
        let s = &m.services()[0];
        assert_eq!(s.vip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(s.ports, vec![(80, 8080)]);
        assert_eq!(s.endpoints.len(), 2);
        let hosts = m.hosts_file("default");
        assert!(
            hosts.contains(
                "10.96.0.10 web.default.svc.cluster.local web.default.svc web.default web\n"
            ),
            "{hosts}"
        );
        assert!(!m.hosts_file("other").contains(" web\n"));
        let rules = m.service_rules("ZL-SERVICES");
        assert!(rules.contains("-A ZL-SERVICES -d 10.96.0.10/32 -p tcp --dport 80 -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.250.1.10:8080\n"), "{rules}");
        assert!(
            rules.contains("--dport 80 -j DNAT --to-destination 10.250.2.10:8080\n"),
            "{rules}"
        );
        let manifests = m.manifests_yaml("zl");
        assert!(
            manifests.contains(
                "annotations: {ambient.local/netns: /var/run/netns/zl-pod-default-web-0}"
            ),
            "{manifests}"
        );
        assert!(
            manifests.contains("status: {podIP: 10.250.1.10"),
            "{manifests}"
        );
    }

    #[test]
    fn labels_and_deletions_change_the_documents() {
        let mut m = mesh();
        m.label_namespace("default", &["istio.io/dataplane-mode=ambient".into()])
            .unwrap();
        assert!(
            m.manifests_yaml("zl")
                .contains("istio.io/dataplane-mode: ambient")
        );
        m.label_namespace("default", &["istio.io/dataplane-mode-".into()])
            .unwrap();
        assert!(!m.manifests_yaml("zl").contains("dataplane-mode"));
        assert!(m.label_namespace("nope", &["a=b".into()]).is_err());
        assert!(m.label_namespace("default", &["nonsense".into()]).is_err());
        let gone = parse_docs(TEXT, "t").unwrap();
        m.delete(&gone[1..2]);
        assert!(m.pods().is_empty());
        assert!(m.services()[0].endpoints.is_empty());
    }

    #[test]
    fn bad_documents_are_refused_with_their_place() {
        for (text, want) in [
            (
                "kind: Secret\nmetadata: {name: x}\n",
                "document 1: kind Secret is not supported",
            ),
            (
                "---\nkind: Service\nmetadata: {}\n",
                "Service without metadata.name",
            ),
            (
                "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n",
                "`port` between 1 and 65535",
            ),
            (
                "kind: Service\nmetadata: {name: s}\nspec: {clusterIP: banana}\n",
                "not an IPv4 address",
            ),
            (
                "kind: Deployment\nmetadata: {name: d}\nspec: {replicas: 99}\n",
                "replicas must be 0 to 16",
            ),
            (
                "kind: Deployment\nmetadata: {name: d}\nspec: {template: {spec: {containers: [{image: ambient.local/gateway, env: [{name: ROUTES, value: oops}]}]}}}\n",
                "not host=url",
            ),
            ("a: [\n", "not YAML"),
        ] {
            let e = parse_docs(text, "f.yaml").unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("f.yaml"), "{text}: {e}");
        }
    }
}
