//! Shared by the real-netns tests: a network namespace that is removed even when a test fails.
#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;
use std::process::Command;

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
