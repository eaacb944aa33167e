//! Interop with an independent HBONE implementation: `interop/h2_peer.py` (Python's ssl module
//! and the pure-Python `h2` package, sharing no code with ours). `.ci/run` installs the package;
//! without it these tests fail with a message saying what to install.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{Running, TempDir, free_port, serve_hbone, tls_args, with_stdin};

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
    let dir = TempDir::new(&format!("interop-{name}"));
    let status = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["demo", "--streams", "1", "--bytes", "1", "--write-certs"])
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    dir
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
    let (_server, listen) = serve_hbone(&dir.0);
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
