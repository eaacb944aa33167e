//! A Kubernetes API server emulator for tests, where no real one can be had.
//!
//! It serves the core (`v1`) kinds the node agent and the CNI plugin use, `pods`, `namespaces`
//! and `nodes`, over HTTPS on loopback (its own CA; [`ApiServer::kubeconfig`] writes a
//! kubeconfig a client can use as is), and checks what the real server checks on that path:
//!
//! - **Authentication**: a bearer token, issued by [`ApiServer::token_for`] for a service
//!   account (user `system:serviceaccount:NS:NAME`) or the administrator's ([`ApiServer::start`]
//!   makes one, all-powerful as `system:masters` is). No token or an unknown one: 401.
//! - **Authorization (RBAC)**: the verb (`get`, `list`, `watch`, `patch`) on the resource
//!   (`pods`, `pods/status`, ...) in the namespace, against the ClusterRoles, Roles and their
//!   bindings loaded with [`ApiServer::load_rbac`] from the same YAML an operator applies. Not
//!   allowed: 403 with the real server's message.
//! - **Requests**: list (with `fieldSelector` on `metadata.name`, `metadata.namespace` and
//!   `spec.nodeName`, and equality `labelSelector`s; anything else is a 400, never ignored), get,
//!   watch (from a `resourceVersion`, replaying what happened since, as the real server does), and
//!   patch as JSON merge patch (`application/merge-patch+json`; strategic merge patch is taken
//!   as a merge patch, which is the same for maps such as annotations). A patch through the
//!   `status` subresource changes `status` and `metadata`, never `spec`.
//!
//! Not emulated: other kinds and API groups (404), JSON patch and server-side apply (415),
//! admission, resource quotas, paging (`limit` returns everything, which the API allows).
//!
//! ```
//! use kube_emulator::ApiServer;
//! use serde_json::json;
//!
//! let server = ApiServer::start().unwrap();
//! server.put(json!({"kind": "Pod", "metadata": {"name": "web", "namespace": "default"},
//!                   "spec": {"nodeName": "node-a"}}));
//! let pod = server.get("pods", Some("default"), "web").unwrap();
//! assert_eq!(pod["metadata"]["resourceVersion"], "1");
//! assert!(pod["metadata"]["uid"].as_str().is_some());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// The kinds served: (resource, kind, namespaced).
const KINDS: &[(&str, &str, bool)] = &[
    ("pods", "Pod", true),
    ("namespaces", "Namespace", false),
    ("nodes", "Node", false),
];

/// The administrator: may do anything.
const ADMIN: &str = "system:admin";

/// One request as the emulator saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// The authenticated user (empty when none).
    pub user: String,
    /// The status answered.
    pub status: u16,
}

/// A key of a stored object: (resource, namespace or "", name).
type Key = (String, String, String);

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    resource: String,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
}

/// An RBAC rule: API groups, resources (with subresources), verbs, optional names.
#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

impl Rule {
    fn allows(&self, verb: &str, resource: &str, name: Option<&str>) -> bool {
        let any = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
        any(&self.groups, "")
            && any(&self.resources, resource)
            && any(&self.verbs, verb)
            && (self.names.is_empty() || name.is_some_and(|n| self.names.iter().any(|v| v == n)))
    }
}

#[derive(Default)]
struct Rbac {
    /// Roles by (namespace or "" for a ClusterRole, name).
    roles: HashMap<(String, String), Vec<Rule>>,
    /// Bindings: (namespace of a RoleBinding or "" for a ClusterRoleBinding, role namespace
    /// ("" for a ClusterRole), role name, subjects as user names).
    bindings: Vec<(String, String, String, Vec<String>)>,
}

impl Rbac {
    fn allows(
        &self,
        user: &str,
        verb: &str,
        resource: &str,
        namespace: &str,
        name: Option<&str>,
    ) -> bool {
        self.bindings
            .iter()
            .filter(|(scope, _, _, subjects)| {
                (scope.is_empty() || scope == namespace) && subjects.iter().any(|s| s == user)
            })
            .filter_map(|(_, role_ns, role, _)| self.roles.get(&(role_ns.clone(), role.clone())))
            .flatten()
            .any(|rule| rule.allows(verb, resource, name))
    }
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    tokens: Mutex<HashMap<String, String>>,
    rbac: Mutex<Rbac>,
    seen: Mutex<Vec<Seen>>,
    stopped: AtomicBool,
    next_uid: AtomicU64,
}

/// A running emulator (stops serving when dropped).
pub struct ApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    ca_pem: String,
    admin_token: String,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.changed.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Why the emulator could not start or load something.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for _ in 0..4 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

impl ApiServer {
    /// Starts serving HTTPS on a free loopback port.
    pub fn start() -> Result<Self, Error> {
        let ca = identity::DevCa::generate("kube-emulator.local")
            .map_err(|e| Error(format!("cannot make the emulator's CA: {e}")))?;
        let creds = ca
            .issue_server(&["127.0.0.1", "localhost"], Duration::from_secs(24 * 3600))
            .map_err(|e| Error(format!("cannot issue the emulator's certificate: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth()
                .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        })
        .map_err(|e| Error(format!("TLS: {e}")))?;
        let mut config = config;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error(e.to_string()))?;
        let addr = listener.local_addr().map_err(|e| Error(e.to_string()))?;
        let admin_token = random_token();
        let inner = Arc::new(Inner {
            state: Mutex::default(),
            changed: Condvar::new(),
            tokens: Mutex::new(HashMap::from([(admin_token.clone(), ADMIN.to_owned())])),
            rbac: Mutex::default(),
            seen: Mutex::default(),
            stopped: AtomicBool::new(false),
            next_uid: AtomicU64::new(1),
        });
        let serving = inner.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if serving.stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (inner, config) = (serving.clone(), config.clone());
                std::thread::spawn(move || {
                    let Ok(tls) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut stream = rustls::StreamOwned::new(tls, conn);
                    serve(&inner, &mut stream);
                });
            }
        });
        Ok(ApiServer {
            inner,
            addr,
            ca_pem: ca.root_pem().to_owned(),
            admin_token,
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The administrator's token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A token for service account `namespace/name` (user
    /// `system:serviceaccount:NAMESPACE:NAME`), allowed what the loaded RBAC binds to it.
    pub fn token_for(&self, namespace: &str, name: &str) -> String {
        let token = format!("sa-{namespace}-{name}-{}", random_token());
        self.inner.tokens.lock().expect("lock").insert(
            token.clone(),
            format!("system:serviceaccount:{namespace}:{name}"),
        );
        token
    }

    /// Writes a kubeconfig for `token` at `path` (server, CA data, token).
    pub fn kubeconfig(&self, path: &Path, token: &str) -> std::io::Result<()> {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: user\ncurrent-context: emulator\n",
            self.url()
        );
        std::fs::write(path, text)
    }

    /// Loads ClusterRoles, Roles, ClusterRoleBindings and RoleBindings from YAML documents
    /// (other kinds are skipped). Errors name the document.
    pub fn load_rbac(&self, yaml: &str) -> Result<(), Error> {
        let mut rbac = self.inner.rbac.lock().expect("lock");
        for (n, doc) in common::k8s::documents(yaml) {
            let doc = doc.map_err(|e| Error(format!("RBAC document {n}: {e}")))?;
            let doc: Value =
                serde_json::to_value(&doc).map_err(|e| Error(format!("RBAC document {n}: {e}")))?;
            let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
            let list = |v: &Value| -> Vec<String> {
                v.as_array()
                    .map(|a| a.iter().map(text).collect())
                    .unwrap_or_default()
            };
            let namespace = text(&doc["metadata"]["namespace"]);
            let name = text(&doc["metadata"]["name"]);
            match doc["kind"].as_str() {
                Some(kind @ ("ClusterRole" | "Role")) => {
                    let rules = doc["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| Rule {
                            groups: list(&r["apiGroups"]),
                            resources: list(&r["resources"]),
                            verbs: list(&r["verbs"]),
                            names: list(&r["resourceNames"]),
                        })
                        .collect();
                    let scope = if kind == "Role" {
                        namespace
                    } else {
                        String::new()
                    };
                    rbac.roles.insert((scope, name), rules);
                }
                Some(kind @ ("ClusterRoleBinding" | "RoleBinding")) => {
                    let role = &doc["roleRef"];
                    let role_ns = if role["kind"] == "Role" {
                        namespace.clone()
                    } else {
                        String::new()
                    };
                    let subjects = doc["subjects"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| match s["kind"].as_str() {
                            Some("ServiceAccount") => format!(
                                "system:serviceaccount:{}:{}",
                                s["namespace"].as_str().unwrap_or(&namespace),
                                text(&s["name"])
                            ),
                            _ => text(&s["name"]),
                        })
                        .collect();
                    let scope = if kind == "RoleBinding" {
                        namespace
                    } else {
                        String::new()
                    };
                    rbac.bindings
                        .push((scope, role_ns, text(&role["name"]), subjects));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Creates or replaces an object (its `kind` says which resource; a Pod without a namespace
    /// goes to `default`), giving it a uid when it has none and a new resourceVersion; watchers
    /// see ADDED or MODIFIED.
    pub fn put(&self, mut object: Value) -> Value {
        let kind = object["kind"].as_str().unwrap_or("").to_owned();
        let (resource, kind, namespaced) = *KINDS
            .iter()
            .find(|(_, k, _)| *k == kind)
            .unwrap_or_else(|| panic!("the emulator serves no kind {kind:?}"));
        let meta = &mut object["metadata"];
        if namespaced && meta["namespace"].is_null() {
            meta["namespace"] = json!("default");
        }
        if meta["uid"].is_null() {
            let n = self.inner.next_uid.fetch_add(1, Ordering::SeqCst);
            meta["uid"] = json!(format!("00000000-0000-4000-8000-{n:012}"));
        }
        let key = key_of(resource, &object);
        let mut state = self.inner.state.lock().expect("lock");
        let created = !state.objects.contains_key(&key);
        store(&mut state, resource, kind, key, object, created);
        let stored = state.events.last().expect("just stored").object.clone();
        self.inner.changed.notify_all();
        stored
    }

    /// Deletes an object; watchers see DELETED. Returns whether it existed.
    pub fn delete(&self, resource: &str, namespace: Option<&str>, name: &str) -> bool {
        let key = (
            resource.to_owned(),
            namespace.unwrap_or("").to_owned(),
            name.to_owned(),
        );
        let mut state = self.inner.state.lock().expect("lock");
        let Some(mut object) = state.objects.remove(&key) else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = kind_of(resource);
        state.events.push(Event {
            rv,
            resource: resource.to_owned(),
            object: with_type(object, kind, "DELETED"),
        });
        self.inner.changed.notify_all();
        true
    }

    /// The stored object, if any.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = (
            resource.to_owned(),
            namespace.unwrap_or("").to_owned(),
            name.to_owned(),
        );
        self.inner
            .state
            .lock()
            .expect("lock")
            .objects
            .get(&key)
            .cloned()
    }

    /// Every request served so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().expect("lock").clone()
    }
}

fn kind_of(resource: &str) -> &'static str {
    KINDS
        .iter()
        .find(|(r, _, _)| *r == resource)
        .map(|(_, k, _)| *k)
        .unwrap_or("")
}

fn key_of(resource: &str, object: &Value) -> Key {
    let meta = &object["metadata"];
    (
        resource.to_owned(),
        meta["namespace"].as_str().unwrap_or("").to_owned(),
        meta["name"].as_str().unwrap_or("").to_owned(),
    )
}

/// A watch event: `{"type": EVENT, "object": OBJECT}`, the object with its kind.
fn with_type(mut object: Value, kind: &str, event: &str) -> Value {
    object["kind"] = json!(kind);
    object["apiVersion"] = json!("v1");
    json!({"type": event, "object": object})
}

fn store(
    state: &mut State,
    resource: &str,
    kind: &'static str,
    key: Key,
    mut object: Value,
    created: bool,
) {
    state.rv += 1;
    let rv = state.rv;
    object["kind"] = json!(kind);
    object["apiVersion"] = json!("v1");
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    state.objects.insert(key, object.clone());
    state.events.push(Event {
        rv,
        resource: resource.to_owned(),
        object: with_type(object, kind, if created { "ADDED" } else { "MODIFIED" }),
    });
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("an object");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

type Stream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// An HTTP request.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(reader: &mut BufReader<&mut Stream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (k, v) = header.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > 4 << 20 {
        return None;
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

/// A response: status and JSON body.
struct Reply(u16, Value);

fn status(code: u16, reason: &str, message: String) -> Reply {
    Reply(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn write_reply(stream: &mut Stream, reply: &Reply) -> std::io::Result<()> {
    let body = reply.1.to_string();
    write!(
        stream,
        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        reply.0,
        body.len()
    )?;
    stream.flush()
}

fn serve(inner: &Inner, stream: &mut Stream) {
    loop {
        let request = {
            let mut reader = BufReader::new(&mut *stream);
            let Some(request) = read_request(&mut reader) else {
                return;
            };
            request
        };
        let user = request
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| inner.tokens.lock().expect("lock").get(t.trim()).cloned())
            .unwrap_or_default();
        let outcome = handle(inner, &request, &user);
        let code = match &outcome {
            Outcome::Reply(r) => r.0,
            Outcome::Watch(..) => 200,
        };
        inner.seen.lock().expect("lock").push(Seen {
            method: request.method.clone(),
            target: request.target.clone(),
            user: user.clone(),
            status: code,
        });
        match outcome {
            Outcome::Reply(reply) => {
                if write_reply(stream, &reply).is_err() {
                    return;
                }
            }
            Outcome::Watch(watch) => {
                watch.run(inner, stream);
                return;
            }
        }
    }
}

enum Outcome {
    Reply(Reply),
    Watch(Watch),
}

/// What a path names.
struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    query: HashMap<String, String>,
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_target(target: &str) -> Option<Target> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let rest = path.strip_prefix("/api/v1/")?;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let own = |s: &str| Some(s.to_owned());
    let (resource, namespace, name, subresource) = match parts.as_slice() {
        [resource] => (*resource, None, None, None),
        ["namespaces", ns, resource] => (*resource, own(ns), None, None),
        ["namespaces", ns, resource, name] => (*resource, own(ns), own(name), None),
        ["namespaces", ns, resource, name, sub] => (*resource, own(ns), own(name), own(sub)),
        [resource, name] => (*resource, None, own(name), None),
        [resource, name, sub] => (*resource, None, own(name), own(sub)),
        _ => return None,
    };
    Some(Target {
        resource: resource.to_owned(),
        namespace,
        name,
        subresource,
        query,
    })
}

/// A list or watch filter.
#[derive(Debug, Clone, Default)]
struct Filter {
    namespace: Option<String>,
    fields: Vec<(String, bool, String)>,
    labels: Vec<(String, LabelTest)>,
}

#[derive(Debug, Clone)]
enum LabelTest {
    Equals(String),
    NotEquals(String),
    Exists,
    Absent,
}

impl Filter {
    fn parse(target: &Target) -> Result<Self, String> {
        let mut filter = Filter {
            namespace: target.namespace.clone(),
            ..Filter::default()
        };
        if let Some(fields) = target.query.get("fieldSelector").filter(|f| !f.is_empty()) {
            for term in fields.split(',') {
                let (key, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                    (k, false, v)
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    (k, true, v)
                } else {
                    return Err(format!("invalid field selector {term:?}"));
                };
                if !["metadata.name", "metadata.namespace", "spec.nodeName"].contains(&key) {
                    return Err(format!(
                        "field label not supported: {key} (the emulator filters on metadata.name, metadata.namespace and spec.nodeName)"
                    ));
                }
                filter
                    .fields
                    .push((key.to_owned(), equal, value.to_owned()));
            }
        }
        if let Some(labels) = target.query.get("labelSelector").filter(|l| !l.is_empty()) {
            for term in labels.split(',') {
                let term = term.trim();
                let test = if let Some((k, v)) = term.split_once("!=") {
                    (k, LabelTest::NotEquals(v.to_owned()))
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    (k, LabelTest::Equals(v.to_owned()))
                } else if let Some(k) = term.strip_prefix('!') {
                    (k, LabelTest::Absent)
                } else if term.contains(' ') || term.contains('(') {
                    return Err(format!(
                        "the emulator takes equality label selectors only, not {term:?}"
                    ));
                } else {
                    (term, LabelTest::Exists)
                };
                filter.labels.push((test.0.trim().to_owned(), test.1));
            }
        }
        Ok(filter)
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let field = |key: &str| match key {
            "metadata.name" => meta["name"].as_str().unwrap_or(""),
            "metadata.namespace" => meta["namespace"].as_str().unwrap_or(""),
            _ => object["spec"]["nodeName"].as_str().unwrap_or(""),
        };
        self.fields
            .iter()
            .all(|(key, equal, value)| (field(key) == value) == *equal)
            && self.labels.iter().all(|(key, test)| {
                let label = meta["labels"][key].as_str();
                match test {
                    LabelTest::Equals(v) => label == Some(v),
                    LabelTest::NotEquals(v) => label != Some(v),
                    LabelTest::Exists => label.is_some(),
                    LabelTest::Absent => label.is_none(),
                }
            })
    }
}

struct Watch {
    resource: String,
    filter: Filter,
    /// Replay from after this version; `None`: the current objects first, as ADDED.
    from: Option<u64>,
}

impl Watch {
    fn run(self, inner: &Inner, stream: &mut Stream) {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
        let mut state = inner.state.lock().expect("lock");
        let mut last = match self.from {
            Some(rv) => rv,
            None => {
                let current: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((r, _, _), o)| *r == self.resource && self.filter.matches(o))
                    .map(|(_, o)| with_type(o.clone(), kind_of(&self.resource), "ADDED"))
                    .collect();
                let rv = state.rv;
                drop(state);
                for event in current {
                    if send_chunk(stream, &event).is_err() {
                        return;
                    }
                }
                state = inner.state.lock().expect("lock");
                rv
            }
        };
        loop {
            if inner.stopped.load(Ordering::SeqCst) {
                return;
            }
            let pending: Vec<Value> = state
                .events
                .iter()
                .filter(|e| e.rv > last && e.resource == self.resource)
                .filter(|e| self.filter.matches(&e.object["object"]))
                .map(|e| e.object.clone())
                .collect();
            last = state.rv;
            drop(state);
            for event in pending {
                if send_chunk(stream, &event).is_err() {
                    return;
                }
            }
            state = inner.state.lock().expect("lock");
            if state.rv == last {
                state = inner
                    .changed
                    .wait_timeout(state, Duration::from_secs(1))
                    .expect("lock")
                    .0;
            }
        }
    }
}

fn send_chunk(stream: &mut Stream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(stream, "{:x}\r\n{line}\r\n", line.len())?;
    stream.flush()
}

fn handle(inner: &Inner, request: &Request, user: &str) -> Outcome {
    let reply = |r: Reply| Outcome::Reply(r);
    if user.is_empty() {
        return reply(status(401, "Unauthorized", "Unauthorized".into()));
    }
    let Some(target) = parse_target(&request.target) else {
        return reply(status(
            404,
            "NotFound",
            format!("the emulator serves no {}", request.target),
        ));
    };
    let Some(&(resource, kind, namespaced)) = KINDS.iter().find(|(r, _, _)| *r == target.resource)
    else {
        return reply(status(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                target.resource
            ),
        ));
    };
    if namespaced != target.namespace.is_some() && target.name.is_some() {
        return reply(status(
            404,
            "NotFound",
            format!(
                "{resource} is {}namespaced",
                if namespaced { "" } else { "not " }
            ),
        ));
    }
    let watching = matches!(
        target.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let verb = match (request.method.as_str(), &target.name, watching) {
        ("GET", _, true) => "watch",
        ("GET", Some(_), false) => "get",
        ("GET", None, false) => "list",
        ("PATCH", Some(_), _) => "patch",
        _ => {
            return reply(status(
                405,
                "MethodNotAllowed",
                format!(
                    "the emulator does not take {} {}",
                    request.method, request.target
                ),
            ));
        }
    };
    let full_resource = match &target.subresource {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_owned(),
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let allowed = user == ADMIN
        || inner.rbac.lock().expect("lock").allows(
            user,
            verb,
            &full_resource,
            &namespace,
            target.name.as_deref(),
        );
    if !allowed {
        let what = match &target.name {
            Some(name) => format!("{resource} {name:?}"),
            None => resource.to_owned(),
        };
        let scope = if namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace {namespace:?}")
        };
        return reply(status(
            403,
            "Forbidden",
            format!(
                "{what} is forbidden: User {user:?} cannot {verb} resource {full_resource:?} in API group \"\" {scope}"
            ),
        ));
    }
    if let Some(sub) = &target.subresource
        && sub != "status"
    {
        return reply(status(404, "NotFound", format!("no subresource {sub}")));
    }
    match verb {
        "list" | "watch" => {
            let filter = match Filter::parse(&target) {
                Ok(f) => f,
                Err(e) => return reply(status(400, "BadRequest", e)),
            };
            if verb == "watch" {
                let from = target
                    .query
                    .get("resourceVersion")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|rv| *rv > 0);
                return Outcome::Watch(Watch {
                    resource: resource.to_owned(),
                    filter,
                    from,
                });
            }
            let state = inner.state.lock().expect("lock");
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|((r, _, _), o)| r == resource && filter.matches(o))
                .map(|(_, o)| o.clone())
                .collect();
            reply(Reply(
                200,
                json!({"kind": format!("{kind}List"), "apiVersion": "v1",
                       "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
            ))
        }
        "get" => {
            let key = (
                resource.to_owned(),
                namespace,
                target.name.clone().unwrap_or_default(),
            );
            match inner.state.lock().expect("lock").objects.get(&key) {
                Some(object) => reply(Reply(200, object.clone())),
                None => reply(status(
                    404,
                    "NotFound",
                    format!("{resource} {:?} not found", key.2),
                )),
            }
        }
        _ => reply(patch(inner, request, resource, kind, namespace, &target)),
    }
}

fn patch(
    inner: &Inner,
    request: &Request,
    resource: &str,
    kind: &'static str,
    namespace: String,
    target: &Target,
) -> Reply {
    let content_type = request.header("content-type").unwrap_or("");
    if !matches!(
        content_type.split(';').next().unwrap_or("").trim(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return status(
            415,
            "UnsupportedMediaType",
            format!("the emulator takes merge patches only, not {content_type:?}"),
        );
    }
    let body: Value = match serde_json::from_slice(&request.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return status(
                400,
                "BadRequest",
                "a merge patch must be a JSON object".into(),
            );
        }
        Err(e) => return status(400, "BadRequest", format!("the patch is not JSON: {e}")),
    };
    let name = target.name.clone().unwrap_or_default();
    let key = (resource.to_owned(), namespace, name.clone());
    let mut state = inner.state.lock().expect("lock");
    let Some(current) = state.objects.get(&key).cloned() else {
        return status(404, "NotFound", format!("{resource} {name:?} not found"));
    };
    // A uid in the patch is a precondition, as the real server takes it.
    if let Some(uid) = body["metadata"]["uid"].as_str()
        && current["metadata"]["uid"].as_str() != Some(uid)
    {
        return status(
            409,
            "Conflict",
            format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                current["metadata"]["uid"].as_str().unwrap_or("")
            ),
        );
    }
    let mut patched = current.clone();
    merge(&mut patched, &body);
    // What the real server keeps whatever the patch says.
    patched["metadata"]["uid"] = current["metadata"]["uid"].clone();
    patched["metadata"]["name"] = current["metadata"]["name"].clone();
    patched["metadata"]["namespace"] = current["metadata"]["namespace"].clone();
    if target.subresource.is_some() {
        patched["spec"] = current["spec"].clone();
    } else {
        patched["status"] = current["status"].clone();
    }
    for field in ["spec", "status"] {
        if patched[field].is_null() {
            patched.as_object_mut().expect("object").remove(field);
        }
    }
    store(&mut state, resource, kind, key.clone(), patched, false);
    let stored = state.objects[&key].clone();
    inner.changed.notify_all();
    Reply(200, stored)
}
