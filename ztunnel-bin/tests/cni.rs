//! The CNI plugin as a container runtime runs it (the `ztunnel-cni` binary, its environment,
//! the network configuration on stdin), against `ztunnel node-agent --cni-socket` and a real
//! `ztunnel proxy` on real network namespaces (root needed).
//!
//! `ztunnel-cni` is another package's binary: `cargo test --workspace` builds it beside
//! `ztunnel`; run alone, build it first (`cargo build -p ztunnel-cni`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    Fabric, Netns, Running, TempDir, ca_init, echo_app, free_port, has_capture_rules, http_get,
    invoke_plugin, listens, plaintext_controlplane, plugin_binary, start_proxy, ztunnel,
};

/// The runtime's invocation of the plugin for pod `namespace/name` in `netns` at `ip`.
fn plugin(command: &str, socket: &Path, pod: (&str, &str), netns: &Netns, ip: &str) -> Child {
    invoke_plugin(command, socket, pod, netns, ip, serde_json::json!({}))
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

#[test]
fn add_returns_only_once_the_pod_is_captured_and_served_and_del_releases() {
    let pid = std::process::id();
    let ip = move |host: u8| format!("10.{}.{}.{host}", 100 + pid % 100, 200 - (pid / 100) % 50);
    let fabric = Fabric::new("cn", &[("web", 2), ("plain", 3)], &ip);
    let (web, plain) = (&fabric.pods[0], &fabric.pods[1]);
    let _app = echo_app(web, "web", &[8080]);
    let dir = TempDir::new("cni-e2e");
    // The pods as the API server would list them when the runtime sets up their sandboxes:
    // scheduled here, no address yet (so nothing but the runtime's word says where they are).
    std::fs::write(
        dir.0.join("mesh.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: default, uid: uid-web}\nspec: {serviceAccountName: web, nodeName: node-a}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: plain, namespace: other, uid: uid-plain}\nspec: {nodeName: node-a}\n",
    )
    .unwrap();
    ca_init(&dir.0.join(".ca"));
    let xds = free_port();
    let _controlplane = plaintext_controlplane(&dir.0, xds);
    let zds = dir.0.join("ztunnel.sock");
    let cni = dir.0.join("cni.sock");
    let (health, metrics) = (free_port(), free_port());
    let agent = |log: &str| {
        Running(
            ztunnel()
                .args(["node-agent", "--source"])
                .arg(format!("manifests:{}", dir.0.display()))
                .args(["--node", "node-a", "--backend", "nftables", "--zds-socket"])
                .arg(&zds)
                .arg("--cni-socket")
                .arg(&cni)
                .args(["--health-addr", &health.to_string()])
                .args(["--metrics-addr", &metrics.to_string()])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.0.join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut running_agent = Some(agent("agent.log"));
    let start = Instant::now();
    while !cni.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no CNI socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    // No proxy yet: the ADD of a mesh pod waits (its rules go in, but nobody serves it).
    let add = plugin("ADD", &cni, ("default", "web"), web, &ip(2));
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    while !has_capture_rules(web) {
        assert!(start.elapsed() < Duration::from_secs(5), "no rules in web");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!listens(web, 15008));
    let mut add = add;
    assert!(
        add.try_wait().unwrap().is_none(),
        "ADD returned before any proxy served the pod"
    );
    // The proxy comes: the ADD returns once it listens in the pod, with the primary's result.
    let proxy = start_proxy(&dir.0, &zds, xds, "p");
    let _proxy = Running(proxy.child);
    let out = finish(add);
    assert!(
        out.status.success(),
        "ADD failed: {}\n{}\nagent:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default()
    );
    assert!(
        listens(web, 15008) && listens(web, 15001) && listens(web, 15006),
        "ADD returned but the proxy does not serve the pod"
    );
    assert!(has_capture_rules(web));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["ips"][0]["address"], format!("{}/24", ip(2)));
    // The agent's readiness and metrics say so.
    assert_eq!(
        http_get(health, "/healthz/ready").map(|(s, _)| s),
        Some(200)
    );
    let (status, text) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in [
        "ztunnel_node_agent_pods_captured 1",
        "ztunnel_node_agent_cni_requests_total{event=\"ADD\",outcome=\"captured\"} 1",
        "ztunnel_node_agent_zds_connections 1",
        "ztunnel_node_agent_synced 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }

    // A pod outside the mesh passes at once, untouched.
    let out = finish(plugin("ADD", &cni, ("other", "plain"), plain, &ip(3)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!has_capture_rules(plain));

    // DEL releases: rules out, the proxy stops serving the pod.
    let out = finish(plugin("DEL", &cni, ("default", "web"), web, &ip(2)));
    assert!(out.status.success());
    assert!(
        !has_capture_rules(web),
        "DEL returned with the rules still in"
    );
    let start = Instant::now();
    while listens(web, 15008) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the proxy still serves web"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The agent down: a mesh pod's ADD fails (the kubelet will try again), nothing captured.
    drop(running_agent.take());
    let out = finish(plugin("ADD", &cni, ("default", "web"), web, &ip(2)));
    assert!(!out.status.success());
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["code"], 11, "{error}");
    assert!(!has_capture_rules(web));

    // Back up: the ADD succeeds again.
    let _agent = agent("agent2.log");
    let start = Instant::now();
    let out = loop {
        let out = finish(plugin("ADD", &cni, ("default", "web"), web, &ip(2)));
        if out.status.success() || start.elapsed() > Duration::from_secs(20) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(has_capture_rules(web) && listens(web, 15008));
}

#[test]
fn install_cni_copies_the_plugin_chains_it_with_a_kubeconfig_and_chains_again() {
    let dir = TempDir::new("cni-install");
    let (bin, conf) = (dir.0.join("bin"), dir.0.join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    let primary = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
        "plugins": [{"type": "bridge", "bridge": "cni0"}]});
    std::fs::write(conf.join("10-bridge.conflist"), primary.to_string()).unwrap();
    let given = dir.0.join("kubeconfig");
    std::fs::write(&given, "apiVersion: v1\nkind: Config\n").unwrap();
    std::fs::create_dir_all(dir.0.join("manifests")).unwrap();
    let cni = dir.0.join("cni.sock");
    let agent = |extra: &[&str]| {
        let mut cmd = ztunnel();
        cmd.args(["node-agent", "--source"])
            .arg(format!("manifests:{}", dir.0.join("manifests").display()))
            .args(["--node", "node-a", "--backend", "nftables"])
            .arg("--install-cni")
            .arg(format!("{},{}", bin.display(), conf.display()))
            .arg("--cni-plugin")
            .arg(plugin_binary())
            .arg("--cni-kubeconfig")
            .arg(&given)
            .args(extra)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    // Without the socket, installing is refused: the plugin would fail every mesh pod.
    let out = agent(&[]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs --cni-socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _agent = Running(
        agent(&["--cni-socket", cni.to_str().unwrap()])
            .stderr(std::fs::File::create(dir.0.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let chained = || -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(conf.join("10-bridge.conflist")).ok()?;
        let config: serde_json::Value = serde_json::from_str(&text).ok()?;
        config["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["type"] == "ztunnel-cni")
            .cloned()
    };
    let start = Instant::now();
    while chained().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never chained: {}",
            std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let entry = chained().unwrap();
    assert_eq!(entry["agent_socket"], cni.display().to_string());
    // The plugin decides as the agent does while the agent is down.
    assert_eq!(
        entry["exclude_namespaces"],
        serde_json::json!(["kube-system"])
    );
    let kubeconfig = PathBuf::from(entry["kubernetes"]["kubeconfig"].as_str().unwrap());
    assert_eq!(kubeconfig, conf.join("ZZZ-ztunnel-cni-kubeconfig"));
    assert_eq!(
        std::fs::read_to_string(&kubeconfig).unwrap(),
        std::fs::read_to_string(&given).unwrap()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(bin.join("ztunnel-cni"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755);
    }
    // The primary CNI rewrites its file: chained again.
    std::fs::write(conf.join("10-bridge.conflist"), primary.to_string()).unwrap();
    let start = Instant::now();
    while chained().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not chained again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The kubeconfig it was given changes (a rotated token): written again.
    std::fs::write(&given, "apiVersion: v1\nkind: Config\n# rotated\n").unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .contains("rotated")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "kubeconfig not refreshed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
