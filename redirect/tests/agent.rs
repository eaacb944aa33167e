//! The node agent against real network namespaces, with an in-memory pod source.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

mod common;

use common::{Netns, Recorder, Source, nft_agent};
use redirect::agent::{DATAPLANE_MODE_LABEL, NodeAgent, PodInfo};
use redirect::{Backend, RuleSet, check};

fn pod(name: &str, netns: &Netns, node: &str) -> PodInfo {
    PodInfo {
        uid: format!("uid-{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        labels: BTreeMap::new(),
        namespace_labels: BTreeMap::new(),
        node: node.into(),
        netns: Some(netns.path()),
        ips: Vec::new(),
        annotations: BTreeMap::new(),
    }
}

#[test]
fn captures_by_namespace_label_and_releases() {
    let (n1, n2, n3) = (Netns::new("a"), Netns::new("b"), Netns::new("c"));
    let source = Source::default();
    *source.0.lock().unwrap() = vec![
        pod("p1", &n1, "node-a"),
        pod("p2", &n2, "node-a"),
        pod("elsewhere", &n3, "node-b"),
    ];
    let handoff = Recorder::default();
    let rules = RuleSet::default();
    let mut agent = NodeAgent::new(
        "node-a",
        Backend::Nftables,
        rules.clone(),
        source.clone(),
        handoff.clone(),
    );
    let set_ambient = |on: bool| {
        for p in source.0.lock().unwrap().iter_mut() {
            if on {
                p.namespace_labels
                    .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
            } else {
                p.namespace_labels.clear();
            }
        }
    };

    agent.sync().unwrap();
    assert!(agent.captured().is_empty(), "nothing is ambient yet");

    set_ambient(true);
    agent.sync().unwrap();
    assert_eq!(
        agent.captured().len(),
        2,
        "both pods of this node, not the other node's"
    );
    for ns in [&n1, &n2] {
        assert!(
            check(&ns.path(), Backend::Nftables, &rules)
                .unwrap()
                .is_clean()
        );
    }
    assert!(
        !n3.ruleset().contains("ztunnel"),
        "another node's pod was captured"
    );

    // Opting a pod out releases it.
    source.0.lock().unwrap()[1]
        .labels
        .insert(DATAPLANE_MODE_LABEL.into(), "none".into());
    agent.sync().unwrap();
    assert_eq!(agent.captured().len(), 1);
    assert!(
        !n2.ruleset().contains("ztunnel"),
        "released pod still has rules"
    );

    // A restarted agent reconciles without duplicating anything.
    let before = n1.ruleset();
    let mut restarted = NodeAgent::new(
        "node-a",
        Backend::Nftables,
        rules.clone(),
        source.clone(),
        handoff.clone(),
    );
    restarted.sync().unwrap();
    assert_eq!(restarted.captured().len(), 1);
    assert_eq!(n1.ruleset(), before, "restart duplicated or changed rules");

    // A deleted pod is released; a namespace leaving the mesh releases the rest.
    source.0.lock().unwrap().remove(0);
    restarted.sync().unwrap();
    assert!(restarted.captured().is_empty());
    assert!(!n1.ruleset().contains("ztunnel"));
    set_ambient(false);
    restarted.sync().unwrap();

    let log = handoff.0.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            "add p1",
            "add p2",
            "remove uid-p2",
            "add p1",
            "remove uid-p1"
        ],
        "{log:?}"
    );
}

/// A test-owned address block; the third octet is per process so parallel runs do not collide.
fn test_ip(host: u8) -> std::net::IpAddr {
    format!("10.251.{}.{host}", std::process::id() % 250)
        .parse()
        .unwrap()
}

fn give_address(ns: &Netns, v4: std::net::IpAddr, v6: &str) {
    ns.exec(&format!(
        "ip link add d0 type veth peer name d1 && ip addr add {v4}/24 dev d0 && ip addr add {v6}/64 dev d0 nodad && ip link set d1 up && ip link set d0 up"
    ));
}

fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// Kills the process-held namespace's holder even when the test fails.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn finds_named_and_process_held_namespaces_by_ip() {
    let named = Netns::new("ipa");
    let v6_named = format!("fd00:251:{:x}::5", std::process::id() % 0xffff);
    give_address(&named, test_ip(5), &v6_named);
    assert_eq!(
        redirect::netns::find_by_ip(&[test_ip(5)]),
        Ok(Some(named.path()))
    );
    assert_eq!(
        redirect::netns::find_by_ip(&[v6_named.parse().unwrap()]),
        Ok(Some(named.path()))
    );
    assert_eq!(redirect::netns::find_by_ip(&[test_ip(99)]), Ok(None));

    // A namespace no name points at, held only by a process (a pod's sandbox, in a cluster).
    let v6_held = format!("fd00:252:{:x}::6", std::process::id() % 0xffff);
    let holder = Holder(
        Command::new("unshare")
            .args([
                "--net",
                "sh",
                "-c",
                &format!(
                    "ip link add d0 type veth peer name d1 && ip addr add {}/24 dev d0 && ip addr add {v6_held}/64 dev d0 nodad && ip link set d1 up && ip link set d0 up && exec sleep 60",
                    test_ip(6)
                ),
            ])
            .spawn()
            .unwrap(),
    );
    let holder_ns = PathBuf::from(format!("/proc/{}/ns/net", holder.0.id()));
    let start = std::time::Instant::now();
    let found = loop {
        if let Ok(Some(found)) = redirect::netns::find_by_ip(&[test_ip(6)]) {
            break found;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "the process-held namespace was not found"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(inode(&found), inode(&holder_ns));
    assert_ne!(
        inode(&found),
        inode(std::path::Path::new("/proc/self/ns/net"))
    );
}

#[test]
fn captures_a_pod_found_by_its_ip() {
    let ns = Netns::new("ipc");
    give_address(
        &ns,
        test_ip(7),
        &format!("fd00:253:{:x}::7", std::process::id() % 0xffff),
    );
    let mut p = pod("by-ip", &ns, "node-a");
    p.netns = None;
    p.ips = vec![test_ip(7)];
    p.namespace_labels
        .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
    let (mut agent, source, handoff) = nft_agent(vec![p]);
    agent.sync().unwrap();
    assert!(ns.ruleset().contains("table inet ztunnel"));
    assert_eq!(
        agent
            .captured()
            .get("uid-by-ip")
            .and_then(|c| c.pod.netns.clone()),
        Some(ns.path())
    );
    // The next pass reuses what it found: no second capture, no second handoff.
    agent.sync().unwrap();
    assert_eq!(*handoff.0.lock().unwrap(), vec!["add by-ip".to_owned()]);

    // A pod whose IP no namespace holds is not captured (and nothing fails).
    let mut ghost = pod("ghost", &ns, "node-a");
    ghost.netns = None;
    ghost.ips = vec![test_ip(98)];
    ghost
        .namespace_labels
        .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
    source.0.lock().unwrap().push(ghost);
    agent.sync().unwrap();
    assert!(!agent.captured().contains_key("uid-ghost"));
}

#[test]
fn a_pod_ip_held_by_two_namespaces_is_never_guessed() {
    let (a, b) = (Netns::new("amb1"), Netns::new("amb2"));
    let v6 = |host: u8| format!("fd00:254:{:x}::{host}", std::process::id() % 0xffff);
    give_address(&a, test_ip(8), &v6(8));
    give_address(&b, test_ip(8), &v6(9));
    let err = redirect::netns::find_by_ip(&[test_ip(8)]).unwrap_err();
    let mut candidates = err.candidates.clone();
    candidates.sort();
    let mut both = vec![a.path(), b.path()];
    both.sort();
    assert_eq!(candidates, both, "{err}");
    let mut p = pod("twin", &a, "node-a");
    p.netns = None;
    p.ips = vec![test_ip(8)];
    p.namespace_labels
        .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
    let (mut agent, _source, handoff) = nft_agent(vec![p]);
    agent.sync().unwrap();
    agent.sync().unwrap();
    assert!(agent.captured().is_empty());
    assert!(handoff.0.lock().unwrap().is_empty());
    for ns in [&a, &b] {
        assert!(!ns.ruleset().contains("ztunnel"), "rules in {}", ns.0);
    }
}

#[test]
fn a_namespace_recreated_at_the_same_path_is_never_touched() {
    let first = Netns::new("recr");
    let rules = RuleSet::default();
    let mut p = pod("moved", &first, "node-a");
    p.namespace_labels
        .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
    let (mut agent, source, handoff) = nft_agent(vec![p]);
    agent.sync().unwrap();
    let held = agent.captured()["uid-moved"].netns.clone();
    let old_inode = {
        use std::os::unix::fs::MetadataExt;
        held.metadata().unwrap().ino()
    };
    // The pod's namespace goes away and another one is created under the same name (another
    // pod, whose rules someone else manages).
    assert!(
        Command::new("ip")
            .args(["netns", "del", &first.0])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("ip")
            .args(["netns", "add", &first.0])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("ip")
            .args(["-n", &first.0, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    assert_ne!(first.inode(), old_inode);
    redirect::apply(&first.path(), Backend::Nftables, &rules).unwrap();
    let others = first.ruleset();
    // Releasing the pod removes its rules from its own namespace (through the held
    // descriptor), never from the namespace that now has its path.
    source.0.lock().unwrap().clear();
    agent.sync().unwrap();
    assert!(agent.captured().is_empty());
    assert_eq!(
        first.ruleset(),
        others,
        "the new namespace's rules were touched"
    );
    let fd = redirect::fd_path(std::os::fd::AsFd::as_fd(&*held));
    assert!(
        !check(&fd, Backend::Nftables, &rules)
            .unwrap()
            .missing
            .is_empty(),
        "the pod's own namespace still has its rules"
    );
    assert_eq!(
        *handoff.0.lock().unwrap(),
        vec!["add moved".to_owned(), "remove uid-moved".to_owned()]
    );
}

/// Removes our nftables table from this (the host's) namespace on drop, should a broken agent
/// ever have put it there.
struct HostGuard;

impl Drop for HostGuard {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", redirect::NFT_TABLE])
            .output();
    }
}

#[test]
fn the_agents_own_namespace_is_never_captured() {
    let _guard = HostGuard;
    let host_ruleset = || {
        let out = Command::new("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        !host_ruleset().contains("table inet ztunnel"),
        "leftover from another run"
    );
    let placeholder = Netns::new("own");
    let mut p = pod("host", &placeholder, "node-a");
    // A path that names the agent's own namespace (a pod reported with the agent's PID, or a
    // reused one).
    p.netns = Some(PathBuf::from(format!(
        "/proc/{}/ns/net",
        std::process::id()
    )));
    p.namespace_labels
        .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
    let (mut agent, _source, handoff) = nft_agent(vec![p]);
    agent.sync().unwrap();
    assert!(agent.captured().is_empty());
    assert!(handoff.0.lock().unwrap().is_empty());
    assert!(
        !host_ruleset().contains("table inet ztunnel"),
        "the host was captured"
    );
}
