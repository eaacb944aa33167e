//! Finding a running pod's network namespace by its uid in the processes' cgroups, then checking
//! the pod's IP, as the node agent does in a cluster (`NetnsLookup::ByUid`): against a host root
//! laid out by the test (as a DaemonSet sees the host's `/proc` under `/host`), and against a
//! real process in a real cgroup. Needs root.

mod common;

use common::{Netns, TempDir};

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use redirect::netns::{Unresolved, find_by_uid};

const UID: &str = "5c1f3a7e-92b0-4d6a-8f17-0c2e9b4d1a66";

/// A namespace holding `ip` on a veth.
fn netns_with(tag: &str, ip: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.exec(&format!(
        "ip link add eth0 type veth peer name eth1 && ip addr add {ip}/32 dev eth0 && ip link set eth1 up && ip link set eth0 up"
    ));
    ns
}

/// A process directory under `root/proc/PID`: its cgroup text, its namespace a link to `netns`.
fn process(root: &Path, pid: u32, cgroup: &str, netns: &Path) {
    let dir = root.join(format!("proc/{pid}"));
    std::fs::create_dir_all(dir.join("ns")).unwrap();
    std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    std::os::unix::fs::symlink(netns, dir.join("ns/net")).unwrap();
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn the_namespace_of_the_pods_processes_is_taken_only_when_it_holds_the_pods_ip() {
    let pid = std::process::id();
    let pod_ip = format!("10.{}.{}.7", 200 + pid % 50, (pid / 50) % 250);
    let other_ip = format!("10.{}.{}.8", 200 + pid % 50, (pid / 50) % 250);
    let pod_ns = netns_with("uid-pod", &pod_ip);
    let other_ns = netns_with("uid-other", &other_ip);
    let d = TempDir::new("uid-root");
    let root = &d.0;
    // PID 1 is the host (its namespace is never a pod's).
    process(root, 1, "0::/init.scope\n", Path::new("/proc/1/ns/net"));
    // The pod's sandbox and app, systemd driver (uid with underscores), one namespace.
    let underscored = UID.replace('-', "_");
    let slice = format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice"
    );
    process(
        root,
        4100,
        &format!("{slice}/cri-containerd-aaa.scope\n"),
        &pod_ns.path(),
    );
    process(
        root,
        4101,
        &format!("{slice}/cri-containerd-bbb.scope\n"),
        &pod_ns.path(),
    );
    // Another pod (cgroupfs driver).
    process(
        root,
        4200,
        "12:pids:/kubepods/burstable/pod0b9e-other/ccc\n",
        &other_ns.path(),
    );
    // A host-network container of the pod would be in the host's namespace: skipped.
    process(
        root,
        4102,
        &format!("{slice}/cri-containerd-ccc.scope\n"),
        Path::new("/proc/1/ns/net"),
    );

    let found = find_by_uid(root, UID, &[ip(&pod_ip)]).unwrap().unwrap();
    assert!(
        found == root.join("proc/4100/ns/net") || found == root.join("proc/4101/ns/net"),
        "{}",
        found.display()
    );
    // The pod's processes' namespace does not hold the address the API gives: refused, named.
    match find_by_uid(root, UID, &[ip(&other_ip)]) {
        Err(Unresolved::WrongAddress { netns, .. }) => {
            assert!(netns.starts_with(root.join("proc")))
        }
        other => panic!("{other:?}"),
    }
    // No process of the pod, or no address yet: nothing (yet).
    assert_eq!(
        find_by_uid(root, "0000-none", &[ip(&pod_ip)]).unwrap(),
        None
    );
    assert_eq!(find_by_uid(root, UID, &[]).unwrap(), None);
    // The pod's processes in two namespaces: never a guess.
    process(
        root,
        4103,
        &format!("{slice}/cri-containerd-ddd.scope\n"),
        &other_ns.path(),
    );
    match find_by_uid(root, UID, &[ip(&pod_ip)]) {
        Err(e @ Unresolved::Scattered { .. }) => assert!(e.to_string().contains("not guessing")),
        other => panic!("{other:?}"),
    }
}

/// A writable cgroup hierarchy: the unified (v2) one, or the v1 `pids` one.
fn cgroup_root() -> PathBuf {
    for candidate in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/pids",
    ] {
        let path = PathBuf::from(candidate);
        if path.join("cgroup.procs").exists() {
            return path;
        }
    }
    panic!("no cgroup hierarchy to place a test process in (looked under /sys/fs/cgroup)");
}

/// A process in a cgroup, both removed on drop.
struct InCgroup {
    child: Child,
    dirs: Vec<PathBuf>,
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_real_process_in_a_cgroup_named_after_the_pod_gives_its_namespace() {
    let pid = std::process::id();
    let pod_ip = format!("10.{}.{}.9", 200 + pid % 50, (pid / 50) % 250);
    let pod_ns = netns_with("uid-real", &pod_ip);
    let base = cgroup_root().join(format!("ztt-{pid}-kubepods"));
    let leaf = base.join(format!("pod{UID}"));
    std::fs::create_dir_all(&leaf).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &pod_ns.0, "sleep", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let guard = InCgroup {
        child,
        dirs: vec![base.clone(), leaf.clone()],
    };
    std::fs::write(leaf.join("cgroup.procs"), guard.child.id().to_string()).unwrap();
    // `ip netns exec` has become `sleep` in the pod's namespace by now, or soon.
    let start = std::time::Instant::now();
    let found = loop {
        let found = find_by_uid(Path::new("/"), UID, &[ip(&pod_ip)]);
        if matches!(found, Ok(Some(_))) || start.elapsed() > std::time::Duration::from_secs(5) {
            break found;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        found.unwrap(),
        Some(PathBuf::from(format!("/proc/{}/ns/net", guard.child.id())))
    );
    drop(guard);
}
