//! The node agent as it runs in a cluster, end to end (root needed): `ztunnel node-agent
//! --source kube` against the Kubernetes API emulator (HTTPS, the agent's own service-account
//! token, the RBAC of `deploy/node-agent/rbac.yaml`), the `ztunnel-cni` binary invoked as a
//! container runtime invokes it, and a real `ztunnel proxy`. Pods are listed as the API server
//! lists them when their sandboxes are made: scheduled here, no address yet.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use common::{
    Fabric, Netns, Running, TempDir, ca_init, free_port, has_capture_rules, invoke_plugin,
    plaintext_controlplane, start_proxy, wait, ztunnel,
};
use kube_emulator::ApiServer;
use serde_json::{Value, json};

const REDIRECTION: &str = "ambient.istio.io/redirection";

fn plugin(socket: &Path, kubeconfig: &Path, pod: (&str, &str), netns: &Netns, ip: &str) -> Output {
    let extra = json!({"kubernetes": {"kubeconfig": kubeconfig.display().to_string()}});
    invoke_plugin("ADD", socket, pod, netns, ip, extra)
        .wait_with_output()
        .unwrap()
}

fn annotation(server: &ApiServer, namespace: &str, name: &str) -> Option<String> {
    server.get("pods", Some(namespace), name)?["metadata"]["annotations"][REDIRECTION]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn in_a_cluster_new_pods_are_captured_annotated_and_released_and_others_left_alone() {
    let pid = std::process::id();
    let ip = move |host: u8| format!("10.{}.{}.{host}", 100 + pid % 100, 100 - (pid / 100) % 50);
    let pods = [
        ("shop", "web", 2, json!({})),
        (
            "kube-system",
            "coredns",
            3,
            json!({"istio.io/dataplane-mode": "ambient"}),
        ),
        (
            "shop",
            "batch",
            4,
            json!({"istio.io/dataplane-mode": "none"}),
        ),
        ("other", "plain", 5, json!({})),
        ("shop", "legacy", 6, json!({})),
    ];
    let hosts: Vec<(&str, u8)> = pods
        .iter()
        .map(|(_, name, host, _)| (*name, *host))
        .collect();
    let fabric = Fabric::new("cl", &hosts, &ip);
    let netns = |name: &str| &fabric.pods[pods.iter().position(|p| p.1 == name).unwrap()];

    let server = ApiServer::start().unwrap();
    server
        .load_rbac(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/node-agent/rbac.yaml"
            ))
            .unwrap(),
        )
        .unwrap();
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    server.put(json!({"kind": "Namespace", "metadata": {"name": "shop", "labels": ambient}}));
    server.put(json!({"kind": "Namespace", "metadata": {"name": "kube-system"}}));
    server.put(json!({"kind": "Namespace", "metadata": {"name": "other"}}));
    for (namespace, name, _, labels) in &pods {
        let annotations = if *name == "legacy" {
            json!({"sidecar.istio.io/status": "{}"})
        } else {
            json!({})
        };
        server.put(json!({"kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"),
                         "labels": labels, "annotations": annotations},
            "spec": {"nodeName": "node-a", "serviceAccountName": name, "containers": []},
            "status": {"phase": "Pending"}}));
    }
    let dir = TempDir::new("cluster");
    let kubeconfig = dir.0.join("kubeconfig");
    server
        .kubeconfig(
            &kubeconfig,
            &server.token_for("istio-system", "ztunnel-node-agent"),
        )
        .unwrap();
    // The proxy's control plane (its workloads matter little here: the proxy serves the pods it
    // is handed; a pod on node-a makes the control plane issue node-a's token).
    std::fs::create_dir_all(dir.0.join("mesh")).unwrap();
    std::fs::write(
        dir.0.join("mesh/mesh.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, uid: uid-web}\nspec: {serviceAccountName: web, nodeName: node-a}\n",
    )
    .unwrap();
    ca_init(&dir.0.join("mesh/.ca"));
    let xds = free_port();
    let _controlplane = plaintext_controlplane(&dir.0.join("mesh"), xds);
    let (zds, cni) = (dir.0.join("ztunnel.sock"), dir.0.join("cni.sock"));
    let agent = || {
        Running(
            ztunnel()
                .args([
                    "node-agent",
                    "--source",
                    "kube",
                    "--backend",
                    "nftables",
                    "--zds-socket",
                ])
                .arg(&zds)
                .arg("--cni-socket")
                .arg(&cni)
                .env("NODE_NAME", "node-a")
                .env("KUBECONFIG", &kubeconfig)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.0.join("agent.log")).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let running = agent();
    wait("the CNI socket", || cni.exists());
    let proxy = start_proxy(&dir.0.join("mesh"), &zds, xds, "p");
    let _proxy = Running(proxy.child);
    let log = || {
        std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default()
            + "\nproxy:\n"
            + &std::fs::read_to_string(dir.0.join("mesh/proxy-p.log")).unwrap_or_default()
    };

    for (namespace, name, host, _) in &pods {
        let out = plugin(
            &cni,
            &kubeconfig,
            (namespace, name),
            netns(name),
            &ip(*host),
        );
        assert!(
            out.status.success(),
            "{namespace}/{name}: {}\nagent:\n{}",
            String::from_utf8_lossy(&out.stdout),
            log()
        );
    }
    // Only web joined; the API server says so.
    assert!(has_capture_rules(netns("web")));
    wait("web annotated enabled", || {
        annotation(&server, "shop", "web").as_deref() == Some("enabled")
    });
    for (namespace, name, _, _) in &pods[1..] {
        assert!(!has_capture_rules(netns(name)), "{name} was captured");
        assert_eq!(annotation(&server, namespace, name), None, "{name}");
    }
    // Every call the agent made was its own, allowed by the deployed RBAC.
    for seen in server
        .seen()
        .iter()
        .filter(|s| s.user.contains("ztunnel-node-agent"))
    {
        assert!(seen.status < 400, "{seen:?}");
    }

    // Its namespace leaves the mesh: released, and the annotation removed.
    server.put(json!({"kind": "Namespace", "metadata": {"name": "shop"}}));
    wait("web released and its annotation removed", || {
        !has_capture_rules(netns("web")) && annotation(&server, "shop", "web").is_none()
    });
    server.put(json!({"kind": "Namespace", "metadata": {"name": "shop", "labels": ambient}}));

    // The agent down: the plugin asks the API server and fails only mesh pods.
    drop(running);
    let out = plugin(&cni, &kubeconfig, ("shop", "web"), netns("web"), &ip(2));
    assert!(!out.status.success());
    let error: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["code"], 11, "{error}");
    let out = plugin(
        &cni,
        &kubeconfig,
        ("other", "plain"),
        netns("plain"),
        &ip(5),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
