//! `ztunnel-cni` invoked as a container runtime invokes it (the binary, its environment, the
//! network configuration on stdin), against a test agent on a real Unix socket.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use redirect::cni::{CniAnswer, CniEvent, CniRequest};
use serde_json::{Value, json};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let path = std::env::temp_dir().join(format!("ztunnel-cni-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    Dir(path)
}

/// A test agent at `path`: answers each request with `answer(request)`, and records it.
fn agent(
    path: &Path,
    answer: impl Fn(&CniRequest) -> CniAnswer + Send + 'static,
) -> Arc<Mutex<Vec<CniRequest>>> {
    let listener = UnixListener::bind(path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let body = redirect::cni::read_bounded(&mut conn).unwrap();
            let request: CniRequest = serde_json::from_slice(&body).unwrap();
            let reply = serde_json::to_vec(&answer(&request)).unwrap();
            record.lock().unwrap().push(request);
            conn.write_all(&reply).unwrap();
        }
    });
    seen
}

fn config(socket: &Path, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "ztunnel-cni",
        "agent_socket": socket.display().to_string(),
        "prevResult": {
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1234"}],
            "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0},
                    {"address": "fd00::7/64", "interface": 0}]
        }
    })
}

/// Runs the plugin with `command`, the pod `namespace/name` (none: not a Kubernetes pod) and
/// `stdin`.
fn invoke(command: &str, pod: Option<(&str, &str)>, stdin: &[u8]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "5f3e0c1d")
        .env("CNI_NETNS", "/var/run/netns/cni-1234")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((namespace, name)) = pod {
        cmd.env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=5f3e0c1d;K8S_POD_UID=uid-{name}"
            ),
        );
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn json_out(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn add_waits_for_the_agent_and_passes_the_primary_result_on() {
    let d = dir("add");
    let socket = d.0.join("cni.sock");
    let seen = agent(&socket, |r| match r.pod_name.as_str() {
        "web" => CniAnswer::Captured,
        "batch" => CniAnswer::NotInMesh {
            reason: "its namespace is not in the mesh".into(),
        },
        _ => CniAnswer::Refused {
            reason: "the proxy did not acknowledge the pod".into(),
        },
    });
    for version in ["1.0.0", "0.4.0"] {
        let config = config(&socket, version);
        let out = invoke(
            "ADD",
            Some(("default", "web")),
            config.to_string().as_bytes(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(json_out(&out), config["prevResult"]);
    }
    let request = seen.lock().unwrap()[0].clone();
    assert_eq!(
        request,
        CniRequest {
            event: CniEvent::Add,
            container_id: "5f3e0c1d".into(),
            netns: "/var/run/netns/cni-1234".into(),
            pod_name: "web".into(),
            pod_namespace: "default".into(),
            pod_uid: Some("uid-web".into()),
            ips: vec!["10.244.1.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    );
    let config = config(&socket, "1.0.0").to_string();
    // A pod the agent says is outside the mesh starts as it is.
    let out = invoke("ADD", Some(("jobs", "batch")), config.as_bytes());
    assert!(out.status.success());
    // A refusal fails the pod's network setup, with the reason.
    let out = invoke("ADD", Some(("default", "stuck")), config.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let error = json_out(&out);
    assert_eq!(error["code"], ztunnel_cni::REFUSED);
    assert_eq!(error["cniVersion"], "1.0.0");
    assert!(
        error["msg"].as_str().unwrap().contains("pod default/stuck"),
        "{error}"
    );
    assert_eq!(error["details"], "the proxy did not acknowledge the pod");
    // Deletions reach the agent.
    let out = invoke("DEL", Some(("default", "web")), config.as_bytes());
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|r| r.event == CniEvent::Del && r.pod_name == "web")
    );
}

#[test]
fn without_the_agent_add_fails_and_del_succeeds() {
    let d = dir("down");
    let config = config(&d.0.join("nobody-listens.sock"), "1.0.0").to_string();
    let out = invoke("ADD", Some(("default", "web")), config.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let error = json_out(&out);
    assert_eq!(error["code"], ztunnel_cni::TRY_AGAIN_LATER);
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("nobody-listens.sock"),
        "{error}"
    );
    let out = invoke("DEL", Some(("default", "web")), config.as_bytes());
    assert!(out.status.success());
    // Not a Kubernetes pod: passed through without asking anyone.
    let out = invoke("ADD", None, config.as_bytes());
    assert!(out.status.success());
}

#[test]
fn version_and_bad_input_answer_as_the_specification_says() {
    let out = invoke("VERSION", None, b"");
    assert!(out.status.success());
    let version = json_out(&out);
    assert_eq!(version["cniVersion"], "1.0.0");
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("0.4.0"))
    );
    let code = |out: &Output| json_out(out)["code"].as_u64().unwrap();
    let d = dir("bad");
    let socket = d.0.join("cni.sock");
    assert_eq!(
        code(&invoke("ADD", Some(("default", "web")), b"{not json")),
        u64::from(ztunnel_cni::DECODING_FAILURE)
    );
    let mut unchained = config(&socket, "1.0.0");
    unchained.as_object_mut().unwrap().remove("prevResult");
    assert_eq!(
        code(&invoke(
            "ADD",
            Some(("default", "web")),
            unchained.to_string().as_bytes()
        )),
        u64::from(ztunnel_cni::INVALID_CONFIGURATION)
    );
    assert_eq!(
        code(&invoke(
            "ADD",
            Some(("default", "web")),
            config(&socket, "9.9.9").to_string().as_bytes()
        )),
        u64::from(ztunnel_cni::INCOMPATIBLE_VERSION)
    );
    let mut bad_ip = config(&socket, "1.0.0");
    bad_ip["prevResult"]["ips"][0]["address"] = json!("not-an-ip/24");
    let out = invoke(
        "ADD",
        Some(("default", "web")),
        bad_ip.to_string().as_bytes(),
    );
    assert_eq!(code(&out), u64::from(ztunnel_cni::INVALID_CONFIGURATION));
    assert!(String::from_utf8_lossy(&out.stdout).contains("prevResult.ips[0].address"));
}

/// The agent's RBAC as `deploy/` grants it (the installer gives the plugin the agent's token).
fn rbac() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/node-agent/rbac.yaml"
    );
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn with_the_agent_down_only_pods_outside_the_mesh_start_as_the_api_server_tells() {
    use kube_emulator::ApiServer;
    let d = dir("agent-down");
    let server = ApiServer::start().unwrap();
    server.load_rbac(&rbac()).unwrap();
    let ambient = json!({"istio.io/dataplane-mode": "ambient"});
    server.put(json!({"kind": "Namespace", "metadata": {"name": "shop", "labels": ambient}}));
    server.put(json!({"kind": "Namespace", "metadata": {"name": "default"}}));
    server.put(json!({"kind": "Namespace", "metadata": {"name": "kube-system"}}));
    for (name, namespace, labels) in [
        ("web", "shop", json!({})),
        ("batch", "shop", json!({"istio.io/dataplane-mode": "none"})),
        ("api", "default", ambient.clone()),
        ("plain", "default", json!({})),
        ("coredns", "kube-system", ambient.clone()),
    ] {
        server.put(json!({"kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": "node-a"}}));
    }
    // The kubeconfig as the agent's installer writes it from its service account (server, CA,
    // token), into the CNI configuration directory.
    let token = server.token_for("istio-system", "ztunnel-node-agent");
    let text = redirect::cni::install::plugin_kubeconfig(&server.url(), server.ca_pem(), &token);
    let (kubeconfig, written) = redirect::cni::install::write_kubeconfig(&d.0, &text).unwrap();
    assert!(written);
    assert_eq!(kubeconfig, d.0.join("ZZZ-ztunnel-cni-kubeconfig"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the kubeconfig holds a token");
    }
    // Unchanged: not written again.
    assert!(
        !redirect::cni::install::write_kubeconfig(&d.0, &text)
            .unwrap()
            .1
    );
    // No agent listens on this socket.
    let mut config = config(&d.0.join("no-agent.sock"), "1.0.0");
    config["kubernetes"] = json!({"kubeconfig": kubeconfig.display().to_string()});
    let stdin = config.to_string();
    for (namespace, name, starts) in [
        ("shop", "web", false),
        ("shop", "batch", true),
        ("default", "api", false),
        ("default", "plain", true),
        ("kube-system", "coredns", true),
        // Unknown to the API server: nothing says it may start uncaptured.
        ("shop", "ghost", false),
    ] {
        let out = invoke("ADD", Some((namespace, name)), stdin.as_bytes());
        assert_eq!(
            out.status.success(),
            starts,
            "{namespace}/{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let result = json_out(&out);
        if starts {
            assert_eq!(result, config["prevResult"]);
        } else {
            assert_eq!(result["code"], 11, "{result}");
        }
    }
    // The agent's own selectors, copied into the configuration by the installer: a namespace
    // labelled team=pay joins without the ambient label, and nothing else does.
    server
        .put(json!({"kind": "Namespace", "metadata": {"name": "pay", "labels": {"team": "pay"}}}));
    server.put(
        json!({"kind": "Pod", "metadata": {"name": "ledger", "namespace": "pay"},
        "spec": {"nodeName": "node-a"}}),
    );
    let mut selecting = config.clone();
    selecting["enablement_selectors"] =
        json!([{"namespaceSelector": {"matchLabels": {"team": "pay"}}}]);
    for (namespace, name, starts) in [("pay", "ledger", false), ("shop", "web", true)] {
        let out = invoke(
            "ADD",
            Some((namespace, name)),
            selecting.to_string().as_bytes(),
        );
        assert_eq!(out.status.success(), starts, "{namespace}/{name}");
    }
    selecting["enablement_selectors"] =
        json!([{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]);
    let out = invoke(
        "ADD",
        Some(("pay", "ledger")),
        selecting.to_string().as_bytes(),
    );
    assert_eq!(
        json_out(&out)["code"],
        7,
        "a selector that means nothing is a bad configuration"
    );

    // The API server unreachable too: every pod fails.
    let dead = d.0.join("dead-kubeconfig");
    let text = std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .replace(&server.url(), "https://127.0.0.1:1");
    std::fs::write(&dead, text).unwrap();
    config["kubernetes"] = json!({"kubeconfig": dead.display().to_string()});
    let out = invoke(
        "ADD",
        Some(("default", "plain")),
        config.to_string().as_bytes(),
    );
    assert!(!out.status.success());
    assert_eq!(json_out(&out)["code"], 11);
    // A token the RBAC does not cover: refused by the server, so the pod fails too.
    let stranger = d.0.join("stranger-kubeconfig");
    server
        .kubeconfig(&stranger, &server.token_for("default", "app"))
        .unwrap();
    config["kubernetes"] = json!({"kubeconfig": stranger.display().to_string()});
    let out = invoke(
        "ADD",
        Some(("default", "plain")),
        config.to_string().as_bytes(),
    );
    assert!(!out.status.success());
    assert!(
        json_out(&out)["details"]
            .as_str()
            .unwrap()
            .contains("forbidden"),
        "{}",
        json_out(&out)
    );
}
