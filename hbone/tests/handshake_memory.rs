//! A connection that has not finished its handshake costs little memory, and neither does an
//! established one that is idle: the large read buffer under TLS is taken only while bytes
//! arrive. Measured with a counting allocator (its own test binary; the tests take turns).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use hbone::{Config, Server};
use support::{Pki, echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The tests measure the whole process's allocations, so they must not overlap.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Live bytes in allocations of at least [`LARGE_FROM`] bytes (buffers, not bookkeeping).
static LARGE: AtomicIsize = AtomicIsize::new(0);
const LARGE_FROM: usize = 32 * 1024;

fn large(size: usize) -> isize {
    if size >= LARGE_FROM { size as isize } else { 0 }
}

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        LARGE.fetch_add(large(layout.size()), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LARGE.fetch_sub(large(layout.size()), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        LARGE.fetch_add(large(new_size) - large(layout.size()), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[tokio::test(flavor = "current_thread")]
async fn connections_waiting_for_a_handshake_hold_no_read_buffer() {
    let _turn = SERIAL.lock().await;
    let pki = Pki::new();
    let config = Config::default();
    let read_buffer = config.read_buffer;
    assert!(
        read_buffer >= 32 * 1024,
        "the test assumes a large read buffer"
    );
    let server = Server::new(config, pki.server_config(), echo);
    let peer = SocketAddr::from(([127, 0, 0, 1], 1));
    const N: usize = 200;
    let mut far_ends = Vec::new();
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..N {
        let (far, near) = tokio::io::duplex(4096);
        far_ends.push(far);
        let server = server.clone();
        tokio::spawn(async move { server.serve_io(near, peer, peer).await });
    }
    // Let every connection start its (never finishing) handshake.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let per_connection = (LIVE.load(Ordering::Relaxed) - before) / N as isize;
    assert!(
        per_connection < (read_buffer / 2) as isize,
        "{per_connection} bytes per connection waiting for its TLS handshake"
    );
    drop(far_ends);
}

#[tokio::test(flavor = "current_thread")]
async fn idle_established_connections_hold_no_read_buffer() {
    let _turn = SERIAL.lock().await;
    let pki = Pki::new();
    let read_buffer = Config::default().read_buffer;
    let server = Server::new(Config::default(), pki.server_config(), echo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    // One tunnel per connection, so that N tunnels make N connections.
    let mut config = Config::default();
    config.max_concurrent_streams = 1;
    let pool = hbone::Pool::new(config, hbone::StaticTls(pki.client_config()));
    // HTTP/2's own buffers are 16 KiB or less; a 64 KiB read buffer kept by an idle connection
    // (on either end) shows up here.
    let per_connection = growth_per_idle_tunnel(&pool, addr, 20, &LARGE).await;
    assert!(
        per_connection < (read_buffer / 2) as isize,
        "{per_connection} bytes in buffers of {LARGE_FROM} bytes or more per idle connection (both ends)"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn idle_tunnels_after_a_small_exchange_hold_no_write_buffer() {
    let _turn = SERIAL.lock().await;
    let pki = Pki::new();
    // A handler that answers one small message and then waits, holding nothing of its own.
    let server = Server::new(
        Config::default(),
        pki.server_config(),
        |req: hbone::InboundConnect| async move {
            let mut t = req.accept().unwrap();
            let mut msg = [0u8; 4];
            if t.read_exact(&mut msg).await.is_ok() && t.write_all(&msg).await.is_ok() {
                let _ = t.flush().await;
                let mut rest = Vec::new();
                let _ = t.read_to_end(&mut rest).await;
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { server.serve(listener).await });
    let pool = hbone::Pool::new(Config::default(), hbone::StaticTls(pki.client_config()));
    // Both ends of each tunnel (streams of one connection): without a kept 16 KiB staging buffer
    // per end, a few KiB.
    let per_tunnel = growth_per_idle_tunnel(&pool, addr, 50, &LIVE).await;
    assert!(
        per_tunnel < 12 * 1024,
        "{per_tunnel} bytes per idle tunnel (both ends)"
    );
}

/// Opens one tunnel to warm up, then `n` more, each after a 4-byte exchange, and returns how much
/// `counter` grew per tunnel once they are all idle (they stay open until then).
async fn growth_per_idle_tunnel(
    pool: &hbone::Pool<&'static str, hbone::StaticTls>,
    addr: SocketAddr,
    n: usize,
    counter: &AtomicIsize,
) -> isize {
    let authority: hbone::Authority = "10.0.0.1:8080".parse().unwrap();
    let open = async || {
        let mut t = pool
            .connect("k", addr, &authority, http::HeaderMap::new())
            .await
            .unwrap();
        t.write_all(b"ping").await.unwrap();
        t.flush().await.unwrap();
        let mut back = [0u8; 4];
        t.read_exact(&mut back).await.unwrap();
        t
    };
    let mut tunnels = vec![open().await];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = counter.load(Ordering::Relaxed);
    for _ in 0..n {
        tunnels.push(open().await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    (counter.load(Ordering::Relaxed) - before) / n as isize
}
