//! A failure half-way through an iptables apply rolls back what was already installed. The IPv6
//! tool is made to fail with a stand-in `ip6tables-restore` first on PATH; this is the only test in
//! this binary, since it changes the process environment.

use std::path::PathBuf;
use std::process::Command;

use redirect::{Backend, Error, RuleSet, apply};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ruleset(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft list ruleset failed in {ns}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_failed_ipv6_apply_rolls_back_ipv4() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test needs root (CI runs as root)"
    );
    let ns = Netns(format!("ztrb-{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    let before = ruleset(&ns.0);

    let bin = std::env::temp_dir().join(format!("ztrb-bin-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("ip6tables-restore");
    std::fs::write(&fake, "#!/bin/sh\necho 'injected failure' >&2\nexit 1\n").unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    // SAFETY: the only test in this binary; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PATH", format!("{}:{path}", bin.display())) };

    let err = apply(
        &PathBuf::from("/var/run/netns").join(&ns.0),
        Backend::Iptables,
        &RuleSet::default(),
    )
    .unwrap_err();
    unsafe { std::env::set_var("PATH", path) };
    let _ = std::fs::remove_dir_all(&bin);

    assert!(
        matches!(&err, Error::Tool { command, stderr, .. } if command.contains("ip6tables-restore") && stderr.contains("injected failure")),
        "{err}"
    );
    assert_eq!(ruleset(&ns.0), before, "IPv4 rules left behind");
}
