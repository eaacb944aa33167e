//! Serving DNS: queries on a UDP socket and a TCP listener (RFC 1035 framing: a two-byte length
//! before each message), answered by [`super::decide`] against the current state, or forwarded
//! to the upstream resolvers with a time limit (over UDP for UDP queries, TCP for TCP ones), from
//! sockets carrying the proxy's mark so the pod's DNS capture does not send them back here.
//!
//! A forwarded answer is accepted only from the server asked and with the query's id (anything
//! else arriving on the socket is ignored until the time limit). With no upstream configured, or
//! none answering in time, the query is answered REFUSED or SERVFAIL and the reason logged. At
//! most [`MAX_IN_FLIGHT`] queries per server are worked on at once; UDP queries beyond that wait
//! in the socket's buffer, as a flood should.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Asker, Decision, DnsConfig, Outcome, decide_with_outcome};
use crate::state::StateStore;

/// Queries worked on at once, per server.
pub const MAX_IN_FLIGHT: usize = 256;
/// The largest DNS message taken or sent (TCP's limit; UDP with EDNS stays under it).
const MAX_MESSAGE: usize = 65_535;
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Where queries the mesh does not answer go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The resolvers, tried in order.
    pub servers: Vec<SocketAddr>,
    /// How long each may take.
    pub timeout: Duration,
    /// `SO_MARK` for the forwarding sockets (Istio's 0x539), so capture rules skip them.
    pub mark: Option<u32>,
}

impl Upstream {
    /// The `nameserver` lines of a `resolv.conf` text (port 53), and its `search` domains.
    /// Lines that do not parse are errors naming the line; none at all is allowed (then
    /// everything not in the mesh is refused).
    pub fn from_resolv_conf(text: &str) -> Result<(Vec<SocketAddr>, Vec<String>), String> {
        let mut servers = Vec::new();
        let mut search = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split(['#', ';']).next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    let address = words.next().unwrap_or("");
                    // A scoped IPv6 address (fe80::1%eth0) keeps no scope here.
                    let ip: std::net::IpAddr = address
                        .split('%')
                        .next()
                        .unwrap_or("")
                        .parse()
                        .map_err(|_| {
                            format!("line {}: nameserver {address:?} is not an address", n + 1)
                        })?;
                    servers.push(SocketAddr::new(ip, 53));
                }
                Some("search") | Some("domain") => {
                    search = words.map(|w| w.trim_end_matches('.').to_owned()).collect();
                }
                _ => {}
            }
        }
        Ok((servers, search))
    }
}

/// Counts of what the DNS proxy did (`ztunnel_dns_*` in Prometheus text).
#[derive(Debug, Default)]
pub struct DnsMetrics {
    requests: AtomicU64,
    answered: AtomicU64,
    no_records: AtomicU64,
    forwarded: AtomicU64,
    forward_failures: AtomicU64,
    malformed: AtomicU64,
    refused: AtomicU64,
}

impl DnsMetrics {
    fn count(&self, outcome: Outcome) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let counter = match outcome {
            Outcome::Answered => &self.answered,
            Outcome::NoRecords => &self.no_records,
            Outcome::Forwarded => &self.forwarded,
            Outcome::Malformed | Outcome::NotImplemented | Outcome::Dropped => &self.malformed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of the counts.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::from(
            "# HELP ztunnel_dns_requests_total DNS queries received by the DNS proxy, by outcome.\n# TYPE ztunnel_dns_requests_total counter\n",
        );
        for (outcome, counter) in [
            ("answered", &self.answered),
            ("no_records", &self.no_records),
            ("forwarded", &self.forwarded),
            ("malformed", &self.malformed),
        ] {
            out.push_str(&format!(
                "ztunnel_dns_requests_total{{outcome=\"{outcome}\"}} {}\n",
                get(counter)
            ));
        }
        out.push_str(&format!(
            "# HELP ztunnel_dns_upstream_failures_total Forwarded queries no upstream answered (SERVFAIL) or that had no upstream (REFUSED).\n# TYPE ztunnel_dns_upstream_failures_total counter\nztunnel_dns_upstream_failures_total{{reason=\"no_answer\"}} {}\nztunnel_dns_upstream_failures_total{{reason=\"no_upstream\"}} {}\n",
            get(&self.forward_failures),
            get(&self.refused)
        ));
        out
    }

    /// Queries received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A DNS proxy for one asker (a pod, or the workload of dedicated mode).
#[derive(Debug)]
pub struct DnsServer {
    state: Arc<StateStore>,
    config: DnsConfig,
    upstream: Upstream,
    asker: Asker,
    metrics: Arc<DnsMetrics>,
    in_flight: Arc<Semaphore>,
}

impl DnsServer {
    /// A server answering `asker` from `state`, forwarding to `upstream`.
    pub fn new(
        state: Arc<StateStore>,
        config: DnsConfig,
        upstream: Upstream,
        asker: Asker,
        metrics: Arc<DnsMetrics>,
    ) -> Arc<Self> {
        Arc::new(DnsServer {
            state,
            config,
            upstream,
            asker,
            metrics,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Serves `udp` and `tcp` until `stop` is cancelled.
    pub async fn serve(self: Arc<Self>, udp: UdpSocket, tcp: TcpListener, stop: CancellationToken) {
        let udp = Arc::new(udp);
        let udp_loop = {
            let server = self.clone();
            let udp = udp.clone();
            async move {
                let mut buf = vec![0u8; MAX_MESSAGE];
                loop {
                    let (n, peer) = match udp.recv_from(&mut buf).await {
                        Ok(got) => got,
                        Err(e) => {
                            debug!(error = %e, "DNS: UDP receive failed");
                            continue;
                        }
                    };
                    let Ok(permit) = server.in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    let (server, udp, query) = (server.clone(), udp.clone(), buf[..n].to_vec());
                    tokio::spawn(async move {
                        if let Some(reply) = server.reply(&query, false).await {
                            let _ = udp.send_to(&reply, peer).await;
                        }
                        drop(permit);
                    });
                }
            }
        };
        let tcp_loop = {
            let server = self.clone();
            async move {
                loop {
                    let Ok((stream, _)) = tcp.accept().await else {
                        continue;
                    };
                    let server = server.clone();
                    tokio::spawn(async move { server.serve_tcp(stream).await });
                }
            }
        };
        tokio::select! {
            () = udp_loop => {}
            () = tcp_loop => {}
            () = stop.cancelled() => {}
        }
    }

    /// One TCP client: length-prefixed queries, one after another, until it closes or idles.
    async fn serve_tcp(self: Arc<Self>, mut stream: TcpStream) {
        loop {
            let mut length = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut length)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let mut query = vec![0u8; u16::from_be_bytes(length) as usize];
            if tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
                .await
                .map_or(true, |r| r.is_err())
            {
                return;
            }
            let Ok(_permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let Some(reply) = self.reply(&query, true).await else {
                return;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// The reply to one query (`None`: send nothing).
    async fn reply(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let state = self.state.snapshot();
        let (decision, outcome) = decide_with_outcome(&state, &self.asker, &self.config, query);
        self.metrics.count(outcome);
        match decision {
            Decision::Answer(bytes) => Some(bytes),
            Decision::Drop => None,
            Decision::Forward => Some(self.forward(query, tcp).await),
        }
    }

    /// The upstream's answer to `query`, or REFUSED (no upstream) / SERVFAIL (none answered).
    async fn forward(&self, query: &[u8], tcp: bool) -> Vec<u8> {
        let Ok(message) = Message::from_vec(query) else {
            return Vec::new();
        };
        if self.upstream.servers.is_empty() {
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
            warn!(
                namespace = %self.asker.namespace,
                query = ?message.queries().first().map(|q| q.name().to_ascii()),
                "DNS: not a mesh name and no upstream resolver is configured: refused"
            );
            return failure(&message, ResponseCode::Refused);
        }
        for server in &self.upstream.servers {
            let asked = if tcp {
                forward_tcp(*server, query, self.upstream.timeout, self.upstream.mark).await
            } else {
                forward_udp(
                    *server,
                    query,
                    message.id(),
                    self.upstream.timeout,
                    self.upstream.mark,
                )
                .await
            };
            match asked {
                Ok(answer) => return answer,
                Err(e) => {
                    debug!(%server, error = %e, "DNS: upstream did not answer");
                }
            }
        }
        self.metrics
            .forward_failures
            .fetch_add(1, Ordering::Relaxed);
        warn!(
            namespace = %self.asker.namespace,
            query = ?message.queries().first().map(|q| q.name().to_ascii()),
            servers = ?self.upstream.servers,
            "DNS: no upstream resolver answered in time: SERVFAIL"
        );
        failure(&message, ResponseCode::ServFail)
    }
}

fn failure(message: &Message, code: ResponseCode) -> Vec<u8> {
    let mut reply = Message::error_msg(message.id(), message.op_code(), code);
    for query in message.queries() {
        reply.add_query(query.clone());
    }
    reply.set_recursion_desired(message.recursion_desired());
    reply.to_vec().unwrap_or_default()
}

async fn forward_udp(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    timeout: Duration,
    mark: Option<u32>,
) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::from_std(crate::sockets::udp_socket(local, false, mark)?)?;
    socket.send_to(query, server).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    tokio::time::timeout(timeout, async {
        loop {
            let (n, from) = socket.recv_from(&mut buf).await?;
            // Only the server asked, answering this query, is believed.
            if from == server && n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

async fn forward_tcp(
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
    mark: Option<u32>,
) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(timeout, async {
        let mut stream = crate::sockets::connect_marked(server, mark).await?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await?;
        let mut answer = vec![0u8; u16::from_be_bytes(length) as usize];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}
