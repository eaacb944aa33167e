//! The agent's CNI socket, end to end in one process: a real node agent (nftables, real network
//! namespaces) with a real ZDS server and a proxy stand-in that acknowledges pods, asked over the
//! real socket exactly as `ztunnel-cni` asks. Needs root.

mod common;

use common::{Netns, Source, TempDir};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redirect::agent::{NodeAgent, PodInfo};
use redirect::cni::{CniAnswer, CniBoard, CniEvent, CniRequest, CniServer, CniServerConfig, ask};
use redirect::zds::proto::Payload;
use redirect::zds::{ZdsServer, run_test_peer};
use redirect::{Backend, RuleSet};

fn pod(name: &str, namespace: &str, ambient: bool) -> PodInfo {
    let mut labels = BTreeMap::new();
    if ambient {
        labels.insert("istio.io/dataplane-mode".to_owned(), "ambient".to_owned());
    }
    PodInfo {
        uid: format!("uid-{name}"),
        name: name.into(),
        namespace: namespace.into(),
        service_account: name.into(),
        labels,
        namespace_labels: BTreeMap::new(),
        node: "node-a".into(),
        // Known only from the runtime, as in a cluster at the moment the sandbox is made.
        netns: None,
        ips: Vec::new(),
        annotations: BTreeMap::new(),
    }
}

fn request(event: CniEvent, name: &str, namespace: &str, netns: &Path) -> CniRequest {
    CniRequest {
        event,
        container_id: format!("c-{name}"),
        netns: netns.display().to_string(),
        pod_name: name.into(),
        pod_namespace: namespace.into(),
        pod_uid: None,
        ips: vec!["10.244.1.7".parse().unwrap()],
    }
}

/// What the proxy stand-in saw, and when it acknowledged each add.
#[derive(Clone, Default)]
struct Proxy {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    deleted: Arc<Mutex<Vec<String>>>,
    /// Refuse every add (as a proxy without a certificate would).
    refuse: Arc<AtomicBool>,
}

/// Everything a test needs: the agent running on its own thread, its sockets, the proxy.
struct Harness {
    socket: PathBuf,
    proxy: Proxy,
    source: Source,
    stop: Arc<AtomicBool>,
    _dir: TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // The agent stops after its current pause (not waited for: its namespaces are the
        // test's, deleted by their guards).
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The proxy stand-in acknowledges each add after `ack_delay`.
fn harness(tag: &str, pods: Vec<PodInfo>, ack_delay: Duration, answer_within: Duration) -> Harness {
    let dir = TempDir::new(tag);
    let zds_path = dir.0.join("ztunnel.sock");
    let socket = dir.0.join("cni.sock");
    let zds = ZdsServer::bind(&zds_path).unwrap();
    let proxy = Proxy::default();
    let seen = proxy.clone();
    std::thread::spawn(move || {
        let _ = run_test_peer(&zds_path, |request, _fd| match request.payload {
            Some(Payload::Add(add)) => {
                std::thread::sleep(ack_delay);
                if seen.refuse.load(Ordering::SeqCst) {
                    return "no certificate for this pod yet".into();
                }
                seen.acked.lock().unwrap().push((add.uid, Instant::now()));
                String::new()
            }
            Some(Payload::Del(del)) => {
                seen.deleted.lock().unwrap().push(del.uid);
                String::new()
            }
            _ => String::new(),
        });
    });
    let source = Source::default();
    *source.0.lock().unwrap() = pods;
    let board = Arc::new(CniBoard::default());
    let mut config = CniServerConfig::default();
    config.answer_within = answer_within;
    CniServer::bind(&socket, config, board.clone()).unwrap();
    let agent = NodeAgent::new(
        "node-a",
        Backend::Nftables,
        RuleSet::default(),
        source.clone(),
        zds,
    )
    .with_cni(board);
    let stop = Arc::new(AtomicBool::new(false));
    let keep = stop.clone();
    std::thread::spawn(move || {
        // A long interval: only a CNI request makes the agent look before it elapses.
        agent.run_while(Duration::from_secs(30), || !keep.load(Ordering::SeqCst));
    });
    Harness {
        socket,
        proxy,
        source,
        stop,
        _dir: dir,
    }
}

fn ask_agent(h: &Harness, request: &CniRequest) -> CniAnswer {
    ask(&h.socket, request, Duration::from_secs(30)).unwrap()
}

#[test]
fn an_ambient_pod_is_answered_only_once_its_rules_are_in_and_the_proxy_acknowledged_it() {
    let web = Netns::new("cni-web");
    let h = harness(
        "cni-add",
        vec![pod("web", "default", true)],
        Duration::from_millis(400),
        Duration::from_secs(10),
    );
    let started = Instant::now();
    let answer = ask_agent(&h, &request(CniEvent::Add, "web", "default", &web.path()));
    let answered = Instant::now();
    assert_eq!(answer, CniAnswer::Captured);
    // Not before the proxy's acknowledgement (which came after its 400 ms delay).
    let acked = h.proxy.acked.lock().unwrap().clone();
    assert_eq!(
        acked.len(),
        1,
        "{:?}",
        acked.iter().map(|a| &a.0).collect::<Vec<_>>()
    );
    assert_eq!(acked[0].0, "uid-web");
    assert!(acked[0].1 <= answered);
    assert!(answered - started >= Duration::from_millis(400));
    // And the rules were in the namespace the runtime named (the agent had no other way to
    // know it: the source gives none, and no namespace holds the pod's IP).
    assert!(web.ruleset().contains("redirect to :15001"));
    // Well before the agent's 30 s interval: the request woke it.
    assert!(answered - started < Duration::from_secs(5));

    // Asked again for the same sandbox (a retried ADD): the same answer, nothing new.
    let again = ask_agent(&h, &request(CniEvent::Add, "web", "default", &web.path()));
    assert_eq!(again, CniAnswer::Captured);
    assert_eq!(h.proxy.acked.lock().unwrap().len(), 1);

    // DEL releases: rules gone, the proxy told, before the answer.
    let released = ask_agent(&h, &request(CniEvent::Del, "web", "default", &web.path()));
    assert_eq!(released, CniAnswer::Released);
    assert!(!web.ruleset().contains("redirect to :15001"));
    assert_eq!(*h.proxy.deleted.lock().unwrap(), vec!["uid-web".to_owned()]);
    // The source still lists the pod (its deletion has not reached it): it stays released.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!web.ruleset().contains("redirect to :15001"));
}

#[test]
fn pods_outside_the_mesh_pass_untouched() {
    let system = Netns::new("cni-sys");
    let plain = Netns::new("cni-plain");
    let opted_out = Netns::new("cni-none");
    let mut none = pod("opted-out", "default", false);
    none.labels
        .insert("istio.io/dataplane-mode".into(), "none".into());
    none.namespace_labels
        .insert("istio.io/dataplane-mode".into(), "ambient".into());
    let h = harness(
        "cni-notin",
        vec![
            pod("coredns", "kube-system", true),
            pod("plain", "default", false),
            none,
        ],
        Duration::ZERO,
        Duration::from_secs(10),
    );
    for (name, namespace, netns) in [
        ("coredns", "kube-system", &system),
        ("plain", "default", &plain),
        ("opted-out", "default", &opted_out),
    ] {
        let answer = ask_agent(&h, &request(CniEvent::Add, name, namespace, &netns.path()));
        assert!(
            matches!(answer, CniAnswer::NotInMesh { .. }),
            "{name}: {answer:?}"
        );
        assert!(
            !netns.ruleset().contains("redirect to"),
            "{name} was captured"
        );
    }
    assert!(h.proxy.acked.lock().unwrap().is_empty());
}

#[test]
fn a_pod_the_proxy_does_not_take_or_the_source_does_not_know_is_refused() {
    let web = Netns::new("cni-refw");
    let h = harness(
        "cni-refused",
        vec![pod("web", "default", true)],
        Duration::ZERO,
        Duration::from_secs(1),
    );
    h.proxy.refuse.store(true, Ordering::SeqCst);
    match ask_agent(&h, &request(CniEvent::Add, "web", "default", &web.path())) {
        CniAnswer::Refused { reason } => {
            assert!(reason.contains("did not acknowledge"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Unknown to the source (the kubelet's view and the agent's differ): refused, never
    // guessed into or out of the mesh.
    let ghost = Netns::new("cni-ghost");
    match ask_agent(
        &h,
        &request(CniEvent::Add, "ghost", "default", &ghost.path()),
    ) {
        CniAnswer::Refused { reason } => assert!(reason.contains("did not list"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(!ghost.ruleset().contains("redirect to"));
    // A namespace path that does not exist: refused at once.
    match ask_agent(
        &h,
        &request(
            CniEvent::Add,
            "web",
            "default",
            Path::new("/var/run/netns/ztt-no-such"),
        ),
    ) {
        CniAnswer::Refused { reason } => assert!(reason.contains("ztt-no-such"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Once the source lists the pod, it is captured (the proxy now takes pods).
    h.proxy.refuse.store(false, Ordering::SeqCst);
    h.source
        .0
        .lock()
        .unwrap()
        .push(pod("ghost", "default", true));
    let answer = ask_agent(
        &h,
        &request(CniEvent::Add, "ghost", "default", &ghost.path()),
    );
    assert_eq!(answer, CniAnswer::Captured);
}

#[test]
fn many_pods_at_once_are_each_answered() {
    let namespaces: Vec<Netns> = (0..6).map(|i| Netns::new(&format!("cni-m{i}"))).collect();
    let pods = (0..6)
        .map(|i| pod(&format!("p{i}"), "default", i % 2 == 0))
        .collect();
    let h = harness(
        "cni-many",
        pods,
        Duration::from_millis(50),
        Duration::from_secs(10),
    );
    let captured = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for (i, netns) in namespaces.iter().enumerate() {
            let (h, captured) = (&h, &captured);
            scope.spawn(move || {
                let answer = ask_agent(
                    h,
                    &request(CniEvent::Add, &format!("p{i}"), "default", &netns.path()),
                );
                match (i % 2 == 0, answer) {
                    (true, CniAnswer::Captured) => {
                        captured.fetch_add(1, Ordering::SeqCst);
                    }
                    (false, CniAnswer::NotInMesh { .. }) => {}
                    (_, other) => panic!("p{i}: {other:?}"),
                }
            });
        }
    });
    assert_eq!(captured.load(Ordering::SeqCst), 3);
    for (i, netns) in namespaces.iter().enumerate() {
        assert_eq!(
            netns.ruleset().contains("redirect to :15001"),
            i % 2 == 0,
            "p{i}"
        );
    }
}
