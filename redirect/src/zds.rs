//! The netns handoff to the proxy over a Unix socket, compatible with Istio's "ZDS" protocol
//! (package `istio.workload.zds`, DESIGN.md "Netns handoff").
//!
//! The agent listens on a SOCK_SEQPACKET socket; a proxy connects and sends `ZdsHello{V1}`. The
//! agent replays every captured pod as `AddWorkload` with the pod's network-namespace descriptor
//! attached (SCM_RIGHTS), then `SnapshotSent`, then streams adds and deletes; after each message
//! it waits for the proxy's `WorkloadResponse{Ack}` before sending the next.
//!
//! Several proxies may be connected at once (a rolling update starts the new proxy before the
//! old one stops). Each connecting proxy gets the whole snapshot; a pod captured afterwards goes
//! to the newest proxy only, as istio-cni hands it; a deletion goes to every proxy. When the
//! newest proxy leaves, the one now newest is sent every captured pod again (it keeps those it
//! already serves), so no pod is left to a proxy that is gone.
//!
//! Never reported as done when it is not: an ack carrying an error means the pod was not handed
//! off (logged, sent again with backoff); a proxy that does not acknowledge within
//! [`ZdsConfig::ack_timeout`] is disconnected, releasing everything queued for it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tracing::{info, warn};

use crate::agent::{Handoff, PodInfo};
use crate::sys;

/// The ZDS messages (`istio.workload.zds`), generated from `proto/zds.proto` (Istio's schema)
/// by `cargo run -p protogen`; [`Payload`] is the request's oneof.
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod proto {
    include!("generated/istio.workload.zds.rs");

    pub use workload_request::Payload;
}

use proto::workload_response::Payload::Ack;
use proto::{
    AddWorkload, DelWorkload, Payload, SnapshotSent, WorkloadInfo, WorkloadRequest,
    WorkloadResponse,
};

/// Messages are small; Istio keeps each under 1024 bytes.
const MAX_MESSAGE: usize = 1024;

/// How often an idle connection checks that its proxy is still there.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// Timing of a [`ZdsServer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ZdsConfig {
    /// A proxy that does not acknowledge a message within this long is disconnected (its thread,
    /// queue and the namespace descriptors queued for it are released); it reconnects and gets
    /// the snapshot again.
    pub ack_timeout: Duration,
    /// First delay before re-sending an add the proxy refused (its ack carried an error).
    pub retry_first: Duration,
    /// Longest such delay.
    pub retry_max: Duration,
    /// Users besides root whose processes may connect (the socket hands out pods' network
    /// namespaces: a peer whose `SO_PEERCRED` uid is neither root's nor one of these is refused
    /// and logged, whatever the socket file's mode).
    pub allowed_uids: Vec<u32>,
}

impl Default for ZdsConfig {
    fn default() -> Self {
        ZdsConfig {
            ack_timeout: Duration::from_secs(10),
            retry_first: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            allowed_uids: Vec::new(),
        }
    }
}

enum Event {
    Add(String, WorkloadInfo, Arc<File>),
    Del(String),
}

#[derive(Default)]
struct Inner {
    pods: Mutex<BTreeMap<String, (WorkloadInfo, Arc<File>)>>,
    /// The connected proxies' event queues, oldest first, each with its connection's number.
    connections: Mutex<Vec<(u64, mpsc::Sender<Event>)>>,
    next_connection: AtomicU64,
    live: AtomicUsize,
    /// Peers refused for their credentials.
    refused: AtomicU64,
    /// For each pod, the connections whose proxy acknowledged its current namespace.
    served: Mutex<BTreeMap<String, Vec<u64>>>,
    /// Whether the agent has completed a full pass ([`Handoff::synced`]): until then a
    /// connecting proxy is not sent its snapshot (an empty or partial one would make it drain
    /// pods that are captured and will be added in a moment).
    synced: (Mutex<bool>, std::sync::Condvar),
}

impl Inner {
    /// Sends `make()` to the newest connected proxy (the one a rolling update brought up last:
    /// new pods are its to serve, as istio-cni hands them). Called with the pods lock held.
    fn to_newest(&self, make: impl Fn() -> Event) {
        let mut connections = self.connections.lock().expect("lock");
        while let Some((_, tx)) = connections.last() {
            if tx.send(make()).is_ok() {
                return;
            }
            connections.pop();
        }
    }

    /// Sends `make()` to every connected proxy (a pod's deletion concerns whoever serves it).
    /// Called with the pods lock held.
    fn to_all(&self, make: impl Fn() -> Event) {
        self.connections
            .lock()
            .expect("lock")
            .retain(|(_, tx)| tx.send(make()).is_ok());
    }

    /// Connection `id` has ended: it gets no more events, and when it was the newest, the proxy
    /// now newest is sent every captured pod (those added while the other one was newest reached
    /// only that one; a pod it already serves is kept as it is).
    fn leave(&self, id: u64) {
        let pods = self.pods.lock().expect("lock");
        let mut connections = self.connections.lock().expect("lock");
        let was_newest = connections.last().is_some_and(|(newest, _)| *newest == id);
        connections.retain(|(c, _)| *c != id);
        drop(connections);
        self.served.lock().expect("lock").retain(|_, by| {
            by.retain(|c| *c != id);
            !by.is_empty()
        });
        if was_newest {
            for (uid, (info, file)) in pods.iter() {
                self.to_newest(|| Event::Add(uid.clone(), info.clone(), file.clone()));
            }
        }
    }
}

/// The agent side of the handoff: a [`Handoff`] that serves proxies on a Unix socket.
#[derive(Clone)]
pub struct ZdsServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer").finish_non_exhaustive()
    }
}

impl ZdsServer {
    /// Listens at `path` (Istio's default: `/var/run/ztunnel/ztunnel.sock`; the socket file is
    /// made mode 0600 whatever the umask) and serves every proxy that connects as root (or as
    /// one of [`ZdsConfig::allowed_uids`]), each on its own thread, with the default
    /// [`ZdsConfig`].
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        Self::bind_with(path, ZdsConfig::default())
    }

    /// Like [`bind`](Self::bind), with explicit timing.
    pub fn bind_with(path: &Path, config: ZdsConfig) -> std::io::Result<Self> {
        let listener = sys::seqpacket_listener(path)?;
        let server = ZdsServer {
            inner: Arc::default(),
        };
        let inner = server.inner.clone();
        std::thread::spawn(move || {
            loop {
                match sys::accept_conn(&listener) {
                    Ok(conn) => {
                        match sys::peer_credentials(&conn) {
                            Ok((_, uid)) if uid == 0 || config.allowed_uids.contains(&uid) => {}
                            Ok((pid, uid)) => {
                                inner.refused.fetch_add(1, Ordering::SeqCst);
                                warn!(
                                    pid,
                                    uid,
                                    "ZDS: refused a peer that is neither root nor an allowed user (it would be handed pods' network namespaces)"
                                );
                                continue;
                            }
                            Err(e) => {
                                inner.refused.fetch_add(1, Ordering::SeqCst);
                                warn!(error = %e, "ZDS: refused a peer whose credentials cannot be read");
                                continue;
                            }
                        }
                        let inner = inner.clone();
                        let config = config.clone();
                        std::thread::spawn(move || {
                            inner.live.fetch_add(1, Ordering::SeqCst);
                            let id = inner.next_connection.fetch_add(1, Ordering::SeqCst);
                            if let Err(e) = serve(&inner, id, &conn, &config) {
                                info!(error = %e, "ZDS: proxy connection ended");
                            }
                            inner.leave(id);
                            inner.live.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "ZDS: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        Ok(server)
    }

    /// How many proxy connections are being served now.
    pub fn connections(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// How many peers were refused for their credentials so far.
    pub fn refused_peers(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// The Prometheus text of the connected proxies and the peers refused
    /// (`ztunnel_node_agent_zds_*`).
    pub fn render(&self) -> String {
        format!(
            "# HELP ztunnel_node_agent_zds_connections Proxies connected to the ZDS socket.\n# TYPE ztunnel_node_agent_zds_connections gauge\nztunnel_node_agent_zds_connections {}\n# HELP ztunnel_node_agent_zds_refused_peers_total Peers refused on the ZDS socket for their credentials.\n# TYPE ztunnel_node_agent_zds_refused_peers_total counter\nztunnel_node_agent_zds_refused_peers_total {}\n",
            self.connections(),
            self.refused_peers()
        )
    }

    /// Whether a connected proxy acknowledged the pod `uid` in the namespace it was last added
    /// with (an add that is refused, pending or sent to a proxy that has gone does not count).
    pub fn serves(&self, uid: &str) -> bool {
        self.inner.served.lock().expect("lock").contains_key(uid)
    }
}

impl Handoff for ZdsServer {
    fn add(&self, pod: &PodInfo, netns: &Arc<File>) {
        let info = WorkloadInfo {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        };
        let mut pods = self.inner.pods.lock().expect("lock");
        pods.insert(pod.uid.clone(), (info.clone(), netns.clone()));
        // A new namespace has to be acknowledged afresh.
        self.inner.served.lock().expect("lock").remove(&pod.uid);
        // Under the pods lock, so a proxy that is connecting sees the pod either in its
        // snapshot or as an event, never both or neither.
        self.inner
            .to_newest(|| Event::Add(pod.uid.clone(), info.clone(), netns.clone()));
    }

    fn served(&self, uid: &str) -> bool {
        self.serves(uid)
    }

    fn synced(&self) {
        let (flag, changed) = &self.inner.synced;
        let mut synced = flag.lock().expect("lock");
        if !*synced {
            *synced = true;
            changed.notify_all();
        }
    }

    fn remove(&self, uid: &str) {
        let mut pods = self.inner.pods.lock().expect("lock");
        pods.remove(uid);
        self.inner.served.lock().expect("lock").remove(uid);
        self.inner.to_all(|| Event::Del(uid.to_owned()));
    }
}

/// An add the proxy refused, to send again.
struct Pending {
    info: WorkloadInfo,
    netns: Arc<File>,
    attempts: u32,
    due: Instant,
}

/// One proxy connection: hello, snapshot, then live events, each acknowledged within the ack
/// timeout. Adds the proxy refuses are sent again with backoff until it accepts them or the pod
/// is deleted.
fn serve(inner: &Inner, id: u64, conn: &OwnedFd, config: &ZdsConfig) -> std::io::Result<()> {
    sys::set_recv_timeout(conn, config.ack_timeout)?;
    let mut buf = [0u8; MAX_MESSAGE];
    let (n, _) = sys::recv(conn, &mut buf).map_err(|e| timed_out(e, config))?;
    let hello = proto::ZdsHello::decode(&buf[..n]).map_err(invalid)?;
    if hello.version != proto::Version::V1 as i32 {
        return Err(invalid(format!(
            "unsupported ZDS version {}",
            hello.version
        )));
    }
    // A proxy that connects before the agent's first full pass (the agent just started) waits
    // for it: the snapshot must name every pod the agent captures, or the proxy would drain the
    // ones missing from it.
    {
        let (flag, changed) = &inner.synced;
        let mut synced = flag.lock().expect("lock");
        if !*synced {
            info!(
                "ZDS: proxy connected; waiting for the agent's first full pass before replaying the pods"
            );
        }
        while !*synced {
            synced = changed.wait(synced).expect("lock");
        }
    }
    // Register for live events under the pods lock, so nothing falls between snapshot and
    // events and nothing is in both.
    let (tx, rx) = mpsc::channel();
    let snapshot: Vec<(String, WorkloadInfo, Arc<File>)> = {
        let pods = inner.pods.lock().expect("lock");
        inner.connections.lock().expect("lock").push((id, tx));
        pods.iter()
            .map(|(uid, (info, file))| (uid.clone(), info.clone(), file.clone()))
            .collect()
    };
    info!(
        pods = snapshot.len(),
        "ZDS: proxy connected; replaying the captured pods"
    );
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    for (uid, info, file) in snapshot {
        send_add(inner, id, conn, config, &mut pending, uid, info, file)?;
    }
    if let Err(refusal) = request(conn, config, Payload::SnapshotSent(SnapshotSent {}), None)? {
        warn!(error = %refusal, "ZDS: the proxy reported an error for the end of the snapshot");
    }
    loop {
        // Idle, the proxy is checked now and then, so one that has gone is noticed (and, when it
        // was the newest, its pods go to the next) without waiting for the next event.
        let wait = pending
            .values()
            .map(|p| p.due.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(IDLE_CHECK)
            .min(IDLE_CHECK);
        let event = match rx.recv_timeout(wait) {
            Ok(event) => Ok(event),
            Err(mpsc::RecvTimeoutError::Timeout) if sys::idle_peer_gone(conn) => {
                info!("ZDS: the proxy closed its connection");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let due: Vec<String> = pending
                    .iter()
                    .filter(|(_, p)| p.due <= now)
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in due {
                    let p = pending.remove(&uid).expect("present");
                    info!(%uid, attempt = p.attempts + 1, "ZDS: sending a refused pod again");
                    retry_add(inner, id, conn, config, &mut pending, uid, p)?;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
        };
        let Ok(event) = event else {
            return Ok(());
        };
        match event {
            Event::Add(uid, info, file) => {
                pending.remove(&uid);
                send_add(inner, id, conn, config, &mut pending, uid, info, file)?;
            }
            Event::Del(uid) => {
                // A pod the proxy never accepted needs no delete.
                if pending.remove(&uid).is_none()
                    && let Err(refusal) = request(
                        conn,
                        config,
                        Payload::Del(DelWorkload { uid: uid.clone() }),
                        None,
                    )?
                {
                    warn!(%uid, error = %refusal, "ZDS: the proxy reported an error for a delete");
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_add(
    inner: &Inner,
    id: u64,
    conn: &OwnedFd,
    config: &ZdsConfig,
    pending: &mut BTreeMap<String, Pending>,
    uid: String,
    info: WorkloadInfo,
    netns: Arc<File>,
) -> std::io::Result<()> {
    let first = Pending {
        info,
        netns,
        attempts: 0,
        due: Instant::now(),
    };
    retry_add(inner, id, conn, config, pending, uid, first)
}

/// Sends an add; if the proxy refuses it, schedules the next attempt; if it accepts it, records
/// that connection `id` serves the pod (unless the pod was deleted or added anew meanwhile).
fn retry_add(
    inner: &Inner,
    id: u64,
    conn: &OwnedFd,
    config: &ZdsConfig,
    pending: &mut BTreeMap<String, Pending>,
    uid: String,
    mut p: Pending,
) -> std::io::Result<()> {
    let add = AddWorkload {
        uid: uid.clone(),
        workload_info: Some(p.info.clone()),
    };
    let outcome = request(conn, config, Payload::Add(add), Some(&p.netns))?;
    if outcome.is_ok() {
        let pods = inner.pods.lock().expect("lock");
        if pods
            .get(&uid)
            .is_some_and(|(_, current)| Arc::ptr_eq(current, &p.netns))
        {
            let mut served = inner.served.lock().expect("lock");
            let by = served.entry(uid.clone()).or_default();
            if !by.contains(&id) {
                by.push(id);
            }
        }
    }
    if let Err(refusal) = outcome {
        p.attempts += 1;
        let delay = config
            .retry_first
            .saturating_mul(1 << p.attempts.min(16).saturating_sub(1))
            .min(config.retry_max);
        warn!(%uid, pod = %p.info.name, error = %refusal, retry_in = ?delay, "ZDS: the proxy did not take the pod; not handed off, will retry");
        p.due = Instant::now() + delay;
        pending.insert(uid, p);
    }
    Ok(())
}

/// Sends one request (with an fd) and waits for its ack: `Ok(Ok(()))` accepted, `Ok(Err(text))`
/// refused by the proxy, `Err` when the connection failed or the ack did not come in time.
fn request(
    conn: &OwnedFd,
    config: &ZdsConfig,
    payload: Payload,
    fd: Option<&File>,
) -> std::io::Result<Result<(), String>> {
    let bytes = WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec();
    let fds: Vec<_> = fd.map(|f| f.as_fd()).into_iter().collect();
    sys::send(conn, &bytes, &fds)?;
    let mut buf = [0u8; MAX_MESSAGE];
    let (n, _) = sys::recv(conn, &mut buf).map_err(|e| timed_out(e, config))?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "proxy closed the connection",
        ));
    }
    let response = WorkloadResponse::decode(&buf[..n]).map_err(invalid)?;
    match response.payload {
        Some(Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
        Some(Ack(ack)) => Ok(Err(ack.error)),
        None => Err(invalid("response without ack".to_owned())),
    }
}

/// A receive that hit the socket's timeout becomes an error saying so.
fn timed_out(e: std::io::Error, config: &ZdsConfig) -> std::io::Error {
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the proxy did not acknowledge within {:?}; disconnecting it",
                config.ack_timeout
            ),
        )
    } else {
        e
    }
}

fn invalid(e: impl ToString) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// The proxy side of the handoff: connects to the agent's socket, says hello, then receives one
/// request at a time and acknowledges each (the agent sends the next only after the ack).
///
/// Blocking I/O: run it on a thread of its own.
#[derive(Debug)]
pub struct ZdsClient {
    conn: OwnedFd,
}

impl ZdsClient {
    /// Connects to the agent at `path` (Istio's default: `/var/run/ztunnel/ztunnel.sock`) and
    /// sends `ZdsHello{V1}`.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let conn = sys::seqpacket_connect(path)?;
        let hello = proto::ZdsHello {
            version: proto::Version::V1 as i32,
        };
        sys::send(&conn, &hello.encode_to_vec(), &[])?;
        Ok(ZdsClient { conn })
    }

    /// The next request and the descriptor that came with it (an add's network namespace);
    /// `None` when the agent closed the connection. A datagram that does not decode is an
    /// `InvalidData` error naming what was wrong (acknowledge it with an error to go on).
    pub fn recv(&self) -> std::io::Result<Option<(WorkloadRequest, Option<OwnedFd>)>> {
        let mut buf = [0u8; MAX_MESSAGE];
        let (n, mut fds) = sys::recv(&self.conn, &mut buf)?;
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        let fd = fds.pop();
        let request = WorkloadRequest::decode(&buf[..n])
            .map_err(|e| invalid(format!("undecodable ZDS request ({n} bytes): {e}")))?;
        Ok(Some((request, fd)))
    }

    /// Acknowledges the last request: empty `error` accepts it, anything else refuses it with
    /// that reason.
    pub fn ack(&self, error: &str) -> std::io::Result<()> {
        let ack = WorkloadResponse {
            payload: Some(Ack(proto::Ack {
                error: error.to_owned(),
            })),
        };
        sys::send(&self.conn, &ack.encode_to_vec(), &[])
    }
}

/// A scripted agent side, for testing proxies: accepts one proxy at a time and sends whatever it
/// is told, well-formed or not, reporting each ack.
#[derive(Debug)]
pub struct ZdsTestAgent {
    listener: OwnedFd,
    conn: Option<OwnedFd>,
}

impl ZdsTestAgent {
    /// Listens at `path`.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        Ok(ZdsTestAgent {
            listener: sys::seqpacket_listener(path)?,
            conn: None,
        })
    }

    /// Waits at most `timeout` for a proxy (dropping the previous one), and as long again for
    /// its hello; returns the hello's version.
    pub fn accept(&mut self, timeout: Duration) -> std::io::Result<i32> {
        self.conn = None;
        // Linux applies a receive timeout to accept(2) as well.
        sys::set_recv_timeout(&self.listener, timeout)?;
        let conn = sys::accept_conn(&self.listener)?;
        sys::set_recv_timeout(&conn, timeout)?;
        let mut buf = [0u8; MAX_MESSAGE];
        let (n, _) = sys::recv(&conn, &mut buf)?;
        let hello = proto::ZdsHello::decode(&buf[..n]).map_err(invalid)?;
        self.conn = Some(conn);
        Ok(hello.version)
    }

    /// Drops the current connection (the proxy sees the agent go away).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Sends `bytes` (with `fd` attached) and returns the ack's error text (empty: accepted).
    pub fn send_raw(&self, bytes: &[u8], fd: Option<&File>) -> std::io::Result<String> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no proxy connected"))?;
        let fds: Vec<_> = fd.map(|f| f.as_fd()).into_iter().collect();
        sys::send(conn, bytes, &fds)?;
        let mut buf = [0u8; MAX_MESSAGE];
        let (n, _) = sys::recv(conn, &mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the proxy closed the connection",
            ));
        }
        let response = WorkloadResponse::decode(&buf[..n]).map_err(invalid)?;
        match response.payload {
            Some(Ack(ack)) => Ok(ack.error),
            None => Err(invalid("response without ack")),
        }
    }

    /// Sends one request and returns the ack's error text.
    pub fn send(&self, payload: Payload, fd: Option<&File>) -> std::io::Result<String> {
        let bytes = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        self.send_raw(&bytes, fd)
    }
}

/// A minimal proxy side, for tests and tools: connects, says hello, and hands each request (with
/// any received descriptor) to `on_request`, acknowledging it with the returned error text.
pub fn run_test_peer(
    path: &Path,
    mut on_request: impl FnMut(WorkloadRequest, Option<OwnedFd>) -> String,
) -> std::io::Result<()> {
    let client = ZdsClient::connect(path)?;
    while let Some((request, fd)) = client.recv()? {
        let error = on_request(request, fd);
        client.ack(&error)?;
    }
    Ok(())
}
