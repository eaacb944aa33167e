//! `ztunnel controlplane`: the local istiod stand-in.

use crate::args::parse_duration;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use controlplane::{ComputeConfig, LocalControlPlane, NodeTokens, TwoServices};
use identity::DevCa;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use super::Error;

#[derive(Debug, Args)]
pub(crate) struct ControlplaneArgs {
    /// Directory of Kubernetes YAML (Namespace, Pod, Deployment, Service, AuthorizationPolicy).
    #[arg(long, value_name = "DIR")]
    pub(crate) manifests: PathBuf,
    /// Address to serve on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15012")]
    pub(crate) listen: SocketAddr,
    /// Development CA directory (created with a new root if missing); default `DIR/.ca`.
    #[arg(long, value_name = "DIR")]
    pub(crate) ca_dir: Option<PathBuf>,
    /// Directory of per-node bearer tokens (`<node>.token`, created for every node a pod runs
    /// on); default `DIR/.node-tokens`. A node's proxy must present its node's token on xDS and
    /// CA calls (`AUTH_TOKEN`); the CA signs only identities of pods on the caller's node.
    #[arg(long, value_name = "DIR")]
    pub(crate) node_tokens: Option<PathBuf>,
    /// Extra DNS names or IPs for the serving certificate (besides istiod.istio-system.svc).
    #[arg(long, value_name = "NAME")]
    pub(crate) tls_name: Vec<String>,
    /// Serve plaintext gRPC instead of TLS (tests and local experiments only).
    #[arg(long)]
    pub(crate) plaintext: bool,
    /// Longest certificate lifetime the CA grants.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub(crate) max_cert_ttl: Duration,
}

/// The DNS name proxies expect in istiod's serving certificate.
const ISTIOD_NAME: &str = "istiod.istio-system.svc";

pub(crate) async fn run(args: ControlplaneArgs) -> Result<(), Error> {
    let ca_dir = args
        .ca_dir
        .clone()
        .unwrap_or_else(|| args.manifests.join(".ca"));
    let ca = if ca_dir.join("root-cert.pem").exists() {
        DevCa::load(&ca_dir)?
    } else {
        info!(dir = %ca_dir.display(), "creating a development CA");
        DevCa::init(&ca_dir, "cluster.local")?
    };
    let ca = Arc::new(ca);
    let token_dir = args
        .node_tokens
        .clone()
        .unwrap_or_else(|| args.manifests.join(".node-tokens"));
    let tokens = Arc::new(NodeTokens::open(&token_dir)?);
    let config = ComputeConfig::default();
    let cp = LocalControlPlane::new(&args.manifests, config, tokens);
    let report = cp.reload();
    for error in &report.errors {
        warn!(%error, "bad manifest");
    }
    info!(dir = %token_dir.display(), "node proxies authenticate with <node>.token from this directory");
    let service = TwoServices::new(
        cp.ads().service(),
        cp.ca_service(ca.clone(), args.max_cert_ttl),
    );
    tokio::spawn(cp.clone().watch(Duration::from_millis(250)));
    let listener = super::listen(args.listen).await?;
    let mut builder = Server::builder();
    if args.plaintext {
        warn!(listen = %args.listen, "serving plaintext gRPC (no TLS): for tests only");
    } else {
        let mut names = vec![ISTIOD_NAME.to_owned()];
        names.extend(args.tls_name.iter().cloned());
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let creds = ca.issue_server(&name_refs, Duration::from_secs(365 * 24 * 3600))?;
        let cert = identity::pem::certs_to_pem(&creds.chain);
        let key = identity::pem::key_to_pem(&creds.key);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| Error::Flag {
                flag: "--tls-name",
                value: names.join(","),
                reason: e.to_string(),
            })?;
        info!(root = %ca_dir.join("root-cert.pem").display(), names = ?names, "serving TLS; clients verify with the CA root");
    }
    info!(listen = %args.listen, manifests = %args.manifests.display(), workloads = report.counts.0, services = report.counts.1, policies = report.counts.2, "control plane ready");
    builder
        .serve_with_incoming(service, TcpIncoming::from(listener))
        .await
        .map_err(|e| Error::Io {
            what: format!("gRPC server on {}", args.listen),
            source: std::io::Error::other(e),
        })
}
