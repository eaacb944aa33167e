//! Taking a node over from istio-cni and handing it back (root needed): a test namespace stands
//! for the node (the agent runs in it, as on a node's host network), another for a pod that
//! istio-cni captured; istio-cni's rules (as it writes them: `ISTIO_*` chains, its nftables
//! tables, its node probe chain) and its chained plugin are in place.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, Running, TempDir};

fn sh(ns: &Netns, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sh", "-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "in {}: {cmd}: {}",
        ns.0,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every rule of every table, both tools.
fn rules(ns: &Netns) -> String {
    sh(ns, "iptables-save; nft list ruleset")
}

fn plugin_types(conf: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(conf.join("10-bridge.conflist")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_node_taken_over_from_istio_cni_holds_one_rule_set_and_is_handed_back_clean() {
    let node = Netns::new("to-node");
    let pod = Netns::new("to-pod");
    // istio-cni's in-pod rules (a subset of what it writes, with its names).
    sh(
        &pod,
        "iptables -t mangle -N ISTIO_PRERT && iptables -t mangle -A PREROUTING -j ISTIO_PRERT \
         && iptables -t mangle -A ISTIO_PRERT -s 169.254.7.127 -p tcp -j ACCEPT \
         && iptables -t nat -N ISTIO_OUTPUT && iptables -t nat -A OUTPUT -j ISTIO_OUTPUT \
         && iptables -t nat -A ISTIO_OUTPUT -p tcp -j REDIRECT --to-ports 15001 \
         && nft add table inet istio-ambient-nat \
         && nft add chain inet istio-ambient-nat output '{ type nat hook output priority -100 ; }'",
    );
    // Its node rules.
    sh(
        &node,
        "iptables -t nat -N ISTIO_POSTRT && iptables -t nat -A POSTROUTING -j ISTIO_POSTRT \
         && iptables -t nat -A ISTIO_POSTRT -m owner --socket-exists -p tcp -j SNAT --to-source 169.254.7.127 \
         && iptables -t nat -A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE",
    );
    let dir = TempDir::new("takeover");
    let (bin, conf) = (dir.0.join("bin"), dir.0.join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("10-bridge.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"istio-cni","kubernetes":{"kubeconfig":"/etc/cni/net.d/ZZZ-istio-cni-kubeconfig"}}]}"#,
    )
    .unwrap();
    let manifests = dir.0.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: uid-web, annotations: {{ambient.local/netns: /var/run/netns/{}}}}}\nspec: {{nodeName: node-a}}\n",
            pod.0
        ),
    )
    .unwrap();
    let plugin = std::path::Path::new(env!("CARGO_BIN_EXE_ztunnel")).with_file_name("ztunnel-cni");
    assert!(
        plugin.exists(),
        "build ztunnel-cni first (cargo build -p ztunnel-cni)"
    );
    let agent = |extra: &[&str], log: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.0])
            .arg(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["node-agent", "--source"])
            .arg(format!("manifests:{}", manifests.display()))
            .args(["--node", "node-a", "--backend", "iptables", "--install-cni"])
            .arg(format!("{},{}", bin.display(), conf.display()))
            .arg("--cni-plugin")
            .arg(&plugin)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join(log)).unwrap());
        cmd
    };
    let socket = dir.0.join("cni.sock");
    let running = Running(
        agent(
            &[
                "--take-over",
                "--kubelet-probe-snat",
                "--cni-socket",
                socket.to_str().unwrap(),
            ],
            "takeover.log",
        )
        .spawn()
        .unwrap(),
    );
    let start = Instant::now();
    while !rules(&pod).contains("ZTUNNEL_PREROUTING") {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the pod was not captured: {}",
            std::fs::read_to_string(dir.0.join("takeover.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One rule set in the pod: ours.
    let in_pod = rules(&pod);
    assert!(!in_pod.contains("ISTIO_"), "{in_pod}");
    assert!(!in_pod.contains("istio-ambient"), "{in_pod}");
    // The node: istio-cni's probe chain out, ours in, the node's other rules untouched.
    let on_node = rules(&node);
    assert!(!on_node.contains("ISTIO_POSTRT"), "{on_node}");
    assert!(on_node.contains("-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE"));
    let start = Instant::now();
    while !rules(&node).contains("ZTUNNEL_POSTRT") {
        assert!(start.elapsed() < Duration::from_secs(10), "no probe rule");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The plugins: istio-cni's out, ours in.
    assert_eq!(plugin_types(&conf), ["bridge", "ztunnel-cni"]);

    // Stopped (SIGTERM) and handed back: ours out everywhere.
    let mut running = running;
    Command::new("kill")
        .args(["-TERM", &running.0.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    while running.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = agent(&["--hand-back"], "handback.log").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(dir.0.join("handback.log")).unwrap_or_default()
    );
    let in_pod = rules(&pod);
    assert!(!in_pod.contains("ZTUNNEL"), "{in_pod}");
    assert!(!rules(&node).contains("ZTUNNEL"));
    assert!(rules(&node).contains("-A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE"));
    assert_eq!(plugin_types(&conf), ["bridge"]);
    assert!(!conf.join("ZZZ-ztunnel-cni-kubeconfig").exists());
}
