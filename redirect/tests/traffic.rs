//! Real traffic through the capture rules: a "pod" namespace with a veth to a "remote"
//! namespace, listeners on the capture ports inside the pod, and connections both ways, for each
//! backend. Needs root, iproute2, iptables, nftables and python3 (the probe in `helpers/`); fails
//! loudly without them. Every namespace and veth is removed even when a test fails.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use redirect::{Backend, RuleSet, apply, reconcile, remove};

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn probe() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/helpers/capture_probe.py")
        .display()
        .to_string()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth: the pod (10.77.0.1) and a remote host (10.77.0.2).
struct Pair {
    pod: String,
    remote: String,
    children: Vec<Child>,
}

impl Pair {
    fn new() -> Self {
        let uid = Command::new("id").arg("-u").output().expect("id");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "these tests need root (CI runs as root)"
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let pair = Pair {
            pod: format!("ztp-{tag}"),
            remote: format!("ztq-{tag}"),
            children: Vec::new(),
        };
        ip(&["netns", "add", &pair.pod]);
        ip(&["netns", "add", &pair.remote]);
        let (a, b) = (format!("zva{tag}"), format!("zvb{tag}"));
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            &pair.pod,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &pair.remote,
        ]);
        for (ns, dev, addr) in [
            (&pair.pod, &a, "10.77.0.1/24"),
            (&pair.remote, &b, "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn pod_path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.pod)
    }

    /// Starts the probe listening on `ports` inside `ns`; returns once it is ready.
    fn listen(&mut self, ns: &str, ports: &[u16]) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", &probe(), "listen"])
            .args(ports.iter().map(u16::to_string))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for the probe");
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert_eq!(first.trim(), "ready", "probe did not start in {ns}");
        self.children.push(child);
    }

    /// Connects from `ns` and returns what the listener said ("accepted PORT ORIGINAL_DST").
    fn connect(&self, ns: &str, host: &str, port: u16, mark: Option<u32>) -> String {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            "python3",
            &probe(),
            "connect",
            host,
            &port.to_string(),
        ]);
        if let Some(mark) = mark {
            cmd.arg(format!("{mark:#x}"));
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "connect {host}:{port} from {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting the namespaces deletes the veth pair too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pod])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.remote])
            .status();
    }
}

fn traffic_is_captured(backend: Backend) {
    let mut pair = Pair::new();
    let (pod, remote) = (pair.pod.clone(), pair.remote.clone());
    let rules = RuleSet::default();
    apply(&pair.pod_path(), backend, &rules).unwrap();
    pair.listen(&pod, &[15001, 15006, 15008, 9999]);
    pair.listen(&remote, &[80]);

    // Outbound from the pod lands on 15001, with the intended destination preserved.
    assert_eq!(
        pair.connect(&pod, "10.77.0.2", 80, None),
        "accepted 15001 10.77.0.2:80"
    );
    // Inbound to an application port lands on 15006, with the original destination.
    assert_eq!(
        pair.connect(&remote, "10.77.0.1", 8080, None),
        "accepted 15006 10.77.0.1:8080"
    );
    // Inbound HBONE reaches 15008 directly.
    let got = pair.connect(&remote, "10.77.0.1", 15008, None);
    assert!(got.starts_with("accepted 15008 "), "{got}");
    // The proxy's own marked sockets are not captured: they reach the remote host.
    let got = pair.connect(&pod, "10.77.0.2", 80, Some(0x539));
    assert!(got.starts_with("accepted 80 "), "{got}");
    // Loopback is not captured.
    let got = pair.connect(&pod, "127.0.0.1", 9999, None);
    assert!(got.starts_with("accepted 9999 "), "{got}");

    remove(&pair.pod_path(), backend, &rules).unwrap();
    // Without the rules, the pod talks to the remote host directly again.
    let got = pair.connect(&pod, "10.77.0.2", 80, None);
    assert!(got.starts_with("accepted 80 "), "{got}");
}

#[test]
fn iptables_captures_traffic() {
    traffic_is_captured(Backend::Iptables);
}

#[test]
fn nftables_captures_traffic() {
    traffic_is_captured(Backend::Nftables);
}

/// A TCP echo on `port` in `ns`, both directions kept (until the pair is dropped).
fn echo_in(pair: &mut Pair, ns: &str, port: u16) {
    let code = format!(
        "import socket,threading\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('0.0.0.0',{port}))\nl.listen(8)\nprint('ready',flush=True)\ndef h(c):\n  while True:\n    d=c.recv(100)\n    if not d: break\n    c.sendall(d)\nwhile True:\n  c,_=l.accept()\n  threading.Thread(target=h,args=(c,),daemon=True).start()"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &code])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "ready");
    pair.children.push(child);
}

/// From `ns`, a connection to `host:port` that echoes once, waits `pause`, and echoes again:
/// "ok", or what went wrong.
fn spawn_long_client(ns: &str, host: &str, port: u16, pause: f64) -> Child {
    let code = format!(
        "import socket,time\ns=socket.create_connection(('{host}',{port}),timeout=5)\ns.sendall(b'before')\nassert s.recv(100)==b'before'\nprint('open',flush=True)\ntime.sleep({pause})\ntry:\n  s.sendall(b'after')\n  print('ok' if s.recv(100)==b'after' else 'wrong',flush=True)\nexcept Exception as e:\n  print(type(e).__name__,flush=True)"
    );
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &code])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn connections_open_at_capture_are_kept(backend: Backend) {
    let mut pair = Pair::new();
    let (pod, remote) = (pair.pod.clone(), pair.remote.clone());
    // Tracked before the capture, so that it empties a table holding both connections.
    conntrack_on(&pod);
    echo_in(&mut pair, &pod, 8080);
    echo_in(&mut pair, &remote, 80);
    let mut inbound = spawn_long_client(&remote, "10.77.0.1", 8080, 1.5);
    let mut outbound = spawn_long_client(&pod, "10.77.0.2", 80, 1.5);
    for child in [&mut inbound, &mut outbound] {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "open");
    }
    // The pod is captured while both connections are open: they go on, direct, as they were.
    apply(&pair.pod_path(), backend, &RuleSet::default()).unwrap();
    // ... and no packet in the middle of a connection makes conntrack take it up as new: such an
    // entry, without the redirect, would carry a later SYN on the same ports past the capture
    // (the hour-long soaks saw a few plaintext connections that way).
    let loose = Command::new("ip")
        .args(["netns", "exec", &pod, "cat"])
        .arg("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&loose.stdout).trim(), "0");
    for (what, child) in [("inbound", inbound), ("outbound", outbound)] {
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(said.lines().last(), Some("ok"), "{what}: {said}");
    }
    // A new connection is captured.
    pair.listen(&pod, &[15001]);
    assert_eq!(
        pair.connect(&pod, "10.77.0.2", 80, None),
        "accepted 15001 10.77.0.2:80"
    );
}

#[test]
fn iptables_capture_keeps_connections_open_before_it() {
    connections_open_at_capture_are_kept(Backend::Iptables);
}

#[test]
fn nftables_capture_keeps_connections_open_before_it() {
    connections_open_at_capture_are_kept(Backend::Nftables);
}

/// From `ns`, one connection from `port` (bound with SO_REUSEADDR, so it can be reused at
/// once) to `host:80`, carrying `mark` when set: what the remote end said, or the error's name.
fn connect_from_port(ns: &str, port: u16, host: &str, mark: Option<u32>) -> String {
    let mark = mark.map_or(String::new(), |m| {
        format!("s.setsockopt(socket.SOL_SOCKET,36,{m})\n")
    });
    let code = format!(
        "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n{mark}s.bind(('10.77.0.1',{port}))\ns.settimeout(5)\ntry:\n  s.connect(('{host}',80))\n  s.sendall(b'x')\n  print(s.recv(100).decode() or 'closed',flush=True)\nexcept Exception as e:\n  print(type(e).__name__,flush=True)"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &code])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A server on port 80 in `ns` that answers "remote" and then resets the connection (its RST
/// leaves the client's conntrack entry in CLOSE, which a SYN on the same ports does not reopen).
fn resetting_server(pair: &mut Pair, ns: &str) {
    let code = "import socket,struct\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('0.0.0.0',80))\nl.listen(8)\nprint('ready',flush=True)\nwhile True:\n  c,_=l.accept()\n  c.recv(10)\n  c.sendall(b'remote')\n  c.setsockopt(socket.SOL_SOCKET,socket.SO_LINGER,struct.pack('ii',1,0))\n  c.close()";
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", code])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "ready");
    pair.children.push(child);
}

fn a_syn_on_an_entry_without_the_redirect_is_refused(backend: Backend) {
    let mut pair = Pair::new();
    let (pod, remote) = (pair.pod.clone(), pair.remote.clone());
    apply(&pair.pod_path(), backend, &RuleSet::default()).unwrap();
    resetting_server(&mut pair, &remote);
    // The proxy's own connection (marked: not redirected) from port 40123, reset by the remote
    // end: its conntrack entry stays, without a redirect, for the next seconds.
    assert_eq!(
        connect_from_port(&pod, 40123, "10.77.0.2", Some(0x539)),
        "remote"
    );
    // The app's connection from the same port meets that entry instead of the capture: it must
    // not reach the remote end past the proxy; it is refused.
    let got = connect_from_port(&pod, 40123, "10.77.0.2", None);
    assert_eq!(got, "ConnectionRefusedError", "past the capture: {got}");
    // A fresh port is captured as ever.
    pair.listen(&pod, &[15001]);
    assert_eq!(
        pair.connect(&pod, "10.77.0.2", 80, None),
        "accepted 15001 10.77.0.2:80"
    );
}

#[test]
fn iptables_refuses_a_syn_on_an_entry_without_the_redirect() {
    a_syn_on_an_entry_without_the_redirect_is_refused(Backend::Iptables);
}

#[test]
fn nftables_refuses_a_syn_on_an_entry_without_the_redirect() {
    a_syn_on_an_entry_without_the_redirect_is_refused(Backend::Nftables);
}

/// From `ns`, a connection from `port` to `host:80` (an echo there) whose end conntrack never
/// sees: its packets are dropped in the raw table, before conntrack, as it closes with a reset.
/// Its entry stays `ESTABLISHED`, without a redirect, after the socket is gone.
fn connection_whose_end_conntrack_missed(ns: &str, port: u16, host: &str) {
    let code = format!(
        "import socket,struct,subprocess\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('10.77.0.1',{port}))\ns.settimeout(5)\ns.connect(('{host}',80))\ns.sendall(b'x')\nassert s.recv(10)==b'x'\nrule=['OUTPUT','-p','tcp','--sport','{port}','-j','DROP']\nsubprocess.run(['iptables','-t','raw','-A']+rule,check=True)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_LINGER,struct.pack('ii',1,0))\ns.close()\nsubprocess.run(['iptables','-t','raw','-D']+rule,check=True)\nprint('gone',flush=True)"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &code])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "gone",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes conntrack track `ns` before any capture: it does only when something there uses it,
/// here a rule of the pod's own (in the soak, the nat table an earlier capture left).
fn conntrack_on(ns: &str) {
    let rule = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "iptables",
            "-A",
            "INPUT",
            "-m",
            "conntrack",
        ])
        .args(["--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
        .status()
        .unwrap();
    assert!(rule.success(), "iptables in {ns}");
}

/// Conntrack's entries in `ns`, one a line.
fn conntrack_table(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/nf_conntrack"])
        .output()
        .unwrap();
    assert!(out.status.success(), "no /proc/net/nf_conntrack in {ns}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn a_pod_entering_the_mesh_starts_with_an_empty_conntrack_table(backend: Backend) {
    let mut pair = Pair::new();
    let (pod, remote) = (pair.pod.clone(), pair.remote.clone());
    echo_in(&mut pair, &remote, 80);
    conntrack_on(&pod);
    // Before the pod is in the mesh: a connection from port 40125 whose end conntrack missed.
    connection_whose_end_conntrack_missed(&pod, 40125, "10.77.0.2");
    let table = conntrack_table(&pod);
    assert!(
        table
            .lines()
            .any(|l| l.contains("ESTABLISHED") && l.contains("sport=40125 dport=80")),
        "no stale entry to start from:\n{table}"
    );
    apply(&pair.pod_path(), backend, &RuleSet::default()).unwrap();
    // A new connection from that port is captured like any other, not refused (nor let past).
    pair.listen(&pod, &[15001]);
    assert_eq!(
        connect_from_port(&pod, 40125, "10.77.0.2", None),
        "accepted 15001 10.77.0.2:80",
        "the port of a connection made before the capture"
    );
    // Applying again (a refresh: the node agent restarted) keeps the table: its entries carry
    // the redirects of connections the proxy serves.
    let redirected = |table: &str| {
        table
            .lines()
            .any(|l| l.contains("sport=40125 dport=80") && l.contains("sport=15001"))
    };
    assert!(redirected(&conntrack_table(&pod)));
    apply(&pair.pod_path(), backend, &RuleSet::default()).unwrap();
    assert!(
        redirected(&conntrack_table(&pod)),
        "a refreshed capture emptied the table"
    );
    // So does a repair, even of a capture whose every rule went.
    remove(&pair.pod_path(), backend, &RuleSet::default()).unwrap();
    let drift = reconcile(&pair.pod_path(), backend, &RuleSet::default()).unwrap();
    assert!(!drift.is_clean());
    assert!(
        redirected(&conntrack_table(&pod)),
        "a repaired capture emptied the table"
    );
}

#[test]
fn iptables_capture_starts_with_an_empty_conntrack_table() {
    a_pod_entering_the_mesh_starts_with_an_empty_conntrack_table(Backend::Iptables);
}

#[test]
fn nftables_capture_starts_with_an_empty_conntrack_table() {
    a_pod_entering_the_mesh_starts_with_an_empty_conntrack_table(Backend::Nftables);
}
