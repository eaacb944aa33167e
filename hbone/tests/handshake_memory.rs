//! A connection that has not finished its handshake costs little memory: the large read buffer
//! is allocated only once TLS succeeds. Measured with a counting allocator (its own test binary,
//! so no other test allocates concurrently).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use hbone::{Config, Server};
use support::{Pki, echo};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[tokio::test(flavor = "current_thread")]
async fn connections_waiting_for_a_handshake_hold_no_read_buffer() {
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
