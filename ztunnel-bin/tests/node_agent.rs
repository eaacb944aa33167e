//! `ztunnel node-agent --source manifests:DIR` with real network namespaces (root needed):
//! labelling the namespace captures the pod within a second; opting the pod out releases it; a
//! proxy on the ZDS socket is handed the pod's network namespace and then told it is gone.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Running, TempDir, ztunnel};
use redirect::zds::proto::Payload;
use redirect::zds::run_test_peer;

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn captured(ns: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("inet ztunnel")
}

fn write_manifests(dir: &std::path::Path, ns: &str, ambient: bool, opt_out: bool) {
    let ns_labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    let pod_labels = if opt_out {
        "{app: web, istio.io/dataplane-mode: none}"
    } else {
        "{app: web}"
    };
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {ns_labels}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: default, uid: u-web, labels: {pod_labels}, annotations: {{ambient.local/netns: /var/run/netns/{ns}}}}}\nspec: {{nodeName: node-a}}\nstatus: {{podIP: 10.244.0.5}}\n"
    );
    // Write then rename, so the agent never reads a half-written file.
    let tmp = dir.join(".mesh.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("mesh.yaml")).unwrap();
}

fn wait(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn node_agent_follows_labels() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test needs root (CI runs as root)"
    );
    let ns = Netns(format!("ztn-{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    let dir = TempDir::new("node-agent");
    write_manifests(&dir.0, &ns.0, false, false);
    let socket = dir.0.join("zds.sock");
    let _agent = Running(
        ztunnel()
            .args([
                "node-agent",
                "--source",
                &format!("manifests:{}", dir.0.display()),
                "--node",
                "node-a",
                "--backend",
                "nftables",
                "--zds-socket",
                socket.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait("the ZDS socket", || socket.exists());
    let (tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = run_test_peer(&socket, |request, fd| {
            let _ = tx.send(match request.payload {
                Some(Payload::Add(add)) => format!("add {} fd={}", add.uid, fd.is_some()),
                Some(Payload::Del(del)) => format!("del {}", del.uid),
                Some(Payload::SnapshotSent(_)) => "snapshot".to_owned(),
                other => format!("unexpected {other:?}"),
            });
            String::new()
        });
    });
    let next = || seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(next(), "snapshot");
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !captured(&ns.0),
        "captured before the namespace was ambient"
    );
    write_manifests(&dir.0, &ns.0, true, false);
    let took = wait("capture after labelling the namespace", || captured(&ns.0));
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(next(), "add u-web fd=true");
    write_manifests(&dir.0, &ns.0, true, true);
    wait("release after the opt-out label", || !captured(&ns.0));
    assert_eq!(next(), "del u-web");
}

#[test]
fn kube_source_without_configuration_is_a_clear_error() {
    let dir = TempDir::new("node-agent-kube");
    let out = ztunnel()
        .args(["node-agent", "--source", "kube", "--node", "node-a"])
        .env("KUBECONFIG", dir.0.join("missing-kubeconfig"))
        .env("HOME", &dir.0)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--source"), "{stderr}");
    assert!(stderr.contains("missing-kubeconfig"), "{stderr}");
}
