//! `ztunnel proxy --mode shared` as a node proxy (root needed): two "nodes" (a proxy and a node
//! agent each, both in the host namespace, as Istio runs them), five pods in network namespaces
//! on one bridge, and `ztunnel controlplane` serving xDS and the CA. The node agents capture the
//! pods of the ambient namespace and hand them to their node's proxy over ZDS; the proxies get
//! workloads, policies and certificates from the control plane.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Fabric, Netns, Running, TempDir, ca_init, call, echo_app, free_port, http_get,
    plaintext_controlplane, python, run, wait, ztunnel,
};

struct Pod {
    name: &'static str,
    namespace: &'static str,
    sa: &'static str,
    node: &'static str,
    host: u8,
    ready: bool,
    ports: &'static [u16],
}

const PODS: [Pod; 5] = [
    Pod {
        name: "sleep",
        namespace: "default",
        sa: "sleep",
        node: "node-a",
        host: 1,
        ready: true,
        ports: &[],
    },
    Pod {
        name: "notsleep",
        namespace: "default",
        sa: "notsleep",
        node: "node-a",
        host: 2,
        ready: true,
        ports: &[],
    },
    Pod {
        name: "web-1",
        namespace: "default",
        sa: "web",
        node: "node-b",
        host: 3,
        ready: true,
        ports: &[8080, 9090],
    },
    Pod {
        name: "web-2",
        namespace: "default",
        sa: "web",
        node: "node-a",
        host: 4,
        ready: false,
        ports: &[8080],
    },
    Pod {
        name: "legacy",
        namespace: "legacy",
        sa: "default",
        node: "node-b",
        host: 5,
        ready: true,
        ports: &[8080],
    },
];

/// The sum of the `metric` samples on `addr`'s /metrics whose labels contain every `filter`.
fn metric(addr: SocketAddr, metric: &str, filters: &[&str]) -> u64 {
    let (_, body) = http_get(addr, "/metrics").expect("metrics answer");
    body.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn manifests(ip: &dyn Fn(u8) -> String, pods: &[&Pod]) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n",
    );
    for p in pods {
        let app = p.name.split('-').next().unwrap();
        let ready = if p.ready { "True" } else { "False" };
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: uid-{}, labels: {{app: {app}}}, annotations: {{ambient.local/netns: /var/run/netns/{}}}}}\nspec: {{serviceAccountName: {}, nodeName: {}}}\nstatus: {{podIP: {}, conditions: [{{type: Ready, status: \"{ready}\"}}]}}\n",
            p.name, p.namespace, p.name, pod_netns(p), p.sa, p.node, ip(p.host)
        ));
    }
    text.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  selector: {{app: web}}\n  clusterIP: {}\n  ports: [{{port: 80, targetPort: 8080}}]\n",
        ip(200)
    ));
    text
}

fn pod_netns(p: &Pod) -> String {
    format!("ztpd-{}-sh-{}", std::process::id(), p.name)
}

fn policy(allowed_sa: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: web-from-{allowed_sa}, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/default/sa/{allowed_sa}]}}}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-9090, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: DENY\n  rules:\n  - to: [{{operation: {{ports: [\"9090\"]}}}}]\n"
    )
}

/// A connection from `ns` to `to` held open: sends `first`, reads the answer, then waits for the
/// peer to close (printing `closed <seconds>`), at most `hold` seconds.
fn hold(ns: &Netns, to: &str, first: &str, hold: u32) -> Child {
    let (host, port) = to.rsplit_once(':').unwrap();
    Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c"])
        .arg(format!(
            "import socket,time\ns=socket.create_connection(('{host}',{port}),timeout={hold})\ns.sendall(b'{first}')\nwant=len(b'web-1:{first}')\ngot=b''\nwhile len(got)<want:\n  d=s.recv(65536)\n  if not d: break\n  got+=d\nprint(got.decode(),flush=True)\nt=time.time()\ntry:\n  d=s.recv(10)\n  print('closed' if not d else 'data', round(time.time()-t,1),flush=True)\nexcept ConnectionResetError:\n  print('reset', round(time.time()-t,1),flush=True)\nexcept Exception:\n  print('timeout', round(time.time()-t,1),flush=True)"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

struct Node {
    admin: SocketAddr,
    readiness: SocketAddr,
    stats: SocketAddr,
    log: std::path::PathBuf,
}

#[test]
fn shared_mode_proxies_carry_pods_traffic_between_nodes_with_their_identities() {
    let pid = std::process::id();
    let ip = move |host: u8| format!("10.{}.{}.{host}", 100 + pid % 100, (pid / 100) % 250);
    let hosts: Vec<(&str, u8)> = PODS.iter().map(|p| (p.name, p.host)).collect();
    let fabric = Fabric::new("sh", &hosts, &ip);
    for (ns, p) in fabric.pods.iter().zip(&PODS) {
        assert_eq!(ns.0, pod_netns(p));
    }
    let pods = &fabric.pods;
    let ns = |name: &str| &pods[PODS.iter().position(|p| p.name == name).unwrap()];
    let _apps: Vec<Running> = PODS
        .iter()
        .filter(|p| !p.ports.is_empty())
        .map(|p| echo_app(ns(p.name), p.name, p.ports))
        .collect();

    let dir = TempDir::new("proxy-shared");
    let all: Vec<&Pod> = PODS.iter().collect();
    write_atomic(&dir.0.join("mesh.yaml"), &manifests(&ip, &all));
    let xds = free_port();
    // The mesh's root exists before anything starts (the control plane uses it as it finds it).
    ca_init(&dir.0.join(".ca"));
    let mut nodes = Vec::new();
    let mut running = Vec::new();
    for node in ["node-a", "node-b"] {
        let socket = dir.0.join(format!("{node}.sock"));
        running.push(Running(
            ztunnel()
                .args(["node-agent", "--source"])
                .arg(format!("manifests:{}", dir.0.display()))
                .args(["--node", node, "--backend", "nftables", "--zds-socket"])
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.0.join(format!("{node}-agent.log"))).unwrap())
                .spawn()
                .unwrap(),
        ));
        let (admin, stats, readiness) = (free_port(), free_port(), free_port());
        let log = dir.0.join(format!("{node}-proxy.log"));
        running.push(Running(
            ztunnel()
                .args(["proxy", "--mode", "shared", "--inpod-uds"])
                .arg(&socket)
                .arg("--xds-address")
                .arg(format!("http://{xds}"))
                .arg("--ca-address")
                .arg(format!("http://{xds}"))
                .arg("--ca")
                .arg(dir.0.join(".ca/root-cert.pem"))
                .arg("--auth-token")
                .arg(dir.0.join(format!(".node-tokens/{node}.token")))
                .args(["--admin-addr", &admin.to_string()])
                .args(["--stats-addr", &stats.to_string()])
                .args(["--readiness-addr", &readiness.to_string()])
                .env("NODE_NAME", node)
                // node-b logs JSON (one object per line), node-a plain key=value.
                .env(
                    "LOG_FORMAT",
                    if node == "node-b" { "json" } else { "plain" },
                )
                .env("ZTUNNEL_WORKER_THREADS", "1")
                .env("CONNECTION_TERMINATION_DEADLINE", "2s")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ));
        nodes.push(Node {
            admin,
            readiness,
            stats,
            log,
        });
    }
    let (a, b) = (&nodes[0], &nodes[1]);

    // Readiness waits for xDS: no control plane yet, so 503.
    wait("node-a's readiness endpoint", || {
        http_get(a.readiness, "/healthz/ready").is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = http_get(a.readiness, "/healthz/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    let _controlplane = plaintext_controlplane(&dir.0, xds);
    for (node, n) in [("node-a", a), ("node-b", b)] {
        wait(&format!("{node}'s readiness"), || {
            http_get(n.readiness, "/healthz/ready").is_some_and(|(s, _)| s == 200)
        });
    }
    // Every meshed pod is in its node's proxy before any call (a pod left out would reach the
    // others over the bridge directly, and the calls below would pass without the mesh).
    for (node, pods) in [(a, 3), (b, 1)] {
        wait("the pods handed to the proxies", || {
            log_of(&node.log).matches("pod added").count() >= pods
        });
    }
    let web1 = ip(3);

    // Cross-node: sleep (node-a) -> web-1 (node-b), tunneled with sleep's identity.
    assert_eq!(
        call(ns("sleep"), &format!("{web1}:8080"), "cross"),
        "web-1:cross"
    );
    // Same node: sleep -> web-2 (both on node-a) goes through HBONE too.
    assert_eq!(
        call(ns("sleep"), &format!("{}:8080", ip(4)), "same"),
        "web-2:same"
    );
    // The service VIP reaches a healthy endpoint only (web-2 is not ready).
    for i in 0..6 {
        let answer = call(ns("sleep"), &format!("{}:80", ip(200)), &format!("vip{i}"));
        assert_eq!(answer, format!("web-1:vip{i}"));
    }
    // Outside the mesh: passthrough.
    assert_eq!(
        call(ns("sleep"), &format!("{}:8080", ip(5)), "plain"),
        "legacy:plain"
    );
    wait("the access logs", || {
        log_of(&b.log).matches(r#""direction":"inbound""#).count() >= 7
    });
    let (log_a, log_b) = (log_of(&a.log), log_of(&b.log));
    let sleep_id = "spiffe://cluster.local/ns/default/sa/sleep";
    let web_id = "spiffe://cluster.local/ns/default/sa/web";
    // Every line of node-b's log is a JSON object; its access-log lines carry the fields.
    let lines: Vec<serde_json::Value> = log_b
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["direction"] == "inbound"
            && l["src.identity"] == sleep_id
            && l["dst.identity"] == web_id
            && l["dst.workload"] == "web-1"
            && l["bytes_recv"] == 5),
        "{log_b}"
    );
    assert!(
        log_a.lines().any(|l| l.contains("direction=\"outbound\"")
            && l.contains(&format!("dst.hbone_addr={web1}:15008"))
            && l.contains(&format!("src.identity=\"{sleep_id}\""))
            && l.contains(&format!("dst.identity=\"{web_id}\""))
            && l.contains("bytes_sent=5")),
        "{log_a}"
    );
    assert!(
        log_a.lines().any(|l| l.contains("direction=\"inbound\"")
            && l.contains(&format!("dst.addr={}:8080", ip(4)))
            && l.contains(&format!("src.identity=\"{sleep_id}\""))),
        "same-node inbound missing: {log_a}"
    );
    assert!(
        log_a.lines().any(|l| l.contains("direction=\"outbound\"")
            && l.contains(&format!("dst.addr={}:8080", ip(5)))
            && l.contains("mtls=false")),
        "passthrough missing: {log_a}"
    );

    // Policies: only sleep may call web, and nobody on 9090.
    let policy_file = dir.0.join("policy.yaml");
    write_atomic(&policy_file, &policy("sleep"));
    wait("the policies to apply", || {
        call(ns("notsleep"), &format!("{web1}:8080"), "x").is_empty()
    });
    // The call that saw the change may have been in flight and closed by it ("closed due to
    // policy change"); a new one must be refused at the door.
    assert_eq!(call(ns("notsleep"), &format!("{web1}:8080"), "x"), "");
    assert_eq!(call(ns("sleep"), &format!("{web1}:8080"), "ok"), "web-1:ok");
    assert_eq!(call(ns("sleep"), &format!("{web1}:9090"), "no"), "");
    let denied_notsleep = |log: &str| {
        log.lines()
            .any(|l| l.contains("connection denied by policy") && l.contains("sa/notsleep"))
    };
    wait("the denials in the log", || {
        let log = log_of(&b.log);
        log.contains("no-9090") && denied_notsleep(&log)
    });

    // Byte counters move while a connection is open.
    let filters = [
        "reporter=\"destination\"",
        "source_principal=\"cluster.local/ns/default/sa/sleep\"",
        "destination_principal=\"cluster.local/ns/default/sa/web\"",
    ];
    let received = metric(b.stats, "istio_tcp_received_bytes_total", &filters);
    let sent = metric(b.stats, "istio_tcp_sent_bytes_total", &filters);
    let opened = metric(b.stats, "istio_tcp_connections_opened_total", &filters);
    let payload = "m".repeat(1000);
    let mut held = hold(ns("sleep"), &format!("{web1}:8080"), &payload, 20);
    let mut lines = std::io::BufReader::new(held.stdout.take().unwrap());
    let _held = Running(held);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut lines, &mut first).unwrap();
    assert_eq!(first.trim(), format!("web-1:{payload}"));
    assert_eq!(
        metric(b.stats, "istio_tcp_received_bytes_total", &filters) - received,
        1000
    );
    assert_eq!(
        metric(b.stats, "istio_tcp_sent_bytes_total", &filters) - sent,
        1006
    );
    assert_eq!(
        metric(b.stats, "istio_tcp_connections_opened_total", &filters) - opened,
        1
    );
    assert!(
        metric(
            b.stats,
            "istio_tcp_connections_failed_total",
            &["response_flags=\"DENY\""]
        ) >= 2
    );

    // A policy pushed while that connection is open closes it: a reset, not a clean end.
    write_atomic(&policy_file, &policy("notsleep"));
    let mut rest = String::new();
    std::io::BufRead::read_line(&mut lines, &mut rest).unwrap();
    assert!(rest.starts_with("reset"), "{rest}");
    wait("the policy-change log", || {
        log_of(&b.log).contains("connection closed due to policy change")
    });
    write_atomic(&policy_file, &policy("sleep"));
    wait("sleep allowed again", || {
        call(ns("sleep"), &format!("{web1}:8080"), "again") == "web-1:again"
    });

    // Security, with `ztunnel hbone connect` from outside any pod: identities come from
    // certificates, a CONNECT must name a pod of this node, other roots are refused.
    let certs = dir.0.join("certs");
    let issue = |ca: &Path, sa: &str| {
        let out = ztunnel()
            .args(["ca", "issue", "--dir"])
            .arg(ca)
            .args([
                "--id",
                &format!("spiffe://cluster.local/ns/default/sa/{sa}"),
            ])
            .arg("--out")
            .arg(certs.join(sa))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    issue(&dir.0.join(".ca"), "sleep");
    issue(&dir.0.join(".ca"), "notsleep");
    let other_ca = dir.0.join("other-ca");
    ca_init(&other_ca);
    std::fs::create_dir_all(certs.join("other")).unwrap();
    let out = ztunnel()
        .args(["ca", "issue", "--dir"])
        .arg(&other_ca)
        .args([
            "--id",
            "spiffe://cluster.local/ns/default/sa/sleep",
            "--out",
        ])
        .arg(certs.join("other"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let connect = |who: &str, authority: &str| {
        let c = certs.join(who);
        let out = Command::new("ip")
            .args(["netns", "exec", &fabric.bridge.0])
            .arg(ztunnel().get_program())
            .args([
                "hbone",
                "connect",
                "--to",
                &format!("{web1}:15008"),
                "--authority",
                authority,
            ])
            .arg("--cert")
            .arg(c.join("cert-chain.pem"))
            .arg("--key")
            .arg(c.join("key.pem"))
            .arg("--ca")
            .arg(dir.0.join(".ca/root-cert.pem"))
            .args(["--expect-san", web_id])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = connect("sleep", &format!("{web1}:8080"));
    assert!(ok && stdout == "web-1:", "{stdout} {stderr}");
    let (ok, _, stderr) = connect("notsleep", &format!("{web1}:8080"));
    assert!(
        !ok && stderr.contains("401"),
        "another identity was let in: {stderr}"
    );
    let (ok, _, stderr) = connect("sleep", &format!("{}:8080", ip(4)));
    assert!(
        !ok && stderr.contains("400"),
        "a pod of another node was reached: {stderr}"
    );
    let (ok, _, stderr) = connect("other", &format!("{web1}:8080"));
    assert!(!ok, "a certificate of another root was accepted: {stderr}");
    wait("the refusals in the log", || {
        let log = log_of(&b.log);
        log.contains("not an address of default/web-1") && log.contains("HBONE connection refused")
    });

    // A pod deleted mid-connection: its connections end and its listeners close.
    let mut held = hold(ns("sleep"), &format!("{web1}:8080"), "bye", 20);
    let mut lines = std::io::BufReader::new(held.stdout.take().unwrap());
    let _held2 = Running(held);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut lines, &mut first).unwrap();
    assert_eq!(first.trim(), "web-1:bye");
    let listening = |addr: &str| {
        python(
            &fabric.bridge,
            &format!(
                "import socket\ntry:\n  socket.create_connection(('{addr}',15008),timeout=2).close()\n  print('open')\nexcept Exception:\n  print('closed')"
            ),
        )
    };
    assert_eq!(
        String::from_utf8_lossy(&listening(&web1).stdout).trim(),
        "open"
    );
    let without_web1: Vec<&Pod> = PODS.iter().filter(|p| p.name != "web-1").collect();
    write_atomic(&dir.0.join("mesh.yaml"), &manifests(&ip, &without_web1));
    let started = Instant::now();
    let mut rest = String::new();
    std::io::BufRead::read_line(&mut lines, &mut rest).unwrap();
    // Cut off, not finished: a reset, not a clean end.
    assert!(rest.starts_with("reset"), "{rest}");
    assert!(started.elapsed() < Duration::from_secs(8));
    wait("web-1's listeners to close", || {
        String::from_utf8_lossy(&listening(&web1).stdout).trim() == "closed"
    });
    assert!(log_of(&b.log).contains("pod removed"));

    // Admin: the config dump shows the state, the pods and their certificates; the log level
    // changes at runtime; /quitquitquit drains node-b like SIGTERM.
    let (status, dump) = http_get(a.admin, "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let pods = dump["pods"].as_array().unwrap();
    assert_eq!(
        pods.len(),
        3,
        "node-a serves sleep, notsleep and web-2: {dump}"
    );
    assert!(
        pods.iter().all(|p| p["certificateExpiry"].is_string()),
        "{dump}"
    );
    assert!(
        pods.iter()
            .any(|p| p["identity"] == sleep_id && p["workloadUid"].is_string()),
        "{dump}"
    );
    assert!(dump["synced"].as_bool().unwrap());
    assert!(dump["policies"].as_array().unwrap().len() >= 2, "{dump}");
    assert!(!log_of(&a.log).contains("DEBUG"));
    assert_eq!(http_get(a.admin, "/logging?level=debug").unwrap().0, 200);
    assert_eq!(
        call(ns("sleep"), &format!("{}:8080", ip(4)), "dbg"),
        "web-2:dbg"
    );
    wait("debug lines after /logging", || {
        log_of(&a.log).contains("DEBUG")
    });
    assert_eq!(http_get(a.admin, "/logging?level=info").unwrap().0, 200);
    let (status, body) = http_get(a.admin, "/logging?level=nonsense[").unwrap();
    assert_eq!(status, 400, "{body}");
    let mut quit = TcpStream::connect(b.admin).unwrap();
    write!(quit, "POST /quitquitquit HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    quit.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut running = running;
    let proxy_b = &mut running[3];
    let start = Instant::now();
    let status = loop {
        if let Some(status) = proxy_b.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node-b's proxy did not quit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    // SIGTERM: node-a's proxy drains and exits 0.
    let proxy_a = &mut running[1];
    assert!(run("kill", &["-TERM", &proxy_a.0.id().to_string()]));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = proxy_a.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node-a's proxy did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}: {}", log_of(&a.log));
}
