//! The Kubernetes documents the local mesh is given: parsed, checked, and what app each pod of a
//! Deployment runs.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_yaml::Value;

/// A malformed or unsupported document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}, document {index}: {reason}")]
pub struct ManifestError {
    /// The file (or "built-in tutorial").
    pub source_name: String,
    /// 1-based position of the document in it.
    pub index: usize,
    /// What is wrong.
    pub reason: String,
}

/// One Kubernetes document.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` (empty for namespaces).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The whole document.
    pub value: Value,
}

impl Doc {
    /// What identifies it: (kind, namespace, name).
    pub fn key(&self) -> (String, String, String) {
        (self.kind.clone(), self.namespace.clone(), self.name.clone())
    }
}

/// The kinds the local mesh understands.
pub const KINDS: [&str; 5] = [
    "Namespace",
    "ServiceAccount",
    "Deployment",
    "Service",
    "AuthorizationPolicy",
];

/// Parses a multi-document YAML text (empty documents are skipped).
pub fn parse_docs(text: &str, source_name: &str) -> Result<Vec<Doc>, ManifestError> {
    let mut docs = Vec::new();
    for (index, value) in common::k8s::documents(text) {
        let err = |reason: String| ManifestError {
            source_name: source_name.to_owned(),
            index,
            reason,
        };
        let value = value.map_err(|e| err(format!("not YAML: {e}")))?;
        let kind = str_at(&value, &["kind"])
            .ok_or_else(|| err("no kind".into()))?
            .to_owned();
        if !KINDS.contains(&kind.as_str()) {
            return Err(err(format!(
                "kind {kind} is not supported here (supported: {})",
                KINDS.join(", ")
            )));
        }
        let name = str_at(&value, &["metadata", "name"])
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err(format!("{kind} without metadata.name")))?
            .to_owned();
        let namespace = if kind == "Namespace" {
            String::new()
        } else {
            str_at(&value, &["metadata", "namespace"])
                .unwrap_or("default")
                .to_owned()
        };
        let doc = Doc {
            kind,
            namespace,
            name,
            value,
        };
        check(&doc).map_err(err)?;
        docs.push(doc);
    }
    Ok(docs)
}

/// Kind-specific checks, so that a typo is refused before anything changes.
fn check(doc: &Doc) -> Result<(), String> {
    let what = format!("{} {}/{}", doc.kind, doc.namespace, doc.name);
    match doc.kind.as_str() {
        "Deployment" => {
            let replicas = doc.value.get("spec").and_then(|s| s.get("replicas"));
            if let Some(r) = replicas
                && !matches!(r.as_u64(), Some(0..=16))
            {
                return Err(format!("{what}: replicas must be 0 to 16"));
            }
            app_spec(doc)
                .map(|_| ())
                .map_err(|e| format!("{what}: {e}"))
        }
        "Service" => {
            let ports = doc
                .value
                .get("spec")
                .and_then(|s| s.get("ports"))
                .and_then(Value::as_sequence);
            for p in ports.into_iter().flatten() {
                if !matches!(p.get("port").and_then(Value::as_u64), Some(1..=65535)) {
                    return Err(format!("{what}: a port needs `port` between 1 and 65535"));
                }
            }
            if let Some(ip) = str_at(&doc.value, &["spec", "clusterIP"])
                && ip.parse::<IpAddr>().is_err()
            {
                return Err(format!("{what}: clusterIP {ip:?} is not an IP address"));
            }
            let listed = doc.value.get("spec").and_then(|s| s.get("clusterIPs"));
            if let Some(listed) = listed {
                let ips = listed
                    .as_sequence()
                    .ok_or_else(|| format!("{what}: clusterIPs is not a list"))?;
                let mut families = Vec::new();
                for ip in ips {
                    let parsed = ip.as_str().and_then(|s| s.parse::<IpAddr>().ok());
                    let Some(parsed) = parsed else {
                        return Err(format!(
                            "{what}: clusterIPs entry {ip:?} is not an IP address"
                        ));
                    };
                    if families.contains(&parsed.is_ipv6()) {
                        return Err(format!(
                            "{what}: clusterIPs holds two addresses of one family"
                        ));
                    }
                    families.push(parsed.is_ipv6());
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

pub(super) fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = value;
    for p in path {
        v = v.get(p)?;
    }
    v.as_str()
}

pub(super) fn labels_at(value: &Value, path: &[&str]) -> BTreeMap<String, String> {
    let mut v = value;
    for p in path {
        match v.get(p) {
            Some(next) => v = next,
            None => return BTreeMap::new(),
        }
    }
    v.as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar(v)?)))
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What a pod runs, from its Deployment's first container (`image` and `env`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum App {
    /// `image: ambient.local/http-app`: answers HTTP on `PORT` (default 8080) with its name, and
    /// first calls `UPSTREAM` (a URL) when set, including the answer.
    Http {
        /// Port.
        port: u16,
        /// URL to call for each request.
        upstream: Option<String>,
    },
    /// `image: ambient.local/gateway`: forwards requests whose `Host` is in `ROUTES`
    /// (`host=url,...`) on `PORT` (default 80); 404 otherwise.
    Gateway {
        /// Port.
        port: u16,
        /// Host -> URL.
        routes: Vec<(String, String)>,
    },
    /// `image: ambient.local/echo`: a TCP echo on `PORT` (default 9000), every byte sent back
    /// as it came (what the soak's connections check their bytes against).
    Echo {
        /// Port.
        port: u16,
    },
    /// Any other image (`ambient.local/client` for a client pod): nothing runs; commands are run
    /// in the pod with `ztunnel local exec`.
    Idle,
}

pub(super) fn app_spec(doc: &Doc) -> Result<App, String> {
    let container = doc
        .value
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("spec"))
        .and_then(|s| s.get("containers"))
        .and_then(|c| c.get(0));
    let Some(container) = container else {
        return Ok(App::Idle);
    };
    let image = container.get("image").and_then(Value::as_str).unwrap_or("");
    let env: BTreeMap<String, String> = container
        .get("env")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e.get("name")?.as_str()?.to_owned(),
                scalar(e.get("value")?)?,
            ))
        })
        .collect();
    let port = |default: u16| -> Result<u16, String> {
        match env.get("PORT") {
            None => Ok(default),
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("env PORT {p:?} is not a port")),
        }
    };
    let image = image.split(':').next().unwrap_or("");
    match image {
        "ambient.local/http-app" => Ok(App::Http {
            port: port(8080)?,
            upstream: env.get("UPSTREAM").cloned().filter(|u| !u.is_empty()),
        }),
        "ambient.local/gateway" => {
            let mut routes = Vec::new();
            for route in env
                .get("ROUTES")
                .map(String::as_str)
                .unwrap_or("")
                .split(',')
            {
                if route.trim().is_empty() {
                    continue;
                }
                let (host, url) = route
                    .split_once('=')
                    .ok_or_else(|| format!("env ROUTES entry {route:?} is not host=url"))?;
                routes.push((host.trim().to_owned(), url.trim().to_owned()));
            }
            Ok(App::Gateway {
                port: port(80)?,
                routes,
            })
        }
        "ambient.local/echo" => Ok(App::Echo { port: port(9000)? }),
        _ => Ok(App::Idle),
    }
}
