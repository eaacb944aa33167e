//! The gRPC channel to the control plane (istiod, or `ztunnel controlplane`), built one way for
//! every client of it: the CA client here and the xDS client in `xds-client`.
//!
//! The address must say `https://` or `http://`. An `https://` server is verified against the
//! root given: a PEM root (a mesh's control plane is signed by the mesh's own root), or the
//! system's trust store when asked for by name ([`TrustRoot::System`], Istio's `SYSTEM`: a
//! control plane behind a publicly signed certificate); there is no fallback from one to the
//! other. An `http://` one is plaintext (local use), and a root given with it is refused as the
//! mistake it is rather than silently ignored.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// What an `https://` control plane's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustRoot {
    /// These PEM certificates.
    Pem(String),
    /// The PEM certificates in this file, read again for each new connection (with
    /// [`FollowedChannel`]): a root rotated in place, as the kubelet updates the mounted
    /// `istio-ca-root-cert` ConfigMap, is used without a restart.
    File(std::path::PathBuf),
    /// The system's trust store (Istio's `SYSTEM`).
    System,
}

/// How to reach the control plane.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSpec<'a> {
    /// `https://host:port` or `http://host:port`.
    pub address: &'a str,
    /// What the server's TLS certificate must chain to (required for `https://`, refused for
    /// `http://`).
    pub root: Option<&'a TrustRoot>,
    /// DNS name to expect in the server's certificate (default: the host of `address`).
    pub tls_server_name: Option<&'a str>,
    /// Limit on establishing the connection.
    pub connect_timeout: Duration,
    /// Limit on each request, when one applies (a unary call; not a stream that stays open).
    pub request_timeout: Option<Duration>,
    /// HTTP/2 PINGs at this interval keep a quiet stream's connection checked.
    pub keep_alive: Option<Duration>,
}

/// A channel that connects on first use. The error says what is wrong with the spec.
pub fn control_plane_channel(spec: &ChannelSpec<'_>) -> Result<Channel, String> {
    let https = spec.address.starts_with("https://");
    if !https && !spec.address.starts_with("http://") {
        return Err("the address must start with https:// or http://".into());
    }
    let mut endpoint = Endpoint::from_shared(spec.address.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(spec.connect_timeout);
    if let Some(timeout) = spec.request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    if let Some(interval) = spec.keep_alive {
        endpoint = endpoint.http2_keep_alive_interval(interval);
    }
    match (spec.root, https) {
        (Some(root), true) => {
            let mut tls = match root {
                TrustRoot::Pem(pem) => ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                TrustRoot::File(path) => ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read_root(path)?)),
                TrustRoot::System => ClientTlsConfig::new().with_native_roots(),
            };
            if let Some(name) = spec.tls_server_name {
                tls = tls.domain_name(name);
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
        }
        (None, true) => return Err("an https:// server needs a root to verify it".into()),
        (Some(_), false) => {
            return Err("a root was given but the address is not https://".into());
        }
        (None, false) => {}
    }
    Ok(endpoint.connect_lazy())
}

fn read_root(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the root {}: {e}", path.display()))
}

/// A control-plane channel that follows a root file ([`TrustRoot::File`]): each
/// [`channel`](Self::channel) reads the file again and, when it changed, builds the channel
/// anew with the new root, so the next connection checks the server against it. With any other
/// root it is the channel [`control_plane_channel`] builds.
#[derive(Debug)]
pub struct FollowedChannel {
    address: String,
    root: Option<TrustRoot>,
    tls_server_name: Option<String>,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
    keep_alive: Option<Duration>,
    /// The root's text the channel was built with, and the channel.
    built: std::sync::Mutex<(Option<String>, Channel)>,
}

impl FollowedChannel {
    /// Builds the channel `spec` describes (reading a root file now: an unreadable one is an
    /// error here, at start).
    pub fn new(spec: &ChannelSpec<'_>) -> Result<Self, String> {
        // A root file is read once here, and the text kept to tell when it changes.
        let (pem, channel) = match spec.root {
            Some(TrustRoot::File(path)) => {
                let pem = read_root(path)?;
                let root = TrustRoot::Pem(pem.clone());
                let channel = control_plane_channel(&ChannelSpec {
                    root: Some(&root),
                    ..*spec
                })?;
                (Some(pem), channel)
            }
            _ => (None, control_plane_channel(spec)?),
        };
        Ok(FollowedChannel {
            address: spec.address.to_owned(),
            root: spec.root.cloned(),
            tls_server_name: spec.tls_server_name.map(str::to_owned),
            connect_timeout: spec.connect_timeout,
            request_timeout: spec.request_timeout,
            keep_alive: spec.keep_alive,
            built: std::sync::Mutex::new((pem, channel)),
        })
    }

    /// The channel to use now: built anew when the root file's content has changed.
    pub fn channel(&self) -> Result<Channel, String> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(TrustRoot::File(path)) = &self.root {
            let pem = read_root(path)?;
            if built.0.as_deref() != Some(pem.as_str()) {
                let channel = self.build(&TrustRoot::Pem(pem.clone()))?;
                tracing::info!(root = %path.display(), address = %self.address, "control plane: the root changed; new connections check the server against it");
                *built = (Some(pem), channel);
            }
        }
        Ok(built.1.clone())
    }

    fn build(&self, root: &TrustRoot) -> Result<Channel, String> {
        control_plane_channel(&ChannelSpec {
            address: &self.address,
            root: Some(root),
            tls_server_name: self.tls_server_name.as_deref(),
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            keep_alive: self.keep_alive,
        })
    }
}

/// The `authorization` header for a bearer token kept in `path` (Istio's projected
/// service-account token, rotated by the kubelet: read again for each new connection or call).
/// An unreadable or empty file, or one whose text cannot be a header value, is an error naming
/// the file: nothing is sent without the token it was meant to carry.
pub async fn bearer_header(
    path: &std::path::Path,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, String> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    format!("Bearer {token}").parse().map_err(|_| {
        format!(
            "the token in {} is not a valid header value",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(address: &str, root: Option<&TrustRoot>) -> Result<Channel, String> {
        control_plane_channel(&ChannelSpec {
            address,
            root,
            tls_server_name: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: None,
            keep_alive: None,
        })
    }

    #[tokio::test]
    async fn the_address_and_the_root_must_agree() {
        assert!(spec("http://127.0.0.1:15012", None).is_ok());
        assert!(
            spec("istiod:15012", None)
                .unwrap_err()
                .contains("https:// or http://")
        );
        assert!(
            spec("https://istiod:15012", None)
                .unwrap_err()
                .contains("needs a root")
        );
        assert!(
            spec("http://istiod:15012", Some(&TrustRoot::Pem("x".into())))
                .unwrap_err()
                .contains("not https://")
        );
        assert!(
            spec("http://istiod:15012", Some(&TrustRoot::System))
                .unwrap_err()
                .contains("not https://")
        );
        assert!(spec("https://istiod:15012", Some(&TrustRoot::System)).is_ok());
    }

    #[tokio::test]
    async fn a_bearer_token_is_read_whole_and_an_empty_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("bearer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("istio-token");
        std::fs::write(&file, "eyJhbGciOi.x.y\n").unwrap();
        assert_eq!(
            bearer_header(&file).await.unwrap().to_str().unwrap(),
            "Bearer eyJhbGciOi.x.y"
        );
        std::fs::write(&file, " \n").unwrap();
        assert!(bearer_header(&file).await.unwrap_err().contains("is empty"));
        std::fs::write(&file, "a\u{1}b").unwrap();
        assert!(
            bearer_header(&file)
                .await
                .unwrap_err()
                .contains("not a valid header value")
        );
        let missing = dir.join("missing");
        assert!(
            bearer_header(&missing)
                .await
                .unwrap_err()
                .contains("cannot read the token file")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
