//! What bringing a mesh up does, as data: the names of its namespaces, links and files, the
//! network steps of the fabric, each node and each pod, and every process's command line. The
//! executor (`mesh`) runs them in order; nothing here touches the system, so each is tested in
//! memory.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use super::{App, Mesh, PodPlan};
use crate::Config;

/// The control plane's port on the host's fabric address.
const CONTROLPLANE_PORT: u16 = 15012;

/// One step of building the mesh's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetStep {
    /// Create this network namespace.
    Namespace(String),
    /// Run `ip ARGS`, in this namespace (`None`: the host's).
    Ip {
        /// Where (`None`: the host's namespace).
        netns: Option<String>,
        /// The arguments of `ip`.
        args: Vec<String>,
    },
    /// Turn on IPv4 forwarding in this namespace.
    Forwarding(String),
}

/// One process of the mesh: `ztunnel ARGS` with `ENV`, in a namespace, logging to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Where it runs (`None`: the host's namespace).
    pub netns: Option<String>,
    /// The `ztunnel` subcommand and its flags.
    pub args: Vec<String>,
    /// Environment variables beyond the inherited ones.
    pub env: Vec<(String, String)>,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Config {
    /// The mesh's state between commands.
    pub(crate) fn state_file(&self) -> PathBuf {
        self.run_dir.join("mesh.json")
    }

    /// The control plane's manifests (which it and the node agents watch).
    pub(crate) fn manifests_dir(&self) -> PathBuf {
        self.run_dir.join("manifests")
    }

    /// The log file of a part: `controlplane`, or `ztunnel`/`node-agent` of a node, or a pod.
    pub fn log_file(&self, part: &str, node: Option<&str>) -> PathBuf {
        match node {
            Some(n) => self
                .run_dir
                .join("logs")
                .join(n)
                .join(format!("{part}.log")),
            None => self.run_dir.join("logs").join(format!("{part}.log")),
        }
    }

    /// The log of a pod's app (removed with the pod).
    pub fn pod_log(&self, p: &crate::plan::Placement) -> PathBuf {
        self.run_dir
            .join("logs")
            .join(format!("pod-{}-{}.log", p.namespace, p.name))
    }

    /// Node `node`'s network namespace.
    pub(crate) fn node_ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// The fabric's namespace (the bridge joining the nodes and the host).
    pub(crate) fn fabric_ns(&self) -> String {
        format!("{}-fabric", self.prefix)
    }

    /// The host's end of its link to the fabric.
    pub(crate) fn host_link(&self) -> String {
        format!("{}-host", self.prefix)
    }

    /// The control plane's pid.
    pub(crate) fn controlplane_pid_file(&self) -> PathBuf {
        self.run_dir.join("controlplane.pid")
    }

    /// Node `node`'s token for the control plane.
    pub(crate) fn token_file(&self, node: &str) -> PathBuf {
        self.run_dir.join("tokens").join(format!("{node}.token"))
    }

    /// The ZDS socket between node `node`'s agent and proxy.
    pub(crate) fn zds_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("{node}.sock"))
    }

    /// Where node `node`'s proxy waits for its successor (`--handoff-socket`): a rolling
    /// restart moves its live connections to the new proxy through it.
    pub(crate) fn handoff_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("{node}.handoff.sock"))
    }

    /// The resolver configuration the node proxies forward names outside the mesh with
    /// (written by `up` from [`Config::dns_upstreams`]).
    pub(crate) fn upstream_resolv_conf(&self) -> PathBuf {
        self.run_dir.join("upstream-resolv.conf")
    }

    /// The text of [`Config::upstream_resolv_conf`].
    pub(crate) fn upstream_resolv_conf_text(&self) -> String {
        if self.dns_upstreams.is_empty() {
            return "# No upstream resolver (ztunnel local up --dns-upstream IP): names outside the mesh are refused.\n".into();
        }
        self.dns_upstreams
            .iter()
            .map(|ip| format!("nameserver {ip}\n"))
            .collect()
    }

    /// The mesh's root certificate (the control plane's CA).
    pub(crate) fn root_cert(&self) -> PathBuf {
        self.run_dir.join("ca").join("root-cert.pem")
    }

    /// The control plane's address.
    pub fn controlplane_addr(&self) -> SocketAddr {
        SocketAddr::from((
            Ipv4Addr::new(self.base[0], self.base[1], 0, 1),
            CONTROLPLANE_PORT,
        ))
    }
}

fn ip(netns: Option<&str>, args: &[&str]) -> NetStep {
    NetStep::Ip {
        netns: netns.map(str::to_owned),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
    }
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

impl Mesh {
    /// The fabric: a bridge in its own namespace, joined to the host by a veth with the host's
    /// address, so the host reaches every node and pod.
    pub fn fabric_steps(&self, config: &Config) -> Vec<NetStep> {
        let fabric = config.fabric_ns();
        let host = config.host_link();
        let f = Some(fabric.as_str());
        vec![
            NetStep::Namespace(fabric.clone()),
            ip(f, &["link", "add", "br0", "type", "bridge"]),
            ip(f, &["link", "set", "br0", "up"]),
            ip(
                None,
                &[
                    "link", "add", &host, "type", "veth", "peer", "name", "uplink", "netns",
                    &fabric,
                ],
            ),
            ip(f, &["link", "set", "uplink", "master", "br0", "up"]),
            ip(
                None,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", self.host_ip()),
                    "dev",
                    &host,
                ],
            ),
            ip(None, &["link", "set", &host, "up"]),
        ]
    }

    /// Node `i`: its namespace on the fabric, a bridge for its pods, routes to the other nodes'
    /// pods, forwarding, and the host's route to its pods.
    pub fn node_steps(&self, config: &Config, i: usize) -> Vec<NetStep> {
        let fabric = config.fabric_ns();
        let f = Some(fabric.as_str());
        let ns = config.node_ns(&self.nodes[i]);
        let n = Some(ns.as_str());
        let port = format!("n{i}");
        let mut steps = vec![
            NetStep::Namespace(ns.clone()),
            ip(
                f,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            ),
            ip(f, &["link", "set", &port, "master", "br0", "up"]),
            ip(
                n,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", self.node_ip(i)),
                    "dev",
                    "eth0",
                ],
            ),
            ip(n, &["link", "set", "eth0", "up"]),
            ip(n, &["link", "add", "cni0", "type", "bridge"]),
            ip(
                n,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", self.pod_gateway(i)),
                    "dev",
                    "cni0",
                ],
            ),
            ip(n, &["link", "set", "cni0", "up"]),
            NetStep::Forwarding(ns.clone()),
        ];
        for j in (0..self.nodes.len()).filter(|j| *j != i) {
            let via = self.node_ip(j).to_string();
            steps.push(ip(n, &["route", "add", &self.pod_subnet(j), "via", &via]));
        }
        if self.ip_family.v6() {
            // `nodad`: usable at once, not after duplicate address detection's second or two.
            let eth0 = format!("{}/64", self.node_ip6(i));
            let cni0 = format!("{}/64", self.pod_gateway6(i));
            steps.push(ip(n, &["-6", "addr", "add", &eth0, "dev", "eth0", "nodad"]));
            steps.push(ip(n, &["-6", "addr", "add", &cni0, "dev", "cni0", "nodad"]));
            for j in (0..self.nodes.len()).filter(|j| *j != i) {
                let via = self.node_ip6(j).to_string();
                let subnet = self.pod_subnet6(j);
                steps.push(ip(n, &["-6", "route", "add", &subnet, "via", &via]));
            }
        }
        let via = self.node_ip(i).to_string();
        let host = config.host_link();
        steps.push(ip(
            None,
            &[
                "route",
                "add",
                &self.pod_subnet(i),
                "via",
                &via,
                "dev",
                &host,
            ],
        ));
        steps
    }

    /// A pod: its namespace, a veth to its node's bridge, its address and default route.
    pub fn pod_steps(&self, config: &Config, pod: &PodPlan) -> Vec<NetStep> {
        let p = &pod.placement;
        let i = self.node_index(&p.node).unwrap_or(0);
        let node_ns = config.node_ns(&p.node);
        let node = Some(node_ns.as_str());
        let ns = Mesh::pod_netns(&config.prefix, p);
        let own = Some(ns.as_str());
        let port = format!("p{}", p.ip.octets()[3]);
        let mut steps = vec![
            NetStep::Namespace(ns.clone()),
            ip(
                node,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            ),
            ip(node, &["link", "set", &port, "master", "cni0", "up"]),
            ip(own, &["link", "set", "eth0", "up"]),
        ];
        if self.ip_family.v4() {
            let addr = format!("{}/24", p.ip);
            let gateway = self.pod_gateway(i).to_string();
            steps.push(ip(own, &["addr", "add", &addr, "dev", "eth0"]));
            steps.push(ip(own, &["route", "add", "default", "via", &gateway]));
        }
        if self.ip_family.v6() {
            let addr = format!("{}/64", self.pod_ip6(p.ip));
            let gateway = self.pod_gateway6(i).to_string();
            steps.push(ip(
                own,
                &["-6", "addr", "add", &addr, "dev", "eth0", "nodad"],
            ));
            steps.push(ip(own, &["-6", "route", "add", "default", "via", &gateway]));
        }
        steps
    }

    /// The control plane: the manifests directory, served on the host's fabric address with the
    /// mesh's CA and the nodes' tokens.
    pub fn controlplane_process(&self, config: &Config) -> Process {
        let addr = config.controlplane_addr();
        Process {
            netns: None,
            args: owned(&[
                "controlplane",
                "--manifests",
                &config.manifests_dir().to_string_lossy(),
                "--listen",
                &addr.to_string(),
                "--tls-name",
                &addr.ip().to_string(),
                "--ca-dir",
                &config.run_dir.join("ca").to_string_lossy(),
                "--node-tokens",
                &config.run_dir.join("tokens").to_string_lossy(),
            ]),
            env: Vec::new(),
            log: config.log_file("controlplane", None),
        }
    }

    /// Node `node`'s agent: the manifests as its pod source, its capture backend, the ZDS socket.
    pub fn node_agent_process(&self, config: &Config, node: &str) -> Process {
        Process {
            netns: Some(config.node_ns(node)),
            args: owned(&[
                "node-agent",
                "--source",
                &format!("manifests:{}", config.manifests_dir().display()),
                "--node",
                node,
                "--backend",
                &config.backend,
                "--zds-socket",
                &config.zds_socket(node).to_string_lossy(),
            ]),
            env: Vec::new(),
            log: config.log_file("node-agent", Some(node)),
        }
    }

    /// Node `node`'s proxy: shared mode, xDS and certificates from the control plane (its
    /// node's token), pods from the agent's ZDS socket.
    pub fn proxy_process(&self, config: &Config, node: &str) -> Process {
        let url = format!("https://{}", config.controlplane_addr());
        let root = config.root_cert();
        let root = root.to_string_lossy();
        Process {
            netns: Some(config.node_ns(node)),
            args: owned(&[
                "proxy",
                "--mode",
                "shared",
                "--xds-address",
                &url,
                "--ca-address",
                &url,
                "--xds-root-ca",
                &root,
                "--ca-root-ca",
                &root,
                "--auth-token",
                &config.token_file(node).to_string_lossy(),
                "--inpod-uds",
                &config.zds_socket(node).to_string_lossy(),
                "--dns-resolv-conf",
                &config.upstream_resolv_conf().to_string_lossy(),
                "--handoff-socket",
                &config.handoff_socket(node).to_string_lossy(),
            ]),
            env: {
                let mut env = vec![
                    ("NODE_NAME".into(), node.to_owned()),
                    ("CONNECTION_TERMINATION_DEADLINE".into(), "2s".into()),
                ];
                if let Some(ttl) = self.secret_ttl_seconds {
                    env.push(("SECRET_TTL".into(), format!("{}s", ttl.max(1))));
                }
                env
            },
            log: config.log_file("ztunnel", Some(node)),
        }
    }

    /// The app a pod runs (`None` for an idle pod).
    pub fn app_process(&self, config: &Config, pod: &PodPlan) -> Option<Process> {
        let p = &pod.placement;
        let mut args = owned(&["local", "app", "--name", &p.deployment]);
        match &pod.app {
            App::Idle => return None,
            App::Echo { port } => {
                args.extend(["--port".into(), port.to_string(), "--echo".into()]);
            }
            App::Http { port, upstream } => {
                args.extend(["--port".into(), port.to_string()]);
                if let Some(u) = upstream {
                    args.extend(["--upstream".into(), u.clone()]);
                }
            }
            App::Gateway { port, routes } => {
                args.extend(["--port".into(), port.to_string()]);
                for (host, url) in routes {
                    args.extend(["--route".into(), format!("{host}={url}")]);
                }
            }
        }
        Some(Process {
            netns: Some(Mesh::pod_netns(&config.prefix, p)),
            args,
            env: Vec::new(),
            log: config.pod_log(p),
        })
    }
}
