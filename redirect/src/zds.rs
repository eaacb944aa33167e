//! The netns handoff to the proxy over a Unix socket, compatible with Istio's "ZDS" protocol
//! (package `istio.workload.zds`, DESIGN.md "Netns handoff").
//!
//! The agent listens on a SOCK_SEQPACKET socket; a proxy connects and sends `ZdsHello{V1}`. The
//! agent replays every captured pod as `AddWorkload` with the pod's network-namespace descriptor
//! attached (SCM_RIGHTS), then `SnapshotSent`, then streams adds and deletes; after each message
//! it waits for the proxy's `WorkloadResponse{Ack}` before sending the next.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use prost::Message;
use tracing::{info, warn};

use crate::agent::{Handoff, PodInfo};
use crate::sys;

/// The ZDS messages (field numbers from Istio's `zds.proto`, as DESIGN.md lists them).
#[allow(missing_docs)]
pub mod proto {
    /// Sent by the proxy first.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ZdsHello {
        #[prost(enumeration = "Version", tag = "1")]
        pub version: i32,
    }

    /// Protocol version.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Version {
        NotUsed = 0,
        V1 = 1,
    }

    /// Who the pod is.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub service_account: String,
    }

    /// A captured pod; its netns descriptor travels with the message.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AddWorkload {
        #[prost(string, tag = "1")]
        pub uid: String,
        #[prost(message, optional, tag = "2")]
        pub workload_info: Option<WorkloadInfo>,
    }

    /// A released pod.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DelWorkload {
        #[prost(string, tag = "2")]
        pub uid: String,
    }

    /// End of the initial replay.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SnapshotSent {}

    /// Keep a pod the proxy already has (before the snapshot ends).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeepWorkload {
        #[prost(string, tag = "1")]
        pub uid: String,
    }

    /// One request from the agent.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadRequest {
        #[prost(oneof = "Payload", tags = "1, 2, 3, 5")]
        pub payload: Option<Payload>,
    }

    /// The request's payload.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(AddWorkload),
        #[prost(message, tag = "2")]
        Del(DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(SnapshotSent),
        #[prost(message, tag = "5")]
        Keep(KeepWorkload),
    }

    /// The proxy's answer.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WorkloadResponse {
        #[prost(message, optional, tag = "1")]
        pub ack: Option<Ack>,
    }

    /// Empty error = success.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Ack {
        #[prost(string, tag = "1")]
        pub error: String,
    }
}

use proto::{
    AddWorkload, DelWorkload, Payload, SnapshotSent, WorkloadInfo, WorkloadRequest,
    WorkloadResponse,
};

/// Messages are small; Istio keeps each under 1024 bytes.
const MAX_MESSAGE: usize = 1024;

enum Event {
    Add(String, WorkloadInfo, Arc<File>),
    Del(String),
}

#[derive(Default)]
struct Inner {
    pods: Mutex<BTreeMap<String, (WorkloadInfo, Arc<File>)>>,
    connections: Mutex<Vec<mpsc::Sender<Event>>>,
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
    /// Listens at `path` (Istio's default: `/var/run/ztunnel/ztunnel.sock`) and serves every
    /// proxy that connects, each on its own thread.
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = sys::seqpacket_listener(path)?;
        let server = ZdsServer {
            inner: Arc::default(),
        };
        let inner = server.inner.clone();
        std::thread::spawn(move || {
            loop {
                match sys::accept_conn(&listener) {
                    Ok(conn) => {
                        let inner = inner.clone();
                        std::thread::spawn(move || {
                            if let Err(e) = serve(&inner, &conn) {
                                info!(error = %e, "ZDS: proxy connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "ZDS: accept failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        });
        Ok(server)
    }

    fn broadcast(&self, make: impl Fn() -> Event) {
        self.inner
            .connections
            .lock()
            .expect("lock")
            .retain(|tx| tx.send(make()).is_ok());
    }
}

impl Handoff for ZdsServer {
    fn add(&self, pod: &PodInfo) {
        let Some(path) = &pod.netns else { return };
        let file = match File::open(path) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                warn!(pod = %pod.name, error = %e, "ZDS: cannot open the pod's netns");
                return;
            }
        };
        let info = WorkloadInfo {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        };
        self.inner
            .pods
            .lock()
            .expect("lock")
            .insert(pod.uid.clone(), (info.clone(), file.clone()));
        self.broadcast(|| Event::Add(pod.uid.clone(), info.clone(), file.clone()));
    }

    fn remove(&self, uid: &str) {
        self.inner.pods.lock().expect("lock").remove(uid);
        self.broadcast(|| Event::Del(uid.to_owned()));
    }
}

/// One proxy connection: hello, snapshot, then live events, each acknowledged.
fn serve(inner: &Inner, conn: &OwnedFd) -> std::io::Result<()> {
    let mut buf = [0u8; MAX_MESSAGE];
    let (n, _) = sys::recv(conn, &mut buf)?;
    let hello = proto::ZdsHello::decode(&buf[..n]).map_err(invalid)?;
    if hello.version != proto::Version::V1 as i32 {
        return Err(invalid(format!(
            "unsupported ZDS version {}",
            hello.version
        )));
    }
    // Register for live events before the snapshot, so nothing falls between.
    let (tx, rx) = mpsc::channel();
    let snapshot: Vec<(String, WorkloadInfo, Arc<File>)> = {
        let pods = inner.pods.lock().expect("lock");
        inner.connections.lock().expect("lock").push(tx);
        pods.iter()
            .map(|(uid, (info, file))| (uid.clone(), info.clone(), file.clone()))
            .collect()
    };
    info!(
        pods = snapshot.len(),
        "ZDS: proxy connected; replaying the captured pods"
    );
    for (uid, info, file) in snapshot {
        send_add(conn, &uid, info, &file)?;
    }
    request(conn, Payload::SnapshotSent(SnapshotSent {}), None)?;
    for event in rx {
        match event {
            Event::Add(uid, info, file) => send_add(conn, &uid, info, &file)?,
            Event::Del(uid) => request(conn, Payload::Del(DelWorkload { uid }), None)?,
        }
    }
    Ok(())
}

fn send_add(conn: &OwnedFd, uid: &str, info: WorkloadInfo, netns: &File) -> std::io::Result<()> {
    let add = AddWorkload {
        uid: uid.to_owned(),
        workload_info: Some(info),
    };
    request(conn, Payload::Add(add), Some(netns))
}

/// Sends one request (with an fd) and waits for its ack.
fn request(conn: &OwnedFd, payload: Payload, fd: Option<&File>) -> std::io::Result<()> {
    let bytes = WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec();
    let fds: Vec<_> = fd.map(|f| f.as_fd()).into_iter().collect();
    sys::send(conn, &bytes, &fds)?;
    let mut buf = [0u8; MAX_MESSAGE];
    let (n, _) = sys::recv(conn, &mut buf)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "proxy closed the connection",
        ));
    }
    let response = WorkloadResponse::decode(&buf[..n]).map_err(invalid)?;
    match response.ack {
        Some(ack) if ack.error.is_empty() => Ok(()),
        Some(ack) => {
            warn!(error = %ack.error, "ZDS: proxy reported an error");
            Ok(())
        }
        None => Err(invalid("response without ack".to_owned())),
    }
}

fn invalid(e: impl ToString) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// A minimal proxy side, for tests and tools: connects, says hello, and hands each request (with
/// any received descriptor) to `on_request`, acknowledging it with the returned error text.
pub fn run_test_peer(
    path: &Path,
    mut on_request: impl FnMut(WorkloadRequest, Option<OwnedFd>) -> String,
) -> std::io::Result<()> {
    let conn = sys::seqpacket_connect(path)?;
    let hello = proto::ZdsHello {
        version: proto::Version::V1 as i32,
    };
    sys::send(&conn, &hello.encode_to_vec(), &[])?;
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        let (n, mut fds) = sys::recv(&conn, &mut buf)?;
        if n == 0 && fds.is_empty() {
            return Ok(());
        }
        let request = WorkloadRequest::decode(&buf[..n]).map_err(invalid)?;
        let error = on_request(request, fds.pop());
        let ack = WorkloadResponse {
            ack: Some(proto::Ack { error }),
        };
        sys::send(&conn, &ack.encode_to_vec(), &[])?;
    }
}
