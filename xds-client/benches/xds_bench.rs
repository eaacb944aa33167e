//! xds-client benchmarks, over real gRPC on loopback: time and peak memory for a client to
//! receive and index 10,000 workloads + 1,000 services + 5,000 policies from the server; time to
//! push a one-resource delta to 100 connected clients. Run with `cargo bench -p xds-client`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use xds_client::client::{ClientConfig, Handler, RawResource, Subscription, XdsClient};
use xds_client::resources::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Address, PortMapping, Service, Workload,
    WorkloadType, decode_address, encode_address,
};
use xds_client::server::{AdsServer, InsecureAcceptAny};

/// Decodes and indexes addresses by key, as a proxy's store would.
#[derive(Default)]
struct AddressStore {
    by_key: Mutex<HashMap<String, Address>>,
    updates: AtomicUsize,
}

impl Handler for AddressStore {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut map = self.by_key.lock().unwrap();
        let mut rejected = Vec::new();
        for r in added {
            match decode_address(&r.body) {
                Ok(a) => {
                    map.insert(r.name, a);
                }
                Err(e) => rejected.push((r.name, e.to_string())),
            }
        }
        for name in removed {
            map.remove(&name);
        }
        self.updates.fetch_add(1, Ordering::Relaxed);
        rejected
    }
}

/// Decodes policies into the authz store.
struct PolicyStore(Mutex<authz::PolicyStore>);

impl Handler for PolicyStore {
    fn apply(&self, added: Vec<RawResource>, removed: Vec<String>) -> Vec<(String, String)> {
        let mut store = self.0.lock().unwrap();
        let mut rejected = Vec::new();
        for r in added {
            match authz::proto::decode(&r.body) {
                Ok(p) => store.insert(p),
                Err(e) => rejected.push((r.name, e.to_string())),
            }
        }
        for name in removed {
            store.remove(&name);
        }
        rejected
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("VmRSS:")
}

fn workload(i: usize) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/ns-{}/pod-{i}", i % 100),
        name: format!("pod-{i}"),
        namespace: format!("ns-{}", i % 100),
        addresses: vec![std::net::IpAddr::from([
            10,
            (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8,
        ])],
        network: String::new(),
        tunnel: xds_client::resources::Tunnel::Hbone,
        identity: identity::SpiffeId::istio(
            "cluster.local",
            &format!("ns-{}", i % 100),
            &format!("sa-{}", i % 500),
        )
        .unwrap(),
        node: format!("node-{}", i % 50),
        canonical_name: format!("app-{}", i % 1000),
        canonical_revision: "v1".into(),
        workload_type: WorkloadType::Deployment,
        workload_name: format!("app-{}", i % 1000),
        authorization_policies: vec![format!("ns-{}/policy-{}", i % 100, i % 50)],
        healthy: true,
        cluster_id: "Kubernetes".into(),
        hostname: String::new(),
        services: [(
            format!(
                "ns-{}/svc-{}.ns-{}.svc.cluster.local",
                i % 100,
                i % 1000,
                i % 100
            ),
            vec![PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
        )]
        .into(),
        waypoint: None,
        network_gateway: None,
        network_mode: xds_client::resources::NetworkMode::Standard,
        locality: Default::default(),
        capacity: 1,
        native_tunnel: false,
        application_tunnel: None,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = AdsServer::new(InsecureAcceptAny);
        for i in 0..10_000 {
            let a = Address::Workload(workload(i));
            server.set(ADDRESS_TYPE_URL, &a.key(), encode_address(&a));
        }
        for i in 0..1_000 {
            let a = Address::Service(Service {
                name: format!("svc-{i}"),
                namespace: format!("ns-{}", i % 100),
                hostname: format!("svc-{i}.ns-{}.svc.cluster.local", i % 100),
                addresses: vec![(String::new(), std::net::IpAddr::from([10, 96, (i >> 8) as u8, i as u8]))],
                ports: vec![PortMapping { service_port: 80, target_port: 8080 }],
                subject_alt_names: vec![],
                waypoint: None,
                ..Default::default()
            });
            server.set(ADDRESS_TYPE_URL, &a.key(), encode_address(&a));
        }
        let yaml: String = (0..5_000)
            .map(|i| format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{i}, namespace: ns-{}}}\nspec:\n  selector: {{matchLabels: {{app: app-{}}}}}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/ns-{}/sa/sa-{}\"]}}}}]\n    to: [{{operation: {{ports: [\"8080\"]}}}}]\n---\n", i % 100, i % 1000, (i + 1) % 100, i % 500))
            .collect();
        for p in authz::parse_policies(&yaml, "bench", "istio-system").unwrap().policies {
            server.set(AUTHORIZATION_TYPE_URL, &p.key(), prost::Message::encode_to_vec(&authz::proto::to_proto(&p)));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = server.service();
        tokio::spawn(async move {
            let _ = Server::builder().serve_with_incoming(service, TcpIncoming::from(listener)).await;
        });

        // One client receives and indexes everything.
        let rss_before = rss_kib();
        let addresses = Arc::new(AddressStore::default());
        let policies = Arc::new(PolicyStore(Mutex::new(authz::PolicyStore::new("istio-system"))));
        let start = Instant::now();
        let client = XdsClient::new(ClientConfig::new(format!("http://{addr}"), "bench"))
            .unwrap()
            .watch(ADDRESS_TYPE_URL, Subscription::Wildcard, addresses.clone())
            .watch(AUTHORIZATION_TYPE_URL, Subscription::Wildcard, policies.clone());
        let handle = client.handle();
        tokio::spawn(client.run());
        handle.synced().wait_for(|s| *s).await.unwrap();
        let took = start.elapsed();
        assert_eq!(addresses.by_key.lock().unwrap().len(), 11_000);
        assert_eq!(policies.0.lock().unwrap().len(), 5_000);
        let rss_after = rss_kib();

        // 100 more clients, then one change pushed to all 101.
        let mut stores = vec![addresses.clone()];
        for _ in 0..100 {
            let store = Arc::new(AddressStore::default());
            let client = XdsClient::new(ClientConfig::new(format!("http://{addr}"), "bench"))
                .unwrap()
                .watch(ADDRESS_TYPE_URL, Subscription::Wildcard, store.clone());
            let handle = client.handle();
            tokio::spawn(client.run());
            handle.synced().wait_for(|s| *s).await.unwrap();
            stores.push(store);
        }
        let before: Vec<usize> = stores.iter().map(|s| s.updates.load(Ordering::Relaxed)).collect();
        let mut changed = workload(42);
        changed.healthy = false;
        let a = Address::Workload(changed);
        let push_start = Instant::now();
        server.set(ADDRESS_TYPE_URL, &a.key(), encode_address(&a));
        while stores.iter().zip(&before).any(|(s, b)| s.updates.load(Ordering::Relaxed) == *b) {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let push = push_start.elapsed();

        println!("xds benchmark: loopback, plaintext gRPC, client and server in one process\n");
        println!("| measurement | result |");
        println!("|---|---|");
        println!("| initial sync: 10,000 workloads + 1,000 services + 5,000 policies, decoded and indexed | {:.0} ms |", took.as_secs_f64() * 1e3);
        println!("| RSS growth of that sync (client side, incl. decoded stores; server shares the process) | {:.1} MiB |", (rss_after.saturating_sub(rss_before)) as f64 / 1024.0);
        println!("| one-resource delta reaching 101 connected clients | {:.2} ms |", push.as_secs_f64() * 1e3);
    });
}
