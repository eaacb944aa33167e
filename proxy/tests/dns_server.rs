//! The DNS proxy on real sockets (loopback): UDP and TCP queries answered from the state, the
//! rest forwarded to an upstream resolver (a test one on loopback), with its failures answered
//! REFUSED or SERVFAIL, and answers from anyone but the server asked ignored.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use proxy::dns::{Asker, DnsConfig, DnsMetrics, DnsServer, Upstream};
use proxy::state::{State, StateStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use xds_client::resources::{Address, Service};

fn state() -> Arc<StateStore> {
    let mut state = State::new("istio-system");
    state.insert_address(Address::Service(Service {
        name: "web-api".into(),
        namespace: "default".into(),
        hostname: "web-api.default.svc.cluster.local".into(),
        addresses: vec![(String::new(), "10.96.0.10".parse().unwrap())],
        ..Service::default()
    }));
    Arc::new(StateStore::new(state))
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    message.to_vec().unwrap()
}

/// A UDP socket and a TCP listener on one loopback port: the UDP socket's, unless another test
/// holds it for TCP (then another).
async fn udp_and_tcp() -> (UdpSocket, SocketAddr, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, addr, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP in 20 tries");
}

/// A test upstream on loopback (UDP and TCP, one port): `example.net` is 192.0.2.1, anything
/// else NXDOMAIN. With `spoof`, each UDP answer is preceded by one with the wrong id.
async fn upstream(spoof: bool) -> SocketAddr {
    let (udp, addr, tcp) = udp_and_tcp().await;
    let answer = |bytes: &[u8]| -> Vec<u8> {
        let asked = Message::from_vec(bytes).unwrap();
        let mut reply = Message::new();
        reply
            .set_id(asked.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_recursion_available(true);
        for q in asked.queries() {
            reply.add_query(q.clone());
            if q.name().to_ascii() == "example.net." {
                reply.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A("192.0.2.1".parse().unwrap())),
                ));
            } else {
                reply.set_response_code(ResponseCode::NXDomain);
            }
        }
        reply.to_vec().unwrap()
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            let reply = answer(&buf[..n]);
            if spoof {
                let mut wrong = reply.clone();
                wrong[0] ^= 0xff;
                udp.send_to(&wrong, peer).await.unwrap();
            }
            udp.send_to(&reply, peer).await.unwrap();
        }
    });
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tcp.accept().await.unwrap();
            tokio::spawn(async move {
                let mut length = [0u8; 2];
                while stream.read_exact(&mut length).await.is_ok() {
                    let mut q = vec![0u8; u16::from_be_bytes(length) as usize];
                    stream.read_exact(&mut q).await.unwrap();
                    let reply = answer(&q);
                    stream
                        .write_all(&(reply.len() as u16).to_be_bytes())
                        .await
                        .unwrap();
                    stream.write_all(&reply).await.unwrap();
                }
            });
        }
    });
    addr
}

/// A DNS proxy on loopback forwarding to `servers`; its UDP and TCP address (one port).
async fn proxy(
    servers: Vec<SocketAddr>,
    metrics: Arc<DnsMetrics>,
) -> (SocketAddr, CancellationToken) {
    let (udp, addr, tcp) = udp_and_tcp().await;
    let server = DnsServer::new(
        state(),
        DnsConfig::default(),
        Upstream {
            servers,
            timeout: Duration::from_millis(300),
            mark: None,
        },
        Asker {
            namespace: "default".into(),
            search_domains: vec!["default.svc.cluster.local".into()],
        },
        metrics,
    );
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(udp, tcp, stop.clone()));
    (addr, stop)
}

async fn ask_udp(to: SocketAddr, bytes: &[u8]) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, to).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

fn addresses(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn mesh_names_are_answered_and_the_rest_forwarded_over_udp_and_tcp() {
    let metrics = Arc::new(DnsMetrics::default());
    let (dns, _stop) = proxy(vec![upstream(false).await], metrics.clone()).await;
    let mesh = ask_udp(dns, &query(1, "web-api.default.svc.cluster.local.")).await;
    assert_eq!(addresses(&mesh), ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert!(mesh.authoritative());
    let external = ask_udp(dns, &query(2, "example.net.")).await;
    assert_eq!(external.id(), 2);
    assert_eq!(
        addresses(&external),
        ["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
    assert!(
        !external.authoritative(),
        "the upstream's answer, as it gave it"
    );
    let missing = ask_udp(dns, &query(3, "nope.example.")).await;
    assert_eq!(missing.response_code(), ResponseCode::NXDomain);

    // TCP: several queries on one connection, forwarded over TCP.
    let mut stream = TcpStream::connect(dns).await.unwrap();
    for (id, name) in [(4, "web-api."), (5, "example.net.")] {
        let q = query(id, name);
        stream
            .write_all(&(q.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&q).await.unwrap();
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await.unwrap();
        let mut reply = vec![0u8; u16::from_be_bytes(length) as usize];
        stream.read_exact(&mut reply).await.unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.id(), id);
        assert_eq!(addresses(&reply).len(), 1, "{name}");
    }

    // A malformed query: FORMERR, and the proxy goes on.
    let whole = query(6, "web-api.");
    let bad = ask_udp(dns, &whole[..15]).await;
    assert_eq!(bad.response_code(), ResponseCode::FormErr);
    assert_eq!(
        addresses(&ask_udp(dns, &query(7, "web-api.")).await).len(),
        1
    );

    let text = metrics.render();
    for line in [
        "ztunnel_dns_requests_total{outcome=\"answered\"} 3",
        "ztunnel_dns_requests_total{outcome=\"forwarded\"} 3",
        "ztunnel_dns_requests_total{outcome=\"malformed\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn no_upstream_is_refused_a_silent_one_is_servfail_and_spoofs_are_ignored() {
    let metrics = Arc::new(DnsMetrics::default());
    let (dns, _stop) = proxy(Vec::new(), metrics.clone()).await;
    assert_eq!(
        ask_udp(dns, &query(1, "example.net."))
            .await
            .response_code(),
        ResponseCode::Refused
    );
    // Mesh names need no upstream.
    assert_eq!(
        addresses(&ask_udp(dns, &query(2, "web-api.")).await).len(),
        1
    );

    // An upstream that never answers: SERVFAIL after the time limit.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (dns, _stop2) = proxy(vec![silent.local_addr().unwrap()], metrics.clone()).await;
    let start = Instant::now();
    let reply = ask_udp(dns, &query(3, "example.net.")).await;
    assert_eq!(reply.response_code(), ResponseCode::ServFail);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(
        metrics
            .render()
            .contains("ztunnel_dns_upstream_failures_total{reason=\"no_answer\"} 1")
    );

    // An answer with the wrong id comes first: ignored, the right one taken.
    let (dns, _stop3) = proxy(vec![upstream(true).await], metrics.clone()).await;
    let reply = ask_udp(dns, &query(4, "example.net.")).await;
    assert_eq!(reply.id(), 4);
    assert_eq!(addresses(&reply), ["192.0.2.1".parse::<IpAddr>().unwrap()]);
}

#[test]
fn resolv_conf_gives_servers_and_search_domains_and_errors_name_the_line() {
    let (servers, search) = Upstream::from_resolv_conf(
        "# comment\nnameserver 10.96.0.10\nnameserver fd00::a # second\nsearch default.svc.cluster.local svc.cluster.local cluster.local.\noptions ndots:5\n",
    )
    .unwrap();
    assert_eq!(
        servers,
        [
            "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
            "[fd00::a]:53".parse().unwrap()
        ]
    );
    assert_eq!(
        search,
        [
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local"
        ]
    );
    let error = Upstream::from_resolv_conf("nameserver 10.0.0.1\nnameserver bogus\n").unwrap_err();
    assert!(
        error.contains("line 2") && error.contains("bogus"),
        "{error}"
    );
}
