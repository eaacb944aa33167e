//! A rolling update of the node proxy, as Istio's chart rolls it out (`maxSurge: 1,
//! maxUnavailable: 0`), on one node (root needed: real network namespaces and capture rules).
//! Two pods in the mesh, a node agent, the control plane and the old proxy; a client opens
//! connections through the mesh all along while a new proxy starts beside the old one (both bind
//! the pods' ports with SO_REUSEPORT), becomes ready, and the old one is stopped with SIGTERM and
//! drains. No connection may be refused or fail, and both proxies must have carried some.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Fabric, Proxy, Running, TempDir, ca_init, echo_app, free_port, http_get,
    plaintext_controlplane, start_proxy, ztunnel,
};

const HOSTS: [(&str, &str, u8); 2] = [("sleep", "sleep", 1), ("web", "web", 2)];

fn manifests(ip: &dyn Fn(u8) -> String, netns: &dyn Fn(&str) -> String) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for (name, sa, host) in HOSTS {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, uid: uid-{name}, labels: {{app: {name}}}, annotations: {{ambient.local/netns: /var/run/netns/{}}}}}\nspec: {{serviceAccountName: {sa}, nodeName: node-a}}\nstatus: {{podIP: {}, conditions: [{{type: Ready, status: \"True\"}}]}}\n",
            netns(name),
            ip(host)
        ));
    }
    text
}

/// The lines of a proxy's log that report a connection ending badly, or a warning.
fn trouble(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            (l.contains("connection complete") && !l.contains("error=\"-\""))
                || l.contains(" WARN ")
        })
        .filter(|l| !l.contains("token file"))
        .map(|l| format!("{}: {l}", log.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn outbound_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("direction=\"outbound\""))
        .count()
}

#[test]
fn a_rolling_update_of_the_node_proxy_refuses_no_connection() {
    let pid = std::process::id();
    let ip = move |host: u8| format!("10.{}.{}.{host}", 100 + pid % 100, 250 - (pid / 100) % 50);
    let netns_name = move |name: &str| format!("ztpd-{pid}-ru-{name}");
    let hosts: Vec<(&str, u8)> = HOSTS.iter().map(|(name, _, host)| (*name, *host)).collect();
    let fabric = Fabric::new("ru", &hosts, &ip);
    for (ns, (name, _, _)) in fabric.pods.iter().zip(HOSTS) {
        assert_eq!(ns.0, netns_name(name));
    }
    let (sleep, web) = (&fabric.pods[0], &fabric.pods[1]);
    let _app = echo_app(web, "web", &[8080]);

    let dir = TempDir::new("rolling-update");
    std::fs::write(dir.0.join("mesh.yaml"), manifests(&ip, &netns_name)).unwrap();
    ca_init(&dir.0.join(".ca"));
    let xds = free_port();
    let _controlplane = plaintext_controlplane(&dir.0, xds);
    let socket = dir.0.join("node-a.sock");
    let _agent = Running(
        ztunnel()
            .args(["node-agent", "--source"])
            .arg(format!("manifests:{}", dir.0.display()))
            .args(["--node", "node-a", "--backend", "nftables", "--zds-socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let old = start_proxy(&dir.0, &socket, xds, "old");
    let ready = |p: &Proxy| http_get(p.readiness, "/healthz/ready").is_some_and(|(s, _)| s == 200);
    let start = Instant::now();
    while !ready(&old) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the old proxy never became ready: {}",
            std::fs::read_to_string(&old.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut old = Running(old.child);
    let old_log = dir.0.join("proxy-old.log");

    // Connections at about 100 a second for 8 s, each a greeting and an echo through the mesh.
    let target = format!("{}:8080", ip(2));
    let (host, port) = target.rsplit_once(':').unwrap();
    let load = Command::new("ip")
        .args(["netns", "exec", &sleep.0, "python3", "-c"])
        .arg(format!(
            "import socket,time\nok=0\nfails=[]\nend=time.time()+8\nwhile time.time()<end:\n  t=time.time()\n  try:\n    s=socket.create_connection(('{host}',{port}),timeout=3)\n    s.sendall(b'x')\n    s.shutdown(socket.SHUT_WR)\n    got=b''\n    while True:\n      d=s.recv(100)\n      if not d: break\n      got+=d\n    s.close()\n    if got==b'web:x': ok+=1\n    else: fails.append(repr(got))\n  except Exception as e:\n    fails.append(repr(e))\n  time.sleep(max(0,0.01-(time.time()-t)))\nprint(ok,len(fails),fails[:5],flush=True)"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    // The new proxy starts beside the old one and is ready once it serves both pods.
    let new = start_proxy(&dir.0, &socket, xds, "new");
    let start = Instant::now();
    while !ready(&new) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new proxy never became ready: {}",
            std::fs::read_to_string(&new.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _new = Running(new.child);
    std::thread::sleep(Duration::from_millis(1500));
    // Then the old one is stopped, as the DaemonSet controller does, and drains.
    assert!(
        Command::new("kill")
            .args(["-TERM", &old.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    while old.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the old proxy did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = load.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut fields = summary.splitn(3, ' ');
    let ok: usize = fields.next().unwrap_or("0").parse().unwrap_or(0);
    let failed: usize = fields.next().unwrap_or("1").parse().unwrap_or(1);
    assert_eq!(
        failed,
        0,
        "connections failed during the rolling update: {summary}\nwhat the proxies said of it:\n{}\n{}",
        trouble(&old_log),
        trouble(&dir.0.join("proxy-new.log"))
    );
    assert!(ok >= 300, "too few connections went through: {summary}");
    // Both proxies carried connections (the capture worked, and the new one took over).
    assert!(
        outbound_lines(&old_log) > 0,
        "the old proxy carried nothing"
    );
    assert!(
        outbound_lines(&dir.0.join("proxy-new.log")) > 0,
        "the new proxy carried nothing"
    );
    drop(_new);
    drop(fabric);
}
