//! The emulator through the real kube client: what the node agent and the plugin do (list,
//! watch, get, patch of `pods/status`), and what the real server refuses.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, Client, Config};
use kube_emulator::ApiServer;
use serde_json::json;

const RBAC: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: agent}
rules:
- apiGroups: [""]
  resources: [pods, namespaces]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods/status]
  verbs: [patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: agent}
subjects:
- {kind: ServiceAccount, name: agent, namespace: kube-system}
"#;

async fn client(server: &ApiServer, token: &str) -> Client {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("kube-emulator-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.kubeconfig(&path, token).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Client::try_from(config).unwrap()
}

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({"kind": "Pod", "metadata": {"name": name, "namespace": "default",
           "labels": {"app": name}}, "spec": {"nodeName": node, "containers": []}})
}

#[tokio::test]
async fn list_watch_get_and_patch_status_as_an_authorized_service_account() {
    let server = ApiServer::start().unwrap();
    server.load_rbac(RBAC).unwrap();
    server.put(pod("web", "node-a"));
    server.put(pod("db", "node-b"));
    let token = server.token_for("kube-system", "agent");
    let pods: Api<Pod> = Api::all(client(&server, &token).await);

    let here = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    let names: Vec<_> = here
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["web"]);
    let rv = here.metadata.resource_version.clone().unwrap();

    // A watch from the list's version sees what happens next, filtered.
    let mut events = pods
        .watch(&WatchParams::default().fields("spec.nodeName=node-a"), &rv)
        .await
        .unwrap()
        .boxed();
    server.put(pod("api", "node-a"));
    server.put(pod("cache", "node-b"));
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match event {
        WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("api")),
        other => panic!("{other:?}"),
    }

    // The annotation through pods/status, as istio-cni writes it.
    let namespaced: Api<Pod> = Api::namespaced(client(&server, &token).await, "default");
    let patch = json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}},
                       "spec": {"nodeName": "elsewhere"}});
    namespaced
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let web = namespaced.get("web").await.unwrap();
    let annotations = web.metadata.annotations.unwrap();
    assert_eq!(annotations["ambient.istio.io/redirection"], "enabled");
    // Through the status subresource, spec never changes.
    assert_eq!(web.spec.unwrap().node_name.as_deref(), Some("node-a"));
    let event = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(event, WatchEvent::Modified(_)), "{event:?}");
    // Removed with a null.
    let patch = json!({"metadata": {"annotations": {"ambient.istio.io/redirection": null}}});
    namespaced
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let web = namespaced.get("web").await.unwrap();
    assert!(
        !web.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("ambient.istio.io/redirection")
    );
}

#[tokio::test]
async fn what_rbac_does_not_grant_is_forbidden_and_strangers_are_unauthorized() {
    let server = ApiServer::start().unwrap();
    server.load_rbac(RBAC).unwrap();
    server.put(pod("web", "node-a"));
    let token = server.token_for("kube-system", "agent");
    let namespaced: Api<Pod> = Api::namespaced(client(&server, &token).await, "default");
    // The agent may patch pods/status, not pods.
    let patch = json!({"metadata": {"labels": {"x": "y"}}});
    let error = namespaced
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    match error {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403);
            assert!(
                status.message.contains("cannot patch resource \"pods\""),
                "{}",
                status.message
            );
        }
        other => panic!("{other:?}"),
    }
    // Another service account: nothing.
    let other = server.token_for("default", "app");
    let pods: Api<Pod> = Api::all(client(&server, &other).await);
    assert!(matches!(
        pods.list(&ListParams::default()).await,
        Err(kube::Error::Api(s)) if s.code == 403
    ));
    // No valid token at all.
    let pods: Api<Pod> = Api::all(client(&server, "not-a-token").await);
    assert!(matches!(
        pods.list(&ListParams::default()).await,
        Err(kube::Error::Api(s)) if s.code == 401
    ));
    // Selectors the emulator cannot evaluate are refused, never ignored.
    let pods: Api<Pod> = Api::all(client(&server, server.admin_token()).await);
    assert!(matches!(
        pods.list(&ListParams::default().fields("status.phase=Running")).await,
        Err(kube::Error::Api(s)) if s.code == 400
    ));
}
