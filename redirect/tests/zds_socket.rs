//! The node agent's ZDS socket hands out pods' network namespaces, so who may connect is checked
//! twice: the socket file is mode 0600 whatever the umask, and a peer whose credentials
//! (`SO_PEERCRED`) are neither root's nor an allowed user's is refused, even through a socket
//! file someone made wider. Needs root (to act as another user).

mod common;

use common::TempDir;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use redirect::agent::Handoff;
use redirect::zds::{ZdsConfig, ZdsServer};

fn root() {
    assert!(
        Path::new(SYSTEM_PYTHON).exists(),
        "this test needs {SYSTEM_PYTHON} (Debian's python3 package)"
    );
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test needs root (CI runs as root)"
    );
}

/// The system's python (a user's own, such as pyenv's under /root, is not for other users to
/// run).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Connects to `socket` as user `uid` (setpriv), sends a ZDS hello and returns the length of
/// the first message the agent sends back, `hung up` when it closed or reset the connection,
/// or the connect error.
fn hello_as(uid: u32, socket: &Path) -> String {
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\ns.settimeout(5)\ntry:\n  s.connect({socket:?})\nexcept Exception as e:\n  print('connect:', type(e).__name__); raise SystemExit\ntry:\n  s.send(b'\\x08\\x01')\n  d=s.recv(1024)\n  print(len(d) if d else 'hung up')\nexcept (BrokenPipeError, ConnectionResetError):\n  print('hung up')",
        socket = socket.display().to_string()
    );
    python_as(uid, &code)
}

/// Runs Python `code` as user `uid` (setpriv); what it printed, stdout then stderr, trimmed.
fn python_as(uid: u32, code: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            SYSTEM_PYTHON,
            "-c",
            code,
        ])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn wait_for(mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn the_socket_is_0600_whatever_the_umask_and_strangers_are_refused() {
    root();
    let d = TempDir::new("zds-strangers");
    let path = d.0.join("ztunnel.sock");
    // The most permissive umask there is, for this bind only.
    let before = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let server = ZdsServer::bind(&path);
    nix::sys::stat::umask(before);
    let server = server.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // Through the file's mode, nobody gets in at all.
    assert_eq!(hello_as(65534, &path), "connect: PermissionError");
    assert_eq!(server.refused_peers(), 0);

    // Someone widened the file: the credentials check still refuses (and logs) the stranger,
    // who is hung up on without a message (a close, or a reset of what it sent unread).
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(hello_as(65534, &path), "hung up");
    assert!(wait_for(|| server.refused_peers() == 1));
    assert_eq!(server.connections(), 0);
}

#[test]
fn an_allowed_user_is_served() {
    root();
    let d = TempDir::new("zds-allowed");
    let path = d.0.join("ztunnel.sock");
    let mut config = ZdsConfig::default();
    config.allowed_uids = vec![65534];
    let server = ZdsServer::bind_with(&path, config).unwrap();
    // No agent here: the (empty) set of pods is complete.
    server.synced();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    // The agent answers the hello with its (empty) snapshot's end.
    assert_eq!(hello_as(65534, &path), "2");
    assert_eq!(server.refused_peers(), 0);
    // Root is always allowed.
    assert_eq!(hello_as(0, &path), "2");
}

/// Connects to the CNI socket as user `uid`, sends a DEL for a pod and prints what comes back
/// (`hung up` for nothing).
fn cni_as(uid: u32, socket: &Path) -> String {
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\ns.settimeout(5)\ntry:\n  s.connect({socket:?})\nexcept Exception as e:\n  print('connect:', type(e).__name__); raise SystemExit\ntry:\n  s.sendall(b'{{\"event\":\"DEL\",\"container_id\":\"c\",\"netns\":\"\",\"pod_name\":\"p\",\"pod_namespace\":\"default\",\"pod_uid\":null,\"ips\":[]}}')\n  s.shutdown(socket.SHUT_WR)\n  d=s.recv(1024)\n  print(d.decode() if d else 'hung up')\nexcept (BrokenPipeError, ConnectionResetError):\n  print('hung up')",
        socket = socket.display().to_string()
    );
    python_as(uid, &code)
}

#[test]
fn the_cni_socket_is_0600_whatever_the_umask_and_strangers_are_refused() {
    use redirect::cni::{CniBoard, CniServer, CniServerConfig};
    use std::sync::Arc;
    root();
    let d = TempDir::new("cni-strangers");
    let path = d.0.join("cni.sock");
    let before = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let board = Arc::new(CniBoard::default());
    let server = CniServer::bind(&path, CniServerConfig::default(), board.clone());
    nix::sys::stat::umask(before);
    let server = server.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    assert_eq!(cni_as(65534, &path), "connect: PermissionError");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(cni_as(65534, &path), "hung up");
    assert!(wait_for(|| server.refused_peers() == 1));
    // Root is served (no agent works the board here: a DEL of a pod nobody captured is
    // answered once the board's wait ends; a short one keeps the test quick).
    let mut config = CniServerConfig::default();
    config.answer_within = Duration::from_millis(200);
    let path2 = d.0.join("cni2.sock");
    CniServer::bind(&path2, config, board).unwrap();
    let answer = cni_as(0, &path2);
    assert!(answer.contains("outcome"), "{answer}");
}
