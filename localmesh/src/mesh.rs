//! Bringing a mesh up and down, and changing it while it runs.
//!
//! `up` first removes whatever a previous mesh under the same prefix left behind (after a crash),
//! then builds, in order: the fabric (a bridge in its own namespace, joined to the host by a veth
//! so the host reaches every pod), the nodes (a namespace each, a bridge for its pods, routes to
//! the other nodes' pods, the service rules), the pods (a namespace each, a veth to their node,
//! `/etc/netns/<pod>/hosts` naming every service), the control plane (host namespace, TLS on the
//! host's fabric address), per node the node agent and the proxy (inside the node's namespace),
//! and the pods' apps. It returns once every proxy is ready. Processes are started in their own
//! process groups with their output in `RUN/logs`, so they outlive the command that started them;
//! `down` kills them (every process in the mesh's namespaces, and the control plane by its pid
//! file, checked against its command line) and removes every namespace, link, file and the run
//! directory.
//!
//! Every change (`apply`, `delete`, `label`) updates the state in `RUN/mesh.json`, rewrites the
//! control plane's manifests (which the control plane and the node agents watch), and makes or
//! removes pods and rules to match. `restart` restarts one part in place; a proxy the rolling
//! way ([`Stop::Rolling`]): the new one first, beside the old one, which drains once the new one
//! listens in every pod it listened in.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::net::{self, run, run_in};
use crate::plan::{Mesh, NetStep, PodPlan, Process};
use crate::{Config, Error, write_atomic};

/// The nat chain of the nodes' service rules.
const SERVICES_CHAIN: &str = "ZL-SERVICES";

/// Progress lines for the terminal.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Reads the running mesh's state.
pub fn load(config: &Config) -> Result<Mesh, Error> {
    let text = std::fs::read_to_string(config.state_file()).map_err(|_| Error::NotRunning {
        run_dir: config.run_dir.clone(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Io {
        what: format!("reading {}", config.state_file().display()),
        source: std::io::Error::other(e),
    })
}

fn save(config: &Config, mesh: &Mesh) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(mesh).map_err(|e| Error::Io {
        what: "encoding the mesh state".into(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(&config.state_file(), &text)
}

/// Whether the control plane recorded in the run directory is alive.
fn controlplane_alive(config: &Config) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(config.controlplane_pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("controlplane") && cmdline.contains(&*config.run_dir.to_string_lossy()))
        .then_some(pid)
}

/// Brings a mesh up from `docs`; stops (and cleans up) early when `cancel` is set.
pub fn up(
    config: &Config,
    docs: Vec<crate::plan::Doc>,
    cancel: &AtomicBool,
    progress: Progress<'_>,
) -> Result<Mesh, Error> {
    net::preflight(&config.backend, progress)?;
    if config.state_file().exists() && controlplane_alive(config).is_some() {
        return Err(Error::AlreadyRunning {
            run_dir: config.run_dir.clone(),
        });
    }
    let leftovers = net::namespaces(&config.prefix);
    if !leftovers.is_empty()
        || config.run_dir.exists()
        || net::host_link_exists(&config.host_link())
    {
        progress(&format!(
            "removing what an earlier mesh left behind ({} namespaces)",
            leftovers.len()
        ));
        down(config, &mut |_| {})?;
    }
    let result = build(config, docs, cancel, progress);
    if result.is_err() {
        progress("cleaning up after the failure");
        let _ = down(config, &mut |_| {});
    }
    result
}

fn check_cancel(cancel: &AtomicBool) -> Result<(), Error> {
    if cancel.load(Ordering::SeqCst) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

fn build(
    config: &Config,
    docs: Vec<crate::plan::Doc>,
    cancel: &AtomicBool,
    progress: Progress<'_>,
) -> Result<Mesh, Error> {
    let nodes: Vec<&str> = config.nodes.iter().map(String::as_str).collect();
    let mut mesh = Mesh::new(config.base, &nodes);
    mesh.ip_family = config.ip_family;
    mesh.secret_ttl_seconds = config.secret_ttl.map(|ttl| ttl.as_secs().max(1));
    mesh.apply(docs);
    for dir in [
        config.run_dir.clone(),
        config.manifests_dir(),
        config.run_dir.join("logs"),
        config.run_dir.join("tokens"),
    ] {
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    for node in &config.nodes {
        let dir = config.run_dir.join("logs").join(node);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    save(config, &mesh)?;
    write_atomic(
        &config.upstream_resolv_conf(),
        &config.upstream_resolv_conf_text(),
    )?;

    progress("creating the network: fabric and nodes");
    execute(&mesh.fabric_steps(config))?;
    for i in 0..config.nodes.len() {
        check_cancel(cancel)?;
        execute(&mesh.node_steps(config, i))?;
    }
    for pod in mesh.pods() {
        check_cancel(cancel)?;
        progress(&format!(
            "creating pod {}/{} on {} ({})",
            pod.placement.namespace,
            pod.placement.name,
            pod.placement.node,
            addresses(&mesh, &pod.placement)
        ));
        execute(&mesh.pod_steps(config, &pod))?;
    }
    refresh(config, &mesh)?;

    check_cancel(cancel)?;
    progress("starting the control plane");
    for node in &config.nodes {
        let token = config.token_file(node);
        let secret = format!("{:032x}{:032x}", rand_u128(), rand_u128());
        write_private(&token, &secret)?;
    }
    start_controlplane(config, &mesh, cancel)?;
    for node in &config.nodes {
        check_cancel(cancel)?;
        progress(&format!("starting {node}: node agent and proxy"));
        spawn(config, &mesh.node_agent_process(config, node))?;
        start_proxy(config, &mesh, node, cancel)?;
    }
    for pod in mesh.pods() {
        check_cancel(cancel)?;
        if let Some(app) = mesh.app_process(config, &pod) {
            spawn(config, &app)?;
        }
    }
    Ok(mesh)
}

/// Starts the control plane (its pid recorded) and waits until it serves.
fn start_controlplane(config: &Config, mesh: &Mesh, cancel: &AtomicBool) -> Result<u32, Error> {
    let addr = config.controlplane_addr();
    let cp = spawn(config, &mesh.controlplane_process(config))?;
    write_atomic(&config.controlplane_pid_file(), &cp.to_string())?;
    let root = config.root_cert();
    wait_for(
        cancel,
        "the control plane",
        config.log_file("controlplane", None).display(),
        || root.exists() && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
    )?;
    Ok(cp)
}

/// Starts node `node`'s proxy and waits until it is ready; returns its pid (`ip netns exec`
/// executes it in its own place).
fn start_proxy(
    config: &Config,
    mesh: &Mesh,
    node: &str,
    cancel: &AtomicBool,
) -> Result<u32, Error> {
    let i = mesh
        .node_index(node)
        .ok_or_else(|| Error::Usage(format!("no node {node}")))?;
    let pid = spawn(config, &mesh.proxy_process(config, node))?;
    let ready = SocketAddr::from((mesh.node_ip(i), common::ports::READINESS));
    wait_for(
        cancel,
        &format!("{node}'s proxy"),
        config.log_file("ztunnel", Some(node)).display(),
        || http_get(ready, "/healthz/ready").is_some_and(|(s, _)| s == 200),
    )?;
    Ok(pid)
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish();
    let mut h2 = std::collections::hash_map::RandomState::new().build_hasher();
    h2.write_u64(a);
    (u128::from(a) << 64) | u128::from(h2.finish())
}

fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    common::fs::write_private(path, &format!("{text}\n"))
        .map_err(io(format!("writing {}", path.display())))
}

fn wait_for(
    cancel: &AtomicBool,
    what: &str,
    logs: impl std::fmt::Display,
    mut ok: impl FnMut() -> bool,
) -> Result<(), Error> {
    let start = Instant::now();
    while !ok() {
        check_cancel(cancel)?;
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Timeout {
                what: what.to_owned(),
                logs: logs.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Starts `exe args` (in network namespace `ns` when given) in its own process group, output to
/// `log`; returns its pid.
/// Starts a process of the plan in its own process group (so it outlives this command), with
/// its output appended to its log; returns its pid.
fn spawn(config: &Config, process: &Process) -> Result<u32, Error> {
    let log = &process.log;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("opening {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io("duplicating a log descriptor"))?;
    let mut cmd = match &process.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&config.exe);
            c
        }
        None => Command::new(&config.exe),
    };
    cmd.args(&process.args)
        .envs(process.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = cmd.spawn().map_err(|e| Error::Command {
        command: format!("{} {}", config.exe.display(), process.args.join(" ")),
        reason: format!("cannot start it: {e}"),
    })?;
    Ok(child.id())
}

/// Runs network steps of the plan, in order.
fn execute(steps: &[NetStep]) -> Result<(), Error> {
    for step in steps {
        match step {
            NetStep::Namespace(ns) => net::add_namespace(ns)?,
            NetStep::Ip { netns, args } => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                match netns {
                    Some(ns) => net::ip(ns, &args).map(drop)?,
                    None => run("ip", &args).map(drop)?,
                }
            }
            NetStep::Forwarding(ns) => net::enable_forwarding(ns)?,
        }
    }
    Ok(())
}

/// Rewrites what follows from the documents: the control plane's manifests, the pods' hosts
/// files and the nodes' service rules.
fn refresh(config: &Config, mesh: &Mesh) -> Result<(), Error> {
    write_atomic(
        &config.manifests_dir().join("mesh.yaml"),
        &mesh.manifests_yaml(&config.prefix),
    )?;
    for pod in mesh.pods() {
        let ns = Mesh::pod_netns(&config.prefix, &pod.placement);
        net::write_hosts(&ns, &mesh.hosts_file(&pod.placement.namespace))?;
        net::write_resolv_conf(&ns, &mesh.resolv_conf(&pod.placement))?;
    }
    let mut families = Vec::new();
    if mesh.ip_family.v4() {
        families.push(false);
    }
    if mesh.ip_family.v6() {
        families.push(true);
    }
    for v6 in families {
        let rules = mesh.service_rules(SERVICES_CHAIN, v6);
        let tool = if v6 { "ip6tables" } else { "iptables" };
        for node in &config.nodes {
            let ns = config.node_ns(node);
            net::iptables_restore_in(&ns, &rules, v6)?;
            if run_in(
                &ns,
                tool,
                &["-t", "nat", "-C", "PREROUTING", "-j", SERVICES_CHAIN],
            )
            .is_err()
            {
                run_in(
                    &ns,
                    tool,
                    &["-t", "nat", "-A", "PREROUTING", "-j", SERVICES_CHAIN],
                )?;
            }
        }
    }
    Ok(())
}

/// Applies documents to the running mesh: new pods are created and started, removed ones
/// deleted, and everything rewritten.
pub fn apply(
    config: &Config,
    docs: Vec<crate::plan::Doc>,
    delete: bool,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let mut mesh = load(config)?;
    let before = mesh.pods();
    let changes = if delete {
        mesh.delete(&docs)
    } else {
        mesh.apply(docs)
    };
    let after = mesh.pods();
    for gone in before
        .iter()
        .filter(|b| !after.iter().any(|a| a.placement == b.placement))
    {
        progress(&format!(
            "deleting pod {}/{}",
            gone.placement.namespace, gone.placement.name
        ));
        net::delete_namespace(&Mesh::pod_netns(&config.prefix, &gone.placement));
        let _ = std::fs::remove_file(config.pod_log(&gone.placement));
    }
    let new: Vec<&PodPlan> = after
        .iter()
        .filter(|a| !before.iter().any(|b| b.placement == a.placement))
        .collect();
    for pod in &new {
        progress(&format!(
            "creating pod {}/{} on {} ({})",
            pod.placement.namespace,
            pod.placement.name,
            pod.placement.node,
            addresses(&mesh, &pod.placement)
        ));
        execute(&mesh.pod_steps(config, pod))?;
    }
    save(config, &mesh)?;
    refresh(config, &mesh)?;
    for pod in new {
        if let Some(app) = mesh.app_process(config, pod) {
            spawn(config, &app)?;
        }
    }
    for c in changes {
        progress(&c);
    }
    Ok(())
}

/// Changes labels of a namespace (`k=v` sets, `k-` removes).
pub fn label(
    config: &Config,
    ns: &str,
    changes: &[String],
    progress: Progress<'_>,
) -> Result<(), Error> {
    let mut mesh = load(config)?;
    let said = mesh.label_namespace(ns, changes).map_err(Error::Usage)?;
    save(config, &mesh)?;
    refresh(config, &mesh)?;
    progress(&said);
    Ok(())
}

/// Stops everything and removes every trace: processes, namespaces, links, files.
pub fn down(config: &Config, progress: Progress<'_>) -> Result<(), Error> {
    let namespaces = net::namespaces(&config.prefix);
    // Pods and nodes first (their processes die with them), the fabric last.
    let (fabric, rest): (Vec<String>, Vec<String>) = namespaces
        .into_iter()
        .partition(|n| *n == config.fabric_ns());
    for ns in rest.iter().chain(fabric.iter()) {
        progress(&format!("removing {ns}"));
        net::delete_namespace(ns);
    }
    if let Some(pid) = controlplane_alive(config) {
        progress("stopping the control plane");
        let _ = run("kill", &["-9", &pid.to_string()]);
    }
    if net::host_link_exists(&config.host_link()) {
        let _ = run("ip", &["link", "del", &config.host_link()]);
    }
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{}-", config.prefix))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if config.run_dir.exists() {
        std::fs::remove_dir_all(&config.run_dir)
            .map_err(io(format!("removing {}", config.run_dir.display())))?;
    }
    let left = net::namespaces(&config.prefix);
    if !left.is_empty() {
        return Err(Error::Usage(format!(
            "namespaces could not be removed: {}",
            left.join(", ")
        )));
    }
    Ok(())
}

/// One HTTP GET from this process (host namespace): (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).ok()?;
    let a = crate::app::parse_response(&bytes).ok()?;
    Some((a.status, a.body))
}

/// The network namespace of a pod named `pod` (`NAME` in `default`, or `NAMESPACE/NAME`; a
/// Deployment name means its first pod).
pub fn find_pod(config: &Config, mesh: &Mesh, pod: &str) -> Result<(PodPlan, String), Error> {
    let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
    let plan = mesh.pod(ns, name).ok_or_else(|| {
        Error::Usage(format!(
            "no pod {ns}/{name}; pods: {}",
            mesh.pods()
                .iter()
                .map(|p| format!("{}/{}", p.placement.namespace, p.placement.name))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let netns = Mesh::pod_netns(&config.prefix, &plan.placement);
    Ok((plan, netns))
}

/// Runs `cmd` inside a pod's network namespace (with its hosts file); returns its exit code.
pub fn exec(config: &Config, pod: &str, cmd: &[String]) -> Result<i32, Error> {
    let mesh = load(config)?;
    let (_, netns) = find_pod(config, &mesh, pod)?;
    if cmd.is_empty() {
        return Err(Error::Usage(
            "nothing to run: ztunnel local exec POD -- CMD...".into(),
        ));
    }
    let status = Command::new("ip")
        .args(["netns", "exec", &netns])
        .args(cmd)
        .status()
        .map_err(io("running ip netns exec"))?;
    Ok(status.code().unwrap_or(1))
}

/// The current view: nodes, proxies' readiness, pods with address, node, capture and
/// certificate.
pub fn status(config: &Config) -> Result<String, Error> {
    let mesh = load(config)?;
    let mut out = String::new();
    let cp = controlplane_alive(config);
    out.push_str(&format!(
        "control plane: {} at {}\n",
        cp.map_or("NOT RUNNING".to_owned(), |pid| format!(
            "running (pid {pid})"
        )),
        config.controlplane_addr()
    ));
    let mut served: Vec<(String, serde_json::Value)> = Vec::new();
    for (i, node) in config.nodes.iter().enumerate() {
        let ready = http_get(
            SocketAddr::from((mesh.node_ip(i), common::ports::READINESS)),
            "/healthz/ready",
        );
        out.push_str(&format!(
            "node {node} ({}): proxy {}\n",
            mesh.node_ip(i),
            match ready {
                Some((200, _)) => "ready".to_owned(),
                Some((_, body)) => format!("not ready ({})", body.trim()),
                None => "NOT RUNNING".to_owned(),
            }
        ));
        if let Some(dump) = admin_dump(config, node) {
            for p in dump["pods"].as_array().into_iter().flatten() {
                served.push((node.clone(), p.clone()));
            }
        }
    }
    out.push_str("pods:\n");
    for pod in mesh.pods() {
        let p = &pod.placement;
        let info = served
            .iter()
            .find(|(_, d)| d["namespace"] == p.namespace.as_str() && d["name"] == p.name.as_str());
        let (captured, cert) = match info {
            Some((_, d)) => (
                "captured",
                d["certificateExpiry"]
                    .as_str()
                    .map_or("certificate pending".to_owned(), |e| {
                        format!("certificate until {e}")
                    }),
            ),
            None => ("not captured", String::new()),
        };
        out.push_str(&format!(
            "  {}/{} on {} at {}: {captured} {cert}\n",
            p.namespace,
            p.name,
            p.node,
            addresses(&mesh, p)
        ));
    }
    out.push_str("services:\n");
    for s in mesh.services() {
        out.push_str(&format!(
            "  {}/{} at {} ports {:?} endpoints {:?}\n",
            s.namespace, s.name, s.vip, s.ports, s.endpoints
        ));
    }
    Ok(out)
}

/// The node proxy's `/config_dump` (its admin port listens on the node's loopback).
pub fn admin_dump(config: &Config, node: &str) -> Option<serde_json::Value> {
    let out = run_in(
        &config.node_ns(node),
        &config.exe.to_string_lossy(),
        &["local", "get", "http://127.0.0.1:15000/config_dump"],
    )
    .ok()?;
    serde_json::from_str(&out).ok()
}

/// The log of a part: `ztunnel` or `node-agent` (of `node`, or all nodes), or `controlplane`.
pub fn logs(config: &Config, part: &str, node: Option<&str>) -> Result<String, Error> {
    load(config)?;
    let files: Vec<(String, PathBuf)> = match part {
        "controlplane" => vec![("controlplane".into(), config.log_file("controlplane", None))],
        "ztunnel" | "node-agent" => config
            .nodes
            .iter()
            .filter(|n| node.is_none_or(|want| want == n.as_str()))
            .map(|n| (format!("{part} on {n}"), config.log_file(part, Some(n))))
            .collect(),
        other => {
            return Err(Error::Usage(format!(
                "no logs for {other:?}: use ztunnel, node-agent or controlplane"
            )));
        }
    };
    if files.is_empty() {
        return Err(Error::Usage(format!("no node {:?}", node.unwrap_or(""))));
    }
    let mut out = String::new();
    for (title, file) in files {
        if out.is_empty() && node.is_some() || part == "controlplane" {
            out.push_str(&std::fs::read_to_string(&file).unwrap_or_default());
        } else {
            out.push_str(&format!("==> {title} <==\n"));
            out.push_str(&std::fs::read_to_string(&file).unwrap_or_default());
        }
    }
    Ok(out)
}

/// A pod's addresses for people: the first, then the others in parentheses
/// (`10.250.1.10 (fd7a:afa:1::a)`).
fn addresses(mesh: &Mesh, p: &crate::plan::Placement) -> String {
    let all = mesh.pod_addresses(p);
    match all.split_first() {
        None => p.ip.to_string(),
        Some((first, [])) => first.to_string(),
        Some((first, rest)) => format!(
            "{first} ({})",
            rest.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A part of the mesh that runs as a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// The control plane (on the host).
    ControlPlane,
    /// A node's agent.
    NodeAgent,
    /// A node's proxy.
    Proxy,
}

/// The pids of `part` (of `node`, for a node's part) now running, oldest first.
pub fn pids(config: &Config, part: Part, node: Option<&str>) -> Vec<u32> {
    if part == Part::ControlPlane {
        return controlplane_alive(config).into_iter().collect();
    }
    let Some(node) = node else {
        return Vec::new();
    };
    let listed = run("ip", &["netns", "pids", &config.node_ns(node)]).unwrap_or_default();
    let verb = match part {
        Part::NodeAgent => "node-agent",
        _ => "proxy",
    };
    let mut found: Vec<(u64, u32)> = listed
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            // Our binary's own process (not the `ip netns exec` wrapper, gone after exec).
            let ours = args
                .first()
                .is_some_and(|a| *a == *config.exe.to_string_lossy());
            (ours && args.get(1).is_some_and(|a| a == verb)).then_some(pid)
        })
        .map(|pid| (start_time(pid), pid))
        .collect();
    found.sort();
    found.into_iter().map(|(_, pid)| pid).collect()
}

/// A process's start time in clock ticks since boot (0 when it is gone).
fn start_time(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            after.split_whitespace().nth(19)?.parse().ok()
        })
        .unwrap_or(0)
}

/// How a part is stopped and started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, and up to 10 s to exit (then SIGKILL); then started again.
    Graceful,
    /// SIGKILL; then started again.
    Kill,
    /// A proxy only: the new one first, beside the old (its listeners in every pod join the old
    /// one's, `SO_REUSEPORT`); once it serves every pod it takes the old one's live connections
    /// (HBONE both ways, passthrough, inbound plaintext) over the handoff socket, and the old
    /// one drains what could not move and
    /// exits by itself (SIGTERM if it has not within 20 s: its connections then have the drain
    /// deadline, and are cut).
    Rolling,
}

/// What a restart did.
#[derive(Debug, Clone)]
pub struct Restarted {
    /// The pids stopped.
    pub old: Vec<u32>,
    /// The new process's pid.
    pub new: u32,
    /// When the old processes were signalled.
    pub signalled: Instant,
    /// When the old processes had exited.
    pub exited: Instant,
}

/// Restarts `part` (of `node`) as `how` says and waits until it serves again (the control
/// plane's port answers, a proxy is ready or, rolling, listens in every pod the old one served;
/// an agent is given its start). The mesh's pods and rules are left as they are.
pub fn restart(
    config: &Config,
    part: Part,
    node: Option<&str>,
    how: Stop,
) -> Result<Restarted, Error> {
    let mesh = load(config)?;
    let old = pids(config, part, node);
    let never = AtomicBool::new(false);
    if how == Stop::Rolling {
        let (Part::Proxy, Some(node)) = (part, node) else {
            return Err(Error::Usage(
                "only a node's proxy restarts the rolling way".into(),
            ));
        };
        let new = start_beside(config, &mesh, node, &old)?;
        let signalled = Instant::now();
        if !exited_within(&old, HANDOFF_WAIT) {
            stop(&old, "-TERM", part)?;
        }
        return Ok(Restarted {
            old,
            new,
            signalled,
            exited: Instant::now(),
        });
    }
    let signalled = Instant::now();
    stop(
        &old,
        if how == Stop::Kill { "-KILL" } else { "-TERM" },
        part,
    )?;
    let exited = Instant::now();
    let new = match (part, node) {
        (Part::ControlPlane, _) => start_controlplane(config, &mesh, &never),
        (Part::NodeAgent, Some(node)) => spawn(config, &mesh.node_agent_process(config, node)),
        (Part::Proxy, Some(node)) => start_proxy(config, &mesh, node, &never),
        (_, None) => Err(Error::Usage(format!("{part:?} needs a node"))),
    }?;
    Ok(Restarted {
        old,
        new,
        signalled,
        exited,
    })
}

/// How long a rolling restart waits for the old proxy to hand over and exit by itself.
const HANDOFF_WAIT: Duration = Duration::from_secs(20);

/// Whether `pids` have all exited within `limit`.
fn exited_within(pids: &[u32], limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if pids.iter().all(|pid| {
            reap(*pid);
            zombie(*pid)
        }) {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` to `pids` and waits until they have exited (SIGKILL after 10 s).
fn stop(pids: &[u32], signal: &str, part: Part) -> Result<(), Error> {
    for pid in pids {
        let _ = run("kill", &[signal, &pid.to_string()]);
    }
    let start = Instant::now();
    while pids.iter().any(|pid| {
        reap(*pid);
        !zombie(*pid)
    }) {
        if start.elapsed() > Duration::from_secs(10) {
            for pid in pids {
                let _ = run("kill", &["-KILL", &pid.to_string()]);
            }
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err(Error::Usage(format!("{part:?} {pids:?} did not exit")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts a second proxy on `node` beside `old` and waits until it listens on the proxy ports
/// in every pod namespace where one of `old` does; returns its pid.
fn start_beside(config: &Config, mesh: &Mesh, node: &str, old: &[u32]) -> Result<u32, Error> {
    let new = spawn(config, &mesh.proxy_process(config, node))?;
    let log = config.log_file("ztunnel", Some(node));
    let netns: Vec<String> = mesh
        .pods()
        .iter()
        .filter(|p| p.placement.node == node)
        .map(|p| Mesh::pod_netns(&config.prefix, &p.placement))
        .collect();
    let mut missing = String::new();
    let serves_all = |missing: &mut String| {
        missing.clear();
        for ns in &netns {
            let owners = proxy_port_owners(ns);
            for (port, pids) in &owners {
                if pids.iter().any(|p| old.contains(p)) && !pids.contains(&new) {
                    *missing = format!("{ns} port {port}");
                    return false;
                }
            }
        }
        true
    };
    let start = Instant::now();
    while !serves_all(&mut missing) {
        if zombie(new) {
            return Err(Error::Usage(format!(
                "{node}'s new proxy (pid {new}) exited; see {}",
                log.display()
            )));
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Timeout {
                what: format!("{node}'s new proxy (pid {new}) to listen in {missing}"),
                logs: log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(new)
}

/// For each proxy port (outbound, inbound plaintext, inbound HBONE) listened on in network
/// namespace `ns`, the pids whose sockets listen there (`ss`, iproute2).
fn proxy_port_owners(ns: &str) -> std::collections::BTreeMap<u16, Vec<u32>> {
    listeners_by_port(&run_in(ns, "ss", &["-Hltnp"]).unwrap_or_default())
}

/// The proxy ports in `ss -Hltnp`'s listing, each with the pids whose sockets listen on it.
fn listeners_by_port(listed: &str) -> std::collections::BTreeMap<u16, Vec<u32>> {
    let mut owners = std::collections::BTreeMap::<u16, Vec<u32>>::new();
    for line in listed.lines() {
        let Some(local) = line.split_whitespace().nth(3) else {
            continue;
        };
        let Some(port) = local
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .filter(|p| common::ports::PROXY_PORTS.contains(p))
        else {
            continue;
        };
        let pids = owners.entry(port).or_default();
        for part in line.split("pid=").skip(1) {
            if let Some(pid) = part
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|p| p.parse().ok())
            {
                pids.push(pid);
            }
        }
    }
    owners
}

/// Collects `pid`'s exit when it is this process's child (a part this process started), so it
/// leaves no zombie behind; nothing for anyone else's.
fn reap(pid: u32) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Whether `pid` is gone or has exited without being reaped (it serves nothing either way).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_of_ss_gives_each_proxy_port_its_listening_pids() {
        let listed = "\
LISTEN 0      1024         0.0.0.0:15008      0.0.0.0:*    users:((\"ztunnel\",pid=101,fd=20))
LISTEN 0      1024         0.0.0.0:15008      0.0.0.0:*    users:((\"ztunnel\",pid=202,fd=31))
LISTEN 0      1024            [::]:15001         [::]:*    users:((\"ztunnel\",pid=101,fd=22),(\"ztunnel\",pid=303,fd=7))
LISTEN 0      128          0.0.0.0:8080       0.0.0.0:*    users:((\"app\",pid=55,fd=3))
LISTEN 0      4096               *:15006            *:*
";
        let owners = listeners_by_port(listed);
        assert_eq!(owners[&15008], vec![101, 202]);
        assert_eq!(owners[&15001], vec![101, 303]);
        assert_eq!(owners[&15006], Vec::<u32>::new());
        assert!(!owners.contains_key(&8080));
    }
}
