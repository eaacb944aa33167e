//! Interop with an independent HBONE implementation: `interop/h2_peer.py` (Python's ssl module
//! and the pure-Python `h2` package, sharing no code with ours). `.ci/run` installs the package;
//! without it these tests fail with a message saying what to install.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../interop/h2_peer.py")
}

/// Fails loudly when the independent peer cannot run.
fn require_python_h2() {
    let out = Command::new("python3").args(["-c", "import h2"]).output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the interop peer needs the Python package h2 (`python3 -m pip install h2`): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("the interop peer needs python3: {e}"),
    }
}

fn certs(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("ztunnel-interop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let status = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["demo", "--streams", "1", "--bytes", "1", "--write-certs"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    TempDir(dir)
}

fn tls_args(dir: &Path, side: &str) -> Vec<String> {
    let d = dir.join(side);
    ["cert-chain.pem", "key.pem", "root-cert.pem"]
        .iter()
        .zip(["--cert", "--key", "--ca"])
        .flat_map(|(file, flag)| [flag.to_owned(), d.join(file).display().to_string()])
        .collect()
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn wait_for_listener(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn with_stdin(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn our_client_talks_to_an_independent_server() {
    require_python_h2();
    let dir = certs("client");
    let listen = free_port();
    let mut server = Command::new("python3");
    server
        .arg(peer_script())
        .args(["server", "--listen", &listen.to_string()])
        .args(tls_args(&dir.0, "server"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut server = Running(server.spawn().unwrap());
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");

    let mut client = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    client
        .args([
            "hbone",
            "connect",
            "--to",
            &listen.to_string(),
            "--authority",
            "[fd00::7]:8080",
        ])
        .args(tls_args(&dir.0, "client"))
        .args([
            "--expect-san",
            "spiffe://cluster.local/ns/default/sa/web-api",
        ]);
    let out = with_stdin(client, b"half-closed, then answered");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"HALF-CLOSED, THEN ANSWERED");
    let line = lines.next().unwrap().unwrap();
    assert_eq!(
        line,
        "stream peer=spiffe://cluster.local/ns/default/sa/sleep authority=[fd00::7]:8080 status=200"
    );
}

#[test]
fn an_independent_client_talks_to_our_server() {
    require_python_h2();
    let dir = certs("server");
    // Backend: upper-cases what it got after the client's EOF.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in backend.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut data = Vec::new();
                if std::io::Read::read_to_end(&mut conn, &mut data).is_ok() {
                    let _ = conn.write_all(&data.to_ascii_uppercase());
                }
            });
        }
    });
    let listen = free_port();
    let _server = Running(
        Command::new(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["hbone", "serve", "--listen", &listen.to_string()])
            .args(tls_args(&dir.0, "server"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_listener(listen);
    let client = |authority: &str, input: &[u8]| {
        let mut cmd = Command::new("python3");
        cmd.arg(peer_script())
            .args([
                "client",
                "--to",
                &listen.to_string(),
                "--authority",
                authority,
            ])
            .args(tls_args(&dir.0, "client"))
            .args([
                "--expect-san",
                "spiffe://cluster.local/ns/default/sa/web-api",
            ]);
        with_stdin(cmd, input)
    };
    let out = client(&backend_addr.to_string(), b"from another implementation");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"FROM ANOTHER IMPLEMENTATION");
    // A malformed authority from the other implementation gets our 400.
    let out = client("no-port", b"x");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("status=400"));
}
