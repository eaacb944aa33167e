//! The system side: network namespaces, links, addresses, routes and rules, made with `ip`,
//! `sysctl` and `iptables-restore`, and processes started in them. Every name starts with the
//! mesh's prefix, so that teardown can find everything it made (also after a crash).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::Error;

/// Runs `program args`; its stdout, or an error naming the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: format!("{program} {}", args.join(" ")),
            reason: format!("cannot run it: {e}"),
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n ns args` (an `ip` command applied inside namespace `ns`).
pub fn ip(ns: &str, args: &[&str]) -> Result<String, Error> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Runs `program args` inside network namespace `ns`.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<String, Error> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Runs `iptables-restore --noflush` (`ip6tables-restore` when `v6`) with `input` inside `ns`.
pub fn iptables_restore_in(ns: &str, input: &str, v6: bool) -> Result<(), Error> {
    use std::io::Write as _;
    let tool = if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    };
    let command = format!("ip netns exec {ns} {tool} --noflush");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, tool, "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command {
            command: command.clone(),
            reason: format!("cannot run it: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| Error::Command {
        command: command.clone(),
        reason: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command,
            reason: format!(
                "{}: {}\ninput:\n{input}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The network namespaces whose names start with `prefix-`.
pub fn namespaces(prefix: &str) -> Vec<String> {
    let listed = run("ip", &["netns", "list"]).unwrap_or_default();
    listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

/// Creates namespace `name` with its loopback up.
pub fn add_namespace(name: &str) -> Result<(), Error> {
    run("ip", &["netns", "add", name])?;
    run("ip", &["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Kills every process in namespace `ns` (SIGKILL) and deletes it.
pub fn delete_namespace(ns: &str) {
    if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
    }
    let _ = run("ip", &["netns", "del", ns]);
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
}

/// Whether link `name` exists in the host namespace.
pub fn host_link_exists(name: &str) -> bool {
    run("ip", &["link", "show", name]).is_ok()
}

/// Writes `/etc/netns/<ns>/hosts`, which `ip netns exec` shows to commands in `ns` as
/// `/etc/hosts`.
pub fn write_hosts(ns: &str, text: &str) -> Result<(), Error> {
    write_netns_file(ns, "hosts", text)
}

/// Writes `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` shows to commands in `ns` as
/// `/etc/resolv.conf`.
pub fn write_resolv_conf(ns: &str, text: &str) -> Result<(), Error> {
    write_netns_file(ns, "resolv.conf", text)
}

/// Writes `/etc/netns/<ns>/<name>` in place: `ip netns exec` bind-mounts this very file, so a
/// running app sees updates only if the file keeps its inode.
fn write_netns_file(ns: &str, name: &str, text: &str) -> Result<(), Error> {
    let dir = Path::new("/etc/netns").join(ns);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|source| Error::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// Runs `work` on a thread of its own that entered network namespace `ns` (by name), so the
/// sockets and `/proc/sys/net` it touches are the namespace's; the thread's handle. Its result
/// is `work`'s, or why the namespace could not be entered.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, String>> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering {path}: {e}"))?;
        work()
    })
}

/// [`spawn_in`], waited for; `work` panicking is an error naming the namespace.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    spawn_in(ns, work)
        .join()
        .map_err(|_| format!("the thread working in network namespace {ns} panicked"))?
}

/// Turns on IPv4 and IPv6 forwarding inside namespace `ns` (a node routes for its pods), writing
/// its `/proc/sys` from a thread that entered the namespace (no `sysctl` binary needed). IPv6
/// forwarding is skipped where the kernel has no IPv6.
pub fn enable_forwarding(ns: &str) -> Result<(), Error> {
    in_netns(ns, || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("enabling forwarding: {e}"))?;
        let v6 = Path::new("/proc/sys/net/ipv6/conf/all/forwarding");
        if v6.exists() {
            std::fs::write(v6, "1").map_err(|e| format!("enabling IPv6 forwarding: {e}"))?;
        }
        Ok(())
    })
    .map_err(|reason| Error::Command {
        command: format!("net.ipv4.ip_forward=1 (and IPv6's) in {ns}"),
        reason,
    })
}

/// Whether `tool` is an executable on `PATH`.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Checks what the mesh needs before anything is made: root, and the tools (`ip`, and the
/// capture and service rules' `iptables-restore` or `nft`). Missing packages are installed with
/// `apt-get` when it is there (saying so), else named in the error.
pub fn preflight(backend: &str, progress: &mut dyn FnMut(&str)) -> Result<(), Error> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Err(Error::Usage(
            "the local mesh needs root (it makes network namespaces, links, routes and rules): run it with sudo".into(),
        ));
    }
    let mut tools = vec![("ip", "iproute2"), ("iptables-restore", "iptables")];
    if backend == "nftables" {
        tools.push(("nft", "nftables"));
    }
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        return Err(Error::Usage(format!(
            "missing tools; install the packages {} first",
            missing.join(" ")
        )));
    }
    progress(&format!("installing {} (apt-get)", missing.join(" ")));
    run("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    let out = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: format!("apt-get {}", args.join(" ")),
            reason: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("apt-get {}", args.join(" ")),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
