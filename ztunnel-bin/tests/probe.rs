//! Kubelet probes under a policy that allows nobody (root needed): the node (here the fabric
//! namespace that holds the pods' bridge, where the node agent runs as it runs on a node's host
//! network) opens a plain TCP connection to the app, as the kubelet's probe does. Without the
//! probe rewrite it is captured and denied like anyone's; with `--kubelet-probe-snat` it leaves
//! the node as 169.254.7.127, which the pod's rules let through, and reaches the app. Another
//! pod is still denied. The same over IPv6 (the probe leaves as
//! fd16:9254:7127:1337:ffff:ffff:ffff:ffff). On SIGTERM the agent removes its node rules.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Fabric, Netns, Running, TempDir, ca_init, call, echo_app, free_port, listens,
    plaintext_controlplane, start_proxy,
};

fn node_table(fabric: &Netns) -> bool {
    [
        ("ip", "169.254.7.127"),
        ("ip6", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
    ]
    .iter()
    .all(|(family, source)| {
        let out = Command::new("ip")
            .args(["netns", "exec", &fabric.0, "nft", "list", "table"])
            .args([family, "ztunnel-host"])
            .output()
            .unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(source)
    })
}

fn wait(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_probe_from_the_node_reaches_an_app_whose_policy_allows_nobody() {
    let pid = std::process::id();
    let ip = move |host: u8| format!("10.{}.{}.{host}", 100 + pid % 100, 150 - (pid / 100) % 50);
    let fabric = Fabric::new("pr", &[("sleep", 1), ("web", 2)], &ip);
    let (sleep, web) = (&fabric.pods[0], &fabric.pods[1]);
    let ip6 = move |host: u8| format!("fd0e:{:x}::{host:x}", pid % 0xffff);
    assert!(fabric.bridge.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/64", ip6(254)),
        "dev",
        "br0",
        "nodad"
    ]));
    for (pod, host) in fabric.pods.iter().zip([1u8, 2]) {
        // Replies to the probe address go back through the node, as on a real pod network.
        assert!(pod.exec(&["ip", "route", "add", "default", "via", &ip(254)]));
        let own = format!("{}/64", ip6(host));
        assert!(pod.exec(&["ip", "-6", "addr", "add", &own, "dev", "eth0", "nodad"]));
        assert!(pod.exec(&["ip", "-6", "route", "add", "default", "via", &ip6(254)]));
    }
    let _app = echo_app(web, "web", &[8080]);
    let dir = TempDir::new("probe");
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n",
    );
    for (pod, host, ns) in [("sleep", 1, sleep), ("web", 2, web)] {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: default, uid: uid-{pod}, labels: {{app: {pod}}}, annotations: {{ambient.local/netns: /var/run/netns/{}}}}}\nspec: {{serviceAccountName: {pod}, nodeName: node-a}}\nstatus: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}], conditions: [{{type: Ready, status: \"True\"}}]}}\n",
            ns.0,
            ip(host),
            ip(host),
            ip6(host)
        ));
    }
    text.push_str("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: nobody, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/nobody]}}]\n");
    std::fs::write(dir.0.join("mesh.yaml"), text).unwrap();
    ca_init(&dir.0.join(".ca"));
    let xds = free_port();
    let _controlplane = plaintext_controlplane(&dir.0, xds);
    let zds = dir.0.join("ztunnel.sock");
    let agent = |snat: bool, log: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &fabric.bridge.0])
            .arg(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["node-agent", "--source"])
            .arg(format!("manifests:{}", dir.0.display()))
            .args(["--node", "node-a", "--backend", "nftables", "--zds-socket"])
            .arg(&zds)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join(log)).unwrap());
        if snat {
            cmd.arg("--kubelet-probe-snat");
        }
        Running(cmd.spawn().unwrap())
    };
    let first = agent(false, "agent1.log");
    let proxy = start_proxy(&dir.0, &zds, xds, "p");
    let _proxy = Running(proxy.child);
    wait("the proxy serves web", Duration::from_secs(20), || {
        listens(web, 15006)
    });

    // Without the rewrite, the node's connection is captured and denied as anyone's, in
    // either family.
    assert_eq!(
        call(&fabric.bridge, &format!("{}:8080", ip(2)), "probe"),
        ""
    );
    assert_eq!(
        call(&fabric.bridge, &format!("{}:8080", ip6(2)), "probe"),
        ""
    );

    // With it: the same connection reaches the app.
    drop(first);
    let second = agent(true, "agent2.log");
    wait("the node's probe rules", Duration::from_secs(10), || {
        node_table(&fabric.bridge)
    });
    let start = Instant::now();
    let answer = loop {
        let answer = call(&fabric.bridge, &format!("{}:8080", ip(2)), "probe");
        if answer == "web:probe" || start.elapsed() > Duration::from_secs(10) {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        answer,
        "web:probe",
        "agent:\n{}",
        std::fs::read_to_string(dir.0.join("agent2.log")).unwrap_or_default()
    );
    let answer6 = loop {
        let answer = call(&fabric.bridge, &format!("{}:8080", ip6(2)), "probe");
        if answer == "web:probe" || start.elapsed() > Duration::from_secs(15) {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(answer6, "web:probe", "over IPv6");
    // Another pod is still denied: the rewrite is the node's only.
    assert_eq!(call(sleep, &format!("{}:8080", ip(2)), "hello"), "");
    assert_eq!(call(sleep, &format!("{}:8080", ip6(2)), "hello"), "");

    // SIGTERM: the agent removes its node rules before it exits.
    let mut second = second;
    assert!(
        Command::new("kill")
            .args(["-TERM", &second.0.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait("the agent exits", Duration::from_secs(10), || {
        second.0.try_wait().unwrap().is_some()
    });
    assert!(!node_table(&fabric.bridge), "node rules left behind");
}
