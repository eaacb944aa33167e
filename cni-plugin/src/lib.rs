//! `ztunnel-cni`: a chained CNI plugin (CNI specification 1.0) that holds a new pod until the
//! ambient node agent has captured it.
//!
//! The container runtime runs it by file name from its CNI bin directory, after the primary
//! plugin of the node's conflist, with the command in `CNI_COMMAND`, the pod in `CNI_NETNS`,
//! `CNI_CONTAINERID` and `CNI_ARGS` (`K8S_POD_NAME`, `K8S_POD_NAMESPACE`, `K8S_POD_UID`), and
//! the network configuration on stdin, with the primary plugin's result as `prevResult`:
//!
//! - `ADD`: asks the agent (plugin field `agent_socket`, default
//!   [`redirect::cni::DEFAULT_CNI_SOCKET`]) to capture the pod, and passes `prevResult` on only
//!   when the agent says the pod is captured (its rules are in and the proxy acknowledged it) or
//!   not in the mesh. A refusal, or an agent that cannot be reached, fails the ADD with a CNI
//!   error (the kubelet tries again): a pod never starts uncaptured. Invocations that are not
//!   for a Kubernetes pod pass through. While the agent cannot be reached, the plugin reads the
//!   pod and its namespace from the API server with the kubeconfig its configuration names
//!   (`"kubernetes": {"kubeconfig": PATH}`, written by the agent's installer) and lets a pod
//!   outside the mesh start (istio-cni's rules, with the configuration's `exclude_namespaces`,
//!   default `kube-system`, and `enablement_selectors`, which the installer copies from the
//!   agent's settings); a pod in the mesh, or any pod when the API server cannot tell, fails.
//! - `DEL`: tells the agent, if it can be reached, and succeeds (a deletion must not fail).
//! - `CHECK`: succeeds when the configuration is well formed.
//! - `VERSION`: the versions this plugin speaks.
//!
//! [`run`] is the whole plugin, given the environment, stdin and a way to reach the agent, so
//! tests run it in memory; `main` only wires it to the process.
//!
//! ```
//! use ztunnel_cni::{Agent, run};
//! use redirect::cni::{CniAnswer, CniRequest};
//!
//! struct Refuses;
//! impl Agent for Refuses {
//!     fn ask(&self, _: &std::path::Path, _: &CniRequest) -> std::io::Result<CniAnswer> {
//!         Ok(CniAnswer::Refused { reason: "no certificate yet".into() })
//!     }
//!     fn pod(&self, _: &std::path::Path, _: &str, _: &str) -> Result<ztunnel_cni::PodView, String> {
//!         Err("no API server here".into())
//!     }
//! }
//! let env = |k: &str| match k {
//!     "CNI_COMMAND" => Some("ADD".to_owned()),
//!     "CNI_CONTAINERID" => Some("c1".to_owned()),
//!     "CNI_NETNS" => Some("/var/run/netns/p1".to_owned()),
//!     "CNI_ARGS" => Some("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web".to_owned()),
//!     _ => None,
//! };
//! let config = br#"{"cniVersion":"1.0.0","name":"k8s","type":"ztunnel-cni",
//!   "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}}"#;
//! let error = run(&env, config, &Refuses).unwrap_err();
//! assert_eq!(error.code, ztunnel_cni::REFUSED);
//! assert!(error.to_json("1.0.0").contains("no certificate yet"));
//! ```
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::k8s::Enablement;
use redirect::cni::{CniAnswer, CniEvent, CniRequest, DEFAULT_CNI_SOCKET};
use serde_json::{Value, json};

/// The CNI versions this plugin speaks (its results are `prevResult`, in the caller's version).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// CNI error code: incompatible CNI version (the specification's).
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// CNI error code: a required environment variable is missing (the specification's).
pub const MISSING_ENVIRONMENT: u32 = 4;
/// CNI error code: stdin is not a network configuration (the specification's).
pub const DECODING_FAILURE: u32 = 6;
/// CNI error code: a bad network configuration (the specification's).
pub const INVALID_CONFIGURATION: u32 = 7;
/// CNI error code: try again later (the specification's): the agent cannot be reached.
pub const TRY_AGAIN_LATER: u32 = 11;
/// Plugin error code: the agent refused to capture a pod that joins the mesh.
pub const REFUSED: u32 = 100;
/// Plugin error code: the agent's answer makes no sense for the request.
pub const BAD_ANSWER: u32 = 101;

/// How long the plugin waits for the agent: capturing a pod includes the proxy's
/// acknowledgement, which includes its certificate.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the plugin reads of a pod from the API server: its labels and annotations and its
/// namespace's labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodView {
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// The pod's annotations.
    pub annotations: BTreeMap<String, String>,
    /// Its namespace's labels.
    pub namespace_labels: BTreeMap<String, String>,
}

/// How the plugin reaches the agent (a Unix socket in production, anything in tests), and the
/// API server when the agent cannot be reached.
pub trait Agent {
    /// Sends `request` to the agent at `socket`.
    fn ask(&self, socket: &Path, request: &CniRequest) -> std::io::Result<CniAnswer>;

    /// Reads pod `namespace/name` and its namespace with the kubeconfig at `kubeconfig`.
    fn pod(&self, kubeconfig: &Path, namespace: &str, name: &str) -> Result<PodView, String>;
}

/// The agent over its Unix socket; the API server through the kube client.
#[derive(Debug, Clone, Copy)]
pub struct SocketAgent;

/// How long the plugin waits for the API server.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

impl Agent for SocketAgent {
    fn ask(&self, socket: &Path, request: &CniRequest) -> std::io::Result<CniAnswer> {
        redirect::cni::ask(socket, request, AGENT_TIMEOUT)
    }

    fn pod(&self, kubeconfig: &Path, namespace: &str, name: &str) -> Result<PodView, String> {
        use k8s_openapi::api::core::v1::{Namespace, Pod};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let config = kube::config::Kubeconfig::read_from(kubeconfig)
                .map_err(|e| format!("kubeconfig {}: {e}", kubeconfig.display()))?;
            let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", kubeconfig.display()))?;
            let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
            let lookup = async {
                let pod = kube::Api::<Pod>::namespaced(client.clone(), namespace)
                    .get(name)
                    .await
                    .map_err(|e| format!("pod {namespace}/{name}: {e}"))?;
                let ns = kube::Api::<Namespace>::all(client)
                    .get(namespace)
                    .await
                    .map_err(|e| format!("namespace {namespace}: {e}"))?;
                Ok(PodView {
                    labels: pod.metadata.labels.unwrap_or_default(),
                    annotations: pod.metadata.annotations.unwrap_or_default(),
                    namespace_labels: ns.metadata.labels.unwrap_or_default(),
                })
            };
            tokio::time::timeout(API_TIMEOUT, lookup)
                .await
                .map_err(|_| format!("the API server did not answer within {API_TIMEOUT:?}"))?
        })
    }
}

/// A CNI error, written to stdout as the specification's error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The code (see the constants).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object, in `version`.
    pub fn to_json(&self, version: &str) -> String {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
            .to_string()
    }
}

/// The network configuration fields the plugin reads.
#[derive(Debug)]
struct Config {
    version: String,
    agent_socket: PathBuf,
    prev_result: Option<Value>,
    /// `kubernetes.kubeconfig`: how to read a pod while the agent is down.
    kubeconfig: Option<PathBuf>,
    /// `exclude_namespaces` (default `kube-system`) and `enablement_selectors`, as the agent's.
    enablement: Enablement,
}

fn config(stdin: &[u8]) -> Result<Config, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            DECODING_FAILURE,
            "the network configuration on stdin is not JSON",
            e.to_string(),
        )
    })?;
    let version = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CniError::new(
                INVALID_CONFIGURATION,
                "the network configuration has no cniVersion",
                "",
            )
        })?
        .to_owned();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!("CNI version {version} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let agent_socket = match value.get("agent_socket") {
        None => PathBuf::from(DEFAULT_CNI_SOCKET),
        Some(Value::String(path)) if !path.is_empty() => PathBuf::from(path),
        Some(other) => {
            return Err(CniError::new(
                INVALID_CONFIGURATION,
                "agent_socket must be a path",
                other.to_string(),
            ));
        }
    };
    let kubeconfig = match value.pointer("/kubernetes/kubeconfig") {
        None => None,
        Some(Value::String(path)) if !path.is_empty() => Some(PathBuf::from(path)),
        Some(other) => {
            return Err(CniError::new(
                INVALID_CONFIGURATION,
                "kubernetes.kubeconfig must be a path",
                other.to_string(),
            ));
        }
    };
    let mut enablement = Enablement::default();
    match value.get("exclude_namespaces") {
        None => {}
        Some(Value::Array(names)) => {
            enablement.excluded_namespaces = names
                .iter()
                .map(|n| n.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    CniError::new(
                        INVALID_CONFIGURATION,
                        "exclude_namespaces must be a list of names",
                        Value::Array(names.clone()).to_string(),
                    )
                })?;
        }
        Some(other) => {
            return Err(CniError::new(
                INVALID_CONFIGURATION,
                "exclude_namespaces must be a list of names",
                other.to_string(),
            ));
        }
    }
    match value.get("enablement_selectors") {
        None | Some(Value::Null) => {}
        Some(selectors) => {
            enablement.selectors = Some(
                common::k8s::parse_enablement_selectors(&selectors.to_string()).map_err(|e| {
                    CniError::new(
                        INVALID_CONFIGURATION,
                        "enablement_selectors are not valid",
                        e,
                    )
                })?,
            );
        }
    }
    Ok(Config {
        version,
        agent_socket,
        prev_result: value.get("prevResult").cloned(),
        kubeconfig,
        enablement,
    })
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn cni_args(text: &str) -> Vec<(&str, &str)> {
    text.split(';')
        .filter_map(|pair| pair.split_once('='))
        .collect()
}

/// The addresses of a result (`ips[].address`, CIDR notation).
fn result_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let mut ips = Vec::new();
    for (i, entry) in result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let text = entry.get("address").and_then(Value::as_str).unwrap_or("");
        let ip = text.split('/').next().unwrap_or("").parse().map_err(|_| {
            CniError::new(
                INVALID_CONFIGURATION,
                format!("prevResult.ips[{i}].address is not an address"),
                text,
            )
        })?;
        ips.push(ip);
    }
    Ok(ips)
}

/// Runs one invocation: `env` reads the environment, `stdin` is the network configuration.
/// `Ok` is what to print on stdout (exit 0); `Err` is printed as [`CniError::to_json`] (exit 1).
pub fn run(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    agent: &dyn Agent,
) -> Result<String, CniError> {
    let command = required(env, "CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let config = config(stdin)?;
    match command.as_str() {
        "ADD" => add(env, &config, agent),
        "DEL" => {
            // Best effort: a deletion never fails, and the agent also sees the pod go.
            if let Some(request) = request(env, CniEvent::Del, Vec::new())? {
                let _ = agent.ask(&config.agent_socket, &request);
            }
            Ok(String::new())
        }
        "CHECK" => Ok(String::new()),
        other => Err(CniError::new(
            INVALID_CONFIGURATION,
            format!("unknown CNI_COMMAND {other:?}"),
            "ADD, DEL, CHECK or VERSION",
        )),
    }
}

/// An environment variable that must be set and not empty.
fn required(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<String, CniError> {
    env(name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(MISSING_ENVIRONMENT, format!("{name} is not set"), ""))
}

/// The request for this invocation's pod; `None` when it is not a Kubernetes pod.
fn request(
    env: &dyn Fn(&str) -> Option<String>,
    event: CniEvent,
    ips: Vec<IpAddr>,
) -> Result<Option<CniRequest>, CniError> {
    let args_text = env("CNI_ARGS").unwrap_or_default();
    let args = cni_args(&args_text);
    let arg = |key: &str| {
        args.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
            .filter(|v| !v.is_empty())
    };
    let (Some(pod_name), Some(pod_namespace)) = (arg("K8S_POD_NAME"), arg("K8S_POD_NAMESPACE"))
    else {
        return Ok(None);
    };
    Ok(Some(CniRequest {
        event,
        container_id: env("CNI_CONTAINERID").unwrap_or_default(),
        netns: env("CNI_NETNS").unwrap_or_default(),
        pod_name,
        pod_namespace,
        pod_uid: arg("K8S_POD_UID"),
        ips,
    }))
}

fn add(
    env: &dyn Fn(&str) -> Option<String>,
    config: &Config,
    agent: &dyn Agent,
) -> Result<String, CniError> {
    let Some(prev) = &config.prev_result else {
        return Err(CniError::new(
            INVALID_CONFIGURATION,
            "ztunnel-cni is a chained plugin: the configuration has no prevResult",
            "list it after the primary plugin in the node's conflist",
        ));
    };
    let passed = || {
        let mut result = prev.clone();
        if let Some(object) = result.as_object_mut() {
            object.insert("cniVersion".into(), config.version.clone().into());
        }
        result.to_string()
    };
    required(env, "CNI_CONTAINERID")?;
    required(env, "CNI_NETNS")?;
    let Some(request) = request(env, CniEvent::Add, result_ips(prev)?)? else {
        return Ok(passed());
    };
    let pod = format!("{}/{}", request.pod_namespace, request.pod_name);
    match agent.ask(&config.agent_socket, &request) {
        Ok(CniAnswer::Captured | CniAnswer::NotInMesh { .. }) => Ok(passed()),
        Ok(CniAnswer::Refused { reason }) => Err(CniError::new(
            REFUSED,
            format!("the ambient node agent could not capture pod {pod}"),
            reason,
        )),
        Ok(other) => Err(CniError::new(
            BAD_ANSWER,
            format!("the ambient node agent answered {other:?} to an ADD for pod {pod}"),
            "",
        )),
        Err(e) => {
            let unreachable = format!(
                "the ambient node agent cannot be reached at {}",
                config.agent_socket.display()
            );
            // Whether the pod needs the agent at all, from the API server.
            let Some(kubeconfig) = &config.kubeconfig else {
                return Err(CniError::new(
                    TRY_AGAIN_LATER,
                    unreachable,
                    format!(
                        "pod {pod}: {e} (and no kubernetes.kubeconfig to tell whether the pod is in the mesh)"
                    ),
                ));
            };
            let view = agent
                .pod(kubeconfig, &request.pod_namespace, &request.pod_name)
                .map_err(|lookup| {
                    CniError::new(
                        TRY_AGAIN_LATER,
                        unreachable.clone(),
                        format!("pod {pod}: {e}; and the API server cannot tell whether the pod is in the mesh: {lookup}"),
                    )
                })?;
            match config.enablement.admits(
                &request.pod_namespace,
                &view.labels,
                &view.annotations,
                &view.namespace_labels,
            ) {
                Err(skip) => {
                    eprintln!(
                        "ztunnel-cni: pod {pod} is not in the mesh ({skip}); the agent is down: {e}"
                    );
                    Ok(passed())
                }
                Ok(()) => Err(CniError::new(
                    TRY_AGAIN_LATER,
                    unreachable,
                    format!("pod {pod} is in the ambient mesh and cannot start uncaptured: {e}"),
                )),
            }
        }
    }
}

/// The `cni_config` fuzz target's body: `data` as the network configuration of an ADD, a DEL
/// and a CHECK for a Kubernetes pod, with an agent that cannot be reached and an API server
/// that answers nothing. Whatever `data` is, the plugin answers with a result or a CNI error
/// whose JSON is well formed, and never panics.
pub fn fuzz_config(data: &[u8]) {
    struct Nobody;
    impl Agent for Nobody {
        fn ask(&self, _: &Path, _: &CniRequest) -> std::io::Result<CniAnswer> {
            Err(std::io::Error::other("no agent"))
        }
        fn pod(&self, _: &Path, _: &str, _: &str) -> Result<PodView, String> {
            Err("no API server".into())
        }
    }
    for command in ["ADD", "DEL", "CHECK"] {
        let env = |name: &str| match name {
            "CNI_COMMAND" => Some(command.to_owned()),
            "CNI_CONTAINERID" => Some("c".to_owned()),
            "CNI_NETNS" => Some("/var/run/netns/x".to_owned()),
            "CNI_ARGS" => Some("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web".to_owned()),
            _ => None,
        };
        match run(&env, data, &Nobody) {
            Ok(out) if !out.is_empty() => {
                serde_json::from_str::<Value>(&out).expect("a result is JSON");
            }
            Ok(_) => {}
            Err(e) => {
                serde_json::from_str::<Value>(&e.to_json("1.0.0")).expect("an error is JSON");
            }
        }
    }
    let _ = common::k8s::parse_enablement_selectors(&String::from_utf8_lossy(data));
}
