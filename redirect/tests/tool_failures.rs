//! Tools that fail, hang, or race with another writer: the agent never reports a failed capture
//! or release as done and retries with backoff, a hanging tool is killed at its time limit, and
//! another program's nat rules written between our read and our write survive. The tools are
//! wrapped by stand-ins first on PATH that consult flag files; this is the only test in this
//! binary, since it changes the process environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{Netns, nft_agent};
use redirect::agent::{DATAPLANE_MODE_LABEL, PodInfo};
use redirect::{Backend, Error, RuleSet, apply};

/// The stand-in tools and their switches.
struct Fakes {
    dir: PathBuf,
}

impl Fakes {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("zttf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fakes = Fakes { dir };
        for tool in ["nft", "iptables-restore"] {
            let real = which(tool);
            let script = format!(
                "#!/bin/sh\n\
                 echo \"{tool} $*\" >> {log}\n\
                 if [ -e {fail} ]; then echo 'injected failure' >&2; exit 1; fi\n\
                 if [ -e {hang} ]; then exec sleep 60; fi\n\
                 if [ -e {race} ] && [ {tool} = iptables-restore ]; then iptables -t nat -A POSTROUTING -m comment --comment other-writer -j ACCEPT; fi\n\
                 exec {real} \"$@\"\n",
                log = fakes.path("log").display(),
                fail = fakes.path("fail").display(),
                hang = fakes.path("hang").display(),
                race = fakes.path("race").display(),
                real = real.display(),
            );
            let path = fakes.dir.join(tool);
            std::fs::write(&path, script).unwrap();
            Command::new("chmod").arg("+x").arg(&path).status().unwrap();
        }
        fakes
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn set(&self, switch: &str, on: bool) {
        if on {
            std::fs::write(self.path(switch), "").unwrap();
        } else {
            let _ = std::fs::remove_file(self.path(switch));
        }
    }

    fn calls(&self) -> usize {
        std::fs::read_to_string(self.path("log"))
            .unwrap_or_default()
            .lines()
            .count()
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!path.is_empty(), "{tool} is not installed");
    PathBuf::from(path)
}

/// A tool's real path (the stand-ins are first on PATH while the test runs).
fn which_real(tool: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{tool} is not installed"))
}

fn ambient_pod(name: &str, netns: &Path) -> PodInfo {
    PodInfo {
        uid: format!("uid-{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        labels: BTreeMap::new(),
        namespace_labels: [(DATAPLANE_MODE_LABEL.to_owned(), "ambient".to_owned())].into(),
        node: "node-a".into(),
        netns: Some(netns.to_owned()),
        ips: Vec::new(),
        annotations: BTreeMap::new(),
    }
}

#[test]
fn failing_hanging_and_racing_tools() {
    let ns = Netns::new("tools");
    let fakes = Fakes::new();
    let path = std::env::var("PATH").unwrap_or_default();
    // SAFETY: the only test in this binary; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PATH", format!("{}:{path}", fakes.dir.display())) };

    // 1. A capture that fails is not reported, and is retried only after its backoff.
    let (mut agent, source, handoff) = nft_agent(vec![ambient_pod("p", &ns.path())]);
    fakes.set("fail", true);
    agent.sync().unwrap();
    assert!(agent.captured().is_empty());
    assert!(handoff.0.lock().unwrap().is_empty());
    let tries = fakes.calls();
    agent.sync().unwrap();
    assert_eq!(fakes.calls(), tries, "retried before the backoff elapsed");
    std::thread::sleep(Duration::from_millis(300));
    agent.sync().unwrap();
    assert!(fakes.calls() > tries, "not retried after the backoff");
    fakes.set("fail", false);
    std::thread::sleep(Duration::from_millis(600));
    agent.sync().unwrap();
    assert_eq!(agent.captured().len(), 1);
    assert_eq!(*handoff.0.lock().unwrap(), vec!["add p".to_owned()]);

    // 2. A release that fails keeps the pod captured and handed off, until it succeeds.
    fakes.set("fail", true);
    source.0.lock().unwrap().clear();
    agent.sync().unwrap();
    assert_eq!(
        agent.captured().len(),
        1,
        "a failed release was reported as done"
    );
    assert_eq!(handoff.0.lock().unwrap().len(), 1, "announced as released");
    let real_nft = format!("{} list ruleset", which_real("nft").display());
    assert!(ns.output(&real_nft).contains("table inet ztunnel"));
    fakes.set("fail", false);
    std::thread::sleep(Duration::from_millis(300));
    agent.sync().unwrap();
    assert!(agent.captured().is_empty());
    assert_eq!(
        *handoff.0.lock().unwrap(),
        vec!["add p".to_owned(), "remove uid-p".to_owned()]
    );
    assert!(!ns.ruleset().contains("ztunnel"));

    // 3. A tool that hangs is killed at the limit.
    fakes.set("hang", true);
    let mut rules = RuleSet::default();
    rules.tool_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = apply(&ns.path(), Backend::Nftables, &rules).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    fakes.set("hang", false);

    // 4. Another writer's nat rule, added between our read and our write, survives.
    fakes.set("race", true);
    apply(&ns.path(), Backend::Iptables, &RuleSet::default()).unwrap();
    fakes.set("race", false);
    let saved = ns.output("iptables-save -t nat");
    assert!(
        saved.contains("other-writer"),
        "another writer's rule was lost:\n{saved}"
    );
    assert!(saved.contains("ZTUNNEL_OUTPUT"));
    redirect::remove(&ns.path(), Backend::Iptables, &RuleSet::default()).unwrap();
    let saved = ns.output("iptables-save -t nat");
    assert!(
        saved.contains("other-writer"),
        "removal lost another writer's rule:\n{saved}"
    );
    assert!(!saved.contains("ZTUNNEL"), "{saved}");

    unsafe { std::env::set_var("PATH", path) };
}
