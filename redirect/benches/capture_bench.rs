//! Time to capture 100 pods per backend: apply the rules in 100 fresh network namespaces (and
//! remove them); then the node agent's reaction to label flips over the same 100 pods. Needs root,
//! iproute2, iptables and nftables. Run with `cargo bench -p redirect`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redirect::agent::{DATAPLANE_MODE_LABEL, NoHandoff, NodeAgent, PodInfo, PodSource};
use redirect::{Backend, RuleSet, apply, remove};

#[derive(Clone, Default)]
struct Source(Arc<Mutex<Vec<PodInfo>>>);

impl PodSource for Source {
    fn pods(&self) -> Result<Vec<PodInfo>, String> {
        Ok(self.0.lock().unwrap().clone())
    }
}

struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn main() {
    let pods = 100;
    println!("redirect benchmark: {pods} network namespaces, rules applied one after another\n");
    println!("| backend | apply to {pods} pods | per pod | remove from {pods} pods |");
    println!("|---|---|---|---|");
    let mut flips = Vec::new();
    for (backend, name) in [
        (Backend::Iptables, "iptables"),
        (Backend::Nftables, "nftables"),
    ] {
        let namespaces = Namespaces(
            (0..pods)
                .map(|i| format!("ztb-{}-{name}-{i}", std::process::id()))
                .collect(),
        );
        for ns in &namespaces.0 {
            let ok = Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip netns add {ns} failed (root needed)");
            let ok = Command::new("ip")
                .args(["-n", ns, "link", "set", "lo", "up"])
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip -n {ns} link set lo up failed");
        }
        let paths: Vec<PathBuf> = namespaces
            .0
            .iter()
            .map(|n| PathBuf::from("/var/run/netns").join(n))
            .collect();
        let rules = RuleSet::default();
        let start = Instant::now();
        for path in &paths {
            apply(path, backend, &rules).unwrap();
        }
        let applied = start.elapsed();
        let start = Instant::now();
        for path in &paths {
            remove(path, backend, &rules).unwrap();
        }
        let removed = start.elapsed();
        println!(
            "| {name} | {:.0} ms | {:.1} ms | {:.0} ms |",
            applied.as_secs_f64() * 1e3,
            applied.as_secs_f64() * 1e3 / pods as f64,
            removed.as_secs_f64() * 1e3
        );
        flips.push((name, label_flips(backend, &paths)));
    }
    println!(
        "\nnode agent, one convergence pass after each change (add the agent's 250 ms poll interval for the worst case)\n"
    );
    println!(
        "| backend | namespace labelled: capture {pods} | pass with no change | one pod opts out | namespace unlabelled: release {pods} |"
    );
    println!("|---|---|---|---|---|");
    for (name, [on, idle, one, off]) in flips {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(on),
            ms(idle),
            ms(one),
            ms(off)
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Runs the agent over the pods in `paths` and times the pass after each label change.
fn label_flips(backend: Backend, paths: &[PathBuf]) -> [Duration; 4] {
    let pods: Vec<PodInfo> = paths
        .iter()
        .enumerate()
        .map(|(i, path)| PodInfo {
            uid: format!("uid-{i}"),
            name: format!("pod-{i}"),
            namespace: "default".into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
            node: "node-a".into(),
            netns: Some(path.clone()),
            ips: Vec::new(),
            annotations: BTreeMap::new(),
        })
        .collect();
    let source = Source(Arc::new(Mutex::new(pods)));
    let mut agent = NodeAgent::new(
        "node-a",
        backend,
        RuleSet::default(),
        source.clone(),
        NoHandoff,
    );
    let mut pass = |change: &dyn Fn(&mut Vec<PodInfo>)| {
        change(&mut source.0.lock().unwrap());
        let start = Instant::now();
        agent.sync().unwrap();
        start.elapsed()
    };
    let label = |on: bool| {
        move |pods: &mut Vec<PodInfo>| {
            for p in pods.iter_mut() {
                if on {
                    p.namespace_labels
                        .insert(DATAPLANE_MODE_LABEL.into(), "ambient".into());
                } else {
                    p.namespace_labels.clear();
                }
            }
        }
    };
    let on = pass(&label(true));
    let idle = pass(&|_| {});
    let one = pass(&|pods: &mut Vec<PodInfo>| {
        pods[0]
            .labels
            .insert(DATAPLANE_MODE_LABEL.into(), "none".into());
    });
    let off = pass(&label(false));
    assert!(agent.captured().is_empty());
    [on, idle, one, off]
}
