//! The attack suite: hostile HTTP/2 clients, hostile TLS peers and hostile servers against a real
//! `hbone::Server` and `hbone::Pool`, one test per attack class, each with a concrete bound
//! asserted (bytes the server allocated, handlers running at once, time to serve a legitimate
//! tunnel alongside) and the server still serving afterwards.
//!
//! Each test runs the side under attack on the test's own thread (a current-thread runtime) and
//! the attacker on other threads, so the counting allocator (`alloc`) measures the side under
//! attack alone.

// A test binary: its items are public only to its own modules.
#![allow(missing_docs, unreachable_pub)]

#[path = "../support/mod.rs"]
mod support;

mod alloc;
mod client;
mod h2_server;
mod raw;
mod tls;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hbone::{Config, InboundConnect, Pool, Server, StaticTls};
use http::HeaderMap;
use support::Pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Runs `attack` on a thread of its own (with its own runtime), while this thread's runtime
/// goes on serving; returns what it returned.
pub async fn elsewhere<F, Fut, T>(attack: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(attack())
    })
    .await
    .expect("the attacker panicked")
}

/// What the server's handler does with each CONNECT.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Accept and echo until EOF.
    Echo,
    /// Wait this long first (as a handler dialing a slow destination does), then accept and echo.
    SlowDial(Duration),
    /// For CONNECTs to port 8000: accept, then write this many bytes and wait for the client to
    /// close (others are echoed).
    Send(usize),
}

/// Handler counters: how many run now, the most that ran at once, how many started.
#[derive(Debug, Default)]
pub struct Stats {
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
    pub started: AtomicUsize,
}

impl Stats {
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
}

struct Running(Arc<Stats>);

impl Running {
    fn new(stats: &Arc<Stats>) -> Running {
        stats.started.fetch_add(1, Ordering::SeqCst);
        let now = stats.running.fetch_add(1, Ordering::SeqCst) + 1;
        stats.peak.fetch_max(now, Ordering::SeqCst);
        Running(stats.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A real HBONE server on this thread's runtime.
pub struct Target {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    pub pki: Arc<Pki>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn target(config: Config, behaviour: Behaviour) -> Target {
    let pki = Arc::new(Pki::new());
    let stats = Arc::new(Stats::default());
    let counters = stats.clone();
    let server = Server::new(config, pki.server_config(), move |req: InboundConnect| {
        let running = Running::new(&counters);
        async move {
            let _running = running;
            let req_port = req.authority().port();
            if let Behaviour::SlowDial(wait) = behaviour {
                tokio::time::sleep(wait).await;
            }
            let Ok(mut tunnel) = req.accept() else {
                return;
            };
            match behaviour {
                Behaviour::Send(n) if req_port == 8000 => {
                    let chunk = vec![7u8; 64 * 1024];
                    let mut left = n;
                    while left > 0 {
                        let m = left.min(chunk.len());
                        if tunnel.write_all(&chunk[..m]).await.is_err() {
                            return;
                        }
                        left -= m;
                    }
                    let mut sink = [0u8; 1024];
                    while matches!(tunnel.read(&mut sink).await, Ok(n) if n > 0) {}
                }
                _ => {
                    let (mut rd, mut wr) = tokio::io::split(&mut tunnel);
                    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                        let _ = wr.shutdown().await;
                    }
                }
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = server.serve(listener).await;
    });
    Target {
        addr,
        stats,
        pki,
        task,
    }
}

/// One echo round trip through `target` from a well-behaved client on another thread; how long
/// the tunnel took to open and echo. Panics if it fails or takes over 10 s.
pub async fn legit_round_trip(target: &Target) -> Duration {
    let addr = target.addr;
    let tls = target.pki.client_config();
    elsewhere(move || async move {
        let started = Instant::now();
        let pool = Pool::new(Config::default(), StaticTls(tls));
        let authority: hbone::Authority = "10.0.0.1:80".parse().unwrap();
        let exchange = async {
            let mut t = pool
                .connect("legit", addr, &authority, HeaderMap::new())
                .await
                .expect("a legitimate tunnel");
            t.write_all(b"still serving").await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = Vec::new();
            t.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"still serving");
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("a legitimate tunnel within 10 s");
        started.elapsed()
    })
    .await
}

/// Connects to `target` from another thread with a valid client certificate, sends what
/// `script` makes there (after the preface and SETTINGS), and listens until the server closes the
/// connection or says nothing for 2 s; what it heard.
pub async fn hear(
    target: &Target,
    script: impl FnOnce() -> Vec<u8> + Send + 'static,
) -> raw::Heard {
    let (addr, tls) = (target.addr, target.pki.client_config());
    elsewhere(move || async move {
        let mut c = raw::RawH2::connect(addr, tls).await;
        c.send(&script()).await;
        c.listen(Duration::from_secs(2)).await
    })
    .await
}

/// Mebibytes, for messages.
pub fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
