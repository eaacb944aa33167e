//! What the local mesh should look like, as data: the Kubernetes documents it was given, where
//! each pod runs and at which address, the service VIPs, and what that means for the control
//! plane's manifests, the pods' name lookup and the nodes' service rules. No I/O here, so every
//! rule is tested in memory.
//!
//! Addresses (a `base` of `[10, 250]`): the nodes share `10.250.0.0/24` with the host at `.1`
//! and node *i* at `.10+i`; node *i*'s pods live in `10.250.(1+i).0/24` behind its bridge at
//! `.1`, from `.10` up. Services get VIPs in `10.96.0.0/16` (kept when a document sets
//! `spec.clusterIP`). A pod's address never changes while it exists.
//!
//! IPv6 ([`IpFamily`]): the same layout under `fd7a:<A><B>::/32` (`fd7a:afa::` for `10.250`):
//! the nodes' network `fd7a:afa::/64` (node *i* at `::<10+i>`), node *i*'s pods in
//! `fd7a:afa:<1+i>::/64` behind its bridge at `::1`, a pod at the host number of its IPv4
//! address; a service's IPv6 VIP is `fd7a:afa:ff96::<c>:<d>` for the IPv4 VIP `10.96.c.d`. The
//! nodes keep talking IPv4 among themselves and to the control plane; the family is what pods
//! and services get (`dual`: both, IPv4 first).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_yaml::Value;

/// The annotation the node agent reads a pod's network namespace from.
pub use common::k8s::NETNS_ANNOTATION;

mod docs;
mod steps;

pub use docs::{App, Doc, KINDS, ManifestError, parse_docs};
use docs::{app_spec, labels_at, str_at};
pub use steps::{NetStep, Process};

/// The address families of pods and services (`ztunnel local up --ip-family`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4 only (the default).
    #[default]
    Ipv4,
    /// IPv6 only.
    Ipv6,
    /// Both, IPv4 first.
    Dual,
}

impl IpFamily {
    /// Whether pods and services get IPv4 addresses.
    pub fn v4(self) -> bool {
        self != IpFamily::Ipv6
    }

    /// Whether pods and services get IPv6 addresses.
    pub fn v6(self) -> bool {
        self != IpFamily::Ipv4
    }
}

impl std::str::FromStr for IpFamily {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ipv4" => Ok(IpFamily::Ipv4),
            "ipv6" => Ok(IpFamily::Ipv6),
            "dual" => Ok(IpFamily::Dual),
            other => Err(format!(
                "unknown IP family {other:?}; expected ipv4, ipv6 or dual"
            )),
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Dual => "dual",
        })
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
    /// Its IPv4 address (the pod's number on its node; with `--ip-family ipv6` the pod holds
    /// only the IPv6 address made from it: [`Mesh::pod_addresses`]).
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
    /// VIP (the first of `vips`).
    pub vip: IpAddr,
    /// Every VIP (`spec.clusterIPs`, or `spec.clusterIP`), one per family.
    pub vips: Vec<IpAddr>,
    /// (port, target port).
    pub ports: Vec<(u16, u16)>,
    /// Endpoint addresses (every address of the pods whose labels match the selector).
    pub endpoints: Vec<IpAddr>,
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
    /// The address families of pods and services.
    #[serde(default)]
    pub ip_family: IpFamily,
    /// The workload certificates' lifetime the proxies ask for (`SECRET_TTL`), in seconds, when
    /// not the control plane's default: every proxy of the mesh, whenever started, asks for it.
    #[serde(default)]
    pub secret_ttl_seconds: Option<u64>,
}

impl Mesh {
    /// An empty mesh of `nodes` under `base`.
    pub fn new(base: [u8; 2], nodes: &[&str]) -> Self {
        Mesh {
            base,
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            docs: Vec::new(),
            placements: Vec::new(),
            ip_family: IpFamily::Ipv4,
            secret_ttl_seconds: None,
        }
    }

    /// An IPv6 address of the mesh: `fd7a:<A><B>:<subnet>::<host>`.
    fn v6(&self, subnet: u16, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd7a,
            u16::from_be_bytes(self.base),
            subnet,
            0,
            0,
            0,
            0,
            host,
        )
    }

    /// Node `i`'s IPv6 address on the nodes' network.
    pub fn node_ip6(&self, i: usize) -> Ipv6Addr {
        self.v6(0, 10 + i as u16)
    }

    /// Node `i`'s IPv6 pod subnet gateway (its bridge).
    pub fn pod_gateway6(&self, i: usize) -> Ipv6Addr {
        self.v6(1 + i as u16, 1)
    }

    /// Node `i`'s IPv6 pod subnet, `fd7a:<A><B>:<1+i>::/64`.
    pub fn pod_subnet6(&self, i: usize) -> String {
        format!("{}/64", self.v6(1 + i as u16, 0))
    }

    /// The IPv6 address of the pod at IPv4 address `ip`.
    pub fn pod_ip6(&self, ip: Ipv4Addr) -> Ipv6Addr {
        let o = ip.octets();
        self.v6(u16::from(o[2]), u16::from(o[3]))
    }

    /// The IPv6 VIP that goes with IPv4 VIP `vip`.
    pub fn vip6(&self, vip: Ipv4Addr) -> Ipv6Addr {
        let o = vip.octets();
        Ipv6Addr::new(
            0xfd7a,
            u16::from_be_bytes(self.base),
            0xff96,
            0,
            0,
            0,
            u16::from(o[2]),
            u16::from(o[3]),
        )
    }

    /// A pod's addresses under the mesh's family, IPv4 first.
    pub fn pod_addresses(&self, p: &Placement) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if self.ip_family.v4() {
            out.push(IpAddr::V4(p.ip));
        }
        if self.ip_family.v6() {
            out.push(IpAddr::V6(self.pod_ip6(p.ip)));
        }
        out
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

    /// Node `i`'s pod subnet, `A.B.(1+i).0/24`.
    pub fn pod_subnet(&self, i: usize) -> String {
        format!(
            "{}/24",
            Ipv4Addr::new(self.base[0], self.base[1], 1 + i as u8, 0)
        )
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
                let vips: Vec<IpAddr> = match self.ip_family {
                    IpFamily::Ipv4 => vec![vip.into()],
                    IpFamily::Ipv6 => vec![self.vip6(vip).into()],
                    IpFamily::Dual => vec![vip.into(), self.vip6(vip).into()],
                };
                if let Some(spec) = doc.value.get_mut("spec").and_then(Value::as_mapping_mut) {
                    spec.insert("clusterIP".into(), vips[0].to_string().into());
                    if self.ip_family != IpFamily::Ipv4 {
                        let all = vips.iter().map(|v| Value::from(v.to_string())).collect();
                        spec.insert("clusterIPs".into(), Value::Sequence(all));
                    }
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
        let used: BTreeSet<IpAddr> = docs
            .iter()
            .filter(|d| d.kind == "Service")
            .flat_map(service_vips)
            .collect();
        (10..=u16::MAX)
            .map(|n| Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8))
            .find(|ip| !used.contains(&(*ip).into()) && !used.contains(&self.vip6(*ip).into()))
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
                let vips = service_vips(d);
                let vip = *vips.first()?;
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
                    .flat_map(|p| self.pod_addresses(&p.placement))
                    .collect();
                Some(ServicePlan {
                    namespace: d.namespace.clone(),
                    name: d.name.clone(),
                    vip,
                    vips,
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
            let addresses = self.pod_addresses(pl);
            let pod_ips = addresses
                .iter()
                .map(|a| format!("{{ip: \"{a}\"}}"))
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels: {{{labels}}}\n  annotations: {{{NETNS_ANNOTATION}: /var/run/netns/{}}}\nspec: {{serviceAccountName: {}, nodeName: {}}}\nstatus: {{podIP: \"{}\", podIPs: [{pod_ips}], conditions: [{{type: Ready, status: \"True\"}}]}}\n",
                yaml_str(&pl.name),
                yaml_str(&pl.namespace),
                yaml_str(&format!("local-{}-{}", pl.namespace, pl.name)),
                Self::pod_netns(prefix, pl),
                yaml_str(&p.service_account),
                yaml_str(&pl.node),
                addresses.first().copied().unwrap_or(IpAddr::V4(pl.ip))
            ));
        }
        out
    }

    /// `/etc/resolv.conf` for a pod: its node's bridge as the nameserver (the node agent's DNS
    /// capture sends port 53 to the node proxy's DNS proxy whatever the address), and the search
    /// domains of a Kubernetes pod in its namespace.
    pub fn resolv_conf(&self, pod: &Placement) -> String {
        // Of the pod's first family: an IPv6-only pod has no route to an IPv4 nameserver.
        let gateway = self
            .node_index(&pod.node)
            .map(|i| {
                if self.ip_family.v4() {
                    self.pod_gateway(i).to_string()
                } else {
                    self.pod_gateway6(i).to_string()
                }
            })
            .unwrap_or_else(|| "127.0.0.53".to_owned());
        format!(
            "nameserver {gateway}\nsearch {ns}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
            ns = pod.namespace
        )
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
            for vip in &s.vips {
                out.push_str(&format!("{vip} {}\n", names.join(" ")));
            }
        }
        out
    }

    /// The nodes' service rules (what kube-proxy does): `iptables-restore --noflush` input for
    /// the nat table, sending each VIP:port to an endpoint (spread evenly over several). Only
    /// traffic outside the mesh needs them: a captured pod's proxy resolves VIPs itself. `v6`:
    /// the IPv6 VIPs and endpoints, for `ip6tables-restore`.
    pub fn service_rules(&self, chain: &str, v6: bool) -> String {
        let mut out = format!("*nat\n:{chain} - [0:0]\n-F {chain}\n");
        for s in self.services() {
            let endpoints: Vec<&IpAddr> =
                s.endpoints.iter().filter(|e| e.is_ipv6() == v6).collect();
            for vip in s.vips.iter().filter(|v| v.is_ipv6() == v6) {
                let len = if v6 { 128 } else { 32 };
                for (port, target) in &s.ports {
                    let n = endpoints.len();
                    for (i, ep) in endpoints.iter().enumerate() {
                        let spread = if n - i > 1 {
                            format!(" -m statistic --mode nth --every {} --packet 0", n - i)
                        } else {
                            String::new()
                        };
                        let to = std::net::SocketAddr::new(**ep, *target);
                        out.push_str(&format!(
                            "-A {chain} -d {vip}/{len} -p tcp --dport {port}{spread} -j DNAT --to-destination {to}\n",
                        ));
                    }
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
    let _ = mesh.service_rules("ZL-SERVICES", false);
    let _ = mesh.service_rules("ZL-SERVICES", true);
    mesh.delete(&docs);
    assert!(
        mesh.pods().is_empty(),
        "deleting every document leaves no pod"
    );
}

/// A Service document's VIPs: `spec.clusterIPs`, else `spec.clusterIP` (what does not parse
/// as an address, such as `None`, is no VIP).
fn service_vips(d: &Doc) -> Vec<IpAddr> {
    let listed: Vec<IpAddr> = d
        .value
        .get("spec")
        .and_then(|s| s.get("clusterIPs"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    str_at(&d.value, &["spec", "clusterIP"])
        .and_then(|v| v.parse().ok())
        .into_iter()
        .collect()
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests;
