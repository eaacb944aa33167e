//! The Istio CA protocol: a client that asks istiod (or our own server) to sign workload
//! certificates, and a server backed by the [`DevCa`] for tests and the local mesh.
//!
//! Both speak `istio.v1.auth.IstioCertificateService/CreateCertificate` over gRPC with TLS, so the
//! proxy runs the very same client code locally as against a real istiod.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::server::ParsedCertificate;
use tonic::metadata::MetadataValue;

use crate::{CertInfo, Credentials, DevCa, Error, KeyAndCsr, SpiffeId, WorkloadCert};

/// Generated protobuf and gRPC code for `istio.v1.auth` (from `proto/istio_ca.proto`, by
/// `cargo run -p protogen`).
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod proto {
    include!("generated/istio.v1.auth.rs");
}

/// The metadata key Istio uses to ask for a certificate on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The gRPC header that names the cluster of the caller.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// The future a [`CertificateSource`] returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, Error>> + Send + 'a>>;

/// Something that turns a SPIFFE id into a fresh, checked certificate. The
/// [`SecretManager`](crate::SecretManager) takes any implementation, so tests can swap the CA.
pub trait CertificateSource: Send + Sync + 'static {
    /// Fetches a new certificate for `id`.
    fn fetch(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, Error>> + Send + '_>>;
}

/// Settings of the Istio CA client.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CaClientConfig {
    /// The CA's URL, e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// What the CA's own TLS certificate must chain to. `None` means plaintext, which is allowed
    /// only for `http://` addresses (local use).
    pub server_root: Option<crate::grpc::TrustRoot>,
    /// DNS name to expect in the CA's TLS certificate (default: the host of `address`).
    pub tls_server_name: Option<String>,
    /// File holding the bearer token, read again for every request.
    pub token_file: Option<PathBuf>,
    /// Value of the cluster-id header, if any.
    pub cluster_id: Option<String>,
    /// Ask on behalf of the identity (sends `ImpersonatedIdentity`), as a node proxy does for
    /// its pods.
    pub impersonate: bool,
    /// Lifetime to ask for.
    pub cert_lifetime: Duration,
    /// Roots the issued chains must verify against (the mesh's trust roots, as they are at each
    /// answer: a followed root file that changes is used for the next one).
    pub trust_roots: Arc<crate::roots::TrustRoots>,
    /// Limit on one request, connection included.
    pub request_timeout: Duration,
}

impl CaClientConfig {
    /// Settings with defaults: 24 h certificates, impersonation on, 10 s timeout, no token.
    pub fn new(address: impl Into<String>, trust_roots: Arc<crate::roots::TrustRoots>) -> Self {
        CaClientConfig {
            address: address.into(),
            server_root: None,
            tls_server_name: None,
            token_file: None,
            cluster_id: None,
            impersonate: true,
            cert_lifetime: Duration::from_secs(24 * 3600),
            trust_roots,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The Istio CA client. Connects lazily and reconnects as needed.
#[derive(Debug, Clone)]
pub struct IstioCaClient {
    config: Arc<CaClientConfig>,
    channel: Arc<crate::grpc::FollowedChannel>,
}

impl IstioCaClient {
    /// Prepares a client; no connection is made until the first request.
    pub fn new(config: CaClientConfig) -> Result<Self, Error> {
        let bad = |reason: String| Error::CaConfig {
            address: config.address.clone(),
            reason,
        };
        let channel = crate::grpc::FollowedChannel::new(&crate::grpc::ChannelSpec {
            address: &config.address,
            root: config.server_root.as_ref(),
            tls_server_name: config.tls_server_name.as_deref(),
            connect_timeout: config.request_timeout,
            request_timeout: Some(config.request_timeout),
            keep_alive: None,
        })
        .map_err(|reason| bad(format!("{reason} (server_root)")))?;
        Ok(IstioCaClient {
            channel: Arc::new(channel),
            config: Arc::new(config),
        })
    }

    /// Asks the CA for a certificate for `id` and checks the answer before returning it.
    pub async fn sign(&self, id: &SpiffeId) -> Result<WorkloadCert, Error> {
        let csr = KeyAndCsr::generate(id)?;
        let mut request = tonic::Request::new(proto::IstioCertificateRequest {
            csr: csr.csr_pem.clone(),
            validity_duration: self.config.cert_lifetime.as_secs() as i64,
            metadata: self.config.impersonate.then(|| prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                    },
                )]),
            }),
        });
        if let Some(path) = &self.config.token_file {
            let value =
                crate::grpc::bearer_header(path)
                    .await
                    .map_err(|reason| Error::CaConfig {
                        address: self.config.address.clone(),
                        reason,
                    })?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(cluster) = &self.config.cluster_id {
            let value = MetadataValue::try_from(cluster.as_str()).map_err(|_| Error::CaConfig {
                address: self.config.address.clone(),
                reason: format!("cluster id {cluster:?} is not a valid header value"),
            })?;
            request.metadata_mut().insert(CLUSTER_ID_HEADER, value);
        }
        let channel = self.channel.channel().map_err(|reason| Error::CaConfig {
            address: self.config.address.clone(),
            reason,
        })?;
        let mut client =
            proto::istio_certificate_service_client::IstioCertificateServiceClient::new(channel);
        let response = client
            .create_certificate(request)
            .await
            .map_err(|status| Error::CaRpc {
                address: self.config.address.clone(),
                id: id.clone(),
                code: format!("{:?}", status.code()),
                message: status.message().to_owned(),
            })?
            .into_inner();
        check_answer(&self.config, id, csr, &response.cert_chain)
    }
}

impl CertificateSource for IstioCaClient {
    fn fetch(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, Error>> + Send + '_>> {
        let id = id.clone();
        Box::pin(async move { self.sign(&id).await })
    }
}

/// Checks a CA answer: exactly the requested id, our key, a chain to our roots, currently valid.
fn check_answer(
    config: &CaClientConfig,
    id: &SpiffeId,
    csr: KeyAndCsr,
    pems: &[String],
) -> Result<WorkloadCert, Error> {
    let reject = |reason: String| Error::CaAnswer {
        address: config.address.clone(),
        id: id.clone(),
        reason,
    };
    let mut chain = Vec::new();
    for (i, pem) in pems.iter().enumerate() {
        chain.extend(
            crate::parse_pem_chain(pem.as_bytes(), &format!("cert_chain[{i}]"))
                .map_err(|e| reject(e.to_string()))?,
        );
    }
    let Some(leaf) = chain.first() else {
        return Err(reject("the answer holds no certificate".into()));
    };
    let info = CertInfo::parse(leaf).map_err(|e| reject(e.to_string()))?;
    let got = info.spiffe_id().map_err(|e| reject(e.to_string()))?;
    if &got != id {
        return Err(reject(format!("the certificate is for {got}")));
    }
    if info.spki != csr.spki {
        return Err(reject(
            "the certificate is not for the key of our CSR".into(),
        ));
    }
    let now = SystemTime::now();
    if !info.is_valid_at(now) {
        return Err(reject(format!(
            "the certificate is not valid now (valid {} to {})",
            crate::fmt_time(info.not_before),
            crate::fmt_time(info.not_after)
        )));
    }
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| reject(e.to_string()))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &config.trust_roots.store(),
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        crate::tls::provider().signature_verification_algorithms.all,
    )
    .map_err(|e| {
        reject(format!(
            "the chain does not verify against our trust roots: {e}"
        ))
    })?;
    // Keep leaf and intermediates; only a trailing self-signed root (what peers already trust)
    // is dropped. An intermediate is a CA too, but not self-signed: dropping it would leave a
    // chain that peers trusting only the root cannot verify.
    if chain.len() > 1 && chain.last().is_some_and(is_self_signed) {
        chain.pop();
    }
    WorkloadCert::new(
        id.clone(),
        Credentials {
            chain,
            key: csr.key,
        },
    )
}

/// Whether `cert` is a self-signed CA certificate: issuer equals subject and its signature
/// verifies with its own key.
fn is_self_signed(cert: &rustls::pki_types::CertificateDer<'_>) -> bool {
    use x509_parser::prelude::FromDer;
    let Ok((_, parsed)) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    parsed.is_ca() && parsed.issuer() == parsed.subject() && parsed.verify_signature(None).is_ok()
}

/// Who asks the CA server for what; what an [`Authorizer`] decides on.
#[derive(Debug)]
pub struct SignRequest<'a> {
    /// The identity the certificate would carry.
    pub requested: &'a SpiffeId,
    /// Whether the caller asked on someone else's behalf (`ImpersonatedIdentity`).
    pub impersonated: bool,
    /// The bearer token, if the caller sent one.
    pub bearer_token: Option<&'a str>,
    /// The cluster id header, if any.
    pub cluster_id: Option<&'a str>,
    /// The SPIFFE id of the caller's TLS client certificate, if it presented one.
    pub caller: Option<&'a SpiffeId>,
}

/// Why an [`Authorizer`] refused to sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The caller did not prove who it is (no token, an unknown token): `UNAUTHENTICATED`.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not obtain this identity: `PERMISSION_DENIED`.
    #[error("{0}")]
    Denied(String),
}

/// Decides which identities a caller may obtain from the CA server.
pub trait Authorizer: Send + Sync + 'static {
    /// `Ok` to sign; `Err` to refuse, with the reason the caller is told.
    fn authorize(&self, request: &SignRequest<'_>) -> Result<(), Refusal>;
}

impl<F> Authorizer for F
where
    F: Fn(&SignRequest<'_>) -> Result<(), Refusal> + Send + Sync + 'static,
{
    fn authorize(&self, request: &SignRequest<'_>) -> Result<(), Refusal> {
        self(request)
    }
}

/// The CA service backed by a [`DevCa`]: signs what the [`Authorizer`] allows.
pub struct CaServer<A> {
    ca: Arc<DevCa>,
    authorizer: A,
    max_lifetime: Duration,
}

impl<A> std::fmt::Debug for CaServer<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer")
            .field("ca", &self.ca)
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

impl<A: Authorizer> CaServer<A> {
    /// A server that signs with `ca`, at most for `max_lifetime`, what `authorizer` allows.
    pub fn new(ca: Arc<DevCa>, authorizer: A, max_lifetime: Duration) -> Self {
        CaServer {
            ca,
            authorizer,
            max_lifetime,
        }
    }

    /// The gRPC service, to add to a `tonic` server (alone or next to other services).
    pub fn into_service(
        self,
    ) -> proto::istio_certificate_service_server::IstioCertificateServiceServer<Self> {
        proto::istio_certificate_service_server::IstioCertificateServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl<A: Authorizer> proto::istio_certificate_service_server::IstioCertificateService
    for CaServer<A>
{
    async fn create_certificate(
        &self,
        request: tonic::Request<proto::IstioCertificateRequest>,
    ) -> Result<tonic::Response<proto::IstioCertificateResponse>, tonic::Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let cluster_id = request
            .metadata()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let caller = request
            .peer_certs()
            .and_then(|certs| crate::tls::peer_spiffe_id(&certs).ok());
        let body = request.into_inner();
        let csr_id =
            csr_identity(&body.csr).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let requested = match (&impersonated, csr_id) {
            (Some(text), csr_id) => {
                let id = SpiffeId::parse(text).map_err(|e| {
                    tonic::Status::invalid_argument(format!("{IMPERSONATED_IDENTITY}: {e}"))
                })?;
                if csr_id.as_ref().is_some_and(|c| c != &id) {
                    return Err(tonic::Status::invalid_argument(format!(
                        "the CSR asks for {} but {IMPERSONATED_IDENTITY} is {id}",
                        csr_id.expect("checked")
                    )));
                }
                id
            }
            (None, Some(id)) => id,
            (None, None) => {
                return Err(tonic::Status::invalid_argument(
                    "the CSR names no SPIFFE id and no ImpersonatedIdentity was given",
                ));
            }
        };
        let sign_request = SignRequest {
            requested: &requested,
            impersonated: impersonated.is_some(),
            bearer_token: bearer.as_deref(),
            cluster_id: cluster_id.as_deref(),
            caller: caller.as_ref(),
        };
        if let Err(refusal) = self.authorizer.authorize(&sign_request) {
            tracing::info!(id = %requested, reason = %refusal, "CA: refused to sign");
            let message = format!("not allowed to obtain {requested}: {refusal}");
            return Err(match refusal {
                Refusal::Unauthenticated(_) => tonic::Status::unauthenticated(message),
                Refusal::Denied(_) => tonic::Status::permission_denied(message),
            });
        }
        let lifetime =
            Duration::from_secs(body.validity_duration.max(1) as u64).min(self.max_lifetime);
        let chain = self
            .ca
            .sign_csr(&body.csr, &requested, lifetime)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        tracing::debug!(id = %requested, ?lifetime, "CA: signed");
        Ok(tonic::Response::new(proto::IstioCertificateResponse {
            cert_chain: chain
                .iter()
                .map(|c| crate::pem::certs_to_pem(std::slice::from_ref(c)))
                .collect(),
        }))
    }
}

/// The SPIFFE id a PEM CSR asks for, if it names one.
fn csr_identity(csr_pem: &str) -> Result<Option<SpiffeId>, Error> {
    let params = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Error::Csr(e.to_string()))?;
    let uris: Vec<String> = params
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            rcgen::SanType::URI(uri) => Some(uri.as_str().to_owned()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(SpiffeId::parse(one)?)),
        _ => Err(Error::Csr("the CSR names more than one URI SAN".into())),
    }
}
