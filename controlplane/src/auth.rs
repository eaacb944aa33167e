//! Who may talk to the local control plane, and what each caller may obtain.
//!
//! Why: the CA hands out workload identities, so it must know who asks. Istio trusts a node's
//! ztunnel (a "trusted node account") to ask for the identities of the pods on that node, and
//! nothing else. Here each node has its own bearer token, a random secret the control plane
//! creates in a directory it owns (`<dir>/<node>.token`, mode 0600) for every node a pod is
//! scheduled on. A node proxy presents it (`authorization: Bearer ...`, Istio's `AUTH_TOKEN`
//! file) on its xDS stream and its CA calls. The CA then signs an identity only on a pod's behalf
//! (`ImpersonatedIdentity`) and only when a pod with that identity runs on the caller's node;
//! the xDS server serves only streams with a valid node token. Everything else is refused with a
//! reason that says what was missing.

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use identity::SpiffeId;
use identity::ca::{Refusal, SignRequest};
use xds_client::server::StreamCredentials;

/// Errors of the token directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The directory or a token file could not be created, read or written.
    #[error("node token {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A node name that cannot be a file name (Kubernetes names only).
    #[error("node name {0:?} is not a valid Kubernetes name")]
    BadNodeName(String),
}

/// The per-node bearer tokens, kept in a directory (one `<node>.token` file per node).
#[derive(Debug)]
pub struct NodeTokens {
    dir: PathBuf,
    /// token -> node.
    by_token: RwLock<HashMap<String, String>>,
}

impl NodeTokens {
    /// Opens (creating it, mode 0700, if missing) the token directory and loads its tokens.
    pub fn open(dir: &Path) -> Result<Self, TokenError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TokenError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let tokens = NodeTokens {
            dir: dir.to_owned(),
            by_token: RwLock::default(),
        };
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let Some(node) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".token"))
            else {
                continue;
            };
            if valid_node_name(node) {
                tokens.load(node, &path)?;
            }
        }
        Ok(tokens)
    }

    /// The file holding `node`'s token (which [`ensure`](Self::ensure) creates).
    pub fn path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.token"))
    }

    /// Makes sure `node` has a token, creating a new random one if needed; returns its file.
    pub fn ensure(&self, node: &str) -> Result<PathBuf, TokenError> {
        if !valid_node_name(node) {
            return Err(TokenError::BadNodeName(node.to_owned()));
        }
        let path = self.path(node);
        if self.node_has_token(node) {
            return Ok(path);
        }
        let token = random_token();
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            // No trailing newline, as a projected service-account token has none: Istio's
            // ztunnel sends the file's bytes as they are, and a newline is not a header value.
            Ok(mut file) => {
                file.write_all(token.as_bytes())
                    .map_err(|source| TokenError::Io {
                        path: path.clone(),
                        source,
                    })?;
                self.insert(token, node);
                tracing::info!(%node, path = %path.display(), "control plane: created a node token");
            }
            // Written meanwhile (another process, or by hand): use what is there.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.load(node, &path)?,
            Err(source) => return Err(TokenError::Io { path, source }),
        }
        Ok(path)
    }

    /// The node whose token this is.
    pub fn node_of(&self, token: &str) -> Option<String> {
        self.by_token.read().expect("lock").get(token).cloned()
    }

    fn node_has_token(&self, node: &str) -> bool {
        self.by_token
            .read()
            .expect("lock")
            .values()
            .any(|n| n == node)
    }

    fn load(&self, node: &str, path: &Path) -> Result<(), TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Io {
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim();
        if token.len() < 32 {
            tracing::warn!(path = %path.display(), "control plane: ignoring a node token shorter than 32 characters");
            return Ok(());
        }
        self.insert(token.to_owned(), node);
        Ok(())
    }

    fn insert(&self, token: String, node: &str) {
        let mut by_token = self.by_token.write().expect("lock");
        by_token.retain(|_, n| n != node);
        by_token.insert(token, node.to_owned());
    }

    /// Authenticates an xDS stream: it must carry a node token.
    pub fn authenticate_stream(
        &self,
        credentials: &StreamCredentials<'_>,
    ) -> Result<String, String> {
        match credentials.bearer_token {
            None => Err(
                "no bearer token: a node proxy presents its node's token (the control plane's <node>.token file)"
                    .into(),
            ),
            Some(token) => self
                .node_of(token)
                .map(|node| format!("node {node}"))
                .ok_or_else(|| "unknown bearer token: not the token of any node".into()),
        }
    }
}

/// Which nodes run pods of each identity, as the manifests say.
pub type IdentityNodes = Arc<RwLock<HashMap<SpiffeId, BTreeSet<String>>>>;

/// The CA's rule: a node's proxy, authenticated by its token, may obtain (on a pod's behalf) the
/// identity of a pod on its node, and nothing else.
#[derive(Debug, Clone)]
pub struct NodeAuthorizer {
    tokens: Arc<NodeTokens>,
    identities: IdentityNodes,
}

impl NodeAuthorizer {
    /// Checks callers against `tokens` and identities against `identities`.
    pub fn new(tokens: Arc<NodeTokens>, identities: IdentityNodes) -> Self {
        NodeAuthorizer { tokens, identities }
    }
}

impl identity::ca::Authorizer for NodeAuthorizer {
    fn authorize(&self, req: &SignRequest<'_>) -> Result<(), Refusal> {
        let Some(token) = req.bearer_token else {
            return Err(Refusal::Unauthenticated(
                "no bearer token: a node proxy presents its node's token (the control plane's <node>.token file)".into(),
            ));
        };
        let Some(node) = self.tokens.node_of(token.trim()) else {
            return Err(Refusal::Unauthenticated(
                "unknown bearer token: not the token of any node".into(),
            ));
        };
        if !req.impersonated {
            return Err(Refusal::Denied(format!(
                "node {node} may only ask for a pod's identity on the pod's behalf (ImpersonatedIdentity)"
            )));
        }
        let identities = self.identities.read().expect("lock");
        match identities.get(req.requested) {
            None => Err(Refusal::Denied(
                "no pod in the manifests has this identity".into(),
            )),
            Some(nodes) if nodes.contains(&node) => Ok(()),
            Some(nodes) => Err(Refusal::Denied(format!(
                "no pod with this identity runs on node {node} (they run on {})",
                nodes.iter().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// Kubernetes node names: lowercase letters, digits, '-' and '.', at most 253 characters,
/// starting and ending with a letter or digit.
fn valid_node_name(name: &str) -> bool {
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| edge(b) || b == b'-' || b == b'.')
        && edge(name.as_bytes()[0])
        && edge(name.as_bytes()[name.len() - 1])
}

/// 32 random bytes, hex.
fn random_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
