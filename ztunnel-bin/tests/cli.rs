//! Runs the `ztunnel` binary as a user would: the demo, and `hbone serve` + `hbone connect`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{
    Running, TempDir, free_port, serve_hbone, tls_args, upper_backend, wait_for_listener,
    with_stdin, ztunnel,
};

fn connect_stdio(
    dir: &Path,
    server: SocketAddr,
    authority: &str,
    extra: &[&str],
    input: &[u8],
) -> Output {
    let mut cmd = ztunnel();
    cmd.args([
        "hbone",
        "connect",
        "--to",
        &server.to_string(),
        "--authority",
        authority,
    ])
    .args(tls_args(dir, "client"))
    .args(extra);
    with_stdin(cmd, input)
}

#[test]
fn demo_succeeds() {
    let out = ztunnel()
        .args(["demo", "--streams", "4", "--bytes", "100000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo OK"), "{stdout}");
    assert_eq!(
        stdout
            .matches("stream peer=spiffe://cluster.local/ns/default/sa/sleep")
            .count(),
        4,
        "{stdout}"
    );
}

#[test]
fn serve_and_connect_interoperate() {
    let dir = TempDir::new("serve-connect");
    let status = ztunnel()
        .args(["demo", "--streams", "1", "--bytes", "1", "--write-certs"])
        .arg(&dir.0)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let backend = upper_backend();
    let (server, listen) = serve_hbone(&dir.0);

    // stdin/stdout mode, with the right expected identity.
    let out = connect_stdio(
        &dir.0,
        listen,
        &backend.to_string(),
        &[
            "--expect-san",
            "spiffe://cluster.local/ns/default/sa/web-api",
        ],
        b"hello hbone",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"HELLO HBONE");

    // A wrong expected identity fails with a message naming both identities.
    let out = connect_stdio(
        &dir.0,
        listen,
        &backend.to_string(),
        &["--expect-san", "spiffe://cluster.local/ns/x/sa/y"],
        b"x",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sa/web-api") && stderr.contains("ns/x/sa/y"),
        "{stderr}"
    );

    // Without an expected identity the client refuses to run (exit 2, naming the flags).
    let out = connect_stdio(&dir.0, listen, &backend.to_string(), &[], b"x");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--expect-san"), "{stderr}");
    assert!(out.stdout.is_empty());

    // A hostname authority is resolved by the server; --insecure-any-san accepts any identity
    // under the CA and says so.
    let by_name = format!("localhost:{}", backend.port());
    let out = connect_stdio(
        &dir.0,
        listen,
        &by_name,
        &["--insecure-any-san"],
        b"by name",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"BY NAME");
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARNING: --insecure-any-san"));

    // An unreachable destination is a 503, reported with a non-zero exit.
    let dead = free_port();
    let web_api = [
        "--expect-san",
        "spiffe://cluster.local/ns/default/sa/web-api",
    ];
    let out = connect_stdio(&dir.0, listen, &dead.to_string(), &web_api, b"x");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("503"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --listen mode: plain TCP in, tunneled out.
    let plain = free_port();
    let _client = Running(
        ztunnel()
            .args([
                "hbone",
                "connect",
                "--to",
                &listen.to_string(),
                "--authority",
                &backend.to_string(),
            ])
            .args(["--listen", &plain.to_string()])
            .args(tls_args(&dir.0, "client"))
            .args(web_api)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_listener(plain);
    let mut tcp = TcpStream::connect(plain).unwrap();
    tcp.write_all(b"through listen").unwrap();
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"THROUGH LISTEN");
    drop(server);
}

#[test]
fn bad_flags_fail_with_clear_messages() {
    let dir = TempDir::new("bad-flags");
    let missing = dir.0.join("missing.pem");
    let out = ztunnel()
        .args([
            "hbone",
            "connect",
            "--to",
            "127.0.0.1:1",
            "--authority",
            "10.0.0.1",
            "--expect-san",
            "spiffe://cluster.local/ns/default/sa/web-api",
        ])
        .args([
            "--cert",
            &missing.display().to_string(),
            "--key",
            "k",
            "--ca",
            "c",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--authority"));
    let out = ztunnel()
        .args(["hbone", "serve", "--listen", "127.0.0.1:0"])
        .args([
            "--cert",
            &missing.display().to_string(),
            "--key",
            "k",
            "--ca",
            "c",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.pem"));
}

#[test]
fn ca_commands_make_certificates_that_hbone_accepts() {
    let dir = TempDir::new("ca");
    let ca = dir.0.join("ca");
    let run = |args: &[&str]| {
        let out = ztunnel().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    for (side, sa) in [("server", "web-api"), ("client", "sleep")] {
        let id = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        let out = dir.0.join(side);
        run(&[
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--id",
            &id,
            "--ttl",
            "1h",
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    // Another trust domain is refused by this CA.
    let out = ztunnel()
        .args([
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--id",
            "spiffe://other.example/ns/a/sa/b",
        ])
        .args(["--out", dir.0.join("x").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust domain"));

    let backend = upper_backend();
    let (_server, listen) = serve_hbone(&dir.0);
    let out = connect_stdio(
        &dir.0,
        listen,
        &backend.to_string(),
        &[
            "--expect-san",
            "spiffe://cluster.local/ns/default/sa/web-api",
        ],
        b"issued by ztunnel ca",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"ISSUED BY ZTUNNEL CA");
}

#[test]
fn policy_check_and_lint_speak_in_exit_codes() {
    let file = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/policies/tutorial.yaml");
    let file = file.to_str().unwrap();
    let check = |extra: &[&str]| {
        ztunnel()
            .args([
                "policy",
                "check",
                "-f",
                file,
                "--namespace",
                "default",
                "--dest-port",
                "8080",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = check(&[
        "--labels",
        "app=web-api",
        "--source-principal",
        "spiffe://cluster.local/ns/default/sa/sleep",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("ALLOW: allowed by rule 0 of ALLOW policy default/web-api-rbac")
    );
    let out = check(&[
        "--labels",
        "app=web-api",
        "--source-principal",
        "cluster.local/ns/default/sa/notsleep",
        "--explain",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("must be one of [cluster.local/ns/default/sa/sleep")
            && stdout.contains("DENY: no ALLOW policy matched"),
        "{stdout}"
    );
    // Plaintext to the recommendation service: denied (its only rule needed HTTP, so it was dropped).
    let out = check(&["--labels", "app=recommendation"]);
    assert_eq!(out.status.code(), Some(1));
    // Errors are exit code 2, with the place named.
    let dir = TempDir::new("policy");
    let bad = dir.0.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {rules: [{from: [{source: {ipBlocks: [nope]}}]}]}\n").unwrap();
    let out = ztunnel()
        .args([
            "policy",
            "check",
            "-f",
            bad.to_str().unwrap(),
            "--namespace",
            "default",
            "--dest-port",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("spec.rules[0].from[0].source.ipBlocks[0]"),
        "{stderr}"
    );

    let out = ztunnel()
        .args(["policy", "lint", "-f", file])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("rule 0 of default/recommendation-rbac uses `methods`"),
        "{stdout}"
    );
}

#[test]
fn proxy_configuration_is_validated_at_start_naming_the_flag() {
    // (environment, flags, the flag the error must name)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: [Case<'_>; 7] = [
        (
            &[("PACKET_MARK", "zz")],
            &["--mode", "dedicated"],
            "--packet-mark",
        ),
        (&[("PROXY_MODE", "weird")], &[], "--mode"),
        (&[("HTTP2_FRAME_SIZE", "10")], &[], "--http2-frame-size"),
        (&[("LOG_FORMAT", "xml")], &[], "--log-format"),
        (&[("SECRET_TTL", "forever")], &[], "--secret-ttl"),
        (
            &[],
            &["--inpod-uds", "/nonexistent/z.sock"],
            "--xds-address",
        ),
        (
            &[],
            &[
                "--mode",
                "dedicated",
                "--workload",
                "default/a/a",
                "--ca-dir",
                "/tmp/x",
            ],
            "--ca-dir",
        ),
    ];
    for (env, args, flag) in cases {
        let out = ztunnel()
            .arg("proxy")
            .args(args)
            .envs(env.iter().copied())
            .env_remove("XDS_ADDRESS")
            .env_remove("LOCAL_MANIFESTS")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?} {args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{env:?} {args:?} should name {flag}: {stderr}"
        );
    }
}

#[test]
fn istios_chart_arguments_and_environment_are_understood() {
    // (environment, the text the error must hold): each after `proxy ztunnel`, as the chart runs it.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 7] = [
        (&[("PROXY_MODE", "dedicated")], &["--mode", "proxy ztunnel"]),
        (
            &[("XDS_ADDRESS", "grpc://istiod:15012")],
            &["--xds-address", "\"grpc\""],
        ),
        // No scheme is TLS: without a root to check istiod's certificate, nothing is sent.
        (
            &[("XDS_ADDRESS", "istiod.istio-system.svc:15012")],
            &[
                "--xds-address",
                "https://istiod.istio-system.svc:15012",
                "needs a root",
            ],
        ),
        (
            &[
                ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
                ("XDS_ROOT_CA", "/nonexistent/root-cert.pem"),
            ],
            &["--xds-root-ca", "SYSTEM"],
        ),
        (&[("ZTUNNEL_WORKER_THREADS", "0%")], &["--worker-threads"]),
        (&[("ZTUNNEL_CPU_LIMIT", "lots")], &["--cpu-limit"]),
        (
            &[("TERMINATION_GRACE_PERIOD_SECONDS", "soon")],
            &["--termination-grace-period-seconds"],
        ),
    ];
    for (env, expected) in cases {
        let out = ztunnel()
            .args(["proxy", "ztunnel"])
            .envs(env.iter().copied())
            .env_remove("LOCAL_MANIFESTS")
            .env("INPOD_UDS", "/nonexistent/ztunnel.sock")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{env:?} should say {text}: {stderr}");
        }
    }
    // Every variable the chart sets is documented.
    let help = ztunnel().args(["proxy", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "CA_ADDRESS",
        "XDS_ADDRESS",
        "ISTIO_META_CLUSTER_ID",
        "POD_NAME",
        "POD_NAMESPACE",
        "NODE_NAME",
        "INSTANCE_IP",
        "TERMINATION_GRACE_PERIOD_SECONDS",
        "ZTUNNEL_CPU_LIMIT",
        "ZTUNNEL_WORKER_THREADS",
        "LOG_FORMAT",
        "NETWORK",
        "/var/run/secrets/tokens/istio-token",
        "/var/run/secrets/istio/root-cert.pem",
    ] {
        assert!(help.contains(var), "--help does not mention {var}");
    }
}

#[test]
fn the_charts_values_overlay_names_our_image_and_a_surge_rollout() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/values-ztunnel.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<_> = common_yaml(&text);
    assert_eq!(docs.len(), 1, "{}: one document", path.display());
    let values = &docs[0];
    let image = values["image"].as_str().unwrap();
    assert!(
        image.contains('/'),
        "the chart takes an image with a / whole: {image}"
    );
    assert_eq!(
        values["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0)
    );
    assert_eq!(
        values["updateStrategy"]["rollingUpdate"]["maxSurge"].as_u64(),
        Some(1)
    );
    assert!(values["terminationGracePeriodSeconds"].as_u64().is_some());
}

fn common_yaml(text: &str) -> Vec<serde_yaml::Value> {
    ::common::k8s::documents(text)
        .map(|(i, doc)| doc.unwrap_or_else(|e| panic!("document {i}: {e}")))
        .collect()
}

/// `deploy/node-agent/daemonset.yaml` names only flags and variables `ztunnel node-agent` has
/// (a renamed flag would crash-loop every node's agent), and its boolean variables parse.
#[test]
fn the_node_agent_daemonset_names_only_what_the_agent_understands() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/node-agent/daemonset.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let container = &doc["spec"]["template"]["spec"]["containers"][0];
    let help = ztunnel().args(["node-agent", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "node-agent");
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{flag} is not a node-agent flag"
        );
    }
    let mut env = Vec::new();
    for var in container["env"].as_sequence().unwrap() {
        let name = var["name"].as_str().unwrap();
        if name != "RUST_LOG" {
            assert!(
                help.contains(&format!("env: {name}")),
                "{name} is not a node-agent variable"
            );
        }
        if let Some(value) = var["value"].as_str() {
            env.push((name.to_owned(), value.to_owned()));
        }
    }
    // The variables as the DaemonSet sets them, with --hand-back and an empty manifest
    // directory: accepted (TAKE_OVER_ISTIO_CNI=false is false). In a namespace of the test's,
    // since handing back removes node rules.
    let node = common::Netns::new("ds-env");
    let dir = std::env::temp_dir().join(format!("ds-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &node.0])
        .arg(env!("CARGO_BIN_EXE_ztunnel"))
        .args(["node-agent", "--source"])
        .arg(format!("manifests:{}", dir.display()))
        .args(["--node", "n", "--hand-back", "--backend", "nftables"])
        .envs(
            env.iter()
                .filter(|(k, _)| k == "TAKE_OVER_ISTIO_CNI" || k == "EXCLUDE_NAMESPACES")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn enablement_selectors_that_mean_nothing_stop_the_agent_naming_the_flag() {
    let out = ztunnel()
        .args([
            "node-agent",
            "--source",
            "manifests:/nonexistent",
            "--node",
            "n",
        ])
        .args([
            "--enablement-selectors",
            "- podSelector: {matchExpressions: [{key: team, operator: In}]}",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--enablement-selectors") && stderr.contains("need values"),
        "{stderr}"
    );
}
