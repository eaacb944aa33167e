//! Shared by the real-netns tests: a network namespace that is removed even when a test fails.
#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use redirect::agent::{Handoff, NodeAgent, PodInfo, PodSource};
use redirect::{Backend, RuleSet};

/// An in-memory pod source the test edits.
#[derive(Clone, Default)]
pub(crate) struct Source(pub(crate) Arc<Mutex<Vec<PodInfo>>>);

impl PodSource for Source {
    fn pods(&self) -> Result<Vec<PodInfo>, String> {
        Ok(self.0.lock().unwrap().clone())
    }
}

/// An agent for node-a with the nftables backend and default rules over `pods`, with its
/// source (to edit) and handoff recorder.
pub(crate) fn nft_agent(pods: Vec<PodInfo>) -> (NodeAgent<Source, Recorder>, Source, Recorder) {
    let source = Source::default();
    *source.0.lock().unwrap() = pods;
    let handoff = Recorder::default();
    let agent = NodeAgent::new(
        "node-a",
        Backend::Nftables,
        RuleSet::default(),
        source.clone(),
        handoff.clone(),
    );
    (agent, source, handoff)
}

/// A handoff that records `add NAME` and `remove UID`.
#[derive(Clone, Default)]
pub(crate) struct Recorder(pub(crate) Arc<Mutex<Vec<String>>>);

impl Handoff for Recorder {
    fn add(&self, pod: &PodInfo, _netns: &Arc<std::fs::File>) {
        self.0.lock().unwrap().push(format!("add {}", pod.name));
    }
    fn served(&self, _uid: &str) -> bool {
        true
    }
    fn remove(&self, uid: &str) {
        self.0.lock().unwrap().push(format!("remove {uid}"));
    }
}

/// Fails loudly unless running as root (CI runs as root).
pub(crate) fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "these tests need root (CI runs as root)"
    );
}

/// A named network namespace, `ztt-<pid>-<tag>`, deleted on drop.
pub(crate) struct Netns(pub(crate) String);

impl Netns {
    pub(crate) fn new(tag: &str) -> Self {
        require_root();
        let name = format!("ztt-{}-{tag}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success(),
            "ip netns add {name} failed"
        );
        // As a pod's: the runtime brings loopback up before any plugin runs.
        assert!(
            Command::new("ip")
                .args(["-n", &name, "link", "set", "lo", "up"])
                .status()
                .unwrap()
                .success(),
            "ip -n {name} link set lo up failed"
        );
        Netns(name)
    }

    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.0)
    }

    /// Runs a shell command inside the namespace; it must succeed.
    pub(crate) fn exec(&self, cmd: &str) {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .status()
            .unwrap()
            .success();
        assert!(ok, "in {}: {cmd}", self.0);
    }

    /// What a shell command prints inside the namespace; it must succeed.
    pub(crate) fn output(&self, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", cmd])
            .output()
            .unwrap();
        assert!(out.status.success(), "in {}: {cmd}", self.0);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `nft list ruleset` inside the namespace.
    pub(crate) fn ruleset(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft list ruleset failed in {}",
            self.0
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The namespace's inode (what a descriptor of it reports too).
    pub(crate) fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path()).unwrap().ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A rule set (`nft list ruleset` or `iptables-save` text) without what iptables-nft may leave
/// behind after our rules are removed: built-in chains with no rules and a policy of accept, and
/// tables left with nothing in them. Removal keeps those on purpose (deleting a table could
/// delete another writer's rule added meanwhile); they change no packet's fate.
pub(crate) fn without_empty_builtins(text: &str) -> String {
    if text.lines().any(|l| l.starts_with('*')) {
        return iptables_without_empty(text);
    }
    // nft: drop chains whose body is only their hook line with policy accept, then empty tables.
    let mut out: Vec<String> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim_start().starts_with("chain ") && line.trim_end().ends_with('{') {
            let end = (i..lines.len())
                .find(|&j| lines[j].trim() == "}")
                .unwrap_or(lines.len() - 1);
            let body: Vec<&str> = lines[i + 1..end]
                .iter()
                .map(|l| l.trim())
                .filter(|l| !l.is_empty())
                .collect();
            let empty = body.len() == 1
                && body[0].starts_with("type ")
                && body[0].ends_with("policy accept;");
            if !empty {
                out.extend(lines[i..=end].iter().map(|l| l.to_string()));
            }
            i = end + 1;
            continue;
        }
        out.push(line.to_owned());
        i += 1;
    }
    // Tables with nothing but blank lines inside.
    let mut result: Vec<String> = Vec::new();
    let mut j = 0;
    while j < out.len() {
        if out[j].starts_with("table ") {
            let end = (j..out.len())
                .find(|&k| out[k] == "}")
                .unwrap_or(out.len() - 1);
            if out[j + 1..end].iter().all(|l| l.trim().is_empty()) {
                j = end + 1;
                continue;
            }
            result.extend(out[j..=end].iter().cloned());
            j = end + 1;
            continue;
        }
        if !out[j].trim().is_empty() {
            result.push(out[j].clone());
        }
        j += 1;
    }
    result.join("\n")
}

fn iptables_without_empty(text: &str) -> String {
    let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let mut out: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with('*') {
            out.push(lines[i]);
            i += 1;
            continue;
        }
        // One `*table` ... `COMMIT` block.
        let end = (i..lines.len())
            .find(|&j| lines[j] == "COMMIT")
            .unwrap_or(lines.len() - 1);
        let block = &lines[i + 1..end];
        let used = |chain: &str| block.iter().any(|l| l.starts_with(&format!("-A {chain} ")));
        let kept: Vec<&str> = block
            .iter()
            .copied()
            .filter(|l| {
                let Some(rest) = l.strip_prefix(':') else {
                    return true;
                };
                let mut parts = rest.split_whitespace();
                let chain = parts.next().unwrap_or_default();
                let policy = parts.next().unwrap_or_default();
                !(builtin.contains(&chain) && policy == "ACCEPT" && !used(chain))
            })
            .collect();
        if !kept.is_empty() {
            out.push(lines[i]);
            out.extend(kept);
            out.push(lines[end]);
        }
        i = end + 1;
    }
    out.join("\n")
}

/// A scratch directory named after the test and the process, removed when dropped; mode 0755,
/// so other users may reach what is in it.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("redirect-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
