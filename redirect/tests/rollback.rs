//! A failure half-way through an iptables apply rolls back what was already installed. The IPv6
//! tool is made to fail with a stand-in `ip6tables-restore` first on PATH; this is the only test in
//! this binary, since it changes the process environment.

use std::process::Command;

mod common;

use common::Netns;
use redirect::{Backend, Error, RuleSet, apply};

#[test]
fn a_failed_ipv6_apply_rolls_back_ipv4() {
    let ns = Netns::new("rollback");
    let before = ns.ruleset();

    let bin = std::env::temp_dir().join(format!("ztrb-bin-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("ip6tables-restore");
    std::fs::write(&fake, "#!/bin/sh\necho 'injected failure' >&2\nexit 1\n").unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    // SAFETY: the only test in this binary; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PATH", format!("{}:{path}", bin.display())) };

    let err = apply(&ns.path(), Backend::Iptables, &RuleSet::default()).unwrap_err();
    unsafe { std::env::set_var("PATH", path) };
    let _ = std::fs::remove_dir_all(&bin);

    assert!(
        matches!(&err, Error::Tool { command, stderr, .. } if command.contains("ip6tables-restore") && stderr.contains("injected failure")),
        "{err}"
    );
    assert_eq!(
        common::without_empty_builtins(&ns.ruleset()),
        common::without_empty_builtins(&before),
        "IPv4 rules left behind"
    );
}
