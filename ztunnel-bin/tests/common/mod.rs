//! Helpers shared by the tests that run the `ztunnel` binary.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn ztunnel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ztunnel"))
}

/// Kills the child process when dropped, so a failing test leaves nothing running.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ztunnel-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits until something accepts connections on `addr`.
pub fn wait_for_listener(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP backend that answers each connection with its input upper-cased, after EOF.
pub fn upper_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut data = Vec::new();
                if conn.read_to_end(&mut data).is_ok() {
                    let _ = conn.write_all(&data.to_ascii_uppercase());
                }
            });
        }
    });
    addr
}

/// `--cert/--key/--ca` for the files `ztunnel ca issue` (or `demo --write-certs`) wrote in
/// `dir/side`.
pub fn tls_args(dir: &Path, side: &str) -> Vec<String> {
    let d = dir.join(side);
    ["cert-chain.pem", "key.pem", "root-cert.pem"]
        .iter()
        .zip(["--cert", "--key", "--ca"])
        .flat_map(|(file, flag)| [flag.to_owned(), d.join(file).display().to_string()])
        .collect()
}

/// `ztunnel hbone serve` on a free loopback port with the `server` files in `dir`, once it
/// accepts connections.
pub fn serve_hbone(dir: &Path) -> (Running, SocketAddr) {
    let listen = free_port();
    let server = Running(
        ztunnel()
            .args(["hbone", "serve", "--listen", &listen.to_string()])
            .args(tls_args(dir, "server"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_listener(listen);
    (server, listen)
}

/// Runs `cmd` with `input` on stdin and collects its output.
pub fn with_stdin(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A network namespace, deleted on drop (with everything still running in it killed first by
/// the `Running` guards, which are declared after it and so dropped before it).
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test needs root (CI runs as root)"
        );
        let name = format!("ztpd-{}-{tag}", std::process::id());
        assert!(run("ip", &["netns", "add", &name]), "ip netns add {name}");
        // As a pod's: the runtime brings loopback up before any plugin runs.
        assert!(run("ip", &["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }

    pub fn exec(&self, args: &[&str]) -> bool {
        let mut all = vec!["netns", "exec", &self.0];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Joins `a` (a network namespace, or this one) and `b` with a veth pair, `dev_a` at `ip_a` and
/// `dev_b` at `ip_b` (both /24), everything up, loopback too. The pair goes with the namespace.
pub fn veth(
    a: Option<&Netns>,
    b: &Netns,
    (dev_a, ip_a): (&str, &str),
    (dev_b, ip_b): (&str, &str),
) {
    assert!(run(
        "ip",
        &["link", "add", dev_a, "type", "veth", "peer", "name", dev_b]
    ));
    let in_ns = |ns: Option<&Netns>, args: &[&str]| match ns {
        Some(ns) => ns.exec(args),
        None => run(args[0], &args[1..]),
    };
    for (ns, dev, ip) in [(a, dev_a, ip_a), (Some(b), dev_b, ip_b)] {
        if let Some(ns) = ns {
            assert!(run("ip", &["link", "set", dev, "netns", &ns.0]));
            assert!(ns.exec(&["ip", "link", "set", "lo", "up"]));
        }
        assert!(in_ns(
            ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", dev]
        ));
        assert!(in_ns(ns, &["ip", "link", "set", dev, "up"]));
    }
}

pub fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Python one-liners run inside a namespace (python3 is installed by the test script).
pub fn python(ns: &Netns, code: &str) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", code])
        .output()
        .unwrap()
}

pub fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects from `ns` to `to`, sends `data`, half-closes and returns what came back ("" when
/// the connection was refused or closed).
pub fn call(ns: &Netns, to: &str, data: &str) -> String {
    let (host, port) = to.rsplit_once(':').unwrap();
    let code = format!(
        "import socket\ns = socket.create_connection(('{host}', {port}), timeout=5)\ns.sendall(b'{data}')\ns.shutdown(socket.SHUT_WR)\nout = b''\ntry:\n  while True:\n    b = s.recv(4096)\n    if not b: break\n    out += b\nexcept Exception:\n  pass\nprint(out.decode(), end='')"
    );
    String::from_utf8_lossy(&python(ns, &code).stdout).into_owned()
}

/// Pods on one bridge: a "fabric" namespace holding the bridge at `ip(254)`, and one namespace per
/// pod, `ztpd-<pid>-<tag>-<name>`, joined to it by a veth whose pod end is `eth0` at `ip(host)`.
/// Dropped after everything running in it (declare the `Running` guards after it).
pub struct Fabric {
    pub bridge: Netns,
    pub pods: Vec<Netns>,
}

impl Fabric {
    pub fn new(tag: &str, pods: &[(&str, u8)], ip: &dyn Fn(u8) -> String) -> Self {
        let pid = std::process::id();
        let bridge = Netns::new(&format!("{tag}-fabric"));
        assert!(bridge.exec(&["ip", "link", "add", "br0", "type", "bridge"]));
        assert!(bridge.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ip(254)),
            "dev",
            "br0"
        ]));
        assert!(bridge.exec(&["ip", "link", "set", "br0", "up"]));
        let prefix: String = tag.chars().take(2).collect();
        let mut namespaces = Vec::new();
        for (i, (name, host)) in pods.iter().enumerate() {
            let ns = Netns::new(&format!("{tag}-{name}"));
            let veth = format!("z{prefix}{}{i}", pid % 100_000);
            assert!(bridge.exec(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.0
            ]));
            assert!(bridge.exec(&["ip", "link", "set", &veth, "master", "br0", "up"]));
            assert!(ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", ip(*host)),
                "dev",
                "eth0"
            ]));
            assert!(ns.exec(&["ip", "link", "set", "eth0", "up"]));
            assert!(ns.exec(&["ip", "link", "set", "lo", "up"]));
            namespaces.push(ns);
        }
        Fabric {
            bridge,
            pods: namespaces,
        }
    }
}

/// An app in `ns` on `ports`: greets with `name:` then echoes until the client half-closes.
/// An app in `ns` answering `name:` then echoing, on each of `ports` of both families (one
/// dual-stack socket each).
pub fn echo_app(ns: &Netns, name: &str, ports: &[u16]) -> Running {
    let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    Running(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c"])
            .arg(format!(
                "import socket,threading\ndef h(c):\n  c.sendall(b'{name}:')\n  while True:\n    d=c.recv(65536)\n    if not d: break\n    c.sendall(d)\n  c.close()\ndef serve(p):\n  l=socket.socket(socket.AF_INET6)\n  l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n  l.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n  l.bind(('::',p))\n  l.listen(256)\n  while True:\n    c,_=l.accept()\n    threading.Thread(target=h,args=(c,),daemon=True).start()\nts=[threading.Thread(target=serve,args=(p,)) for p in [{}]]\n[t.start() for t in ts]\n[t.join() for t in ts]",
                ports.join(",")
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// HTTP GET on the host's loopback: (status, body), or `None` when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// `ztunnel controlplane` in plaintext on `listen`, serving the manifests of `dir` (its log in
/// `dir/controlplane.log`).
pub fn plaintext_controlplane(dir: &Path, listen: SocketAddr) -> Running {
    Running(
        ztunnel()
            .args(["controlplane", "--plaintext", "--manifests"])
            .arg(dir)
            .args(["--listen", &listen.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("controlplane.log")).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// `ztunnel ca init --dir DIR`: a development CA with a new root, which must succeed.
pub fn ca_init(dir: &Path) {
    assert!(
        ztunnel()
            .args(["ca", "init", "--dir"])
            .arg(dir)
            .status()
            .unwrap()
            .success(),
        "ztunnel ca init --dir {}",
        dir.display()
    );
}

/// A `ztunnel proxy` started by [`start_proxy`].
pub struct Proxy {
    pub child: Child,
    pub readiness: SocketAddr,
    pub stats: SocketAddr,
    pub log: PathBuf,
}

/// `ztunnel proxy ztunnel` for node-a, taking pods from the ZDS `socket` and its workloads and
/// certificates from the plaintext control plane at `xds`, with the development CA of
/// `dir/.ca` and node-a's token (as `ztunnel controlplane` writes them); its log in
/// `dir/proxy-TAG.log`.
pub fn start_proxy(dir: &Path, socket: &Path, xds: SocketAddr, tag: &str) -> Proxy {
    start_proxy_with(dir, socket, xds, tag, &[])
}

/// [`start_proxy`] with more arguments; its stats address in `Proxy::stats`.
pub fn start_proxy_with(
    dir: &Path,
    socket: &Path,
    xds: SocketAddr,
    tag: &str,
    extra: &[&str],
) -> Proxy {
    // Started once the control plane has written the node's token: before it, the proxy's xDS
    // client fails and backs off (up to 15 s) before it tries again, which a loaded machine
    // turns into a test timing out.
    let token = dir.join(".node-tokens/node-a.token");
    let start = Instant::now();
    while !token.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the control plane never wrote {}",
            token.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (admin, stats, readiness) = (free_port(), free_port(), free_port());
    let log = dir.join(format!("proxy-{tag}.log"));
    let child = ztunnel()
        .args(["proxy", "ztunnel"])
        .args(extra)
        .arg("--inpod-uds")
        .arg(socket)
        .arg("--xds-address")
        .arg(format!("http://{xds}"))
        .arg("--ca-address")
        .arg(format!("http://{xds}"))
        .arg("--ca")
        .arg(dir.join(".ca/root-cert.pem"))
        .arg("--auth-token")
        .arg(dir.join(".node-tokens/node-a.token"))
        .args(["--admin-addr", &admin.to_string()])
        .args(["--stats-addr", &stats.to_string()])
        .args(["--readiness-addr", &readiness.to_string()])
        .env("NODE_NAME", "node-a")
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("CONNECTION_TERMINATION_DEADLINE", "3s")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proxy {
        child,
        readiness,
        stats,
        log,
    }
}

/// The `ztunnel-cni` binary beside `ztunnel` (`cargo test --workspace` builds it; alone, build
/// it with `cargo build -p ztunnel-cni`).
pub fn plugin_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_ztunnel")).with_file_name("ztunnel-cni");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p ztunnel-cni` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// `ztunnel-cni` started as a container runtime runs it: `command` for pod `namespace/name`
/// (uid `uid-NAME`) in the named namespace `netns`, the primary plugin's result giving `ip`,
/// the agent at `socket`; `extra` fields are added to the plugin's configuration.
pub fn invoke_plugin(
    command: &str,
    socket: &Path,
    pod: (&str, &str),
    netns: &Netns,
    ip: &str,
    extra: serde_json::Value,
) -> Child {
    let mut child = Command::new(plugin_binary())
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.1))
        .env("CNI_NETNS", format!("/var/run/netns/{}", netns.0))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=uid-{};K8S_POD_INFRA_CONTAINER_ID=sandbox",
                pod.0, pod.1, pod.1
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "ztunnel-cni",
        "agent_socket": socket.display().to_string(),
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": format!("/var/run/netns/{}", netns.0)}],
            "ips": [{"address": format!("{ip}/24"), "interface": 0}]
        }
    });
    if let (Some(config), serde_json::Value::Object(extra)) = (config.as_object_mut(), extra) {
        config.extend(extra);
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    child
}

/// Whether something in `ns` listens on TCP `port`.
pub fn listens(ns: &Netns, port: u16) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ss", "-Hltn"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} "))
}

/// Whether `ns` holds our capture rules (nftables backend).
pub fn has_capture_rules(ns: &Netns) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("redirect to :15001")
}

/// `ztunnel proxy --mode dedicated` for `default/SA/SA` on `node`, run in `ns`, with the mesh of
/// `manifests` and the certificate files of `certs` (`cert-chain.pem`, `key.pem`,
/// `root-cert.pem`); the caller adds its own flags, environment and output.
pub fn dedicated_proxy(
    ns: &Netns,
    manifests: &Path,
    certs: &Path,
    sa: &str,
    node: &str,
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(ztunnel().get_program())
        .args(["proxy", "--mode", "dedicated", "--workload"])
        .arg(format!("default/{sa}/{sa}"))
        .arg("--local-manifests")
        .arg(manifests)
        .arg("--cert")
        .arg(certs.join("cert-chain.pem"))
        .arg("--key")
        .arg(certs.join("key.pem"))
        .arg("--ca")
        .arg(certs.join("root-cert.pem"))
        .env("NODE_NAME", node);
    cmd
}
