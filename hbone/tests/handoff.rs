//! A server's live connections, tunnels and all, handed to another server (another process in a
//! proxy upgrade; two servers of one process here) while their bytes flow: the client and the
//! application see every byte once, in order, and no reset.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hbone::handoff::{
    Copied, HandOff, PlainMover, copy_movable, copy_tunnel_movable, traffic_secret_log,
};
use hbone::{Config, InboundConnect, Server};
use http::HeaderMap;
use support::{Pki, authority, pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Socket buffers of the application's connections: small, so that a stalled flow backs up
/// into the copies instead of into the kernel.
const APP_BUFFER: u32 = 32 * 1024;

/// The application: echoes each connection's bytes and its end.
async fn echo_app() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(APP_BUFFER).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                tokio::io::copy(&mut rd, &mut wr).await.unwrap();
                wr.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// How the handlers' copies ended.
#[derive(Default)]
struct Ends {
    done: AtomicUsize,
    moved: AtomicUsize,
    failed: AtomicUsize,
}

/// How a copy ended, counted in `ends`.
fn count(ends: &Ends, copied: &Result<Copied, hbone::CopyError>) {
    let counter = match copied {
        Ok(Copied::Done(_)) => &ends.done,
        Ok(Copied::Moved(_)) => &ends.moved,
        Err(_) => &ends.failed,
    };
    counter.fetch_add(1, Ordering::SeqCst);
}

/// Goes on with an adopted tunnel's copy in a task, counting how it ended in `ends`.
fn resume_copy(
    adopted: hbone::handoff::AdoptedTunnel,
    ends: Arc<Ends>,
) -> tokio::task::JoinHandle<Result<Copied, hbone::CopyError>> {
    tokio::spawn(async move {
        let mut tunnel = adopted.tunnel;
        let mut app = TcpStream::from_std(adopted.app).unwrap();
        let copied =
            copy_tunnel_movable(&mut tunnel, &mut app, adopted.memo, Some(adopted.copy)).await;
        count(&ends, &copied);
        copied
    })
}

/// Checks that, when the copies stopped, some held bytes for the app and some held bytes from
/// it (each `(to the app, from the app)`).
fn held_both_ways(held: &[(usize, usize)]) {
    assert!(
        held.iter().any(|(to, _)| *to > 0),
        "no copy held bytes for the app (to, from): {held:?}"
    );
    assert!(
        held.iter().any(|(_, from)| *from > 0),
        "no copy held bytes from the app (to, from): {held:?}"
    );
}

/// Waits for resumed copies, each of which must end cleanly.
async fn all_done(resumed: Vec<tokio::task::JoinHandle<Result<Copied, hbone::CopyError>>>) {
    for copy in resumed {
        let copied = copy.await.unwrap();
        assert!(matches!(copied, Ok(Copied::Done(_))), "{copied:?}");
    }
}

/// Opens a new tunnel of key `k` on `pool` to the echo server at `addr`, and checks that
/// `message` comes back.
async fn echo_once(
    pool: &hbone::Pool<&'static str, hbone::StaticTls>,
    addr: SocketAddr,
    message: &[u8],
) {
    let mut fresh = pool
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    fresh.write_all(message).await.unwrap();
    fresh.shutdown().await.unwrap();
    let mut back = Vec::new();
    fresh.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, message);
}

/// A server whose handler joins each CONNECT to the app with a movable copy.
fn server(pki: &Pki, app: SocketAddr, ends: Arc<Ends>) -> Server<impl hbone::ConnectHandler> {
    let mut tls = (*pki.server_config()).clone();
    tls.key_log = traffic_secret_log();
    let mut config = Config::default();
    config.movable = true;
    Server::new(config, tls, move |req: InboundConnect| {
        let ends = ends.clone();
        async move {
            let memo = format!("from {}", req.peer_addr()).into_bytes();
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_send_buffer_size(APP_BUFFER).unwrap();
            let mut app = socket.connect(app).await.unwrap();
            let mut tunnel = req.accept().unwrap();
            let copied = copy_tunnel_movable(&mut tunnel, &mut app, memo, None).await;
            count(&ends, &copied);
        }
    })
}

/// Clients that each write a deterministic stream and check every byte of its echo, and
/// what they have done so far.
struct Load {
    /// Bytes each client has had echoed.
    echoed: Arc<Vec<AtomicU64>>,
    /// Bytes all clients have written.
    written: Arc<AtomicU64>,
    /// Whether the writers should end their streams.
    stopping: Arc<AtomicBool>,
    /// Whether the readers read (while they do not, the writers write as much as the windows
    /// and buffers on the way take).
    reading: tokio::sync::watch::Sender<bool>,
    clients: Vec<(tokio::task::JoinHandle<u64>, tokio::task::JoinHandle<u64>)>,
}

impl Load {
    fn new(clients: usize) -> Load {
        Load {
            echoed: Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect()),
            written: Arc::default(),
            stopping: Arc::default(),
            reading: tokio::sync::watch::channel(true).0,
            clients: Vec::new(),
        }
    }

    /// Client `n` writes on `wr` and reads its echo from `rd`.
    fn add<R, W>(&mut self, mut rd: R, mut wr: W)
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let n = self.clients.len();
        let (echoes, written) = (self.echoed.clone(), self.written.clone());
        let (stopping, gate) = (self.stopping.clone(), self.reading.subscribe());
        let writer = tokio::spawn(async move {
            let mut sent = 0u64;
            while !stopping.load(Ordering::SeqCst) {
                let chunk: Vec<u8> = (sent..sent + 3000).map(|at| byte(n, at)).collect();
                wr.write_all(&chunk).await.unwrap();
                sent += chunk.len() as u64;
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                // Not far ahead of the echo while it is read.
                while *gate.borrow() && sent - echoes[n].load(Ordering::SeqCst) > 200_000 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            wr.shutdown().await.unwrap();
            sent
        });
        let (echoed, mut gate) = (self.echoed.clone(), self.reading.subscribe());
        let reader = tokio::spawn(async move {
            let mut at = 0u64;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                gate.wait_for(|reading| *reading).await.unwrap();
                let got = rd
                    .read(&mut buf)
                    .await
                    .unwrap_or_else(|e| panic!("client {n} after {at} bytes: {e}"));
                if got == 0 {
                    return at;
                }
                for &b in &buf[..got] {
                    assert_eq!(b, byte(n, at), "client {n}: byte {at} changed");
                    at += 1;
                }
                echoed[n].store(at, Ordering::SeqCst);
            }
        });
        self.clients.push((writer, reader));
    }

    /// Waits until every client has had `least` bytes echoed.
    async fn echoed_at_least(&self, least: u64) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.echoed.iter().any(|e| e.load(Ordering::SeqCst) < least) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the clients stalled");
    }

    /// Waits until every client has had a further `more` bytes echoed (beyond the most any had).
    async fn echoed_more(&self, more: u64) {
        let most = self
            .echoed
            .iter()
            .map(|e| e.load(Ordering::SeqCst))
            .max()
            .unwrap();
        self.echoed_at_least(most + more).await;
    }

    /// Stops the readers and waits until the writers have written nothing for a while: every
    /// window and buffer on the way is full.
    async fn stall(&self) {
        self.reading.send_replace(false);
        let mut last = self.written.load(Ordering::SeqCst);
        let mut still = 0;
        tokio::time::timeout(Duration::from_secs(20), async {
            while still < 5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = self.written.load(Ordering::SeqCst);
                still = if now == last { still + 1 } else { 0 };
                last = now;
            }
        })
        .await
        .expect("the writers never stalled");
    }

    /// Lets the readers read again.
    fn read(&self) {
        self.reading.send_replace(true);
    }

    /// Ends every client's stream and checks that each had all of it echoed.
    async fn finish(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (n, (writer, reader)) in self.clients.into_iter().enumerate() {
            let sent = writer.await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(20), reader)
                .await
                .unwrap_or_else(|_| panic!("client {n} did not end"))
                .unwrap();
            assert_eq!(got, sent, "client {n}: sent {sent}, echoed {got}");
        }
    }
}

/// A connection from a client application to `front` (small socket buffers, so a stalled flow
/// backs up into the copies): the client's end and the accepted one.
async fn app_pair(front: &TcpListener) -> (TcpStream, TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(APP_BUFFER).unwrap();
    socket.set_send_buffer_size(APP_BUFFER).unwrap();
    let client = socket.connect(front.local_addr().unwrap()).await.unwrap();
    let (accepted, _) = front.accept().await.unwrap();
    (client, accepted)
}

/// The byte at `at` of tunnel `n`'s stream.
fn byte(n: usize, at: u64) -> u8 {
    ((at + n as u64 * 7) % 251) as u8
}

/// A server (see [`server`]) of the echo app, serving on a port of its own, whose address this
/// returns.
async fn echo_server(pki: &Pki, ends: Arc<Ends>) -> SocketAddr {
    let server = server(pki, echo_app().await, ends);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    addr
}

/// Hands every connection of `from` to `to`, which goes on with each tunnel's copy; checks that
/// nothing stayed and that `from`'s copies all ended as moved. Returns the moved connections'
/// tunnel states (for the test to see what was in flight) and the resumed copies.
async fn move_all<H: hbone::ConnectHandler>(
    from: &Server<H>,
    from_ends: &Ends,
    to: &Server<H>,
    to_ends: &Arc<Ends>,
    tunnels: usize,
) -> (
    Vec<hbone::handoff::CopyState>,
    Vec<tokio::task::JoinHandle<Result<Copied, hbone::CopyError>>>,
) {
    let moved_before = from_ends.moved.load(Ordering::SeqCst);
    let HandOff { moved, stayed } = from.hand_off(Duration::from_secs(5)).await;
    assert!(stayed.is_empty(), "connections stayed: {stayed:?}");
    assert_eq!(moved.len(), 1, "the pool's one connection");
    let mut states = Vec::new();
    let mut resumed = Vec::new();
    for connection in moved {
        assert_eq!(connection.tunnels.len(), tunnels);
        for adopted in to.adopt(connection).unwrap() {
            assert!(
                String::from_utf8_lossy(&adopted.memo).starts_with("from 127.0.0.1:"),
                "the memo came along: {:?}",
                adopted.memo
            );
            states.push(adopted.copy.clone());
            resumed.push(resume_copy(adopted, to_ends.clone()));
        }
    }
    // Each old copy handed over, then ended (its task may finish just after the handoff).
    tokio::time::timeout(Duration::from_secs(5), async {
        while from_ends.moved.load(Ordering::SeqCst) < moved_before + tunnels {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the old copies did not end as moved");
    (states, resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tunnels_move_to_another_server_and_on_to_a_third_without_a_byte_lost_or_a_reset() {
    // A lost or changed byte stops a reader, which stops its writer: fail, do not hang.
    tokio::time::timeout(Duration::from_secs(60), two_moves())
        .await
        .expect("the tunnels did not finish");
}

async fn two_moves() {
    const TUNNELS: usize = 6;
    let pki = Pki::new();
    let app = echo_app().await;
    let ends: Vec<Arc<Ends>> = (0..3).map(|_| Arc::new(Ends::default())).collect();
    let servers: Vec<_> = ends.iter().map(|e| server(&pki, app, e.clone())).collect();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = servers[0].clone();
    tokio::spawn(async move { serving.serve(listener).await });

    let pool = Arc::new(pool(&pki, Config::default()));
    let mut load = Load::new(TUNNELS);
    for _ in 0..TUNNELS {
        let tunnel = pool
            .connect("k", addr, &authority(), HeaderMap::new())
            .await
            .unwrap();
        let (rd, wr) = tokio::io::split(tunnel);
        load.add(rd, wr);
    }
    load.echoed_at_least(300_000).await;

    // First move: while bytes flow both ways.
    let (_, first) = move_all(&servers[0], &ends[0], &servers[1], &ends[1], TUNNELS).await;
    load.echoed_more(300_000).await;

    // Second move, of the adopted connection: with every buffer on the way full, so bytes sit
    // in the copies (read from one side, not yet written to the other) when they stop.
    load.stall().await;
    let (states, resumed) = move_all(&servers[1], &ends[1], &servers[2], &ends[2], TUNNELS).await;
    for copy in first {
        assert!(matches!(copy.await.unwrap(), Ok(Copied::Moved(_))));
    }
    let held: Vec<(usize, usize)> = states
        .iter()
        .map(|s| (s.to_app.len(), s.from_app.len()))
        .collect();
    held_both_ways(&held);
    load.read();
    load.echoed_more(300_000).await;

    // A new tunnel on the same (moved) connection is the last server's.
    echo_once(&pool, addr, b"after the moves").await;
    assert_eq!(pool.connection_count(), 1, "the client dialed again");

    load.finish().await;
    all_done(resumed).await;
    assert_eq!(ends[2].done.load(Ordering::SeqCst), TUNNELS + 1);
    for (n, e) in ends.iter().enumerate() {
        assert_eq!(
            e.failed.load(Ordering::SeqCst),
            0,
            "server {n}'s copies failed"
        );
    }
    assert_eq!(ends[0].done.load(Ordering::SeqCst), 0);
    assert_eq!(ends[1].done.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_a_tunnel_that_cannot_pause_stays_and_every_tunnel_goes_on() {
    let pki = Pki::new();
    let app = echo_app().await;
    let mut tls = (*pki.server_config()).clone();
    tls.key_log = traffic_secret_log();
    let mut config = Config::default();
    config.movable = true;
    // Port 1's tunnels are copied the ordinary way, which a move cannot stop.
    let server = Server::new(config, tls, move |req: InboundConnect| async move {
        let plain = req.authority().port() == 1;
        let mut app = TcpStream::connect(app).await.unwrap();
        let mut tunnel = req.accept().unwrap();
        if plain {
            let _ = hbone::copy_tunnel_bidirectional(&mut tunnel, &mut app).await;
        } else {
            let copied = copy_tunnel_movable(&mut tunnel, &mut app, Vec::new(), None).await;
            assert!(matches!(copied, Ok(Copied::Done(_))), "{copied:?}");
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    let pool = pool(&pki, Config::default());
    let mut tunnels = Vec::new();
    for authority in ["10.0.0.1:8080", "10.0.0.1:1"] {
        let authority = authority.parse().unwrap();
        let mut tunnel = pool
            .connect("k", addr, &authority, HeaderMap::new())
            .await
            .unwrap();
        let mut back = [0u8; 6];
        tunnel.write_all(b"before").await.unwrap();
        tunnel.read_exact(&mut back).await.unwrap();
        tunnels.push(tunnel);
    }

    let HandOff { moved, stayed } = server.hand_off(Duration::from_millis(300)).await;
    assert!(moved.is_empty());
    assert_eq!(stayed.len(), 1);
    assert!(stayed[0].1.contains("did not pause"), "{:?}", stayed[0].1);

    for mut tunnel in tunnels {
        tunnel.write_all(b"after").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut back))
            .await
            .expect("a tunnel stalled after the move was given up")
            .unwrap();
        assert_eq!(back, b"after");
    }
}

/// A pool whose connections can move: movable, its TLS logging the traffic secrets to us.
fn movable_pool(pki: &Pki) -> hbone::Pool<&'static str, hbone::StaticTls> {
    let mut tls = (*pki.client_config()).clone();
    tls.key_log = traffic_secret_log();
    let mut config = Config::default();
    config.movable = true;
    hbone::Pool::new(config, hbone::StaticTls(Arc::new(tls)))
}

/// Joins `app` to a tunnel of `pool` (to the server at `addr`) with a movable copy, counting
/// how the copy ended in `ends`.
async fn client_side_copy(
    pool: &hbone::Pool<&'static str, hbone::StaticTls>,
    addr: SocketAddr,
    mut app: TcpStream,
    ends: Arc<Ends>,
) -> tokio::task::JoinHandle<()> {
    let mut tunnel = pool
        .connect("k", addr, &authority(), HeaderMap::new())
        .await
        .unwrap();
    tokio::spawn(async move {
        let memo = b"outbound".to_vec();
        let copied = copy_tunnel_movable(&mut tunnel, &mut app, memo, None).await;
        count(&ends, &copied);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_live_tunnels_move_to_another_pool_which_goes_on_using_the_connection() {
    tokio::time::timeout(Duration::from_secs(60), client_move())
        .await
        .expect("the tunnels did not finish");
}

async fn client_move() {
    const TUNNELS: usize = 5;
    let pki = Pki::new();
    let server_ends = Arc::new(Ends::default());
    let addr = echo_server(&pki, server_ends.clone()).await;

    // The client applications' connections arrive here, as at a proxy's outbound listener.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (old_pool, new_pool) = (movable_pool(&pki), movable_pool(&pki));
    let (old_ends, new_ends) = (Arc::new(Ends::default()), Arc::new(Ends::default()));
    let mut load = Load::new(TUNNELS);
    let mut old_copies = Vec::new();
    for _ in 0..TUNNELS {
        let (client, accepted) = app_pair(&front).await;
        old_copies.push(client_side_copy(&old_pool, addr, accepted, old_ends.clone()).await);
        let (rd, wr) = client.into_split();
        load.add(rd, wr);
    }
    load.echoed_at_least(300_000).await;

    // The move, with every buffer on the way full (the clients do not read), so bytes sit in
    // the copies when they stop.
    load.stall().await;
    let handed = old_pool.hand_off(Duration::from_secs(5)).await;
    assert!(handed.stayed.is_empty(), "stayed: {:?}", handed.stayed);
    assert_eq!(handed.moved.len(), 1, "the pool's one connection");
    assert_eq!(
        old_pool.connection_count(),
        0,
        "the old pool still holds it"
    );
    let mut held = Vec::new();
    let mut resumed = Vec::new();
    for moved in handed.moved {
        assert_eq!(moved.key, "k");
        assert_eq!(moved.connection.tunnels.len(), TUNNELS);
        for adopted in new_pool.adopt(moved.key, moved.connection).unwrap() {
            assert_eq!(adopted.memo, b"outbound");
            assert_eq!(adopted.peer_addr, addr);
            held.push((adopted.copy.to_app.len(), adopted.copy.from_app.len()));
            resumed.push(resume_copy(adopted, new_ends.clone()));
        }
    }
    for copy in old_copies {
        copy.await.unwrap();
    }
    assert_eq!(old_ends.moved.load(Ordering::SeqCst), TUNNELS);
    held_both_ways(&held);
    load.read();
    load.echoed_more(300_000).await;

    // A new tunnel of the key rides the adopted connection: no second dial.
    echo_once(&new_pool, addr, b"after the move").await;
    assert_eq!(new_pool.connection_count(), 1, "the new pool dialed again");

    load.finish().await;
    all_done(resumed).await;
    assert_eq!(new_ends.done.load(Ordering::SeqCst), TUNNELS);
    assert_eq!(new_ends.failed.load(Ordering::SeqCst), 0);
    assert_eq!(old_ends.failed.load(Ordering::SeqCst), 0);
    // The server's side never knew: every tunnel, and the fresh one, ended there cleanly.
    assert_eq!(server_ends.done.load(Ordering::SeqCst), TUNNELS + 1);
    assert_eq!(server_ends.failed.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_copies_move_to_another_task_with_the_bytes_they_held() {
    tokio::time::timeout(Duration::from_secs(60), plain_move())
        .await
        .expect("the copies did not finish");
}

async fn plain_move() {
    const COPIES: usize = 4;
    let app = echo_app().await;
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (old_ends, new_ends) = (Arc::new(Ends::default()), Arc::new(Ends::default()));
    let mut load = Load::new(COPIES);
    let mut copies = Vec::new();
    for _ in 0..COPIES {
        let (client, mut accepted) = app_pair(&front).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(APP_BUFFER).unwrap();
        let mut upstream = socket.connect(app).await.unwrap();
        let mover = PlainMover::new();
        let (copying, ends) = (mover.clone(), old_ends.clone());
        let task = tokio::spawn(async move {
            let memo = b"plain".to_vec();
            let copied = copy_movable(&mut accepted, &mut upstream, &copying, memo, None).await;
            count(&ends, &copied);
        });
        copies.push((mover, task));
        let (rd, wr) = client.into_split();
        load.add(rd, wr);
    }
    load.echoed_at_least(300_000).await;

    // Every buffer on the way full, so the copies hold bytes both ways when they stop.
    load.stall().await;
    let mut held = Vec::new();
    let mut resumed = Vec::new();
    for (mover, task) in copies {
        let moved = mover.hand_off(Duration::from_secs(5)).await.unwrap();
        task.await.unwrap();
        assert_eq!(moved.memo, b"plain");
        held.push((moved.copy.to_app.len(), moved.copy.from_app.len()));
        // Moved already: a second move finds nothing to take.
        assert!(mover.hand_off(Duration::from_millis(100)).await.is_err());
        let ends = new_ends.clone();
        resumed.push(tokio::spawn(async move {
            let mut a = TcpStream::from_std(std::net::TcpStream::from(moved.a)).unwrap();
            let mut b = TcpStream::from_std(std::net::TcpStream::from(moved.b)).unwrap();
            let again = PlainMover::new();
            let copied = copy_movable(&mut a, &mut b, &again, moved.memo, Some(moved.copy)).await;
            count(&ends, &copied);
        }));
    }
    assert_eq!(old_ends.moved.load(Ordering::SeqCst), COPIES);
    held_both_ways(&held);
    load.read();
    load.echoed_more(300_000).await;
    load.finish().await;
    for copy in resumed {
        copy.await.unwrap();
    }
    assert_eq!(new_ends.done.load(Ordering::SeqCst), COPIES);
    assert_eq!(new_ends.failed.load(Ordering::SeqCst), 0);
    assert_eq!(old_ends.failed.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_pooled_connection_closes_when_idle_like_any_other() {
    let pki = Pki::new();
    let addr = echo_server(&pki, Arc::default()).await;
    let mut tls = (*pki.client_config()).clone();
    tls.key_log = traffic_secret_log();
    let mut config = Config::default();
    config.movable = true;
    config.idle_timeout = Duration::from_millis(300);
    let tls = hbone::StaticTls(Arc::new(tls));
    let (old_pool, mid_pool, new_pool) = (
        hbone::Pool::new(config.clone(), tls.clone()),
        hbone::Pool::new(config.clone(), tls.clone()),
        hbone::Pool::new(config, tls),
    );
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut client, accepted) = app_pair(&front).await;
    let old_copy = client_side_copy(&old_pool, addr, accepted, Arc::default()).await;
    client.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).await.unwrap();

    let mut handed = old_pool.hand_off(Duration::from_secs(5)).await;
    let moved = handed.moved.pop().unwrap();
    old_copy.await.unwrap();
    // Moved twice, as a proxy restarted twice moves it.
    let adopted = mid_pool.adopt(moved.key, moved.connection).unwrap();
    let mid: Vec<_> = adopted
        .into_iter()
        .map(|a| resume_copy(a, Arc::default()))
        .collect();
    client.write_all(b"pong").await.unwrap();
    client.read_exact(&mut back).await.unwrap();
    let mut handed = mid_pool.hand_off(Duration::from_secs(5)).await;
    let moved = handed.moved.pop().unwrap();
    for m in mid {
        assert!(matches!(m.await.unwrap(), Ok(Copied::Moved(_))));
    }
    assert_eq!(mid_pool.connection_count(), 0);
    let adopted = new_pool.adopt(moved.key, moved.connection).unwrap();
    let resumed: Vec<_> = adopted
        .into_iter()
        .map(|a| resume_copy(a, Arc::default()))
        .collect();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    all_done(resumed).await;
    assert_eq!(new_pool.connection_count(), 1);
    // No tunnel left on it: closed after the idle timeout, as a connection dialed here would be.
    until("the adopted connection to go idle", || {
        new_pool.connection_count() == 0
    })
    .await;
}

/// Waits (5 s at most) until `done` holds, else fails naming `what`.
async fn until(what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("waited 5 s for {what}"));
}

/// A movable pool whose connections carry at most `streams` tunnels each and stay 10 minutes
/// idle (longer than any test waits).
fn long_lived_pool(pki: &Pki, streams: u32) -> hbone::Pool<&'static str, hbone::StaticTls> {
    let mut tls = (*pki.client_config()).clone();
    tls.key_log = traffic_secret_log();
    let mut config = Config::default();
    config.movable = true;
    config.max_concurrent_streams = streams;
    config.idle_timeout = Duration::from_secs(600);
    hbone::Pool::new(config, hbone::StaticTls(Arc::new(tls)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_connection_of_a_key_the_pool_already_serves_retires_with_its_last_tunnel() {
    let pki = Pki::new();
    let addr = echo_server(&pki, Arc::default()).await;
    // The old pool: one tunnel a connection, so two tunnels make two connections.
    let (old_pool, new_pool) = (long_lived_pool(&pki, 1), long_lived_pool(&pki, 100));
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut kept, accepted) = app_pair(&front).await;
    let kept_copy = client_side_copy(&old_pool, addr, accepted, Arc::default()).await;
    let (mut ended, accepted) = app_pair(&front).await;
    let ended_copy = client_side_copy(&old_pool, addr, accepted, Arc::default()).await;
    assert_eq!(old_pool.connection_count(), 2);
    ended.write_all(b"short").await.unwrap();
    ended.shutdown().await.unwrap();
    let mut back = Vec::new();
    ended.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"short");
    ended_copy.await.unwrap();
    // The new process dials its own connection of the key before the move, as a new proxy
    // serving beside the old one does.
    echo_once(&new_pool, addr, b"own").await;
    assert_eq!(new_pool.connection_count(), 1);

    let handed = old_pool.hand_off(Duration::from_secs(5)).await;
    assert!(handed.stayed.is_empty(), "stayed: {:?}", handed.stayed);
    assert_eq!(handed.moved.len(), 2);
    kept_copy.await.unwrap();
    let mut resumed = Vec::new();
    for moved in handed.moved {
        for adopted in new_pool.adopt(moved.key, moved.connection).unwrap() {
            resumed.push(resume_copy(adopted, Arc::default()));
        }
    }
    assert_eq!(resumed.len(), 1);
    // The adopted connection without a tunnel closes at once; the one with a tunnel lives as
    // long as its tunnel, which goes on; new tunnels ride the pool's own connection.
    until("the adopted connection without a tunnel to close", || {
        new_pool.connection_count() == 2
    })
    .await;
    kept.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    kept.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    echo_once(&new_pool, addr, b"fresh").await;
    assert_eq!(new_pool.connection_count(), 2);
    kept.shutdown().await.unwrap();
    let mut rest = Vec::new();
    kept.read_to_end(&mut rest).await.unwrap();
    all_done(resumed).await;
    until(
        "the adopted connection to close with its last tunnel",
        || new_pool.connection_count() == 1,
    )
    .await;
    echo_once(&new_pool, addr, b"after").await;
    assert_eq!(new_pool.connection_count(), 1, "the pool dialed again");
}
