//! A whole ambient mesh on one Linux machine, without Kubernetes: nodes and pods are network
//! namespaces, `ztunnel controlplane` serves the Kubernetes documents, each node runs `ztunnel
//! node-agent` and `ztunnel proxy` (shared mode, pods handed over ZDS), and pods run built-in
//! apps. `ztunnel local ...` drives it; [`tutorial`] replays the ambient walkthrough and checks
//! every step.
//!
//! The pure part ([`plan`]) decides where pods run, their addresses, the services' VIPs and what
//! the control plane and the nodes are told:
//!
//! ```
//! use localmesh::plan::{Mesh, parse_docs};
//!
//! let docs = parse_docs(
//!     "kind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: ambient.local/http-app}]}\n---\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n",
//!     "example.yaml",
//! )?;
//! let mut mesh = Mesh::new([10, 250], &["node-a", "node-b"]);
//! mesh.apply(docs);
//! let web = mesh.pod("default", "web").unwrap();
//! assert_eq!(web.placement.node, "node-a");
//! assert_eq!(web.placement.ip.to_string(), "10.250.1.10");
//! assert_eq!(mesh.services()[0].vip.to_string(), "10.96.0.10");
//! # Ok::<(), localmesh::plan::ManifestError>(())
//! ```
#![forbid(unsafe_code)]

pub mod app;
pub mod mesh;
pub mod net;
pub mod plan;
pub mod soak;
pub mod tutorial;

use std::path::{Path, PathBuf};

/// Errors of the local mesh.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A document is malformed or unsupported.
    #[error(transparent)]
    Manifest(#[from] plan::ManifestError),
    /// A system command failed.
    #[error("{command}: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr.
        reason: String,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `up` while a mesh runs.
    #[error(
        "a local mesh is already running (run directory {run_dir}); run `ztunnel local down` first"
    )]
    AlreadyRunning {
        /// Its run directory.
        run_dir: PathBuf,
    },
    /// A command that needs a running mesh, without one.
    #[error("no local mesh is running (no state in {run_dir}); start one with `ztunnel local up`")]
    NotRunning {
        /// The run directory looked at.
        run_dir: PathBuf,
    },
    /// Something did not become ready in time.
    #[error("timed out waiting for {what} (logs: {logs})")]
    Timeout {
        /// What.
        what: String,
        /// Where to look.
        logs: String,
    },
    /// The user asked for something that does not exist or cannot be done.
    #[error("{0}")]
    Usage(String),
    /// Interrupted (Ctrl-C); what was made has been removed.
    #[error("interrupted; everything made so far was removed")]
    Interrupted,
    /// A tutorial observation did not match the expectation.
    #[error("tutorial step {step}: {what}")]
    Check {
        /// The step.
        step: u8,
        /// What was observed instead.
        what: String,
    },
}

/// Where a mesh lives and how its parts are named.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The run directory (state, manifests, logs, sockets): default `/run/ztunnel-local`.
    pub run_dir: PathBuf,
    /// Prefix of every namespace and link name (default `zl`).
    pub prefix: String,
    /// First two octets of every address (default `10.250`).
    pub base: [u8; 2],
    /// Node names (default `node-a`, `node-b`).
    pub nodes: Vec<String>,
    /// The `ztunnel` binary the parts run as (default: this executable).
    pub exe: PathBuf,
    /// Capture backend of the node agents (`iptables` or `nftables`).
    pub backend: String,
    /// The address families of pods and services, for `up` (a running mesh keeps the family it
    /// was made with).
    pub ip_family: plan::IpFamily,
    /// The resolvers the node proxies forward names outside the mesh to (`up --dns-upstream`;
    /// none: such names are refused, logged), on port 53.
    pub dns_upstreams: Vec<std::net::IpAddr>,
    /// The lifetime of the workload certificates the node proxies ask for (their
    /// `SECRET_TTL`; none: the proxies' default, 24 h), for `up`: the mesh keeps it, and every
    /// proxy it starts later (a restart) asks for the same. The soak makes it short, so
    /// certificates rotate all through its run.
    pub secret_ttl: Option<std::time::Duration>,
}

impl Config {
    /// The defaults, with `exe` as the binary.
    pub fn new(exe: PathBuf) -> Self {
        Config {
            run_dir: PathBuf::from("/run/ztunnel-local"),
            prefix: "zl".into(),
            base: [10, 250],
            nodes: vec!["node-a".into(), "node-b".into()],
            exe,
            backend: "iptables".into(),
            ip_family: plan::IpFamily::Ipv4,
            dns_upstreams: Vec::new(),
            secret_ttl: None,
        }
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so readers never see half.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })
}

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
