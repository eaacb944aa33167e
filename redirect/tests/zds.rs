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

    // Both connected proxies see the next event.
    server.remove("uid-b");
    assert_eq!(next(&rx), Seen::Del("uid-b".into()));
    assert_eq!(next(&rx2), Seen::Del("uid-b".into()));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_bad_client_is_dropped_and_the_server_keeps_serving() {
    let a = Netns::new("c");
    let path = socket_path("bad");
    let server = ZdsServer::bind(&path).unwrap();
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
fn a_pod_added_while_a_proxy_connects_is_sent_exactly_once() {
    let a = Netns::new("once");
    let netns = open(&a);
    let path = socket_path("once");
    let server = ZdsServer::bind(&path).unwrap();
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
    for rx in peers {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        loop {
            if let Seen::Add(uid, ..) = next(&rx) {
                let done = uid == "uid-end";
                *counts.entry(uid).or_default() += 1;
                if done {
                    break;
                }
            }
        }
        assert_eq!(counts.len(), 201, "a pod was never sent");
        assert!(
            counts.values().all(|&n| n == 1),
            "a pod was sent twice: {counts:?}"
        );
    }
    let _ = std::fs::remove_file(&path);
}
