//! `ztunnel proxy ztunnel` exactly as Istio's ztunnel chart runs it (its arguments, its
//! environment, nothing else: no flag, no file named), against a stand-in istiod that checks
//! what istiod checks, with a pod handed over by a node agent (root needed: real network and
//! mount namespaces).
//!
//! The stand-in serves delta xDS and the Istio CA on `istiod.istio-system.svc:15012` (TLS under
//! the mesh root) and, as istiod does, refuses a stream or a certificate request without a
//! known bearer token (its "TokenReview": token -> service account), with a `clusterid` header
//! other than its cluster, or (xDS) whose node id names another namespace than the token's; it
//! serves recorded Address and Authorization resources, encoded as istiod encodes them. The
//! proxy runs in a node network namespace, in a private mount namespace holding the chart's
//! mounts: the projected token at `/var/run/secrets/tokens/istio-token`, the mesh root at
//! `/var/run/secrets/istio/root-cert.pem`, the node agent's socket directory at
//! `/var/run/ztunnel`, and an `/etc/hosts` naming istiod. The proxy runs in `kube-system` (the
//! OpenShift and GKE profiles), so a hard-coded `istio-system` node id would be refused.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Fabric, Running, TempDir, echo_app, python, tls_args, wait, with_stdin, ztunnel};
use identity::ca::{CaServer, Refusal, SignRequest};
use identity::{DevCa, SpiffeId};
use prost::Message;
use redirect::zds::ZdsTestAgent;
use redirect::zds::proto::{AddWorkload, Payload, SnapshotSent, WorkloadInfo};
use xds_client::proto::discovery::Node;
use xds_client::proto::workload as pb;
use xds_client::resources::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use xds_client::server::{AdsServer, Authenticator, StreamCredentials};

const CLUSTER: &str = "cluster-east";
const ZTUNNEL_TOKEN: &str = "projected-token-of-kube-system-ztunnel";
const OTHER_TOKEN: &str = "projected-token-of-istio-system-someone";
const HOUR: Duration = Duration::from_secs(3600);

fn ip(host: u8) -> String {
    format!("10.83.{}.{host}", std::process::id() % 200 + 20)
}

/// A node id istiod admitted, with its metadata (key, value).
type AdmittedNode = (String, Vec<(String, String)>);

/// What the stand-in istiod knows and what it saw.
#[derive(Default)]
struct Istiod {
    /// TokenReview: bearer token -> (namespace, service account).
    tokens: HashMap<String, (String, String)>,
    /// Node ids admitted, with their metadata.
    nodes: Mutex<Vec<AdmittedNode>>,
    /// Why streams or requests were refused.
    refusals: Mutex<Vec<String>>,
    /// Identities signed.
    signed: Mutex<Vec<String>>,
}

impl Istiod {
    /// The caller's service account from its token and `clusterid`, as istiod authenticates.
    fn review(
        &self,
        token: Option<&str>,
        cluster: Option<&str>,
    ) -> Result<(String, String), String> {
        let token = token.ok_or("no bearer token")?;
        let account = self
            .tokens
            .get(token)
            .cloned()
            .ok_or("TokenReview: the token is not valid")?;
        if cluster != Some(CLUSTER) {
            return Err(format!(
                "clusterid {cluster:?} is not a cluster served here"
            ));
        }
        Ok(account)
    }

    fn refused(&self, reason: String) -> String {
        self.refusals.lock().unwrap().push(reason.clone());
        reason
    }
}

struct IstiodAuth(Arc<Istiod>);

impl Authenticator for IstiodAuth {
    fn authenticate(&self, c: &StreamCredentials<'_>) -> Result<String, String> {
        let (ns, sa) = self
            .0
            .review(c.bearer_token, c.cluster_id)
            .map_err(|e| self.0.refused(e))?;
        Ok(format!("{ns}/{sa}"))
    }

    fn admit_node(
        &self,
        who: &str,
        _: &StreamCredentials<'_>,
        node: Option<&Node>,
    ) -> Result<(), String> {
        let node = node.ok_or_else(|| self.0.refused("no node".into()))?;
        // ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local
        let parts: Vec<&str> = node.id.split('~').collect();
        let namespace = match parts.as_slice() {
            ["ztunnel", _ip, pod, domain] => {
                let ns = domain
                    .strip_suffix(".svc.cluster.local")
                    .unwrap_or_default();
                (pod.ends_with(&format!(".{ns}")) && !ns.is_empty()).then_some(ns)
            }
            _ => None,
        };
        let Some(namespace) = namespace else {
            return Err(self
                .0
                .refused(format!("node id {:?} is not a ztunnel's", node.id)));
        };
        let token_namespace = who.split('/').next().unwrap_or_default();
        if namespace != token_namespace {
            return Err(self.0.refused(format!(
                "node id {:?} names namespace {namespace}, the token {token_namespace}",
                node.id
            )));
        }
        let metadata = node
            .metadata
            .iter()
            .flat_map(|m| m.fields.iter())
            .filter_map(|(k, v)| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                _ => None,
            })
            .collect();
        self.0
            .nodes
            .lock()
            .unwrap()
            .push((node.id.clone(), metadata));
        Ok(())
    }
}

struct IstiodCa(Arc<Istiod>);

impl identity::ca::Authorizer for IstiodCa {
    fn authorize(&self, r: &SignRequest<'_>) -> Result<(), Refusal> {
        let (ns, sa) = self
            .0
            .review(r.bearer_token, r.cluster_id)
            .map_err(|e| Refusal::Unauthenticated(self.0.refused(e)))?;
        // The node proxy's account may ask on behalf of the pods it serves, only.
        if (ns.as_str(), sa.as_str()) != ("kube-system", "ztunnel") || !r.impersonated {
            return Err(Refusal::Denied(
                self.0
                    .refused(format!("{ns}/{sa} may not impersonate {}", r.requested)),
            ));
        }
        self.0.signed.lock().unwrap().push(r.requested.to_string());
        Ok(())
    }
}

/// The recorded resources: the `web` pod (HBONE, on node-a), a `sleep` pod elsewhere, and an
/// ALLOW from sleep to web on 8080, encoded as istiod sends them.
fn recorded(ads: &AdsServer) {
    let workload = |name: &str, host: u8, node: &str| pb::Address {
        r#type: Some(pb::address::Type::Workload(pb::Workload {
            uid: format!("{CLUSTER}//Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            addresses: vec![
                ip(host)
                    .parse::<std::net::Ipv4Addr>()
                    .unwrap()
                    .octets()
                    .to_vec(),
            ],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            service_account: name.into(),
            node: node.into(),
            cluster_id: CLUSTER.into(),
            workload_name: name.into(),
            canonical_name: name.into(),
            canonical_revision: "latest".into(),
            authorization_policies: if name == "web" {
                vec!["default/allow-sleep".into()]
            } else {
                vec![]
            },
            ..Default::default()
        })),
    };
    let web = workload("web", 2, "node-a");
    let sleep = workload("sleep", 9, "node-b");
    ads.set(
        ADDRESS_TYPE_URL,
        &format!("{CLUSTER}//Pod/default/web"),
        web.encode_to_vec(),
    );
    ads.set(
        ADDRESS_TYPE_URL,
        &format!("{CLUSTER}//Pod/default/sleep"),
        sleep.encode_to_vec(),
    );
    use authz::proto::{
        Authorization, MatchType, ProtoClause, ProtoMatch, ProtoRule, ProtoScope, ProtoStringMatch,
    };
    let principal = |p: &str| ProtoStringMatch {
        match_type: Some(MatchType::Exact(p.into())),
    };
    let policy = Authorization {
        name: "allow-sleep".into(),
        namespace: "default".into(),
        scope: ProtoScope::WorkloadSelector as i32,
        action: 0,
        rules: vec![ProtoRule {
            clauses: vec![
                ProtoClause {
                    matches: vec![ProtoMatch {
                        principals: vec![principal("cluster.local/ns/default/sa/sleep")],
                        ..Default::default()
                    }],
                },
                ProtoClause {
                    matches: vec![ProtoMatch {
                        destination_ports: vec![8080],
                        ..Default::default()
                    }],
                },
            ],
        }],
        ..Default::default()
    };
    ads.set(
        AUTHORIZATION_TYPE_URL,
        "default/allow-sleep",
        policy.encode_to_vec(),
    );
}

/// Serves the stand-in on 127.0.0.1:15012 inside the network namespace `ns` (a thread of this
/// process entered into it), until `stop` fires.
fn serve_istiod(
    ns: &str,
    ads: AdsServer,
    ca: Arc<DevCa>,
    istiod: Arc<Istiod>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    let netns = File::open(format!("/var/run/netns/{ns}")).unwrap();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:15012")
                .await
                .unwrap();
            bound_tx.send(()).unwrap();
            let creds = ca.issue_server(&["istiod.istio-system.svc"], HOUR).unwrap();
            let tls = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(
                    identity::pem::certs_to_pem(&creds.chain),
                    identity::pem::key_to_pem(&creds.key),
                ),
            );
            let service = controlplane::TwoServices::new(
                ads.service(),
                CaServer::new(ca, IstiodCa(istiod), HOUR).into_service(),
            );
            tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .serve_with_incoming_shutdown(
                    service,
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stop.await;
                    },
                )
                .await
                .unwrap();
        });
    });
    bound_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the stand-in istiod listens");
    thread
}

/// `ztunnel proxy ztunnel` in `ns` with the chart's environment and mounts: `token` and the
/// mesh root at the chart's paths, `zds` as `/var/run/ztunnel`, istiod's name in `/etc/hosts`.
fn chart_proxy(ns: &str, dir: &Path, token: &str, root_pem: &str, log: &Path) -> Running {
    std::fs::write(dir.join("istio-token"), token).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root_pem).unwrap();
    std::fs::write(
        dir.join("hosts"),
        "127.0.0.1 localhost\n127.0.0.1 istiod.istio-system.svc\n",
    )
    .unwrap();
    let mounts = format!(
        "set -e
mkdir -p /var/run/secrets/tokens /var/run/secrets/istio /var/run/ztunnel
mount -t tmpfs tmpfs /var/run/secrets/tokens
cp {d}/istio-token /var/run/secrets/tokens/istio-token
mount -t tmpfs tmpfs /var/run/secrets/istio
cp {d}/root-cert.pem /var/run/secrets/istio/root-cert.pem
mount --bind {d}/zds /var/run/ztunnel
mount --bind {d}/hosts /etc/hosts
cd /
exec \"$0\" proxy ztunnel",
        d = dir.display()
    );
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        "unshare",
        "--mount",
        "--propagation",
        "private",
    ])
    .args(["sh", "-c", &mounts])
    .arg(ztunnel().get_program())
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    // What the chart sets, and only that.
    .env("CA_ADDRESS", "istiod.istio-system.svc:15012")
    .env("XDS_ADDRESS", "istiod.istio-system.svc:15012")
    .env("RUST_LOG", "info")
    .env("RUST_BACKTRACE", "1")
    .env("ISTIO_META_CLUSTER_ID", CLUSTER)
    .env("INPOD_ENABLED", "true")
    .env("TERMINATION_GRACE_PERIOD_SECONDS", "30")
    .env("POD_NAME", "ztunnel-x7k2p")
    .env("POD_NAMESPACE", "kube-system")
    .env("NODE_NAME", "node-a")
    .env("INSTANCE_IP", ip(1))
    .env("SERVICE_ACCOUNT", "ztunnel")
    .env("ZTUNNEL_CPU_LIMIT", "1")
    .stdout(Stdio::null())
    .stderr(File::create(log).unwrap());
    Running(cmd.spawn().unwrap())
}

#[test]
fn the_charts_proxy_reaches_istiod_as_istio_does_and_serves_a_handed_over_pod() {
    let fabric = Fabric::new("chart", &[("node", 1), ("web", 2)], &ip);
    let (node, web) = (&fabric.pods[0], &fabric.pods[1]);
    let dir = TempDir::new("chart-istiod");
    std::fs::create_dir_all(dir.0.join("zds")).unwrap();
    let mesh = Arc::new(DevCa::generate("cluster.local").unwrap());
    let istiod = Arc::new(Istiod {
        tokens: [
            (ZTUNNEL_TOKEN, ("kube-system", "ztunnel")),
            (OTHER_TOKEN, ("istio-system", "someone")),
        ]
        .into_iter()
        .map(|(t, (ns, sa))| (t.to_owned(), (ns.to_owned(), sa.to_owned())))
        .collect(),
        ..Default::default()
    });
    let ads = AdsServer::new(IstiodAuth(istiod.clone()));
    recorded(&ads);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let server = serve_istiod(&node.0, ads, mesh.clone(), istiod.clone(), stopped);
    let _app = echo_app(web, "web", &[8080]);

    let mut agent = ZdsTestAgent::bind(&dir.0.join("zds/ztunnel.sock")).unwrap();
    let log = dir.0.join("proxy.log");
    let proxy = chart_proxy(&node.0, &dir.0, ZTUNNEL_TOKEN, mesh.root_pem(), &log);
    agent.accept(Duration::from_secs(20)).unwrap_or_else(|e| {
        panic!(
            "the proxy never reached the node agent ({e}): {}",
            read(&log)
        )
    });
    // The pod, captured as a node agent captures it (the proxy calls the app from the client's
    // address; the capture's return route brings the app's replies back), with its network
    // namespace, then the end of the snapshot.
    let path = format!("/var/run/netns/{}", web.0);
    redirect::apply(
        Path::new(&path),
        redirect::Backend::Nftables,
        &redirect::RuleSet::default(),
    )
    .unwrap();
    let netns = File::open(&path).unwrap();
    let add = Payload::Add(AddWorkload {
        uid: "pod-uid-web".into(),
        workload_info: Some(WorkloadInfo {
            name: "web".into(),
            namespace: "default".into(),
            service_account: "web".into(),
        }),
    });
    assert_eq!(agent.send(add, Some(&netns)).unwrap(), "", "{}", read(&log));
    assert_eq!(
        agent
            .send(Payload::SnapshotSent(SnapshotSent {}), None)
            .unwrap(),
        ""
    );
    wait("the proxy's readiness", || {
        python(
            node,
            "import urllib.request,sys\ntry:\n  sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=1).status == 200 else 1)\nexcept Exception:\n  sys.exit(1)",
        )
        .status
        .success()
    });
    // The operations ports answer on both families, as Istio's chart probes and scrapes them:
    // readiness and metrics on every address, admin on both loopbacks.
    let both = python(
        node,
        "import urllib.request\nfor url in ['http://[::1]:15021/healthz/ready', 'http://[::1]:15020/metrics', 'http://127.0.0.1:15020/metrics', 'http://[::1]:15000/config_dump', 'http://127.0.0.1:15000/config_dump']:\n  print(url, urllib.request.urlopen(url, timeout=2).status)",
    );
    let printed = String::from_utf8_lossy(&both.stdout);
    assert!(
        both.status.success() && printed.lines().count() == 5,
        "{printed}{}",
        String::from_utf8_lossy(&both.stderr)
    );
    assert!(printed.lines().all(|l| l.ends_with(" 200")), "{printed}");

    // istiod saw Istio's node id for this pod of kube-system, with its metadata.
    let nodes = istiod.nodes.lock().unwrap().clone();
    let expected_id = format!(
        "ztunnel~{}~ztunnel-x7k2p.kube-system~kube-system.svc.cluster.local",
        ip(1)
    );
    let (id, metadata) = nodes.first().expect("a node admitted");
    assert_eq!(id, &expected_id);
    for (key, value) in [
        ("NAME", "ztunnel-x7k2p"),
        ("NAMESPACE", "kube-system"),
        ("NODE_NAME", "node-a"),
        ("CLUSTER_ID", CLUSTER),
    ] {
        assert!(
            metadata.iter().any(|(k, v)| k == key && v == value),
            "metadata {key}={value} missing: {metadata:?}"
        );
    }
    // The CA signed the pod's identity, on the proxy's token.
    assert_eq!(
        istiod.signed.lock().unwrap().clone(),
        vec!["spiffe://cluster.local/ns/default/sa/web".to_owned()]
    );

    // The pod is served: sleep (from the recorded policy) reaches the app through its 15008;
    // another identity is denied.
    let call = |sa: &str| {
        mesh.issue_to_dir(
            &format!("spiffe://cluster.local/ns/default/sa/{sa}")
                .parse::<SpiffeId>()
                .unwrap(),
            HOUR,
            &dir.0.join(sa),
        )
        .unwrap();
        let mut connect = Command::new("ip");
        connect
            .args(["netns", "exec", &node.0])
            .arg(ztunnel().get_program())
            .args(["hbone", "connect", "--to", &format!("{}:15008", ip(2))])
            .args(["--authority", &format!("{}:8080", ip(2))])
            .args(tls_args(&dir.0, sa))
            .args(["--expect-san", "spiffe://cluster.local/ns/default/sa/web"]);
        let out = with_stdin(connect, b"through the chart's proxy");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        call("sleep"),
        "web:through the chart's proxy",
        "{}",
        read(&log)
    );
    assert_eq!(call("notsleep"), "", "a client the policy does not allow");

    // What istiod refuses, it refuses: a token of another namespace than the node id's, a
    // cluster it does not serve, no token.
    let refused = |token: Option<&str>, cluster: &str, namespace: &str| {
        let before = istiod.refusals.lock().unwrap().len();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let root = dir.0.join("root-cert.pem");
        let token_file = token.map(|t| {
            let path = dir.0.join(format!("token-{namespace}-{cluster}"));
            std::fs::write(&path, t).unwrap();
            path
        });
        // In the node's namespace, where the stand-in listens.
        let node_ns = File::open(format!("/var/run/netns/{}", node.0)).unwrap();
        let (cluster, namespace) = (cluster.to_owned(), namespace.to_owned());
        std::thread::spawn(move || {
            nix::sched::setns(&node_ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            runtime.block_on(async move {
                let mut config = xds_client::client::ClientConfig::new(
                    "https://127.0.0.1:15012",
                    format!(
                        "ztunnel~{}~z.{namespace}~{namespace}.svc.cluster.local",
                        ip(1)
                    ),
                );
                config.server_root = Some(identity::grpc::TrustRoot::File(root));
                config.tls_server_name = Some("istiod.istio-system.svc".into());
                config.token_file = token_file;
                config.cluster_id = Some(cluster);
                let store = Arc::new(proxy::state::StateStore::new(proxy::state::State::new(
                    "istio-system",
                )));
                let handle = proxy::state::follow(store, config).unwrap();
                tokio::time::sleep(Duration::from_millis(800)).await;
                assert!(
                    !*handle.synced().borrow(),
                    "a refused client got its resources"
                );
            })
        })
        .join()
        .unwrap();
        let refusals = istiod.refusals.lock().unwrap();
        refusals[before..].join("; ")
    };
    let why = refused(Some(OTHER_TOKEN), CLUSTER, "kube-system");
    assert!(
        why.contains("names namespace kube-system, the token istio-system"),
        "{why}"
    );
    let why = refused(Some(ZTUNNEL_TOKEN), "cluster-west", "kube-system");
    assert!(
        why.contains("clusterid Some(\"cluster-west\") is not a cluster served here"),
        "{why}"
    );
    let why = refused(None, CLUSTER, "kube-system");
    assert!(why.contains("no bearer token"), "{why}");

    drop(proxy);
    let _ = stop.send(());
    server.join().unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
