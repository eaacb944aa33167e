//! The DNS proxy's answers (`proxy::dns::decide`): names of the mesh's services as Istio's
//! ztunnel answers them, everything else forwarded, bad queries answered FORMERR or dropped.

#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use proxy::dns::{Asker, Decision, DnsConfig, decide, fuzz_query};
use proxy::state::State;
use xds_client::resources::{Address, IpFamilies, Service, Visibility};

fn service(name: &str, namespace: &str, host: &str, vips: &[&str]) -> Service {
    Service {
        name: name.into(),
        namespace: namespace.into(),
        hostname: host.into(),
        addresses: vips
            .iter()
            .map(|ip| (String::new(), ip.parse().unwrap()))
            .collect(),
        ..Service::default()
    }
}

fn state() -> State {
    let mut state = State::new("istio-system");
    for s in [
        service(
            "web-api",
            "default",
            "web-api.default.svc.cluster.local",
            &["10.96.0.10", "fd00::10"],
        ),
        service("ext", "default", "*.example.com", &["240.240.0.1"]),
        service("api", "default", "api.example.com", &["240.240.0.2"]),
        Service {
            ip_families: IpFamilies::Ipv4Only,
            ..service(
                "v4",
                "default",
                "v4.default.svc.cluster.local",
                &["10.96.0.4"],
            )
        },
        Service {
            visibility: Visibility::Namespace,
            ..service(
                "private",
                "shop",
                "private.shop.svc.cluster.local",
                &["10.96.0.99"],
            )
        },
        // The same host from two namespaces: the canonical one answers.
        service("dup", "a", "dup.example.org", &["240.0.0.1"]),
        Service {
            canonical: true,
            ..service("dup", "b", "dup.example.org", &["240.0.0.2"])
        },
    ] {
        state.insert_address(Address::Service(s));
    }
    state
}

fn asker() -> Asker {
    Asker {
        namespace: "default".into(),
        search_domains: vec![
            "default.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
    }
}

fn query(name: &str, record_type: RecordType) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(0xbeef)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    message.to_vec().unwrap()
}

/// The reply's code, whether it is authoritative, and its records as `name TYPE value`.
fn ask_with(
    state: &State,
    config: &DnsConfig,
    name: &str,
    record_type: RecordType,
) -> Option<(ResponseCode, bool, Vec<String>)> {
    match decide(state, &asker(), config, &query(name, record_type)) {
        Decision::Answer(bytes) => {
            let reply = Message::from_vec(&bytes).unwrap();
            assert_eq!(reply.id(), 0xbeef);
            assert_eq!(reply.message_type(), MessageType::Response);
            assert!(reply.recursion_desired());
            assert_eq!(reply.queries().len(), 1, "the question is echoed");
            let records = reply
                .answers()
                .iter()
                .map(|r| {
                    let value = match r.data() {
                        RData::A(a) => IpAddr::V4(a.0).to_string(),
                        RData::AAAA(a) => IpAddr::V6(a.0).to_string(),
                        RData::CNAME(c) => c.0.to_ascii(),
                        other => format!("{other:?}"),
                    };
                    assert_eq!(r.ttl(), config.ttl);
                    format!("{} {} {value}", r.name().to_ascii(), r.record_type())
                })
                .collect();
            Some((reply.response_code(), reply.authoritative(), records))
        }
        Decision::Forward => None,
        Decision::Drop => panic!("{name}: dropped"),
    }
}

fn ask(name: &str, record_type: RecordType) -> Option<(ResponseCode, bool, Vec<String>)> {
    ask_with(&state(), &DnsConfig::default(), name, record_type)
}

fn answered(records: &[&str]) -> Option<(ResponseCode, bool, Vec<String>)> {
    Some((
        ResponseCode::NoError,
        true,
        records.iter().map(|r| (*r).to_owned()).collect(),
    ))
}

#[test]
fn service_names_in_every_kubernetes_form_are_answered() {
    use RecordType::{A, AAAA};
    assert_eq!(
        ask("web-api.default.svc.cluster.local.", A),
        answered(&["web-api.default.svc.cluster.local. A 10.96.0.10"])
    );
    assert_eq!(
        ask("web-api.default.svc.cluster.local.", AAAA),
        answered(&["web-api.default.svc.cluster.local. AAAA fd00::10"])
    );
    // Short forms, answered under the name asked.
    for short in ["web-api.", "web-api.default.", "web-api.default.svc."] {
        assert_eq!(
            ask(short, A),
            answered(&[&format!("{short} A 10.96.0.10")]),
            "{short}"
        );
    }
    // Case does not matter.
    assert_eq!(
        ask("Web-API.Default.svc.cluster.local.", A),
        answered(&["Web-API.Default.svc.cluster.local. A 10.96.0.10"])
    );
}

#[test]
fn a_name_the_resolver_expanded_with_a_search_domain_gets_a_cname() {
    assert_eq!(
        ask(
            "web-api.default.svc.cluster.local.default.svc.cluster.local.",
            RecordType::A
        ),
        answered(&[
            "web-api.default.svc.cluster.local.default.svc.cluster.local. CNAME web-api.default.svc.cluster.local.",
            "web-api.default.svc.cluster.local. A 10.96.0.10",
        ])
    );
    // An external host a ServiceEntry names, expanded by the pod's resolver.
    assert_eq!(
        ask("api.example.com.svc.cluster.local.", RecordType::A),
        answered(&[
            "api.example.com.svc.cluster.local. CNAME api.example.com.",
            "api.example.com. A 240.240.0.2",
        ])
    );
}

#[test]
fn serviceentry_hosts_wildcards_and_the_canonical_service() {
    use RecordType::A;
    assert_eq!(
        ask("api.example.com.", A),
        answered(&["api.example.com. A 240.240.0.2"])
    );
    // Only the wildcard names it.
    assert_eq!(
        ask("www.example.com.", A),
        answered(&["www.example.com. A 240.240.0.1"])
    );
    assert_eq!(
        ask("dup.example.org.", A),
        answered(&["dup.example.org. A 240.0.0.2"])
    );
}

#[test]
fn a_known_name_without_the_asked_family_has_no_records_not_nxdomain() {
    let no_records = Some((ResponseCode::NoError, true, Vec::new()));
    assert_eq!(
        ask("v4.default.svc.cluster.local.", RecordType::AAAA),
        no_records
    );
    assert_eq!(ask("www.example.com.", RecordType::AAAA), no_records);
    let mut v4_only = DnsConfig::default();
    v4_only.ipv6 = false;
    assert_eq!(
        ask_with(
            &state(),
            &v4_only,
            "web-api.default.svc.cluster.local.",
            RecordType::AAAA
        ),
        no_records
    );
}

/// [`state`] with the headless service `db` in `default` and its pods (name, address, healthy).
fn with_db(pods: &[(&str, &str, bool)]) -> State {
    let mut state = state();
    state.insert_address(Address::Service(service(
        "db",
        "default",
        "db.default.svc.cluster.local",
        &[],
    )));
    for (name, ip, healthy) in pods {
        state.insert_address(Address::Workload(db_pod(name, ip, *healthy)));
    }
    state
}

/// Pod `name` of the headless service `db` in `default`, at `ip`.
fn db_pod(name: &str, ip: &str, healthy: bool) -> xds_client::resources::Workload {
    let mut w = xds_client::resources::Workload::new(
        &format!("Kubernetes//Pod/default/{name}"),
        name,
        "default",
        "spiffe://cluster.local/ns/default/sa/db".parse().unwrap(),
    );
    w.addresses = vec![ip.parse().unwrap()];
    w.healthy = healthy;
    w.services
        .insert("default/db.default.svc.cluster.local".into(), Vec::new());
    w
}

#[test]
fn a_headless_service_answers_its_healthy_endpoints() {
    let state = with_db(&[
        ("db-0", "10.244.0.7", true),
        ("db-1", "10.244.0.8", false),
        ("db-2", "10.244.0.6", true),
    ]);
    assert_eq!(
        ask_with(
            &state,
            &DnsConfig::default(),
            "db.default.svc.cluster.local.",
            RecordType::A
        ),
        answered(&[
            "db.default.svc.cluster.local. A 10.244.0.6",
            "db.default.svc.cluster.local. A 10.244.0.7",
        ])
    );
}

#[test]
fn a_headless_services_pods_answer_by_name() {
    // db-1 is not ready yet: its own name resolves all the same (a StatefulSet's peers find it).
    let state = with_db(&[("db-0", "10.244.0.7", true), ("db-1", "10.244.0.8", false)]);
    let config = DnsConfig::default();
    let ask = |name: &str, t: RecordType| ask_with(&state, &config, name, t);
    assert_eq!(
        ask("db-0.db.default.svc.cluster.local.", RecordType::A),
        answered(&["db-0.db.default.svc.cluster.local. A 10.244.0.7"])
    );
    assert_eq!(
        ask("DB-1.db.default.svc.cluster.local.", RecordType::A),
        answered(&["DB-1.db.default.svc.cluster.local. A 10.244.0.8"])
    );
    // Short forms through the pod's namespace, as for services.
    assert_eq!(
        ask("db-0.db.", RecordType::A),
        answered(&["db-0.db. A 10.244.0.7"])
    );
    // The name exists, not with an IPv6 address.
    assert_eq!(
        ask("db-0.db.default.svc.cluster.local.", RecordType::AAAA),
        Some((ResponseCode::NoError, true, Vec::new()))
    );
    // No such pod, a service with a VIP (its pods have no names here), a name too deep:
    // forwarded.
    assert_eq!(
        ask("db-9.db.default.svc.cluster.local.", RecordType::A),
        None
    );
    assert_eq!(
        ask("db-0.web-api.default.svc.cluster.local.", RecordType::A),
        None
    );
    assert_eq!(
        ask("x.db-0.db.default.svc.cluster.local.", RecordType::A),
        None
    );
}

#[test]
fn what_is_not_ours_is_forwarded() {
    // Unknown names (the upstream answers, NXDOMAIN included), other types, and a service
    // visible only in its own namespace asked from another.
    assert_eq!(ask("example.net.", RecordType::A), None);
    assert_eq!(
        ask("nothing.default.svc.cluster.local.", RecordType::A),
        None
    );
    assert_eq!(
        ask("web-api.default.svc.cluster.local.", RecordType::MX),
        None
    );
    assert_eq!(ask("private.shop.svc.cluster.local.", RecordType::A), None);
    // A ServiceEntry host without addresses is the upstream's to answer (a Kubernetes headless
    // service is ours: its endpoints).
    let mut state = state();
    state.insert_address(Address::Service(service(
        "no-vip",
        "default",
        "novip.example.net",
        &[],
    )));
    assert_eq!(
        ask_with(
            &state,
            &DnsConfig::default(),
            "novip.example.net.",
            RecordType::A
        ),
        None
    );
}

#[test]
fn bad_queries_are_answered_formerr_or_notimp_or_dropped() {
    let state = state();
    let config = DnsConfig::default();
    let decide = |bytes: &[u8]| decide(&state, &asker(), &config, bytes);
    let code = |decision: Decision| match decision {
        Decision::Answer(bytes) => {
            let reply = Message::from_vec(&bytes).unwrap();
            (reply.id(), reply.response_code())
        }
        other => panic!("{other:?}"),
    };
    // Truncated in the question: FORMERR with the query's id.
    let whole = query("web-api.default.svc.cluster.local.", RecordType::A);
    assert_eq!(code(decide(&whole[..20])), (0xbeef, ResponseCode::FormErr));
    // Not even a header, or a response: nothing.
    assert_eq!(decide(&whole[..3]), Decision::Drop);
    assert_eq!(decide(&[]), Decision::Drop);
    let mut response = Message::from_vec(&whole).unwrap();
    response.set_message_type(MessageType::Response);
    assert_eq!(decide(&response.to_vec().unwrap()), Decision::Drop);
    // Two questions, or none: FORMERR.
    let mut two = Message::from_vec(&whole).unwrap();
    two.add_query(Query::query(
        Name::from_ascii("a.b.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        code(decide(&two.to_vec().unwrap())),
        (0xbeef, ResponseCode::FormErr)
    );
    let mut none = Message::from_vec(&whole).unwrap();
    none.queries_mut().clear();
    assert_eq!(
        code(decide(&none.to_vec().unwrap())),
        (0xbeef, ResponseCode::FormErr)
    );
    // Another opcode: NOTIMP.
    let mut status = Message::from_vec(&whole).unwrap();
    status.set_op_code(OpCode::Status);
    assert_eq!(
        code(decide(&status.to_vec().unwrap())),
        (0xbeef, ResponseCode::NotImp)
    );
}

#[test]
fn dns_query_target_over_seed_corpus() {
    let files = seed_corpus::seeds("dns_query");
    assert!(files.len() >= 8);
    for data in &files {
        fuzz_query(data);
    }
}
