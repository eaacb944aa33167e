//! The DNS proxy in a captured pod (root needed): the node agent captures the pod, the shared
//! proxy serves its DNS on 127.0.0.1:15053 in its namespace; a query for a mesh service is
//! answered from xDS, and with no upstream resolver configured an outside name is refused and
//! the refusal logged.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{
    Fabric, Netns, Running, TempDir, ca_init, dedicated_proxy, free_port, http_get, listens,
    plaintext_controlplane, python, start_proxy_with, wait, ztunnel,
};

/// Asks 127.0.0.1:15053 in `ns` over UDP (or TCP) for the A record of `name`; prints
/// `rcode ip...`.
fn dig(ns: &Netns, name: &str, tcp: bool) -> String {
    dig_at(ns, "127.0.0.1", 15053, name, tcp)
}

/// Asks `server:port` in `ns`.
fn dig_at(ns: &Netns, server: &str, port: u16, name: &str, tcp: bool) -> String {
    let code = format!(
        r#"import socket, struct
def q(name):
    out = struct.pack('>HHHHHH', 0x4242, 0x0100, 1, 0, 0, 0)
    for l in name.strip('.').split('.'):
        out += bytes([len(l)]) + l.encode()
    return out + b'\x00' + struct.pack('>HH', 1, 1)
msg = q('{name}')
if {tcp}:
    s = socket.create_connection(('{server}', {port}), timeout=5)
    s.sendall(struct.pack('>H', len(msg)) + msg)
    n = struct.unpack('>H', s.recv(2))[0]
    d = b''
    while len(d) < n: d += s.recv(n - len(d))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(msg, ('{server}', {port}))
    d, src = s.recvfrom(65535)
    if src != ('{server}', {port}):
        print('answered from', src); raise SystemExit
rcode = d[3] & 0x0f
ancount = struct.unpack('>H', d[6:8])[0]
ips = []
i = len(msg)
for _ in range(ancount):
    # name (a pointer or labels), type, class, ttl, rdlength
    if d[i] & 0xc0 == 0xc0: i += 2
    else:
        while d[i]: i += d[i] + 1
        i += 1
    t, _, _, n = struct.unpack('>HHIH', d[i:i+10]); i += 10
    if t == 1: ips.append(socket.inet_ntoa(d[i:i+4]))
    i += n
print(rcode, *ips)"#,
        tcp = if tcp { "True" } else { "False" }
    );
    let out = python(ns, &code);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

#[test]
fn a_captured_pods_dns_is_answered_by_the_node_proxy() {
    let pid = std::process::id();
    let ip = move |host: u8| format!("10.{}.{}.{host}", 100 + pid % 100, 50 - (pid / 100) % 50);
    let fabric = Fabric::new("dn", &[("sleep", 1)], &ip);
    let sleep = &fabric.pods[0];
    let dir = TempDir::new("dns");
    std::fs::write(
        dir.0.join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: sleep, namespace: default, uid: uid-sleep, annotations: {{ambient.local/netns: /var/run/netns/{}}}}}\nspec: {{serviceAccountName: sleep, nodeName: node-a}}\nstatus: {{podIP: {}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web-api, namespace: default}}\nspec: {{clusterIP: 10.96.7.7, ports: [{{port: 80}}]}}\n",
            sleep.0,
            ip(1)
        ),
    )
    .unwrap();
    ca_init(&dir.0.join(".ca"));
    let xds = free_port();
    let _controlplane = plaintext_controlplane(&dir.0, xds);
    let zds = dir.0.join("ztunnel.sock");
    let _agent = Running(
        ztunnel()
            .args(["node-agent", "--source"])
            .arg(format!("manifests:{}", dir.0.display()))
            .args(["--node", "node-a", "--backend", "nftables", "--zds-socket"])
            .arg(&zds)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // No upstream: only the mesh's names can be answered.
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(&resolv, "search example.internal\n").unwrap();
    let proxy = start_proxy_with(
        &dir.0,
        &zds,
        xds,
        "p",
        &["--dns-resolv-conf", resolv.to_str().unwrap()],
    );
    let stats = proxy.stats;
    let log = proxy.log.clone();
    let _proxy = Running(proxy.child);
    let start = std::time::Instant::now();
    while !listens(sleep, 15053) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the proxy does not serve DNS in the pod\nagent:\n{}\nproxy:\n{}",
            std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Names of the mesh, in each form a pod's resolver sends, over UDP and TCP.
    let mut answered = String::new();
    for _ in 0..50 {
        answered = dig(sleep, "web-api.default.svc.cluster.local", false);
        if answered == "0 10.96.7.7" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(answered, "0 10.96.7.7");
    assert_eq!(dig(sleep, "web-api", false), "0 10.96.7.7");
    assert_eq!(
        dig(sleep, "web-api.default.svc.cluster.local", true),
        "0 10.96.7.7"
    );
    // The pod's resolver asks its nameserver on port 53 (any address): the capture sends it to
    // the proxy, over UDP and TCP, and the answer comes back from the address asked.
    let nameserver = ip(254);
    assert_eq!(
        dig_at(sleep, &nameserver, 53, "web-api", false),
        "0 10.96.7.7"
    );
    assert_eq!(
        dig_at(sleep, &nameserver, 53, "web-api", true),
        "0 10.96.7.7"
    );
    // Not a mesh name, and no upstream: REFUSED (5), with the reason in the log.
    assert_eq!(dig(sleep, "example.net", false), "5");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("no upstream resolver is configured"),
        "{text}"
    );
    let (_, metrics) = http_get(stats, "/metrics").unwrap();
    assert!(
        metrics.contains("ztunnel_dns_requests_total{outcome=\"answered\"}"),
        "{metrics}"
    );
}

#[test]
fn dedicated_mode_serves_dns_on_dns_proxy_addr() {
    let ns = Netns::new("dnsded");
    assert!(ns.exec(&["ip", "link", "set", "lo", "up"]));
    let dir = TempDir::new("dns-dedicated");
    std::fs::write(
        dir.0.join("mesh.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: sleep, namespace: default}\nspec: {serviceAccountName: sleep, nodeName: node-a}\nstatus: {podIP: 10.77.1.1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-api, namespace: default}\nspec: {clusterIP: 10.96.7.8, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let ca = identity::DevCa::generate("cluster.local").unwrap();
    ca.issue_to_dir(
        &"spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap(),
        Duration::from_secs(3600),
        &dir.0.join("sleep"),
    )
    .unwrap();
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(&resolv, "").unwrap();
    let _proxy = Running(
        dedicated_proxy(
            &ns,
            &dir.0.join("mesh.yaml"),
            &dir.0.join("sleep"),
            "sleep",
            "node-a",
        )
        .arg("--dns-resolv-conf")
        .arg(&resolv)
        // Istio's form of the address.
        .env("DNS_PROXY_ADDR", "localhost:15053")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("proxy.log")).unwrap())
        .spawn()
        .unwrap(),
    );
    wait("the dedicated proxy serves DNS", || listens(&ns, 15053));
    assert_eq!(dig(&ns, "web-api", false), "0 10.96.7.8");
    assert_eq!(
        dig(&ns, "web-api.default.svc.cluster.local", true),
        "0 10.96.7.8"
    );
}
