//! Fixtures shared by the proxy's tests: identities, workloads, an xDS-form ALLOW policy, an
//! echo app, the failed-connection lines of a metrics registry.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use identity::SpiffeId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use xds_client::resources::{Workload, WorkloadType};

pub const HOUR: Duration = Duration::from_secs(3600);

/// `spiffe://cluster.local/ns/default/sa/<sa>`.
pub fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// A pod of namespace `default` named `uid`, with service account `uid`, at `addr`.
pub fn workload(uid: &str, addr: IpAddr, hbone: bool, policies: &[&str]) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "default".into(),
        addresses: vec![addr],
        network: String::new(),
        tunnel: if hbone {
            xds_client::resources::Tunnel::Hbone
        } else {
            xds_client::resources::Tunnel::None
        },
        identity: id(uid),
        node: "node-a".into(),
        canonical_name: uid.into(),
        canonical_revision: "latest".into(),
        workload_type: WorkloadType::Pod,
        workload_name: uid.into(),
        authorization_policies: policies.iter().map(|p| p.to_string()).collect(),
        healthy: true,
        cluster_id: "Kubernetes".into(),
        hostname: String::new(),
        services: BTreeMap::new(),
        waypoint: None,
        network_gateway: None,
        network_mode: xds_client::resources::NetworkMode::Standard,
        locality: Default::default(),
        capacity: 1,
        native_tunnel: false,
        application_tunnel: None,
    }
}

/// `default/<name>`: ALLOW from service account `sa`, in the form xDS delivers (named by the
/// workloads it applies to, no label selector).
pub fn allow(name: &str, sa: &str) -> authz::Policy {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec: {{selector: {{matchLabels: {{app: web}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/{sa}]}}}}]}}]}}\n"
    );
    let mut p = authz::parse_policies(&yaml, "test", "istio-system")
        .unwrap()
        .policies
        .remove(0);
    p.selector.clear();
    p
}

/// An app that echoes, on a fresh port of `at`.
pub async fn echo_app(at: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(at, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

/// The `istio_tcp_connections_failed_total` lines of `metrics` with `response_flags` `flags`,
/// as rendered.
pub fn failed_lines(metrics: &proxy::telemetry::metrics::Metrics, flags: &str) -> Vec<String> {
    let flags = format!(r#"response_flags="{flags}""#);
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_failed_total{") && l.contains(&flags))
        .map(str::to_owned)
        .collect()
}
