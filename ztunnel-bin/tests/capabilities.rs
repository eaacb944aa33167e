//! The node agent with only the capabilities `deploy/node-agent/daemonset.yaml` grants it
//! (NET_ADMIN, NET_RAW, SYS_PTRACE, SYS_ADMIN, DAC_OVERRIDE: the bounding set of the process and
//! of every tool it runs), root needed: it still captures a pod with either backend, keeps the
//! node's probe rules and serves both sockets. A capability missing from the DaemonSet would
//! fail this test before it failed a node.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, Running, TempDir};

/// The capabilities of the DaemonSet, as `setpriv --bounding-set` names them.
const CAPABILITIES: &str = "-all,+net_admin,+net_raw,+sys_ptrace,+sys_admin,+dac_override";
/// The same as a mask (DAC_OVERRIDE 1, NET_ADMIN 12, NET_RAW 13, SYS_PTRACE 19, SYS_ADMIN 21).
const MASK: u64 = (1 << 1) | (1 << 12) | (1 << 13) | (1 << 19) | (1 << 21);

fn sh(ns: &Netns, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "sh", "-c", cmd])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DaemonSet lists exactly these capabilities.
#[test]
fn the_daemonset_grants_exactly_the_capabilities_tested() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/node-agent/daemonset.yaml"
    ))
    .unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let security = &doc["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["privileged"], serde_yaml::Value::Bool(false));
    let mut added: Vec<String> = security["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect();
    added.sort();
    let mut tested: Vec<String> = CAPABILITIES
        .split(',')
        .filter_map(|c| c.strip_prefix('+'))
        .map(str::to_owned)
        .collect();
    tested.sort();
    assert_eq!(added, tested);
    assert_eq!(
        security["capabilities"]["drop"][0].as_str(),
        Some("ALL"),
        "the DaemonSet must drop every other capability"
    );
}

#[test]
fn with_only_the_daemonsets_capabilities_the_agent_captures_and_keeps_node_rules() {
    for backend in ["iptables", "nftables"] {
        let node = Netns::new(&format!("cap-node-{}", &backend[..3]));
        let pod = Netns::new(&format!("cap-pod-{}", &backend[..3]));
        let dir = TempDir::new(&format!("caps-{backend}"));
        std::fs::write(
            dir.0.join("mesh.yaml"),
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: uid-web, annotations: {{ambient.local/netns: /var/run/netns/{}}}}}\nspec: {{nodeName: node-a}}\nstatus: {{podIP: 10.77.0.9}}\n",
                pod.0
            ),
        )
        .unwrap();
        let (zds, cni) = (dir.0.join("ztunnel.sock"), dir.0.join("cni.sock"));
        let log = dir.0.join("agent.log");
        let agent = Running(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &node.0,
                    "setpriv",
                    "--bounding-set",
                    CAPABILITIES,
                ])
                .args(["--inh-caps=-all", "--"])
                .arg(env!("CARGO_BIN_EXE_ztunnel"))
                .args(["node-agent", "--source"])
                .arg(format!("manifests:{}", dir.0.display()))
                .args([
                    "--node",
                    "node-a",
                    "--backend",
                    backend,
                    "--kubelet-probe-snat",
                ])
                .arg("--zds-socket")
                .arg(&zds)
                .arg("--cni-socket")
                .arg(&cni)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let start = Instant::now();
        loop {
            let in_pod = sh(&pod, "iptables-save; nft list ruleset");
            let on_node = sh(&node, "iptables-save; nft list ruleset");
            if (in_pod.contains("ZTUNNEL_PREROUTING") || in_pod.contains("redirect to :15001"))
                && (on_node.contains("ZTUNNEL_POSTRT") || on_node.contains("ztunnel-host"))
                && zds.exists()
                && cni.exists()
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{backend}: not captured with the DaemonSet's capabilities:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // By now `ip netns exec` and `setpriv` have become the agent.
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).unwrap_or_default();
        let bounding = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap());
        assert_eq!(
            bounding,
            Some(MASK),
            "{backend}: the agent runs with more than the DaemonSet grants"
        );
        let warnings: Vec<String> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
            .map(str::to_owned)
            .collect();
        assert!(warnings.is_empty(), "{backend}: {warnings:#?}");
        drop(agent);
    }
}
