//! Shared mode's side of the netns handoff, driven by a scripted agent (root needed: real network
//! namespaces): pods are served in their namespaces, bad messages are refused with a reason while
//! the proxy keeps serving, and after a reconnect the pods the agent does not replay are dropped.

use std::fs::File;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use identity::{DevCa, DevCaSource, SecretManager, SecretManagerConfig};
use proxy::certs::Managed;
use proxy::inpod::{SharedConfig, SharedProxy};
use proxy::state::{State, StateStore};
use proxy::telemetry::metrics::Metrics;
use redirect::zds::ZdsTestAgent;
use redirect::zds::proto::{AddWorkload, KeepWorkload, Payload, SnapshotSent, WorkloadInfo};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("ztip-{}-{tag}", std::process::id());
        let ok = |args: &[&str]| Command::new("ip").args(args).status().unwrap().success();
        assert!(
            ok(&["netns", "add", &name]),
            "ip netns add {name} (root needed)"
        );
        assert!(ok(&["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }

    fn file(&self) -> File {
        File::open(format!("/var/run/netns/{}", self.0)).unwrap()
    }

    /// Whether something listens on `port` inside the namespace.
    fn listening(&self, port: u16) -> bool {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "ss", "-Hltn"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} "))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn add(uid: &str, name: &str, info: bool) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: info.then(|| WorkloadInfo {
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
        }),
    })
}

fn uids(proxy: &SharedProxy<Managed>) -> Vec<String> {
    proxy.pods().into_iter().map(|p| p.uid).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_come_and_go_over_zds_and_bad_messages_are_refused() {
    let (one, two) = (Netns::new("one"), Netns::new("two"));
    let dir = std::env::temp_dir().join(format!("ztip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("zds.sock");
    let mut agent = ZdsTestAgent::bind(&path).unwrap();

    let ca = Arc::new(DevCa::generate("cluster.local").unwrap());
    let roots = Arc::new(ca.trust_roots());
    let manager = SecretManager::new(
        Arc::new(DevCaSource::new(ca, Duration::from_secs(3600))),
        SecretManagerConfig::default(),
    );
    let store = Arc::new(StateStore::new(State::new("istio-system")));
    store.update(|s| s.set_synced(true));
    let mut config = SharedConfig::new("node-a", "cluster.local");
    config.termination_deadline = Duration::from_millis(200);
    let proxy = SharedProxy::new(
        config,
        store,
        Arc::new(Managed { manager, roots }),
        Metrics::new(Duration::from_secs(60)),
    );
    tokio::spawn(proxy.clone().run_zds(path.clone()));

    let result = tokio::task::spawn_blocking(move || {
        let second = Duration::from_secs(5);
        assert_eq!(agent.accept(second).unwrap(), 1, "hello V1");
        // A pod is served in its namespace.
        assert_eq!(
            agent
                .send(add("u1", "one", true), Some(&one.file()))
                .unwrap(),
            ""
        );
        assert!(one.listening(15008) && one.listening(15006) && one.listening(15001));
        // Refused, with a reason, and nothing else changes:
        let e = agent
            .send(add("u2", "two", false), Some(&two.file()))
            .unwrap();
        assert!(e.contains("without workload info"), "{e}");
        let e = agent.send(add("u2", "two", true), None).unwrap();
        assert!(e.contains("without a network-namespace descriptor"), "{e}");
        let not_netns = File::open("/dev/null").unwrap();
        let e = agent
            .send(add("u2", "two", true), Some(&not_netns))
            .unwrap();
        assert!(e.contains("network namespace"), "{e}");
        let e = agent
            .send(Payload::Keep(KeepWorkload { uid: "nope".into() }), None)
            .unwrap();
        assert!(e.contains("does not serve"), "{e}");
        let e = agent.send_raw(&[0xff, 0xff, 0xff], None).unwrap();
        assert!(e.contains("undecodable"), "{e}");
        assert!(!two.listening(15008));
        assert_eq!(
            agent
                .send(Payload::SnapshotSent(SnapshotSent {}), None)
                .unwrap(),
            ""
        );
        let e = agent
            .send(Payload::SnapshotSent(SnapshotSent {}), None)
            .unwrap();
        assert!(e.contains("second SnapshotSent"), "{e}");
        let e = agent
            .send(Payload::Keep(KeepWorkload { uid: "u1".into() }), None)
            .unwrap();
        assert!(e.contains("after the snapshot"), "{e}");
        // Still serving: another pod comes in.
        assert_eq!(
            agent
                .send(add("u2", "two", true), Some(&two.file()))
                .unwrap(),
            ""
        );
        assert!(two.listening(15008));

        // The agent restarts and replays only pod one: pod two is dropped after the snapshot,
        // pod one (same namespace) is kept as it was.
        agent.disconnect();
        assert_eq!(agent.accept(second).unwrap(), 1);
        assert_eq!(
            agent
                .send(add("u1", "one", true), Some(&one.file()))
                .unwrap(),
            ""
        );
        assert_eq!(
            agent
                .send(Payload::SnapshotSent(SnapshotSent {}), None)
                .unwrap(),
            ""
        );
        let start = std::time::Instant::now();
        while two.listening(15008) {
            assert!(start.elapsed() < second, "pod two's listeners stayed open");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(one.listening(15008));
        (one, two, agent)
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let (_one, _two, _agent) = result.unwrap();
    assert_eq!(uids(&proxy), vec!["u1".to_owned()]);
}

/// A shared proxy over `store` with certificates from a fresh development CA.
fn proxy_over(store: Arc<StateStore>) -> Arc<SharedProxy<Managed>> {
    let ca = Arc::new(DevCa::generate("cluster.local").unwrap());
    let roots = Arc::new(ca.trust_roots());
    let manager = SecretManager::new(
        Arc::new(DevCaSource::new(ca, Duration::from_secs(3600))),
        SecretManagerConfig::default(),
    );
    let mut config = SharedConfig::new("node-a", "cluster.local");
    config.termination_deadline = Duration::from_millis(200);
    SharedProxy::new(
        config,
        store,
        Arc::new(Managed { manager, roots }),
        Metrics::new(Duration::from_secs(60)),
    )
}

/// Waits up to 5 s for `proxy` to be ready; the last reason if it is not.
async fn ready_within(proxy: &SharedProxy<Managed>) -> Result<(), String> {
    let mut last = Ok(());
    for _ in 0..250 {
        last = proxy.readiness();
        if last.is_ok() {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_proxy_serves_a_pod_beside_the_old_one_and_is_ready_after_the_snapshot() {
    // A rolling update (`maxSurge: 1`): the new proxy binds the pod's ports beside the old one's
    // (SO_REUSEPORT) and is not ready until the agent's first snapshot is served.
    let pod = Netns::new("surge");
    let dir = std::env::temp_dir().join(format!("ztip-surge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (old_path, new_path) = (dir.join("old.sock"), dir.join("new.sock"));
    let mut old_agent = ZdsTestAgent::bind(&old_path).unwrap();
    let mut new_agent = ZdsTestAgent::bind(&new_path).unwrap();
    let store = Arc::new(StateStore::new(State::new("istio-system")));
    store.update(|s| s.set_synced(true));
    let (old, new) = (proxy_over(store.clone()), proxy_over(store));
    tokio::spawn(old.clone().run_zds(old_path));
    tokio::spawn(new.clone().run_zds(new_path));
    let why = new.readiness().unwrap_err();
    assert!(why.contains("snapshot"), "{why}");

    let pod_file = pod.file();
    let (pod, old_agent, new_agent) = tokio::task::spawn_blocking(move || {
        let second = Duration::from_secs(5);
        for agent in [&mut old_agent, &mut new_agent] {
            assert_eq!(agent.accept(second).unwrap(), 1, "hello V1");
            assert_eq!(
                agent.send(add("u1", "web", true), Some(&pod_file)).unwrap(),
                "",
                "the pod is served by both proxies"
            );
        }
        assert!(pod.listening(15008) && pod.listening(15006) && pod.listening(15001));
        // A closing listener's queued connections move to the other proxy's, not reset.
        let migrate = Command::new("ip")
            .args([
                "netns",
                "exec",
                &pod.0,
                "cat",
                "/proc/sys/net/ipv4/tcp_migrate_req",
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&migrate.stdout).trim(), "1");
        assert_eq!(
            new_agent
                .send(Payload::SnapshotSent(SnapshotSent {}), None)
                .unwrap(),
            ""
        );
        (pod, old_agent, new_agent)
    })
    .await
    .unwrap();
    ready_within(&new).await.unwrap();
    assert!(
        old.readiness().is_err(),
        "the old proxy has had no snapshot"
    );
    assert_eq!(uids(&old), uids(&new));
    drop((pod, old_agent, new_agent));
    let _ = std::fs::remove_dir_all(&dir);
}
