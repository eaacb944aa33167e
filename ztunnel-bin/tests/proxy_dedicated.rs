//! `ztunnel proxy --mode dedicated` in two real network namespaces (root needed), set up as the
//! benchmark harness does: the client pod's outbound TCP is captured to 15001, the proxy tunnels
//! it over HBONE (with the client's own certificate) to the server pod's proxy on 15008, which
//! checks policy and hands the bytes to the app.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, Running, TempDir, call, dedicated_proxy, python, run, veth, wait};

fn ready(ns: &Netns) -> bool {
    let out = python(
        ns,
        "import urllib.request,sys\ntry:\n  sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=1).status == 200 else 1)\nexcept Exception:\n  sys.exit(1)",
    );
    out.status.success()
}

fn issue(ca: &identity::DevCa, sa: &str, dir: &Path) {
    let id = format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap();
    ca.issue_to_dir(&id, Duration::from_secs(3600), &dir.join(sa))
        .unwrap();
}

fn proxy(ns: &Netns, dir: &Path, sa: &str, node: &str, log: &Path) -> Running {
    let stderr = std::fs::File::create(log).unwrap();
    let mut cmd = dedicated_proxy(ns, &dir.join("mesh.yaml"), &dir.join(sa), sa, node);
    cmd.env("ZTUNNEL_WORKER_THREADS", "1")
        .env("CONNECTION_TERMINATION_DEADLINE", "10s")
        .stdout(Stdio::null())
        .stderr(stderr);
    Running(cmd.spawn().unwrap())
}

/// Two pods in two namespaces joined by a veth: `sleep` (client, its outbound TCP captured to
/// its proxy) and `web-api` (server, echo apps on 8080, allowed from sleep, and 9090), with
/// the mesh's manifest in `dir`.
struct Pair {
    a: Netns,
    b: Netns,
    ip_b: String,
    dir: TempDir,
    _apps: [Running; 2],
}

impl Pair {
    /// `name` names the scratch directory; `second` picks other namespace names and addresses,
    /// for a second pair in the same test process.
    fn new(name: &str, second: bool) -> Pair {
        let a = Netns::new(if second { "ra" } else { "a" });
        let b = Netns::new(if second { "rb" } else { "b" });
        let octet = std::process::id() % 100 + 20 + if second { 100 } else { 0 };
        let (ip_a, ip_b) = (format!("10.79.{octet}.1"), format!("10.79.{octet}.2"));
        let (veth_a, veth_b) = (format!("zpa{octet}"), format!("zpb{octet}"));
        veth(Some(&a), &b, (&veth_a, &ip_a), (&veth_b, &ip_b));
        // The client pod's outbound TCP goes to its proxy, except the proxy's own (marked)
        // sockets.
        assert!(a.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-o",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x539/0xfff",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001"
        ]));
        let dir = TempDir::new(name);
        std::fs::write(
            dir.0.join("mesh.yaml"),
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: sleep, namespace: default, labels: {{app: sleep}}}}\nspec: {{serviceAccountName: sleep, nodeName: node-a}}\nstatus: {{podIP: {ip_a}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-api, namespace: default, labels: {{app: web-api}}}}\nspec: {{serviceAccountName: web-api, nodeName: node-b}}\nstatus: {{podIP: {ip_b}}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-sleep, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: web-api}}}}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/default/sa/sleep]}}}}]\n    to: [{{operation: {{ports: [\"8080\"]}}}}]\n"
            ),
        )
        .unwrap();
        let echo = |port: u16| {
            Running(
                Command::new("ip")
                    .args(["netns", "exec", &b.0, "python3", "-c"])
                    .arg(format!(
                        "import socket,threading\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\nl.bind(('{ip_b}',{port}))\nl.listen(16)\ndef h(c):\n  while True:\n    d=c.recv(4096)\n    if not d: break\n    c.sendall(d)\n  c.close()\nwhile True:\n  c,_=l.accept()\n  threading.Thread(target=h,args=(c,),daemon=True).start()"
                    ))
                    .spawn()
                    .unwrap(),
            )
        };
        let apps = [echo(8080), echo(9090)];
        Pair {
            a,
            b,
            ip_b,
            dir,
            _apps: apps,
        }
    }
}

#[test]
fn a_captured_connection_crosses_two_dedicated_proxies_with_the_clients_identity() {
    let pair = Pair::new("proxy-dedicated", false);
    let (a, b, ip_b, dir) = (&pair.a, &pair.b, pair.ip_b.clone(), &pair.dir);
    let ca = identity::DevCa::generate("cluster.local").unwrap();
    issue(&ca, "sleep", &dir.0);
    issue(&ca, "web-api", &dir.0);
    let client_log = dir.0.join("client.log");
    let server_log = dir.0.join("server.log");
    let _client = proxy(a, &dir.0, "sleep", "node-a", &client_log);
    let _server = proxy(b, &dir.0, "web-api", "node-b", &server_log);
    wait("the client proxy's readiness", || ready(a));
    wait("the server proxy's readiness", || ready(b));

    let answer = call(a, &format!("{ip_b}:8080"), "hello through hbone");
    assert_eq!(answer, "hello through hbone");
    let answer = call(a, &format!("{ip_b}:9090"), "not allowed");
    assert_eq!(answer, "", "a port the policy does not allow was reached");

    // Both proxies logged the connections; the server saw the client's own identity and denied
    // the second connection by policy.
    wait("the access logs", || {
        std::fs::read_to_string(&server_log)
            .unwrap_or_default()
            .matches("connection complete")
            .count()
            >= 2
    });
    let server_text = std::fs::read_to_string(&server_log).unwrap();
    assert!(
        server_text.contains(r#"src.identity="spiffe://cluster.local/ns/default/sa/sleep""#),
        "{server_text}"
    );
    assert!(server_text.contains("denied"), "{server_text}");
    let client_text = std::fs::read_to_string(&client_log).unwrap();
    assert!(
        client_text.contains(&format!("dst.hbone_addr={ip_b}:15008")),
        "{client_text}"
    );
    assert!(client_text.contains("mtls=true"), "{client_text}");

    // A policy change closes a connection it no longer allows: an open connection, then the
    // manifest edited to allow another port only.
    let held = Command::new("ip")
        .args(["netns", "exec", &a.0, "python3", "-c"])
        .arg(format!(
            "import socket,time\ns=socket.create_connection(('{ip_b}',8080),timeout=8)\ns.sendall(b'hi')\nprint(s.recv(2).decode(),end=' ')\nt=time.time()\ntry:\n  d=s.recv(10)\n  print('closed' if not d else 'data',end=' ')\nexcept Exception as e:\n  print('closed',end=' ')\nprint(round(time.time()-t,1),end='')"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mesh = std::fs::read_to_string(dir.0.join("mesh.yaml")).unwrap();
    let edit = |text: &str| {
        let tmp = dir.0.join(".mesh.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.0.join("mesh.yaml")).unwrap();
    };
    edit(&mesh.replace("ports: [\"8080\"]", "ports: [\"9999\"]"));
    let out = held.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("hi closed"),
        "the connection stayed open: {text}"
    );
    let waited: f64 = text.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(waited < 5.0, "closed only after {waited} s");
    assert!(
        std::fs::read_to_string(&server_log)
            .unwrap()
            .contains("connection closed due to policy change")
    );
    edit(&mesh);
    std::thread::sleep(Duration::from_millis(600));

    // SIGTERM drains: a connection open at that moment finishes, new ones are refused, and the
    // proxy exits 0 once it is done.
    let mut slow = Command::new("ip")
        .args(["netns", "exec", &a.0, "python3", "-c"])
        .arg(format!(
            "import socket,sys,time\ns=socket.create_connection(('{ip_b}',8080),timeout=10)\ns.sendall(b'first ')\ntime.sleep(0.3)\nsys.stderr.write('sent\\n'); sys.stderr.flush()\ntime.sleep(1.5)\ns.sendall(b'and last')\ns.shutdown(socket.SHUT_WR)\nout=b''\nwhile True:\n  d=s.recv(4096)\n  if not d: break\n  out+=d\nprint(out.decode(),end='')"
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the connection is through both proxies (python's start-up in the namespace can
    // take longer than any fixed sleep on a loaded machine).
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(slow.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "sent\n", "the slow client did not connect");
    let mut server = _server;
    assert!(run("kill", &["-TERM", &server.0.id().to_string()]));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        call(a, &format!("{ip_b}:8080"), "too late"),
        "",
        "a new connection was accepted while draining"
    );
    let out = slow.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "first and last");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the proxy did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

/// Replaces `path` with `text` the way a ConfigMap update does (a new file renamed over it).
fn replace(path: &Path, text: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, text).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

#[test]
fn a_mesh_root_rotated_in_its_file_is_used_without_a_restart_on_both_sides() {
    let pair = Pair::new("proxy-dedicated-roots", true);
    let (a, b, ip_b, dir) = (&pair.a, &pair.b, pair.ip_b.clone(), &pair.dir);
    // The server's certificate is from the old root, the client's from the new one; each side
    // trusts only its own root at first.
    let (old, new) = (
        identity::DevCa::generate("cluster.local").unwrap(),
        identity::DevCa::generate("cluster.local").unwrap(),
    );
    issue(&new, "sleep", &dir.0);
    issue(&old, "web-api", &dir.0);
    let client_roots = dir.0.join("sleep/root-cert.pem");
    let server_roots = dir.0.join("web-api/root-cert.pem");
    let (client_log, server_log) = (dir.0.join("client.log"), dir.0.join("server.log"));
    let _client = proxy(a, &dir.0, "sleep", "node-a", &client_log);
    let _server = proxy(b, &dir.0, "web-api", "node-b", &server_log);
    wait("the client proxy's readiness", || ready(a));
    wait("the server proxy's readiness", || ready(b));
    let to = format!("{ip_b}:8080");
    assert_eq!(call(a, &to, "before"), "", "a server under an unknown root");

    // The client's roots gain the old one: it now trusts the server, which still refuses it.
    replace(
        &client_roots,
        &format!("{}{}", new.root_pem(), old.root_pem()),
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(call(a, &to, "half"), "", "a client under an unknown root");
    wait("the server's refusal of the new root", || {
        std::fs::read_to_string(&server_log)
            .unwrap_or_default()
            .contains("UnknownIssuer")
            || std::fs::read_to_string(&server_log)
                .unwrap_or_default()
                .contains("unknown issuer")
    });

    // The server's roots gain the new one: the same processes now talk.
    replace(
        &server_roots,
        &format!("{}{}", old.root_pem(), new.root_pem()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if call(a, &to, "after") == "after" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated roots were not used: {}",
            std::fs::read_to_string(&server_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let server_text = std::fs::read_to_string(&server_log).unwrap();
    assert!(
        server_text.contains("mesh trust roots changed"),
        "{server_text}"
    );
    let client_text = std::fs::read_to_string(&client_log).unwrap();
    assert!(
        client_text.contains("mesh trust roots changed"),
        "{client_text}"
    );
}
