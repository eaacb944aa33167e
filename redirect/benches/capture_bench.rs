//! Time to capture 100 pods per backend: apply the rules in 100 fresh network namespaces (and
//! remove them). Needs root, iproute2, iptables and nftables. Run with `cargo bench -p redirect`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use redirect::{Backend, RuleSet, apply, remove};

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
    }
}
