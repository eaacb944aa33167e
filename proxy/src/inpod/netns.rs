//! Sockets made inside a pod's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life.
//! Each pod gets one helper thread that enters the pod's namespace once (`setns`) and then
//! creates that pod's sockets on request: listeners (bound there, then served from the async
//! runtime like any other) and unconnected outgoing sockets (carrying the proxy's mark, connected
//! from the runtime). The runtime's own threads never change namespace.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, mpsc};

use nix::sched::CloneFlags;
use tokio::net::{TcpListener, TcpStream};

use crate::sockets::Connector;

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in a pod's network namespace; it ends when the last handle is dropped.
#[derive(Debug)]
pub struct PodNetns {
    jobs: mpsc::Sender<Job>,
    inode: u64,
}

fn gone() -> io::Error {
    io::Error::other("the pod's network-namespace thread has stopped")
}

impl PodNetns {
    /// Starts the helper thread in the namespace `netns` (a descriptor of `/proc/<pid>/ns/net`
    /// or of a bind-mounted namespace file). Fails when `netns` is not a network namespace.
    pub fn enter(netns: OwnedFd, label: &str) -> io::Result<Self> {
        let inode = nix::sys::stat::fstat(netns.as_fd())
            .map_err(io::Error::from)?
            .st_ino;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("netns-{label}"))
            .spawn(move || {
                let result = nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("cannot enter the network namespace: {e}"),
                    )
                });
                let ok = result.is_ok();
                let _ = entered_tx.send(result);
                drop(netns);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })?;
        entered.recv().map_err(|_| gone())??;
        Ok(PodNetns { jobs, inode })
    }

    /// The namespace's inode number (tells two descriptors of the same namespace apart from two
    /// different namespaces).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `job` on the thread inside the namespace.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// A listener bound to `addr` inside the namespace; with `reuse_port`, `SO_REUSEPORT`, so
    /// another proxy may bind the same port beside it.
    pub async fn listen(&self, addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
        let listener = self
            .run(move || crate::sockets::listener(addr, reuse_port))
            .await??;
        TcpListener::from_std(listener)
    }
}

/// Opens connections from inside a pod's namespace, marked so the pod's capture rules skip them.
#[derive(Debug, Clone)]
pub struct InPodConnector {
    /// The pod's namespace thread.
    pub netns: Arc<PodNetns>,
    /// `SO_MARK` (Istio: 0x539).
    pub mark: Option<u32>,
    /// Connect to the app from the client's address ([`Connector::connect_app`]); when false,
    /// from the pod's own.
    pub original_source: bool,
}

impl InPodConnector {
    /// Connects to `to` from a socket made in the pod's namespace, carrying the mark; from
    /// `source` (a transparent socket) when given, else from the pod's own address.
    fn dial(
        &self,
        source: Option<IpAddr>,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send + use<> {
        let netns = self.netns.clone();
        let mark = self.mark;
        async move {
            let socket = netns
                .run(move || match source {
                    Some(source) => crate::sockets::transparent_socket(source, to, mark),
                    None => crate::sockets::marked_socket(to, mark),
                })
                .await??;
            let stream = socket.connect(to).await?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

impl Connector for InPodConnector {
    fn connect(&self, to: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send {
        self.dial(None, to)
    }

    fn connect_app(
        &self,
        client: IpAddr,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send {
        // The client's address when it can be the source of a connection to `to`: of the same
        // family, and neither unspecified nor loopback (a client inside the pod itself).
        let client = client.to_canonical();
        let source = (self.original_source
            && client.is_ipv4() == to.is_ipv4()
            && !client.is_unspecified()
            && !client.is_loopback())
        .then_some(client);
        self.dial(source, to)
    }
}
