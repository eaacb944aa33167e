//! `ztunnel local` (root needed: it makes network namespaces, links and routes). Each test runs
//! its own mesh under its own prefix, subnet and run directory, so they run in parallel without
//! meeting, and each checks that nothing of it is left afterwards.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run, ztunnel};

/// One test's mesh; `down` on drop, whatever happened.
struct Local {
    prefix: String,
    subnet: String,
    run_dir: PathBuf,
}

impl Local {
    fn new(n: u8) -> Self {
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test needs root (CI runs as root)"
        );
        Local {
            prefix: format!("zt{n}"),
            subnet: format!("10.{}", 240 + n),
            run_dir: std::env::temp_dir().join(format!("ztunnel-local-{}-{n}", std::process::id())),
        }
    }

    fn cmd(&self, args: &[impl AsRef<std::ffi::OsStr>]) -> Command {
        let mut c = ztunnel();
        c.arg("local")
            .args(["--prefix", &self.prefix, "--subnet", &self.subnet])
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(args);
        c
    }

    /// Runs a verb; (success, stdout, stderr).
    fn run(&self, args: &[impl AsRef<std::ffi::OsStr>]) -> (bool, String, String) {
        let out = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn up(&self) {
        let (ok, _, err) = self.run(&["up"]);
        assert!(ok, "up failed: {err}");
    }

    /// In-pod GET through `ztunnel local exec POD -- ztunnel local get URL`.
    fn get(&self, pod: &str, url: &str) -> (bool, String) {
        let exe = ztunnel().get_program().to_owned();
        let (ok, out, err) = self.run(&[
            "exec",
            pod,
            "--",
            &exe.to_string_lossy(),
            "local",
            "get",
            url,
        ]);
        (ok, if ok { out } else { err })
    }

    /// Everything of this mesh that exists on the machine.
    fn traces(&self) -> Vec<String> {
        let mut found = Vec::new();
        let p = format!("{}-", self.prefix);
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for l in String::from_utf8_lossy(&netns.stdout).lines() {
            if l.starts_with(&p) {
                found.push(format!("netns {l}"));
            }
        }
        let links = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        for l in String::from_utf8_lossy(&links.stdout).lines() {
            if l.contains(&format!(": {p}")) {
                found.push(format!("link {l}"));
            }
        }
        let routes = Command::new("ip").args(["route", "show"]).output().unwrap();
        for l in String::from_utf8_lossy(&routes.stdout).lines() {
            if l.starts_with(&format!("{}.", self.subnet)) {
                found.push(format!("route {l}"));
            }
        }
        for (tool, args) in [("iptables-save", vec![]), ("nft", vec!["list", "ruleset"])] {
            if let Ok(out) = Command::new(tool).args(&args).output()
                && String::from_utf8_lossy(&out.stdout).contains(&format!("{}.", self.subnet))
            {
                found.push(format!("host {tool} rules mention {}", self.subnet));
            }
        }
        if let Ok(entries) = std::fs::read_dir("/etc/netns") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&p) {
                    found.push(format!("/etc/netns/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        if self.run_dir.exists() {
            found.push(format!("run directory {}", self.run_dir.display()));
        }
        for proc_dir in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(proc_dir.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // The run directory as a whole path component (`...-1/`, not `...-12/`).
            let ours = format!("{}/", self.run_dir.display());
            if cmdline.contains(&ours) && !cmdline.contains(" local ") {
                found.push(format!("process {cmdline}"));
            }
        }
        found
    }

    /// Labels `default` ambient and waits until each of `pods` (`<name>-0`) is captured.
    fn label_default_ambient(&self, pods: &[&str]) {
        let (ok, _, err) = self.run(&[
            "label",
            "namespace",
            "default",
            "istio.io/dataplane-mode=ambient",
        ]);
        assert!(ok, "{err}");
        self.wait("the pods captured", || {
            pods.iter().all(|pod| self.captured(pod))
        });
    }

    /// Whether `status` says `default/<pod>-0` is captured.
    fn captured(&self, pod: &str) -> bool {
        let (_, out, _) = self.run(&["status"]);
        out.lines()
            .any(|l| l.contains(&format!("default/{pod}-0 ")) && l.contains(": captured"))
    }

    fn wait(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["down"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn the_tutorial_passes_every_step_and_leaves_nothing_behind() {
    let mesh = Local::new(1);
    let start = Instant::now();
    let (ok, out, err) = mesh.run(&["tutorial"]);
    assert!(ok, "tutorial failed:\n{out}\n{err}");
    for expected in [
        "step 1:",
        "step 2:",
        "Adding pod 'web-api-0/default'",
        "app processes unchanged (no restart): true",
        "100/100 succeeded",
        "sleep -> web-api: 0/100 succeeded",
        "HTTP 502",
        "HTTP 200 web-api -> recommendation -> purchase-history",
        "notsleep -> web-api: 0/20 succeeded",
        "connection denied by policy",
        "istio_tcp_received_bytes_total{",
        "tutorial OK",
    ] {
        assert!(out.contains(expected), "{expected:?} missing in:\n{out}");
    }
    eprintln!("tutorial took {:?}", start.elapsed());
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

#[test]
fn up_and_down_leave_no_trace_and_a_second_up_is_refused() {
    let mesh = Local::new(2);
    assert_eq!(mesh.traces(), Vec::<String>::new());
    mesh.up();
    assert!(!mesh.traces().is_empty());
    let (ok, out, _) = mesh.run(&["status"]);
    assert!(
        ok && out.contains("node node-a") && out.contains("proxy ready"),
        "{out}"
    );
    let (ok, _, err) = mesh.run(&["up"]);
    assert!(!ok && err.contains("already running"), "{err}");
    // The tutorial refuses too, and leaves the running mesh alone.
    let (ok, _, err) = mesh.run(&["tutorial"]);
    assert!(!ok && err.contains("already running"), "{err}");
    let (ok, out, _) = mesh.run(&["status"]);
    assert!(ok && out.contains("proxy ready"), "{out}");
    let (ok, _, err) = mesh.run(&["down"]);
    assert!(ok, "{err}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
    // Verbs without a mesh say so.
    let (ok, _, err) = mesh.run(&["status"]);
    assert!(!ok && err.contains("no local mesh is running"), "{err}");
}

#[test]
fn ctrl_c_during_up_removes_what_was_made() {
    let mesh = Local::new(3);
    let mut child = mesh
        .cmd(&["up"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "up ended early: {seen}"
        );
        seen.push_str(&line);
        if line.contains("creating pod") {
            break;
        }
    }
    assert!(run("kill", &["-INT", &child.id().to_string()]));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(rest.contains("interrupted"), "{seen}{rest}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

#[test]
fn down_works_after_the_proxy_and_the_control_plane_were_killed() {
    let mesh = Local::new(4);
    mesh.up();
    let node_ns = format!("{}-node-a", mesh.prefix);
    let pids = Command::new("ip")
        .args(["netns", "pids", &node_ns])
        .output()
        .unwrap();
    let mut killed = 0;
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("proxy") {
            assert!(run("kill", &["-9", pid]));
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "node-a's proxy");
    let cp = std::fs::read_to_string(mesh.run_dir.join("controlplane.pid")).unwrap();
    assert!(run("kill", &["-9", cp.trim()]));
    let (ok, _, err) = mesh.run(&["down"]);
    assert!(ok, "{err}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

#[test]
fn labelling_back_releases_the_pods_without_restarting_them() {
    let mesh = Local::new(5);
    mesh.up();
    let web_pids = || {
        let ns = format!("{}-pod-default-web-api-0", mesh.prefix);
        let out = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before = web_pids();
    assert!(!before.is_empty());
    let captured = |pod: &str| mesh.captured(pod);
    mesh.label_default_ambient(&["sleep", "web-api"]);
    let (ok, body) = mesh.get("sleep", "http://web-api:8080/");
    assert!(ok && body.contains("purchase-history"), "{body}");
    let (_, logs, _) = mesh.run(&["logs", "ztunnel", "--node", "node-b"]);
    assert!(
        logs.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "the call was not tunneled"
    );

    let (ok, _, err) = mesh.run(&["label", "namespace", "default", "istio.io/dataplane-mode-"]);
    assert!(ok, "{err}");
    mesh.wait("sleep and web-api released", || {
        !captured("sleep") && !captured("web-api")
    });
    let (_, agent, _) = mesh.run(&["logs", "node-agent"]);
    assert!(
        agent.contains("Removing pod 'web-api-0/default'"),
        "{agent}"
    );
    let (ok, body) = mesh.get("sleep", "http://web-api:8080/");
    assert!(
        ok && body.contains("purchase-history"),
        "direct call after release: {body}"
    );
    assert_eq!(web_pids(), before, "the app restarted");
    let (ok, _, err) = mesh.run(&["down"]);
    assert!(ok, "{err}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

/// The script of the mixed loads: echo streams beside HTTP calls, every byte and answer checked.
const MIX_LOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mix_load.py");

/// Held by a test that runs a mixed load for its whole length: two at once on a 2-core machine
/// would measure each other (their throughput and stall limits), not the mesh.
static MIXED_LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Brings `mesh` up with the default namespace ambient and an echo server (port 9090) in
/// web-api's pod; returns the running server and its address.
fn mixed_load_mesh(mesh: &Local) -> (common::Running, String) {
    mesh.up();
    let (ok, _, err) = mesh.run(&[
        "label",
        "namespace",
        "default",
        "istio.io/dataplane-mode=ambient",
    ]);
    assert!(ok, "{err}");
    mesh.wait("sleep and web-api captured", || {
        mesh.captured("sleep") && mesh.captured("web-api")
    });
    let web_ns = format!("{}-pod-default-web-api-0", mesh.prefix);
    let addr = Command::new("ip")
        .args(["-n", &web_ns, "-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    let web_ip = String::from_utf8_lossy(&addr.stdout)
        .split_whitespace()
        .find_map(|w| {
            w.split('/')
                .next()
                .filter(|ip| ip.starts_with(&format!("{}.", mesh.subnet)))
                .map(str::to_owned)
        })
        .expect("web-api's pod address");
    let mut echo = common::Running(
        Command::new("ip")
            .args([
                "netns", "exec", &web_ns, "python3", MIX_LOAD, "echo", "9090",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    BufReader::new(echo.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready", "the echo server did not start");
    (echo, format!("{web_ip}:9090"))
}

/// `local exec sleep -- python3 mix_load.py load ...`: 20 echo streams of 100 KB/s each to
/// `echo_addr` beside HTTP calls to web-api:8080 at `rate` a second, for `seconds`.
fn mixed_load_args(echo_addr: &str, rate: u32, seconds: u32) -> Vec<String> {
    [
        "exec",
        "sleep",
        "--",
        "python3",
        MIX_LOAD,
        "load",
        "--echo",
        echo_addr,
        "--http",
        "web-api:8080",
        "--streams",
        "20",
        "--stream-rate",
        "100000",
        "--rate",
        &rate.to_string(),
        "--seconds",
        &seconds.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

#[test]
fn long_lived_streams_beside_short_calls_never_stall() {
    // 20 echo streams of 100 KB/s each from sleep to web-api's pod, every byte checked on its
    // way back, beside HTTP calls from sleep to web-api:8080 (-> recommendation ->
    // purchase-history) at 100 a second: no call may take 2 s, no stream may sit 2 s with bytes
    // outstanding. (The outbound proxy's first read of a new connection once lost the wake-up
    // for bytes that arrived during it: 1 call in about 4,300 of this mix waited for its
    // timeout.)
    let _alone = MIXED_LOAD.lock().unwrap_or_else(|p| p.into_inner());
    let mesh = Local::new(6);
    let (echo, echo_addr) = mixed_load_mesh(&mesh);
    let (ok, out, err) = mesh.run(&mixed_load_args(&echo_addr, 100, 30));
    assert!(ok, "the load did not run: {err}");
    let stats: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    eprintln!("mixed load: {stats}");
    for key in [
        "call_failures",
        "call_stalls",
        "echo_mismatches",
        "stream_stalls",
        "stream_failures",
        "stream_short",
    ] {
        assert_eq!(stats[key], 0, "{key}: {stats}");
    }
    assert!(stats["calls"].as_u64().unwrap() >= 2_500, "{stats}");
    // 20 streams for 30 s at 100 KB/s each: about 60 MB echoed.
    assert!(
        stats["echo_bytes"].as_u64().unwrap() >= 40_000_000,
        "{stats}"
    );
    drop(echo);
    let (ok, _, err) = mesh.run(&["down"]);
    assert!(ok, "{err}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

#[test]
fn a_pods_own_resolver_is_answered_by_the_node_proxy() {
    let mesh = Local::new(7);
    mesh.up();
    mesh.label_default_ambient(&["sleep"]);
    // From sleep: ask the nameserver of the pod's resolv.conf, on port 53 as any resolver does;
    // the DNS capture sends it to the node proxy, which answers with the service's address (the
    // one the pod's hosts file also names).
    let (rcode, ip) = resolve_in(&mesh, "sleep", "web-api.default.svc.cluster.local");
    assert_eq!(rcode, 0);
    let (ok, hosts, err) = mesh.run(&["exec", "sleep", "--", "cat", "/etc/hosts"]);
    assert!(ok, "{err}");
    let listed = hosts
        .lines()
        .find(|l| l.contains(" web-api.default.svc.cluster.local"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{hosts}"));
    assert_eq!(ip, listed, "the proxy's answer and the hosts file differ");
}

#[test]
fn the_app_sees_its_callers_own_address_through_either_inbound_port() {
    let mesh = Local::new(8);
    mesh.up();
    mesh.label_default_ambient(&["sleep", "web-api"]);
    let (_, status, _) = mesh.run(&["status"]);
    let ip_of = |pod: &str| -> String {
        status
            .lines()
            .find(|l| l.contains(&format!("/{pod}-0 on ")))
            .and_then(|l| l.split(" at ").nth(1))
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_else(|| panic!("no address for {pod} in\n{status}"))
            .to_owned()
    };
    let remote = |answer: &str| -> String {
        answer
            .trim()
            .strip_prefix("remote=")
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| panic!("not a whoami answer: {answer}"))
    };
    // Through HBONE: sleep's tunnel ends in web-api's proxy, which calls the app from sleep's
    // address, not from web-api's own.
    let url = "http://web-api.default.svc.cluster.local:8080/whoami";
    let (ok, answer) = mesh.get("sleep", url);
    assert!(ok, "{answer}");
    assert_eq!(
        remote(&answer),
        ip_of("sleep"),
        "web-api is {}",
        ip_of("web-api")
    );
    // Through the plaintext inbound port: the host is not in the mesh, its call to web-api's
    // pod is captured on web-api's side only; the app still sees the host's address.
    let host = format!("{}.0.1", mesh.subnet);
    let out = mesh
        .cmd(&["get", &format!("http://{}:8080/whoami", ip_of("web-api"))])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(remote(&answer), host);
    // The proxy logs a connection when it ends, a moment after the client saw its answer.
    let logged = || {
        let log = std::fs::read_to_string(mesh.run_dir.join("logs/node-b/ztunnel.log")).unwrap();
        log.lines().any(|l| {
            l.contains("direction=\"inbound\"")
                && l.contains(&format!("src.addr={host}:"))
                && l.contains("src.identity=\"-\"")
        })
    };
    let start = Instant::now();
    while !logged() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        logged(),
        "the host's call did not go through web-api's plaintext inbound:\n{}",
        std::fs::read_to_string(mesh.run_dir.join("logs/node-b/ztunnel.log")).unwrap()
    );
}

#[test]
fn with_both_families_sleep_reaches_web_api_over_ipv6_through_hbone() {
    let mesh = Local::new(9);
    let (ok, _, err) = mesh.run(&["up", "--ip-family", "dual"]);
    assert!(ok, "up failed: {err}");
    mesh.label_default_ambient(&["sleep", "web-api"]);
    let (_, status, _) = mesh.run(&["status"]);
    // `default/web-api at 10.96.0.10 ports ...`: the IPv6 VIP goes with the IPv4 one.
    let v6 = |v4: &str| -> String {
        let o: Vec<u16> = v4.split('.').map(|x| x.parse().unwrap()).collect();
        let base = (o[0] << 8) | o[1];
        format!("fd7a:{base:x}:{:x}::{:x}", o[2], o[3])
    };
    let sleep6 = {
        let line = status
            .lines()
            .find(|l| l.contains("default/sleep-0 on "))
            .unwrap_or_else(|| panic!("{status}"));
        let inner = line.split(" (").nth(1).and_then(|r| r.split(')').next());
        inner
            .unwrap_or_else(|| panic!("no IPv6 address: {line}"))
            .to_owned()
    };
    let subnet: Vec<u16> = mesh.subnet.split('.').map(|x| x.parse().unwrap()).collect();
    assert_eq!(
        sleep6,
        v6(&format!("{}.{}.1.10", subnet[0], subnet[1])),
        "{status}"
    );
    let vip6 = format!("fd7a:{:x}:ff96::a", (subnet[0] << 8) | subnet[1]);
    let (ok, answer) = mesh.get("sleep", &format!("http://[{vip6}]:8080/"));
    assert!(ok, "{answer}");
    assert_eq!(answer, "web-api -> recommendation -> purchase-history\n");
    let (ok, answer) = mesh.get("sleep", &format!("http://[{vip6}]:8080/whoami"));
    assert!(ok, "{answer}");
    assert!(
        answer.starts_with(&format!("remote=[{sleep6}]:")),
        "web-api did not see sleep's IPv6 address: {answer}"
    );
    // The client's proxy tunnelled over IPv6 with mutual TLS.
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(mesh.run_dir.join("logs/node-a/ztunnel.log")).unwrap();
        let tunnelled = log.lines().any(|l| {
            l.contains("direction=\"outbound\"")
                && l.contains(&format!("src.addr=[{sleep6}]:"))
                && l.contains(&format!("dst.addr=[{vip6}]:8080"))
                && l.contains("dst.hbone_addr=[fd7a:")
                && l.contains("mtls=true")
                && l.contains("dst.identity=\"spiffe://cluster.local/ns/default/sa/web-api\"")
        });
        if tunnelled {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no IPv6 HBONE line in node-a's access log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asks pod `pod`'s own resolver (its resolv.conf's nameserver, port 53, as its resolver would)
/// for the A records of `name`: (rcode, first address or "-"); the answer must come from the
/// address asked.
fn resolve_in(mesh: &Local, pod: &str, name: &str) -> (u8, String) {
    let code = format!(
        r#"import socket, struct
ns = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
msg = struct.pack('>HHHHHH', 0x2323, 0x0100, 1, 0, 0, 0)
for l in '{name}'.split('.'):
    msg += bytes([len(l)]) + l.encode()
msg += b'\x00' + struct.pack('>HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(8)
s.sendto(msg, (ns, 53))
d, src = s.recvfrom(65535)
print(d[3] & 0x0f, socket.inet_ntoa(d[-4:]) if struct.unpack('>H', d[6:8])[0] else '-', src[0] == ns)"#
    );
    let (ok, out, err) = mesh.run(&["exec", pod, "--", "python3", "-c", &code]);
    assert!(ok, "{err}");
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{out}");
    assert_eq!(fields[2], "True", "answered from another address: {out}");
    (fields[0].parse().unwrap(), fields[1].to_owned())
}

#[test]
fn names_outside_the_mesh_go_to_the_upstream_or_are_refused_with_a_log() {
    // With an upstream: a resolver on the host's mesh address (ours, answering every A question
    // with 192.0.2.7) gets the name the mesh does not know, and its answer reaches the pod.
    let mesh = Local::new(10);
    let host = format!("{}.0.1", mesh.subnet);
    let (ok, _, err) = mesh.run(&["up", "--dns-upstream", &host]);
    assert!(ok, "up failed: {err}");
    mesh.label_default_ambient(&["sleep"]);
    let upstream = std::net::UdpSocket::bind((host.as_str(), 53)).unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let answering = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let (n, from) = upstream.recv_from(&mut buf).unwrap();
        let query = &buf[..n];
        // The question as asked, then one A record pointing back at it.
        let mut answer = query.to_vec();
        answer[2] = 0x81;
        answer[3] = 0x80;
        answer[6..8].copy_from_slice(&1u16.to_be_bytes());
        answer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 192, 0, 2, 7]);
        upstream.send_to(&answer, from).unwrap();
        let name_end = 12 + query[12..].iter().position(|b| *b == 0).unwrap();
        String::from_utf8_lossy(&query[12..name_end]).into_owned()
    });
    let (rcode, ip) = resolve_in(&mesh, "sleep", "external.example.org");
    assert_eq!((rcode, ip.as_str()), (0, "192.0.2.7"));
    let asked = answering.join().unwrap();
    assert!(
        asked.contains("external") && asked.contains("example"),
        "{asked:?}"
    );
    // A mesh name is still the proxy's own answer, not the upstream's.
    let (rcode, ip) = resolve_in(&mesh, "sleep", "web-api.default.svc.cluster.local");
    assert_eq!((rcode, ip.as_str()), (0, "10.96.0.10"));
    drop(mesh);

    // Without one: REFUSED at once, and the node proxy says why, naming the query.
    let mesh = Local::new(11);
    mesh.up();
    mesh.label_default_ambient(&["sleep"]);
    let (rcode, _) = resolve_in(&mesh, "sleep", "external.example.org");
    assert_eq!(rcode, 5, "REFUSED");
    let log = std::fs::read_to_string(mesh.run_dir.join("logs/node-a/ztunnel.log")).unwrap();
    assert!(
        log.lines().any(
            |l| l.contains("no upstream resolver is configured: refused")
                && l.contains("external.example.org")
        ),
        "{log}"
    );
}

/// The pids of `node`'s proxies, oldest first (by pid order, enough within one test).
fn proxy_pids(mesh: &Local, node: &str) -> Vec<u32> {
    let ns = format!("{}-{node}", mesh.prefix);
    let out = Command::new("ip")
        .args(["netns", "pids", &ns])
        .output()
        .unwrap();
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.get(1).is_some_and(|a| *a == b"proxy")
        })
        .collect();
    pids.sort();
    pids
}

#[test]
fn a_rolling_restart_starts_the_new_proxy_beside_the_old_one_which_then_drains() {
    let mesh = Local::new(14);
    mesh.up();
    mesh.label_default_ambient(&["sleep", "web-api"]);
    let (ok, body) = mesh.get("sleep", "http://web-api:8080/");
    assert!(ok && body.contains("purchase-history"), "{body}");
    let before = proxy_pids(&mesh, "node-b");
    assert_eq!(before.len(), 1, "{before:?}");

    let (ok, _, err) = mesh.run(&["restart", "ztunnel", "--node", "node-b"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("node-b's ztunnel") && err.contains("rolling"),
        "{err}"
    );
    let after = proxy_pids(&mesh, "node-b");
    assert_eq!(after.len(), 1, "the old proxy is gone: {after:?}");
    assert_ne!(after, before);
    // The new proxy has the pod's listeners and the operations ports (bound beside the old
    // one's, SO_REUSEPORT), and serves: the call is tunneled to web-api through it.
    let log = std::fs::read_to_string(mesh.run_dir.join("logs/node-b/ztunnel.log")).unwrap();
    assert!(
        log.contains("proxy stopped"),
        "the old proxy drained: {log}"
    );
    let (_, status, _) = mesh.run(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.contains("node-b") && l.contains("ready")),
        "{status}"
    );
    let (ok, body) = mesh.get("sleep", "http://web-api:8080/");
    assert!(ok && body.contains("purchase-history"), "{body}");
    let ss = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-pod-default-web-api-0", mesh.prefix),
            "ss",
            "-Hltnp",
            "sport = :15008",
        ])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert!(ss.contains(&format!("pid={},", after[0])), "{ss}");
    assert!(!ss.contains(&format!("pid={},", before[0])), "{ss}");

    // Bad requests name what is wrong.
    let (ok, _, err) = mesh.run(&["restart", "ztunnel", "--node", "node-z"]);
    assert!(
        !ok && err.contains("--node") && err.contains("node-z"),
        "{err}"
    );
    let (ok, _, err) = mesh.run(&["restart", "controlplane", "--node", "node-a"]);
    assert!(
        !ok && err.contains("the control plane runs on the host"),
        "{err}"
    );
    let (ok, _, err) = mesh.run(&["down"]);
    assert!(ok, "{err}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

#[test]
fn rolling_restarts_of_either_nodes_proxy_move_its_live_tunnels_without_a_byte_lost() {
    // Issue 31: node-b's proxy (web-api's, the destination's) and node-a's (sleep's, the
    // source's) restarted 5 times each the rolling way, in turn, while 20 echo streams from
    // sleep to web-api's pod carry 100 KB/s each and calls to web-api:8080 come at 100 a second.
    // Each restart moves the old proxy's live connections to the new one (--handoff-socket):
    // node-b's inbound ones, node-a's outbound ones with their client sockets. No stream may see
    // a byte lost, changed or a reset, nor stall 2 s; no call may fail.
    // CI calls at 100 a second; the issue's 200 by hand: ROLLING_RESTART_RATE=200.
    let rate = std::env::var("ROLLING_RESTART_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100);
    let _alone = MIXED_LOAD.lock().unwrap_or_else(|p| p.into_inner());
    let mesh = Local::new(15);
    let (echo, echo_addr) = mixed_load_mesh(&mesh);
    let load = mesh
        .cmd(&mixed_load_args(&echo_addr, rate, 75))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    for n in 0..10 {
        let node = if n % 2 == 0 { "node-b" } else { "node-a" };
        let before = proxy_pids(&mesh, node);
        let (ok, _, err) = mesh.run(&["restart", "ztunnel", "--node", node]);
        assert!(ok, "restart {n} of {node}: {err}");
        let after = proxy_pids(&mesh, node);
        assert_eq!(
            after.len(),
            1,
            "restart {n}: the old proxy is gone: {after:?}"
        );
        assert_ne!(after, before, "restart {n}");
        std::thread::sleep(Duration::from_secs(2));
    }
    let out = load.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "the load did not run: {stderr}");
    let stats: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    eprintln!("mixed load across 10 restarts: {stats}");
    // A call stalls when it waits 2 s (a connection whose copies all paused for a stream that
    // never settled waited the handoff's whole patience: 275 of 15,000 calls at 200 a second,
    // before each pod's connections went to the new proxy as soon as they were taken apart).
    let keys = [
        "call_failures",
        "call_stalls",
        "echo_mismatches",
        "stream_stalls",
        "stream_failures",
        "stream_short",
    ];
    if keys.iter().any(|key| stats[key] != 0) {
        // The mesh's logs go with it: keep them for whoever looks into this.
        let kept = std::env::temp_dir().join(format!("{}-failed-logs", mesh.prefix));
        let _ = Command::new("cp")
            .arg("-r")
            .arg(mesh.run_dir.join("logs"))
            .arg(&kept)
            .status();
        panic!("{stats}; the mesh's logs are in {}", kept.display());
    }
    // The tunnels moved: each old proxy handed over, each new one took over; node-a's
    // handed outbound connections.
    for node in ["node-a", "node-b"] {
        let log =
            std::fs::read_to_string(mesh.run_dir.join(format!("logs/{node}/ztunnel.log"))).unwrap();
        let handed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("handoff: live connections handed to the new proxy"))
            .collect();
        assert_eq!(handed.len(), 5, "handoffs in {node}'s proxy log");
        assert!(
            log.contains("handoff: took over from the old proxy"),
            "no takeover logged by {node}'s proxy"
        );
        if node == "node-a" {
            assert!(
                handed.iter().all(|l| !l.contains(" outbound=0 ")),
                "node-a's proxy did not hand over its outbound connections: {handed:#?}"
            );
        }
    }
    drop(echo);
    let (ok, _, err) = mesh.run(&["down"]);
    assert!(ok, "{err}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

/// `ztunnel local soak` under this test's prefix, subnet and run directory: (exit success,
/// stdout, stderr, the JSON report).
fn soak(mesh: &Local, args: &[&str]) -> (bool, String, String, serde_json::Value) {
    let report = mesh.run_dir.with_extension("soak.json");
    let mut all = vec!["soak", "--report"];
    let path = report.to_string_lossy().into_owned();
    all.push(&path);
    all.extend_from_slice(args);
    let (ok, out, err) = mesh.run(&all);
    let json = std::fs::read_to_string(&report)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = std::fs::remove_file(&report);
    (ok, out, err, json)
}

#[test]
fn a_short_soak_injects_every_fault_and_finds_nothing_wrong_or_leaked() {
    let mesh = Local::new(12);
    // Certificates last: a proxy an earlier fault restarted must still ask for the mesh's
    // one-minute certificates, or they stop rotating (an hour's soak found restarted proxies
    // asking for the default 24 hours).
    let faults = "policy,controlplane,node-agent,proxy-restart,proxy-kill,pods,label,certs";
    let (ok, out, err, report) = soak(
        &mesh,
        &[
            "--minutes",
            "1",
            "--rate",
            "50",
            "--long",
            "5",
            "--faults",
            faults,
        ],
    );
    assert!(ok, "{out}\n{err}");
    let summary = out
        .lines()
        .find(|l| l.starts_with("soak: "))
        .unwrap_or_default();
    assert!(
        summary.contains(" 0 wrong ()") && summary.contains(" 0 leaks"),
        "{summary}\n{err}"
    );
    let injected: Vec<&str> = report["faults"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f[1].as_str())
        .collect();
    for fault in [
        "controlplane",
        "node-agent",
        "proxy-kill",
        "proxy-restart",
        "policy",
        "pods",
        "label",
        "certs",
    ] {
        assert!(
            injected.contains(&fault),
            "{fault} never injected: {injected:?}"
        );
    }
    // The traffic was real: served and, under the deny policy, denied connections.
    assert!(report["served"].as_u64().unwrap_or(0) > 500, "{report}");
    assert!(report["denied"].as_u64().unwrap_or(0) > 50, "{report}");
    assert_eq!(mesh.traces(), Vec::<String>::new());
}

#[test]
fn the_soak_fails_when_a_denied_connection_is_served_or_plaintext_slips_through() {
    let mesh = Local::new(13);
    let (ok, out, err, report) = soak(
        &mesh,
        &[
            "--minutes",
            "0.3",
            "--rate",
            "50",
            "--long",
            "2",
            "--faults",
            "policy",
            "--inject",
            "denied-served",
            "--inject",
            "plaintext",
        ],
    );
    assert!(
        !ok,
        "the soak passed with wrong outcomes made on purpose:\n{out}\n{err}"
    );
    assert!(
        report["wrong"]["denied_served"].as_u64().unwrap_or(0) > 0,
        "{report}\n{err}"
    );
    assert_eq!(report["wrong"]["plaintext"].as_u64(), Some(1), "{report}");
    assert!(
        out.contains("denied_served") && out.contains("plaintext"),
        "{out}"
    );
}
