//! The redirection annotation (`ambient.istio.io/redirection`) as the node agent writes it
//! through `pods/status`, against the Kubernetes API emulator (HTTPS, a service account token,
//! the RBAC of `deploy/`), with real network namespaces found by the pods' IPs and a proxy
//! stand-in on the ZDS socket. Needs root.

mod common;

use common::{Netns, TempDir};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube_emulator::ApiServer;
use redirect::agent::{NodeAgent, REDIRECTION_ANNOTATION};
use redirect::k8s::KubeSource;
use redirect::zds::proto::Payload;
use redirect::zds::{ZdsServer, run_test_peer};
use redirect::{Backend, RuleSet};
use serde_json::{Value, json};

/// The agent's RBAC as `deploy/` grants it.
fn rbac() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/node-agent/rbac.yaml"
    );
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pod(name: &str, namespace: &str, ip: &str, labels: Value, annotations: Value) -> Value {
    json!({"kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels,
                        "annotations": annotations},
           "spec": {"nodeName": "node-a", "serviceAccountName": name, "containers": []},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn annotation(server: &ApiServer, namespace: &str, name: &str) -> Option<String> {
    server.get("pods", Some(namespace), name).and_then(|p| {
        p["metadata"]["annotations"][REDIRECTION_ANNOTATION]
            .as_str()
            .map(str::to_owned)
    })
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pod's namespace holding `ip` on a veth (found by the agent's IP scan).
fn pod_netns(tag: &str, ip: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.exec(&format!(
        "ip link add eth0 type veth peer name eth1 && ip addr add {ip}/32 dev eth0 && ip link set eth1 up && ip link set eth0 up"
    ));
    ns
}

#[test]
fn pods_are_annotated_enabled_pending_and_not_at_all_as_their_capture_stands() {
    let pid = std::process::id();
    let ip = |host: u8| format!("10.{}.{}.{host}", 150 + pid % 50, (pid / 50) % 250);
    let web_ns = pod_netns("ka-web", &ip(1));
    let sys_ns = pod_netns("ka-sys", &ip(2));
    let side_ns = pod_netns("ka-side", &ip(3));
    let none_ns = pod_netns("ka-none", &ip(4));
    let server = ApiServer::start().unwrap();
    server.load_rbac(&rbac()).unwrap();
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    server.put(json!({"kind": "Namespace", "metadata": {"name": "shop", "labels": ambient}}));
    server.put(json!({"kind": "Namespace", "metadata": {"name": "kube-system"}}));
    server.put(pod("web", "shop", &ip(1), json!({}), json!({})));
    server.put(pod(
        "coredns",
        "kube-system",
        &ip(2),
        ambient.clone(),
        json!({}),
    ));
    server.put(pod(
        "legacy",
        "shop",
        &ip(3),
        json!({}),
        json!({"sidecar.istio.io/status": "{}"}),
    ));
    server.put(pod(
        "batch",
        "shop",
        &ip(4),
        json!({"istio.io/dataplane-mode": "none"}),
        json!({}),
    ));

    let dir = TempDir::new("kube-annotation");
    let zds_path = dir.0.join("ztunnel.sock");
    let zds = ZdsServer::bind(&zds_path).unwrap();
    let refuse = Arc::new(AtomicBool::new(true));
    let refusing = refuse.clone();
    std::thread::spawn(move || {
        let _ = run_test_peer(&zds_path, |request, _| match request.payload {
            Some(Payload::Add(_)) if refusing.load(Ordering::SeqCst) => "no certificate yet".into(),
            _ => String::new(),
        });
    });

    let kubeconfig = dir.0.join("kubeconfig");
    let token = server.token_for("istio-system", "ztunnel-node-agent");
    server.kubeconfig(&kubeconfig, &token).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let source = runtime.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        KubeSource::start(kube::Client::try_from(config).unwrap(), "node-a")
    });
    let agent = NodeAgent::new("node-a", Backend::Nftables, RuleSet::default(), source, zds);
    let stop = Arc::new(AtomicBool::new(false));
    let keep = stop.clone();
    std::thread::spawn(move || {
        agent.run_while(Duration::from_millis(100), || !keep.load(Ordering::SeqCst));
    });
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop = Stop(stop);

    // Captured, but the proxy does not take it: pending.
    wait_until("web annotated pending", || {
        annotation(&server, "shop", "web").as_deref() == Some("pending")
    });
    assert!(web_ns.ruleset().contains("redirect to :15001"));
    // The proxy takes it: enabled.
    refuse.store(false, Ordering::SeqCst);
    wait_until("web annotated enabled", || {
        annotation(&server, "shop", "web").as_deref() == Some("enabled")
    });
    // Out of the mesh (its namespace unlabelled): rules out, annotation removed.
    server.put(json!({"kind": "Namespace", "metadata": {"name": "shop"}}));
    wait_until("web's annotation removed", || {
        annotation(&server, "shop", "web").is_none()
    });
    assert!(!web_ns.ruleset().contains("redirect to :15001"));

    // Never captured nor annotated: kube-system, a sidecar's pod, dataplane-mode=none.
    for (name, namespace, ns) in [
        ("coredns", "kube-system", &sys_ns),
        ("legacy", "shop", &side_ns),
        ("batch", "shop", &none_ns),
    ] {
        assert_eq!(annotation(&server, namespace, name), None, "{name}");
        assert!(!ns.ruleset().contains("redirect to"), "{name} was captured");
    }
    // Every patch went through pods/status with the agent's own token, none refused.
    let patches: Vec<_> = server
        .seen()
        .into_iter()
        .filter(|s| s.method == "PATCH")
        .collect();
    assert!(patches.len() >= 3, "{patches:?}");
    for p in &patches {
        assert!(p.target.contains("/pods/web/status"), "{p:?}");
        assert_eq!(p.status, 200, "{p:?}");
        assert_eq!(
            p.user,
            "system:serviceaccount:istio-system:ztunnel-node-agent"
        );
    }
    drop(runtime);
}
