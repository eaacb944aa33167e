//! The ZDS handoff against real network namespaces: the proxy side receives each captured pod's
//! netns descriptor, and the descriptor is the namespace itself (same inode as the netns file).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

mod common;

use common::Netns;
use redirect::agent::{Handoff, PodInfo};
use redirect::zds::proto::{Payload, WorkloadRequest};
use redirect::zds::{ZdsServer, run_test_peer};

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
#[derive(Debug, PartialEq)]
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
            let ino = std::fs::File::from(fd).metadata().unwrap().ino();
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
    server.add(&pod("uid-a", &a));
    let rx = peer(path.clone());
    assert_eq!(
        next(&rx),
        Seen::Add("uid-a".into(), "default/uid-a-name".into(), a.inode())
    );
    assert_eq!(next(&rx), Seen::Snapshot);

    // Live events after the snapshot.
    server.add(&pod("uid-b", &b));
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
    server.add(&pod("uid-c", &a));

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
