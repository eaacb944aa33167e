//! HBONE benchmarks on loopback, each reported as a ratio against plain TCP measured in the same run.
//!
//! Run with `cargo bench -p hbone` (add `-- --secs N` to change the length of each throughput and
//! rate measurement, default 3). Three paths are measured:
//! - `tcp`: a plain TCP client talking to a plain TCP server;
//! - `tunnel`: a `Tunnel` from a `Pool` talking to a handler of an hbone `Server`, in process;
//! - `proxy pair`: what a mesh does: TCP client -> outbound proxy (accept, `Pool::connect`,
//!   `copy_tunnel_bidirectional`) -> HBONE -> inbound proxy (`Server`, TCP connect,
//!   `copy_tunnel_bidirectional`)
//!   -> TCP server. This is the path to compare with a pair of Istio ztunnels.
//!
//! Everything runs in one process on one Tokio multi-thread runtime, so on a 2-core machine the
//! proxy pair competes with the client and server for the same cores, as it would on a node.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hbone::{Authority, Config, InboundConnect, Pool, Server, StaticTls};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type BenchPool = Pool<u8, StaticTls>;

/// What the server end of a path does with each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Read to EOF, discarding, then close.
    Sink,
    /// Echo every 1 KiB message back.
    Echo1k,
    /// Read 1 byte, write 1 byte, read to EOF, close.
    Ping,
    /// Hold the connection open until EOF.
    Hold,
}

async fn serve_behaviour<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, behaviour: Behaviour) {
    match behaviour {
        Behaviour::Sink => {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = s.shutdown().await;
        }
        Behaviour::Echo1k => {
            let mut buf = [0u8; 1024];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
        Behaviour::Ping => {
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                let _ = s.shutdown().await;
            }
        }
        Behaviour::Hold => {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
    }
}

/// A plain TCP server with the given behaviour.
async fn tcp_server(behaviour: Behaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve_behaviour(s, behaviour));
        }
    });
    addr
}

/// An hbone server whose handler has the given behaviour itself (the `tunnel` path).
async fn hbone_endpoint(pki: &support::Pki, behaviour: Behaviour) -> SocketAddr {
    let server = Server::new(
        bench_config(),
        pki.server_config(),
        move |req: InboundConnect| async move {
            if let Ok(t) = req.accept() {
                serve_behaviour(t, behaviour).await;
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    addr
}

/// An inbound proxy: an hbone server that forwards each tunnel to its authority over TCP.
async fn inbound_proxy(pki: &support::Pki) -> SocketAddr {
    let server = Server::new(
        bench_config(),
        pki.server_config(),
        |req: InboundConnect| async move {
            let Some(dst) = req.authority().socket_addr() else {
                return;
            };
            let Ok(mut upstream) = TcpStream::connect(dst).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            if let Ok(mut t) = req.accept() {
                let _ = hbone::copy_tunnel_bidirectional(&mut t, &mut upstream).await;
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    addr
}

/// An outbound proxy: accepts TCP and tunnels each connection to `dst` through `hbone_addr`.
async fn outbound_proxy(pool: BenchPool, hbone_addr: SocketAddr, dst: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let authority = Authority::from(dst);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let pool = pool.clone();
            let authority = authority.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = pool
                    .connect(0, hbone_addr, &authority, HeaderMap::new())
                    .await
                {
                    let _ = hbone::copy_tunnel_bidirectional(&mut t, &mut s).await;
                }
            });
        }
    });
    addr
}

/// A bare TLS 1.3 server (no HTTP/2) with the given behaviour: the floor cost of userspace TLS.
async fn tls_server(pki: &support::Pki, behaviour: Behaviour) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    serve_behaviour(tls, behaviour).await;
                }
            });
        }
    });
    addr
}

/// How a client opens a connection on one path.
#[derive(Clone)]
enum Path {
    Tcp(SocketAddr),
    Tls {
        config: Arc<rustls::ClientConfig>,
        server: SocketAddr,
    },
    Tunnel {
        pool: BenchPool,
        server: SocketAddr,
    },
    ProxyPair(SocketAddr),
}

enum Conn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Tunnel(hbone::Tunnel),
}

impl Path {
    async fn open(&self) -> Conn {
        match self {
            Path::Tcp(addr) | Path::ProxyPair(addr) => {
                let s = TcpStream::connect(addr).await.unwrap();
                s.set_nodelay(true).unwrap();
                Conn::Tcp(s)
            }
            Path::Tls { config, server } => {
                let s = TcpStream::connect(server).await.unwrap();
                s.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, s)
                    .await
                    .unwrap();
                Conn::Tls(Box::new(tls))
            }
            Path::Tunnel { pool, server } => {
                let authority: Authority = "10.0.0.1:80".parse().unwrap();
                Conn::Tunnel(
                    pool.connect(0, *server, &authority, HeaderMap::new())
                        .await
                        .unwrap(),
                )
            }
        }
    }
}

macro_rules! with_conn {
    ($conn:expr, $s:ident => $body:expr) => {
        match $conn {
            Conn::Tcp(mut $s) => $body,
            Conn::Tls(mut $s) => $body,
            Conn::Tunnel(mut $s) => $body,
        }
    };
}

/// Three paths built for one server behaviour.
struct Paths {
    tcp: Path,
    tls: Path,
    tunnel: Path,
    proxy: Path,
}

async fn paths(pki: &support::Pki, behaviour: Behaviour) -> Paths {
    let tcp_addr = tcp_server(behaviour).await;
    let endpoint = hbone_endpoint(pki, behaviour).await;
    let inbound = inbound_proxy(pki).await;
    let pool_for = || Pool::new(bench_config(), StaticTls(pki.client_config()));
    let outbound = outbound_proxy(pool_for(), inbound, tcp_addr).await;
    Paths {
        tcp: Path::Tcp(tcp_addr),
        tls: Path::Tls {
            config: pki.client_config(),
            server: tls_server(pki, behaviour).await,
        },
        tunnel: Path::Tunnel {
            pool: pool_for(),
            server: endpoint,
        },
        proxy: Path::ProxyPair(outbound),
    }
}

/// Bulk throughput with `streams` concurrent connections: (bytes per second, cores busy).
async fn throughput(path: &Path, streams: usize, secs: f64) -> (f64, f64) {
    let total = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let path = path.clone();
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            let conn = path.open().await;
            with_conn!(conn, s => {
                let chunk = vec![0xA5u8; 256 * 1024];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&chunk).await.unwrap();
                    sent += chunk.len() as u64;
                }
                s.shutdown().await.unwrap();
                // The server closes after reading everything: all bytes have arrived.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                total.fetch_add(sent, Ordering::Relaxed);
            })
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cores = (cpu_seconds() - cpu_before) / elapsed;
    (total.load(Ordering::Relaxed) as f64 / elapsed, cores)
}

/// 1 KiB request/response round trips on one connection: (p50, p99) in microseconds.
async fn latency(path: &Path, rounds: usize) -> (f64, f64) {
    let conn = path.open().await;
    with_conn!(conn, s => {
        let msg = [7u8; 1024];
        let mut back = [0u8; 1024];
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds + 500 {
            let t = Instant::now();
            s.write_all(&msg).await.unwrap();
            s.read_exact(&mut back).await.unwrap();
            if i >= 500 {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
        (pct(0.50), pct(0.99))
    })
}

/// New connections per second, each doing a 1-byte exchange, from `workers` loops.
async fn connection_rate(path: &Path, workers: usize, secs: f64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let path = path.clone();
        let count = count.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let conn = path.open().await;
                with_conn!(conn, s => {
                    s.write_all(b"x").await.unwrap();
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.unwrap();
                    s.shutdown().await.unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                });
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The configuration under test: defaults, overridden by `--frame`, `--window`.
fn bench_config() -> Config {
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.parse::<u32>().ok())
                .expect("a number")
        };
        match arg.as_str() {
            "--read-buffer" => config.read_buffer = value() as usize,
            "--frame" => config.max_frame_size = value(),
            "--window" => config.stream_window = value(),
            "--send-buffer" => config.max_send_buffer = value() as usize,
            _ => {}
        }
    }
    config
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Opens `n` idle connections on `path` and returns the RSS growth per connection, in bytes.
async fn memory_per_idle(path: &Path, n: usize) -> f64 {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    let mut held = Vec::with_capacity(n);
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..n {
        let path = path.clone();
        opening.spawn(async move { path.open().await });
        if opening.len() >= 256 {
            held.push(opening.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(c) = opening.join_next().await {
        held.push(c.unwrap());
    }
    // Let the far ends settle (handler tasks started, buffers allocated).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    (after.saturating_sub(before)) as f64 / n as f64
}

fn gbits(bps: f64) -> String {
    format!("{:.2} Gbit/s", bps * 8.0 / 1e9)
}

fn main() {
    let mut secs = 3.0;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--secs" => {
                secs = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--secs takes a number");
            }
            "--only" => only = args.next(),
            _ => {}
        }
    }
    let run = move |name: &str| only.as_deref().is_none_or(|o| o == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pki = support::Pki::new();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        println!("hbone benchmark: loopback, {cores} cores, {secs} s per throughput/rate measurement\n");
        println!("| measurement | plain TCP | tunnel (in-process ends) | ratio | proxy pair (TCP->HBONE->TCP) | ratio |");
        println!("|---|---|---|---|---|---|");

        let sink = paths(&pki, Behaviour::Sink).await;
        let mut tls_lines = Vec::new();
        for streams in [1usize, 8] {
            if !run("throughput") {
                break;
            }
            let tcp = throughput(&sink.tcp, streams, secs).await;
            if std::env::var_os("HBONE_BENCH_PROFILE").is_some() {
                // Profiling aid: only the tunnel path, for a clean perf/strace picture.
                let (tunnel, cores) = throughput(&sink.tunnel, streams, secs).await;
                println!("profile: tunnel {streams} stream(s) {} ({cores:.2} cores)", gbits(tunnel));
                continue;
            }
            let (tunnel, tunnel_cores) = throughput(&sink.tunnel, streams, secs).await;
            let (proxy, proxy_cores) = throughput(&sink.proxy, streams, secs).await;
            let (tcp, tcp_cores) = tcp;
            let (tls, tls_cores) = throughput(&sink.tls, streams, secs).await;
            tls_lines.push(format!(
                "| bulk throughput, {streams} stream(s), bare TLS 1.3 without HTTP/2 (reference) | {} ({tcp_cores:.2}) | {} ({tls_cores:.2}) | {:.2}x | | |",
                gbits(tcp), gbits(tls), tls / tcp
            ));
            println!(
                "| bulk throughput, {streams} stream(s) (CPU cores busy) | {} ({tcp_cores:.2}) | {} ({tunnel_cores:.2}) | {:.2}x | {} ({proxy_cores:.2}) | {:.2}x |",
                gbits(tcp), gbits(tunnel), tunnel / tcp, gbits(proxy), proxy / tcp
            );
        }

        for line in tls_lines {
            println!("{line}");
        }
        if run("latency") {
        let echo = paths(&pki, Behaviour::Echo1k).await;
        let rounds = 20_000;
        let (tcp50, tcp99) = latency(&echo.tcp, rounds).await;
        let (tun50, tun99) = latency(&echo.tunnel, rounds).await;
        let (px50, px99) = latency(&echo.proxy, rounds).await;
        println!(
            "| 1 KiB round trip p50 | {tcp50:.1} us | {tun50:.1} us | +{:.1} us | {px50:.1} us | +{:.1} us |",
            tun50 - tcp50, px50 - tcp50
        );
        println!(
            "| 1 KiB round trip p99 | {tcp99:.1} us | {tun99:.1} us | +{:.1} us | {px99:.1} us | +{:.1} us |",
            tun99 - tcp99, px99 - tcp99
        );
        }
        if run("rate") {
        let ping = paths(&pki, Behaviour::Ping).await;
        let workers = 16;
        let tcp = connection_rate(&ping.tcp, workers, secs).await;
        let tunnel = connection_rate(&ping.tunnel, workers, secs).await;
        let proxy = connection_rate(&ping.proxy, workers, secs).await;
        println!(
            "| new connections/s ({workers} loops, warm pool) | {tcp:.0} | {tunnel:.0} | {:.2}x | {proxy:.0} | {:.2}x |",
            tunnel / tcp, proxy / tcp
        );
        }
        if !run("memory") {
            return;
        }
        let hold = paths(&pki, Behaviour::Hold).await;
        // Plain TCP needs two descriptors per connection in this process; stay under the limit.
        let tcp = memory_per_idle(&hold.tcp, 5_000).await;
        let tunnel = memory_per_idle(&hold.tunnel, 10_000).await;
        let proxy = memory_per_idle(&hold.proxy, 4_000).await;
        println!(
            "| RSS per idle connection, both ends (TCP: 5,000; tunnel: 10,000; proxy pair: 4,000) | {:.1} KiB | {:.1} KiB | {:.2}x | {:.1} KiB | {:.2}x |",
            tcp / 1024.0, tunnel / 1024.0, tunnel / tcp, proxy / 1024.0, proxy / tcp
        );
    });
}
