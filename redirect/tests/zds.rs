//! The ZDS handoff against real network namespaces: the proxy side receives each captured pod's
//! netns descriptor, and the descriptor is the namespace itself (same inode as the netns file).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

mod common;

use common::Netns;
use redirect::agent::{Handoff, PodInfo};
use redirect::zds::proto::{Payload, WorkloadRequest};
use redirect::zds::{ZdsConfig, ZdsServer, run_test_peer};

fn open(netns: &Netns) -> Arc<File> {
    Arc::new(File::open(netns.path()).unwrap())
}

fn pod(uid: &str, netns: &Netns) -> PodInfo {
    PodInfo {
        uid: uid.to_owned(),
        name: format!("{uid}-name"),
        namespace: "default".to_owned(),
        service_account: "sa".to_owned(),
        labels: BTreeMap::new(),
        namespace_labels: BTreeMap::new(),
        node: "node-a".to_owned(),
        netns: Some(netns.path()),
        ips: Vec::new(),
        annotations: BTreeMap::new(),
    }
}

/// What the test proxy saw: a short description and, for adds, the descriptor's inode.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Add(String, String, u64),
    Del(String),
    Snapshot,
}

fn describe(request: WorkloadRequest, fd: Option<OwnedFd>) -> Seen {
    match request.payload.expect("payload") {
        Payload::Add(add) => {
            let info = add.workload_info.expect("an add carries workload info");
            let fd = fd.expect("an add carries the netns descriptor");
            let ino = File::from(fd).metadata().unwrap().ino();
            Seen::Add(add.uid, format!("{}/{}", info.namespace, info.name), ino)
        }
        Payload::Del(del) => Seen::Del(del.uid),
        Payload::SnapshotSent(_) => Seen::Snapshot,
        Payload::Keep(keep) => panic!("unexpected keep for {}", keep.uid),
    }
}

fn peer(path: PathBuf) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = run_test_peer(&path, |request, fd| {
            let _ = tx.send(describe(request, fd));
            String::new()
        });
    });
    rx
}

fn next(rx: &mpsc::Receiver<Seen>) -> Seen {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("a ZDS message within 5 s")
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("zds-{}-{tag}.sock", std::process::id()))
}

#[test]
fn replays_snapshot_then_streams_adds_and_deletes_with_netns_descriptors() {
    let a = Netns::new("a");
    let b = Netns::new("b");
    let path = socket_path("stream");
    let server = ZdsServer::bind(&path).unwrap();
    server.synced();

    // Captured before any proxy connects: replayed in the snapshot.
    server.add(&pod("uid-a", &a), &open(&a));
    let rx = peer(path.clone());
    assert_eq!(
        next(&rx),
        Seen::Add("uid-a".into(), "default/uid-a-name".into(), a.inode())
    );
    assert_eq!(next(&rx), Seen::Snapshot);

    // Live events after the snapshot.
    server.add(&pod("uid-b", &b), &open(&b));
    assert_eq!(
        next(&rx),
        Seen::Add("uid-b".into(), "default/uid-b-name".into(), b.inode())
    );
    server.remove("uid-a");
    assert_eq!(next(&rx), Seen::Del("uid-a".into()));

    // A proxy that (re)connects now gets only what is still captured.
    let rx2 = peer(path.clone());
    assert_eq!(
        next(&rx2),
        Seen::Add("uid-b".into(), "default/uid-b-name".into(), b.inode())
    );
    assert_eq!(next(&rx2), Seen::Snapshot);

    // A deletion reaches every connected proxy.
    server.remove("uid-b");
    assert_eq!(next(&rx), Seen::Del("uid-b".into()));
    assert_eq!(next(&rx2), Seen::Del("uid-b".into()));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_proxy_gets_no_snapshot_before_the_agents_first_full_pass() {
    // An agent that has just (re)started knows no pods yet: a snapshot now would be empty and
    // the proxy would drain every pod it serves. The proxy waits until the pass is done, and
    // then gets every pod.
    let a = Netns::new("early");
    let path = socket_path("early");
    let server = ZdsServer::bind(&path).unwrap();
    let rx = peer(path.clone());
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a snapshot before the first pass"
    );
    server.add(&pod("uid-a", &a), &open(&a));
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    server.synced();
    assert_eq!(
        next(&rx),
        Seen::Add("uid-a".into(), "default/uid-a-name".into(), a.inode())
    );
    assert_eq!(next(&rx), Seen::Snapshot);
    let _ = std::fs::remove_file(&path);
}

/// A proxy that handles `n` requests (the snapshot's end counts), then disconnects; what it saw.
fn peer_for(path: PathBuf, n: usize) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let client = redirect::zds::ZdsClient::connect(&path).unwrap();
        for _ in 0..n {
            let Ok(Some((request, fd))) = client.recv() else {
                return;
            };
            let _ = tx.send(describe(request, fd));
            client.ack("").unwrap();
        }
    });
    rx
}

#[test]
fn new_pods_go_to_the_newest_proxy_and_back_to_the_older_one_when_it_leaves() {
    // A rolling update: the old proxy keeps its pods, the new one takes every pod captured after
    // it connected; if the new one goes away, nothing is left with it.
    let (d, e, f) = (Netns::new("nd"), Netns::new("ne"), Netns::new("nf"));
    let path = socket_path("newest");
    let server = ZdsServer::bind(&path).unwrap();
    server.synced();
    let old = peer(path.clone());
    assert_eq!(next(&old), Seen::Snapshot);
    let new = peer_for(path.clone(), 3);
    assert_eq!(next(&new), Seen::Snapshot);
    let add =
        |uid: &str, n: &Netns| Seen::Add(uid.into(), format!("default/{uid}-name"), n.inode());
    server.add(&pod("uid-d", &d), &open(&d));
    assert_eq!(next(&new), add("uid-d", &d));
    assert!(
        old.recv_timeout(Duration::from_millis(300)).is_err(),
        "a new pod also went to the older proxy"
    );
    // The new proxy takes one more and leaves: both pods go to the old one.
    server.add(&pod("uid-e", &e), &open(&e));
    assert_eq!(next(&new), add("uid-e", &e));
    let mut resent = vec![next(&old), next(&old)];
    resent.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(resent, vec![add("uid-d", &d), add("uid-e", &e)]);
    // The old proxy is the newest now.
    server.add(&pod("uid-f", &f), &open(&f));
    assert_eq!(next(&old), add("uid-f", &f));
    server.remove("uid-e");
    assert_eq!(next(&old), Seen::Del("uid-e".into()));
    assert!(old.recv_timeout(Duration::from_millis(200)).is_err());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_bad_client_is_dropped_and_the_server_keeps_serving() {
    let a = Netns::new("c");
    let path = socket_path("bad");
    let server = ZdsServer::bind(&path).unwrap();
    server.synced();
    server.add(&pod("uid-c", &a), &open(&a));

    // A stream socket cannot even connect to a SOCK_SEQPACKET listener.
    assert!(UnixStream::connect(&path).is_err());

    // A peer that never acknowledges does not block other proxies.
    let stalled = peer_that_never_acks(path.clone());
    let rx = peer(path.clone());
    assert_eq!(
        next(&rx),
        Seen::Add("uid-c".into(), "default/uid-c-name".into(), a.inode())
    );
    assert_eq!(next(&rx), Seen::Snapshot);
    drop(stalled);
    let _ = std::fs::remove_file(&path);
}

/// Says hello and receives the first request, then holds on without answering.
fn peer_that_never_acks(path: PathBuf) -> mpsc::Sender<()> {
    let (hold, until) = mpsc::channel::<()>();
    let (seen_tx, seen) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = run_test_peer(&path, |request, fd| {
            let _ = seen_tx.send(describe(request, fd));
            // Block until the test ends; the server waits for this ack meanwhile.
            let _ = until.recv();
            String::new()
        });
    });
    assert!(matches!(next(&seen), Seen::Add(..)));
    hold
}

#[test]
fn a_refused_add_is_sent_again_until_the_proxy_takes_it() {
    let a = Netns::new("refuse");
    let path = socket_path("refuse");
    let mut config = ZdsConfig::default();
    config.retry_first = Duration::from_millis(50);
    let server = ZdsServer::bind_with(&path, config).unwrap();
    server.synced();
    let (tx, rx) = mpsc::channel();
    let peer_path = path.clone();
    std::thread::spawn(move || {
        let mut refusals = 2;
        let _ = run_test_peer(&peer_path, |request, fd| {
            let seen = describe(request, fd);
            let refuse = matches!(seen, Seen::Add(..)) && refusals > 0;
            let _ = tx.send((seen, refuse));
            if refuse {
                refusals -= 1;
                "netns not ready".to_owned()
            } else {
                String::new()
            }
        });
    });
    let recv = || {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("a ZDS message within 5 s")
    };
    assert_eq!(recv().0, Seen::Snapshot);
    server.add(&pod("uid-r", &a), &open(&a));
    let add = Seen::Add("uid-r".into(), "default/uid-r-name".into(), a.inode());
    // Refused twice, sent a third time, accepted.
    assert_eq!(recv(), (add.clone(), true));
    assert_eq!(recv(), (add.clone(), true));
    assert_eq!(recv(), (add, false));
    // Then nothing more for it.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_proxy_that_stops_acknowledging_is_disconnected() {
    let a = Netns::new("silent");
    let path = socket_path("silent");
    let mut config = ZdsConfig::default();
    config.ack_timeout = Duration::from_millis(300);
    let server = ZdsServer::bind_with(&path, config).unwrap();
    server.synced();
    server.add(&pod("uid-s", &a), &open(&a));
    let stalled = peer_that_never_acks(path.clone());
    assert_eq!(server.connections(), 1);
    let start = std::time::Instant::now();
    while server.connections() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a proxy that stopped acknowledging is still being served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Others are still served.
    let rx = peer(path.clone());
    assert!(matches!(next(&rx), Seen::Add(..)));
    assert_eq!(next(&rx), Seen::Snapshot);
    drop(stalled);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_pod_added_while_proxies_connect_reaches_the_newest_exactly_once() {
    let a = Netns::new("once");
    let netns = open(&a);
    let path = socket_path("once");
    let server = ZdsServer::bind(&path).unwrap();
    server.synced();
    let mut peers = Vec::new();
    let adder = {
        let server = server.clone();
        let netns = netns.clone();
        let a_path = a.path();
        std::thread::spawn(move || {
            for i in 0..200 {
                let mut p = PodInfo {
                    uid: format!("uid-{i}"),
                    name: format!("p{i}"),
                    namespace: "default".into(),
                    service_account: "sa".into(),
                    labels: BTreeMap::new(),
                    namespace_labels: BTreeMap::new(),
                    node: "node-a".into(),
                    netns: Some(a_path.clone()),
                    ips: Vec::new(),
                    annotations: BTreeMap::new(),
                };
                server.add(&p, &netns);
                p.netns = None;
                std::thread::yield_now();
            }
        })
    };
    // Proxies connect while the pods are being added.
    for _ in 0..8 {
        peers.push(peer(path.clone()));
        std::thread::sleep(Duration::from_millis(2));
    }
    adder.join().unwrap();
    server.add(&pod("uid-end", &a), &netns);
    // The proxy that connected last gets every pod exactly once (from its snapshot or as it
    // was added); the older ones each pod at most once (those captured before a newer one
    // connected), and none of the pods added after the last one connected.
    let counts: Vec<BTreeMap<String, usize>> = peers
        .into_iter()
        .map(|rx| {
            let mut counts = BTreeMap::new();
            while let Ok(seen) = rx.recv_timeout(Duration::from_secs(1)) {
                if let Seen::Add(uid, ..) = seen {
                    *counts.entry(uid).or_default() += 1;
                }
            }
            counts
        })
        .collect();
    let newest: Vec<_> = counts
        .iter()
        .filter(|c| c.contains_key("uid-end"))
        .collect();
    assert_eq!(newest.len(), 1, "uid-end went to {} proxies", newest.len());
    assert_eq!(newest[0].len(), 201, "a pod never reached the newest proxy");
    for c in &counts {
        assert!(c.values().all(|&n| n == 1), "a pod was sent twice: {c:?}");
    }
    let _ = std::fs::remove_file(&path);
}
