//! Rules applied in real network namespaces (needs root, iproute2, iptables and nftables; CI runs
//! as root and installs them). Fails loudly when it cannot run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use redirect::{Backend, RuleSet, apply, check, reconcile, remove};

#[path = "common/mod.rs"]
mod shared;
use shared::without_empty_builtins;

/// A network namespace for one test, deleted on drop (even when the test panics).
struct Netns {
    name: String,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    fn new() -> Self {
        require_root_and_tools();
        let name = format!(
            "ztr-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip netns add {name} failed");
        let status = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip -n {name} link set lo up failed");
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("run ip netns exec");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The namespace's whole rule state (and its routing rules and the return route's table),
    /// without comments and counters.
    fn state(&self, backend: Backend) -> String {
        let mut routing = String::new();
        for family in ["-4", "-6"] {
            routing.push_str(&self.exec(&["ip", family, "rule", "show"]));
            routing.push_str(&self.exec(&["ip", family, "route", "show", "table", "all"]));
        }
        routing
            + &match backend {
                Backend::Iptables => {
                    let mut text = String::new();
                    for tool in ["iptables-save", "ip6tables-save"] {
                        for line in self.exec(&[tool]).lines().filter(|l| !l.starts_with('#')) {
                            let line = match line.strip_prefix(':') {
                                Some(rest) => format!(":{}", rest.split(" [").next().unwrap()),
                                None => line.to_owned(),
                            };
                            text.push_str(&line);
                            text.push('\n');
                        }
                    }
                    text
                }
                Backend::Nftables => self.exec(&["nft", "list", "ruleset"]),
            }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn require_root_and_tools() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "these tests need root (CI runs as root)"
    );
    for tool in [
        "ip",
        "nsenter",
        "iptables-restore",
        "ip6tables-restore",
        "nft",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .unwrap()
            .success();
        assert!(
            found,
            "`{tool}` is missing: install iproute2, util-linux, iptables and nftables"
        );
    }
}

fn apply_is_idempotent_and_remove_is_exact(backend: Backend) {
    let ns = Netns::new();
    // Something that is not ours, to prove it survives.
    match backend {
        Backend::Iptables => {
            ns.exec(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-d",
                "192.0.2.0/24",
                "-j",
                "RETURN",
            ]);
        }
        Backend::Nftables => {
            ns.exec(&[
                "nft",
                "add table ip other; add chain ip other c; add rule ip other c counter",
            ]);
        }
    }
    let before = ns.state(backend);
    let rules = RuleSet::default();
    apply(&ns.path(), backend, &rules).unwrap();
    let once = ns.state(backend);
    assert_ne!(once, before, "apply changed nothing");
    for family in ["-4", "-6"] {
        let rules = ns.exec(&["ip", family, "rule", "show"]);
        assert!(
            rules.contains("32764:\tfrom all fwmark 0x111/0xfff iif lo lookup 100"),
            "{rules}"
        );
        let table = ns.exec(&["ip", family, "route", "show", "table", "100"]);
        assert!(table.starts_with("local default dev lo"), "{table}");
    }
    let drift = check(&ns.path(), backend, &rules).unwrap();
    assert!(drift.is_clean(), "{drift:?}\n{once}");
    apply(&ns.path(), backend, &rules).unwrap();
    assert_eq!(
        ns.state(backend),
        once,
        "applying twice must equal applying once"
    );
    remove(&ns.path(), backend, &rules).unwrap();
    // Exactly as before, but for empty built-in chains iptables-nft may have created for us.
    assert_eq!(
        without_empty_builtins(&ns.state(backend)),
        without_empty_builtins(&before),
        "remove must restore the rule set"
    );
    // Removing again is harmless.
    remove(&ns.path(), backend, &rules).unwrap();
    assert_eq!(
        without_empty_builtins(&ns.state(backend)),
        without_empty_builtins(&before)
    );
    // And check now reports everything missing.
    assert!(
        !check(&ns.path(), backend, &rules)
            .unwrap()
            .missing
            .is_empty()
    );
}

fn drift_is_reported_and_repaired(backend: Backend) {
    let ns = Netns::new();
    let rules = RuleSet::default();
    apply(&ns.path(), backend, &rules).unwrap();
    match backend {
        Backend::Iptables => {
            ns.exec(&["iptables", "-t", "nat", "-D", "ZTUNNEL_OUTPUT", "1"]);
        }
        Backend::Nftables => {
            ns.exec(&["nft", "flush", "chain", "inet", "ztunnel", "output"]);
        }
    }
    // The return route's rule, deleted by someone else, is drift too.
    ns.exec(&[
        "ip",
        "rule",
        "del",
        "pref",
        "32764",
        "fwmark",
        "0x111/0xfff",
        "iif",
        "lo",
        "lookup",
        "100",
    ]);
    let drift = check(&ns.path(), backend, &rules).unwrap();
    assert!(!drift.missing.is_empty(), "deleted rule not reported");
    assert!(
        drift.missing.iter().any(|m| m.starts_with("ip rule 32764")),
        "{drift:?}"
    );
    let repaired = reconcile(&ns.path(), backend, &rules).unwrap();
    assert_eq!(repaired, drift);
    assert!(check(&ns.path(), backend, &rules).unwrap().is_clean());
}

#[test]
fn iptables_apply_is_idempotent_and_remove_is_exact() {
    apply_is_idempotent_and_remove_is_exact(Backend::Iptables);
}

#[test]
fn nftables_apply_is_idempotent_and_remove_is_exact() {
    apply_is_idempotent_and_remove_is_exact(Backend::Nftables);
}

#[test]
fn iptables_drift_is_reported_and_repaired() {
    drift_is_reported_and_repaired(Backend::Iptables);
}

#[test]
fn nftables_drift_is_reported_and_repaired() {
    drift_is_reported_and_repaired(Backend::Nftables);
}

#[test]
fn missing_netns_is_a_clear_error() {
    let err = apply(
        std::path::Path::new("/var/run/netns/does-not-exist-ztr"),
        Backend::Nftables,
        &RuleSet::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does-not-exist-ztr"), "{err}");
}

#[test]
fn applies_through_an_open_namespace_descriptor() {
    use std::os::fd::AsFd;
    let ns = Netns::new();
    let file = std::fs::File::open(ns.path()).unwrap();
    let path = redirect::fd_path(file.as_fd());
    let rules = RuleSet::default();
    apply(&path, Backend::Nftables, &rules).unwrap();
    assert!(
        ns.exec(&["nft", "list", "tables"]).contains("inet ztunnel"),
        "applied through {} but not in the namespace",
        path.display()
    );
    assert!(check(&path, Backend::Nftables, &rules).unwrap().is_clean());
    remove(&path, Backend::Nftables, &rules).unwrap();
    assert!(!ns.exec(&["nft", "list", "tables"]).contains("ztunnel"));
}
