//! The node agent against real network namespaces, with an in-memory pod source.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use redirect::agent::{DATAPLANE_MODE_LABEL, Handoff, NodeAgent, PodInfo, PodSource};
use redirect::{Backend, RuleSet, check};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let uid = Command::new("id").arg("-u").output().expect("id");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "these tests need root (CI runs as root)"
        );
        let name = format!("zta-{}-{tag}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }

    fn ruleset(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[derive(Clone, Default)]
struct Source(Arc<Mutex<Vec<PodInfo>>>);

impl PodSource for Source {
    fn pods(&self) -> Result<Vec<PodInfo>, String> {
        Ok(self.0.lock().unwrap().clone())
    }
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Handoff for Recorder {
    fn add(&self, pod: &PodInfo) {
        self.0.lock().unwrap().push(format!("add {}", pod.name));
    }
    fn remove(&self, uid: &str) {
        self.0.lock().unwrap().push(format!("remove {uid}"));
    }
}

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
