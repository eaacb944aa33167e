//! The DNS proxy's answers: what a pod's query gets, from the proxy's xDS state, as Istio's
//! ztunnel answers it (the serving sockets and the forwarding come on top of [`decide`]).
//!
//! Wire format through `hickory-proto` (no hand-written parsing). For an `A` or `AAAA` question
//! in class `IN`, the name is looked up under each of its aliases, in this order, and the first
//! that names a service the asker may see wins:
//!
//! - the name as asked;
//! - its Kubernetes expansions for the asker's namespace `NS` and cluster domain `D`: one label
//!   `x` -> `x.NS.svc.D`; two labels `x.y` -> `x.y.svc.D`, `x.y.NS.svc.D`; three labels ending in
//!   `svc` -> `x.y.svc.D`, and any three labels -> `x.y.z.svc.D`; four labels ending in `svc` ->
//!   `....svc.D`;
//! - the name with one of the asker's search domains stripped, and that name's expansions (an
//!   answer found so starts with a CNAME from the asked name to the stripped one);
//!
//! each alias also as wildcards (`*.example.com` answers `www.example.com`, `*.com` too). A
//! service is seen by every asker unless its visibility is its namespace's, and a service without
//! VIPs counts only when it is a Kubernetes headless service (its host under `.svc.<domain>`; a
//! ServiceEntry without addresses is forwarded). Its addresses are its VIPs, or for a headless
//! service its healthy endpoints' addresses; `A` takes the IPv4 ones,
//! `AAAA` the IPv6 ones (none when IPv6 is off or the service is IPv4-only, and the converse):
//! a service found with no address of the asked family is answered with no records (NOERROR,
//! not NXDOMAIN: the name exists). The answer is authoritative, with the configured TTL.
//!
//! A headless service's pods by name, as Kubernetes DNS names a StatefulSet's pods: an alias
//! `<pod>.<svc>.<ns>.svc.<domain>` that no service (or wildcard) names is the pod `<pod>`
//! (its workload name) among the endpoints of the headless service `<svc>.<ns>.svc.<domain>`
//! the asker may see, answered with that pod's addresses of the asked family, healthy or not
//! (a pod's own name resolves while it starts, as kube-dns's `publishNotReadyAddresses` of
//! StatefulSets makes it). xDS does not carry a pod's `spec.hostname`, so a pod whose hostname
//! differs from its name is not found here and the query is forwarded (Istio's ztunnel
//! forwards every such name).
//!
//! Everything else is [`Decision::Forward`]: other record types and classes, and names no
//! service has (the upstream resolver answers them, NXDOMAIN included). A query that does not
//! parse is answered FORMERR when its header can be read (a response, never: a loop is not
//! started), dropped otherwise; other opcodes are NOTIMP; a query with no question, or several,
//! is FORMERR.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use xds_client::resources::{IpFamilies, Service, Visibility};

use crate::state::State;

pub mod server;

pub use server::{DnsMetrics, DnsServer, Upstream};

/// How names are answered.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DnsConfig {
    /// The cluster's DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// The TTL of the records answered, in seconds.
    pub ttl: u32,
    /// Whether `AAAA` questions get IPv6 addresses.
    pub ipv6: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            cluster_domain: "cluster.local".into(),
            ttl: 30,
            ipv6: true,
        }
    }
}

/// Who asks: the pod's namespace and its resolver's search domains (its `resolv.conf`).
#[derive(Debug, Clone, Default)]
pub struct Asker {
    /// The pod's namespace.
    pub namespace: String,
    /// Its search domains, without the trailing dot (e.g. `default.svc.cluster.local`).
    pub search_domains: Vec<String>,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back: an answer, or an error response (FORMERR, NOTIMP).
    Answer(Vec<u8>),
    /// Not ours to answer: forward the query to the asker's upstream resolvers.
    Forward,
    /// Send nothing (not a query, or not even a readable header).
    Drop,
}

/// What [`decide`] found, for metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the mesh's services.
    Answered,
    /// A known name with no address of the asked family.
    NoRecords,
    /// Forwarded upstream.
    Forwarded,
    /// Malformed: FORMERR.
    Malformed,
    /// An opcode other than QUERY: NOTIMP.
    NotImplemented,
    /// Dropped.
    Dropped,
}

/// Decides what `query` gets, from `state`, for `asker`.
pub fn decide(state: &State, asker: &Asker, config: &DnsConfig, query: &[u8]) -> Decision {
    decide_with_outcome(state, asker, config, query).0
}

/// [`decide`], with what was found.
pub fn decide_with_outcome(
    state: &State,
    asker: &Asker,
    config: &DnsConfig,
    query: &[u8],
) -> (Decision, Outcome) {
    let message = match Message::from_vec(query) {
        Ok(message) => message,
        Err(_) => return malformed(query),
    };
    if message.message_type() != MessageType::Query {
        return (Decision::Drop, Outcome::Dropped);
    }
    if message.op_code() != OpCode::Query {
        return (
            error(&message, ResponseCode::NotImp),
            Outcome::NotImplemented,
        );
    }
    let [question] = message.queries() else {
        return (error(&message, ResponseCode::FormErr), Outcome::Malformed);
    };
    let record_type = question.query_type();
    if question.query_class() != DNSClass::IN
        || !matches!(record_type, RecordType::A | RecordType::AAAA)
    {
        return (Decision::Forward, Outcome::Forwarded);
    }
    let asked = question.name().to_lowercase().to_ascii();
    let asked = asked.trim_end_matches('.');
    let Some((found, alias)) = find(state, asker, config, asked) else {
        return (Decision::Forward, Outcome::Forwarded);
    };
    let addresses = match found {
        Found::Service(service) => addresses(state, &service, record_type, config),
        Found::Pod { service, pod } => {
            if family_allowed(&service, record_type, config) {
                let v6 = record_type == RecordType::AAAA;
                let mut of_pod: Vec<IpAddr> = pod
                    .addresses
                    .iter()
                    .copied()
                    .filter(|ip| ip.is_ipv6() == v6)
                    .collect();
                of_pod.sort();
                of_pod.dedup();
                of_pod
            } else {
                Vec::new()
            }
        }
    };
    let mut response = response_to(&message, ResponseCode::NoError);
    response.set_authoritative(true);
    let outcome = if addresses.is_empty() {
        Outcome::NoRecords
    } else {
        let mut owner = question.name().clone();
        if let Some(stripped) = &alias.stripped
            && let Ok(target) = Name::from_ascii(format!("{stripped}."))
        {
            response.add_answer(Record::from_rdata(
                owner.clone(),
                config.ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
            owner = target;
        }
        for ip in addresses {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            response.add_answer(Record::from_rdata(owner.clone(), config.ttl, rdata));
        }
        Outcome::Answered
    };
    match response.to_vec() {
        Ok(bytes) => (Decision::Answer(bytes), outcome),
        // A name that cannot be encoded back: the upstream may do better.
        Err(_) => (Decision::Forward, Outcome::Forwarded),
    }
}

/// A reply to `message` with its id, opcode, question and RD bit, and `code`.
fn response_to(message: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(message.id())
        .set_message_type(MessageType::Response)
        .set_op_code(message.op_code())
        .set_recursion_desired(message.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for query in message.queries() {
        response.add_query(query.clone());
    }
    response
}

fn error(message: &Message, code: ResponseCode) -> Decision {
    response_to(message, code)
        .to_vec()
        .map_or(Decision::Drop, Decision::Answer)
}

/// FORMERR for a query whose body does not parse, when its header says it is a query; else
/// nothing.
fn malformed(query: &[u8]) -> (Decision, Outcome) {
    let Some(header) = query.get(..4) else {
        return (Decision::Drop, Outcome::Dropped);
    };
    let is_response = header[2] & 0x80 != 0;
    if is_response {
        return (Decision::Drop, Outcome::Dropped);
    }
    let id = u16::from_be_bytes([header[0], header[1]]);
    let op_code = OpCode::from_u8((header[2] >> 3) & 0x0f);
    let reply = Message::error_msg(id, op_code, ResponseCode::FormErr);
    match reply.to_vec() {
        Ok(bytes) => (Decision::Answer(bytes), Outcome::Malformed),
        Err(_) => (Decision::Drop, Outcome::Dropped),
    }
}

/// A name a query may mean.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Alias {
    /// The name looked up (lowercase, no trailing dot).
    name: String,
    /// When it came from stripping a search domain: the stripped name (the CNAME's target).
    stripped: Option<String>,
}

/// Every alias of `asked`, in the order they are tried, without repeats.
fn aliases(asked: &str, asker: &Asker, config: &DnsConfig) -> Vec<Alias> {
    let mut out: Vec<Alias> = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |name: String, stripped: Option<String>| {
        if !name.is_empty() && seen.insert(name.clone()) {
            out.push(Alias { name, stripped });
        }
    };
    add(asked.to_owned(), None);
    for expanded in kube_expansions(asked, asker, config) {
        add(expanded, None);
    }
    for domain in &asker.search_domains {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let Some(stripped) = asked
            .strip_suffix(domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|rest| !rest.is_empty())
        else {
            continue;
        };
        add(stripped.to_owned(), Some(stripped.to_owned()));
        for expanded in kube_expansions(stripped, asker, config) {
            add(expanded, Some(stripped.to_owned()));
        }
    }
    out
}

/// The Kubernetes names `name` may be short for.
fn kube_expansions(name: &str, asker: &Asker, config: &DnsConfig) -> Vec<String> {
    let domain = config.cluster_domain.trim_end_matches('.');
    let in_namespace = format!("{}.svc.{domain}", asker.namespace);
    let labels: Vec<&str> = name.split('.').collect();
    match labels.as_slice() {
        [_] => vec![format!("{name}.{in_namespace}")],
        [_, _] => vec![
            format!("{name}.svc.{domain}"),
            format!("{name}.{in_namespace}"),
        ],
        [_, _, last] => {
            let mut out = Vec::new();
            if *last == "svc" {
                out.push(format!("{name}.{domain}"));
            }
            out.push(format!("{name}.svc.{domain}"));
            out
        }
        [_, _, _, "svc"] => vec![format!("{name}.{domain}")],
        _ => Vec::new(),
    }
}

/// `name` itself, then each wildcard that would match it (`*.b.c`, `*.c`).
fn wildcards(name: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(name.to_owned()).chain(
        name.match_indices('.')
            .map(move |(i, _)| format!("*{}", &name[i..])),
    )
}

/// What a name was found to be.
enum Found {
    /// A service.
    Service(Arc<Service>),
    /// A pod of a headless service, by name.
    Pod {
        /// The headless service.
        service: Arc<Service>,
        /// The pod's workload.
        pod: Arc<xds_client::resources::Workload>,
    },
}

/// What `asked` names for `asker` (a service, else a headless service's pod), and the alias
/// that found it.
fn find(state: &State, asker: &Asker, config: &DnsConfig, asked: &str) -> Option<(Found, Alias)> {
    for alias in aliases(asked, asker, config) {
        let candidates: Vec<String> = wildcards(&alias.name).collect();
        for candidate in candidates {
            if let Some(service) = best(state, asker, config, &candidate) {
                return Some((Found::Service(service), alias));
            }
        }
        if let Some((service, pod)) = headless_pod(state, asker, config, &alias.name) {
            return Some((Found::Pod { service, pod }, alias));
        }
    }
    None
}

/// `<pod>.<svc>.<ns>.svc.<domain>`: the workload named `<pod>` among the endpoints of the
/// headless service `<svc>.<ns>.svc.<domain>` that `asker` may see.
fn headless_pod(
    state: &State,
    asker: &Asker,
    config: &DnsConfig,
    name: &str,
) -> Option<(Arc<Service>, Arc<xds_client::resources::Workload>)> {
    let (pod, host) = name.split_once('.')?;
    let kubernetes = format!(".svc.{}", config.cluster_domain.trim_end_matches('.'));
    // `<svc>.<ns>.svc.<domain>`: exactly two labels before the suffix.
    let before = host.strip_suffix(&kubernetes)?;
    if before.split('.').count() != 2 {
        return None;
    }
    let service = best(state, asker, config, host).filter(|s| s.addresses.is_empty())?;
    let key = format!("{}/{}", service.namespace, service.hostname);
    let workload = state
        .endpoints(&key)
        .map(|(w, _)| w)
        .find(|w| w.name.eq_ignore_ascii_case(pod) && w.namespace == service.namespace)?
        .clone();
    Some((service, workload))
}

/// Among the services named `host` that `asker` may see and that have addresses to give (a VIP,
/// or a Kubernetes headless service: its host under `.svc.<domain>`; a ServiceEntry without
/// addresses is left to the upstream, as Istio's ztunnel leaves it): the canonical one, else
/// one in the asker's namespace, else the first by namespace.
fn best(state: &State, asker: &Asker, config: &DnsConfig, host: &str) -> Option<Arc<Service>> {
    let kubernetes = format!(".svc.{}", config.cluster_domain.trim_end_matches('.'));
    let mut visible: Vec<&Arc<Service>> = state
        .services_named(host)
        .filter(|s| !s.addresses.is_empty() || s.hostname.ends_with(&kubernetes))
        .filter(|s| s.visibility == Visibility::Public || s.namespace == asker.namespace)
        .collect();
    visible.sort_by(|a, b| {
        (!a.canonical, a.namespace != asker.namespace, &a.namespace).cmp(&(
            !b.canonical,
            b.namespace != asker.namespace,
            &b.namespace,
        ))
    });
    visible.first().map(|s| Arc::clone(s))
}

/// Whether `service` gives addresses of `record_type`'s family (IPv6 on, the service's
/// families).
fn family_allowed(service: &Service, record_type: RecordType, config: &DnsConfig) -> bool {
    let v6 = record_type == RecordType::AAAA;
    match (service.ip_families, v6) {
        (_, true) if !config.ipv6 => false,
        (IpFamilies::Ipv4Only, true) | (IpFamilies::Ipv6Only, false) => false,
        _ => true,
    }
}

/// The addresses answered for `service` to a question of `record_type`.
fn addresses(
    state: &State,
    service: &Service,
    record_type: RecordType,
    config: &DnsConfig,
) -> Vec<IpAddr> {
    let v6 = record_type == RecordType::AAAA;
    if !family_allowed(service, record_type, config) {
        return Vec::new();
    }
    let of_family = |ip: &IpAddr| ip.is_ipv6() == v6;
    let mut out: Vec<IpAddr> = if service.addresses.is_empty() {
        // Headless: the healthy endpoints themselves.
        let key = format!("{}/{}", service.namespace, service.hostname);
        state
            .endpoints(&key)
            .filter(|(w, _)| w.healthy)
            .flat_map(|(w, _)| w.addresses.iter().copied())
            .filter(of_family)
            .collect()
    } else {
        service
            .addresses
            .iter()
            .map(|(_, ip)| *ip)
            .filter(of_family)
            .collect()
    };
    out.sort();
    out.dedup();
    out
}

/// The `dns_query` fuzz target's body: any bytes as a query, from a pod in `default`, against a
/// small state. Never panics; whatever is answered parses as a DNS response with the query's id.
pub fn fuzz_query(data: &[u8]) {
    use std::sync::OnceLock;
    static STATE: OnceLock<State> = OnceLock::new();
    let state = STATE.get_or_init(fuzz_state);
    let asker = Asker {
        namespace: "default".into(),
        search_domains: vec![
            "default.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    };
    if let Decision::Answer(bytes) = decide(state, &asker, &DnsConfig::default(), data) {
        let reply = Message::from_vec(&bytes).expect("an answer parses");
        assert_eq!(reply.message_type(), MessageType::Response);
        if data.len() >= 2 {
            assert_eq!(reply.id(), u16::from_be_bytes([data[0], data[1]]));
        }
    }
}

/// A state with one service of each kind (VIP, headless, wildcard ServiceEntry host, namespace
/// visibility), for the fuzz target and its seed test.
fn fuzz_state() -> State {
    use xds_client::resources::{Address, Workload};
    let mut state = State::new("istio-system");
    let service = |name: &str, ns: &str, host: &str, vips: &[&str]| Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: host.into(),
        addresses: vips
            .iter()
            .map(|ip| (String::new(), ip.parse().expect("an address")))
            .collect(),
        ..Service::default()
    };
    state.insert_address(Address::Service(service(
        "web-api",
        "default",
        "web-api.default.svc.cluster.local",
        &["10.96.0.10", "fd00::10"],
    )));
    state.insert_address(Address::Service(service(
        "db",
        "default",
        "db.default.svc.cluster.local",
        &[],
    )));
    state.insert_address(Address::Service(service(
        "ext",
        "default",
        "*.example.com",
        &["240.240.0.1"],
    )));
    let mut w = Workload::new(
        "db-0",
        "db-0",
        "default",
        "spiffe://cluster.local/ns/default/sa/db"
            .parse()
            .expect("an identity"),
    );
    w.addresses = vec!["10.244.0.7".parse().expect("an address")];
    w.services
        .insert("default/db.default.svc.cluster.local".into(), Vec::new());
    state.insert_address(Address::Workload(w));
    state
}
