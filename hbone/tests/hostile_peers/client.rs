//! Hostile servers against the client pool: what a compromised destination (any pod holds a
//! mesh certificate) can send back to the proxy that dials it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hbone::{Config, Pool, StaticTls};
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::raw::*;
use crate::support::Pki;
use crate::{alloc, mib};

type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A server on a thread of its own (with its own runtime): each accepted connection goes to
/// `serve` in a task of its own.
fn spawn_server<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(serve(tcp));
                }
            });
    });
    addr
}

/// A hostile HBONE server: each connection gets TLS and the HTTP/2 preface, then `script`.
fn hostile<F, Fut>(pki: &Pki, script: F) -> SocketAddr
where
    F: Fn(RawH2<ServerTls>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let script = Arc::new(script);
    spawn_server(move |tcp| {
        let (acceptor, script) = (acceptor.clone(), script.clone());
        async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                script(RawH2::serve(tls).await).await;
            }
        }
    })
}

/// Answers SETTINGS and PINGs until the client's CONNECT arrives; its stream id.
async fn until_connect(s: &mut RawH2<ServerTls>) -> Option<u32> {
    loop {
        let f = s.next(Duration::from_secs(10)).await.ok()?;
        match f.kind {
            SETTINGS if f.flags & ACK == 0 => {
                s.send(&frame(SETTINGS, ACK, 0, &[])).await;
            }
            PING if f.flags & ACK == 0 => {
                s.send(&frame(PING, ACK, 0, &f.payload)).await;
            }
            HEADERS => return Some(f.stream),
            _ => {}
        }
    }
}

fn pool(pki: &Pki, config: Config) -> Pool<&'static str, StaticTls> {
    Pool::new(config, StaticTls(pki.client_config()))
}

fn quick() -> Config {
    let mut c = Config::default();
    c.connect_timeout = Duration::from_secs(2);
    c
}

async fn connect(
    pool: &Pool<&'static str, StaticTls>,
    addr: SocketAddr,
) -> Result<hbone::Tunnel, hbone::Error> {
    let authority: hbone::Authority = "10.0.0.1:80".parse().unwrap();
    pool.connect("k", addr, &authority, HeaderMap::new()).await
}

#[tokio::test(flavor = "current_thread")]
async fn an_hpack_bomb_in_a_response_costs_the_client_little() {
    let pki = Pki::new();
    let addr = hostile(&pki, |mut s| async move {
        let Some(id) = until_connect(&mut s).await else {
            return;
        };
        let mut block = Vec::new();
        indexed(&mut block, 8); // :status 200
        literal_indexed(&mut block, b"x-bomb", &[b'a'; 4000]);
        for _ in 0..16_000 {
            indexed(&mut block, 62);
        }
        s.send(&frame(HEADERS, END_HEADERS, id, &block)).await;
        s.listen(Duration::from_secs(2)).await;
    });
    let pool = pool(&pki, quick());
    let base = alloc::reset();
    let err = connect(&pool, addr).await.unwrap_err();
    let peak = alloc::peak_above(base);
    assert!(
        peak < 2 << 20,
        "{:.1} MiB for a 16 KiB response head",
        mib(peak)
    );
    assert!(err.to_string().contains("ENHANCE_YOUR_CALM"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_response_on_a_dropped_stream_is_decoded_within_the_limit() {
    // The client gives up on stream 1; the server then answers it with 32,769 one-byte fields
    // (more than an `http::HeaderMap` holds, 1.4 MB decoded).
    let pki = Pki::new();
    let addr = hostile(&pki, |mut s| async move {
        let Some(id) = until_connect(&mut s).await else {
            return;
        };
        // Wait for the client's RST_STREAM.
        let _ = s
            .until(Duration::from_secs(5), |f| f.kind == RST_STREAM)
            .await;
        s.send(&frame(HEADERS, END_HEADERS, id, &[0x82; 32_769]))
            .await;
        s.listen(Duration::from_secs(2)).await;
    });
    let mut config = quick();
    config.connect_timeout = Duration::from_millis(300);
    let pool = pool(&pki, config);
    let base = alloc::reset();
    let err = connect(&pool, addr).await.unwrap_err();
    assert!(matches!(err, hbone::Error::ConnectTimeout { .. }), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = alloc::peak_above(base);
    assert!(peak < 2 << 20, "{:.1} MiB", mib(peak));
    // The connection ended (ENHANCE_YOUR_CALM) without a panic: the pool holds none.
    assert_eq!(pool.connection_count(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn floods_from_a_server_end_its_connection_with_bounded_memory() {
    let units: Vec<(&str, Vec<u8>)> = vec![
        ("ping", frame(PING, 0, 0, &[1; 8])),
        ("settings", settings(&[(0x4, 65_535)])),
        ("unknown type", frame(0x42, 0, 0, b"junk")),
    ];
    for (name, unit) in units {
        let pki = Pki::new();
        let addr = hostile(&pki, move |mut s| {
            let unit = unit.clone();
            async move {
                if until_connect(&mut s).await.is_none() {
                    return;
                }
                let burst = unit.repeat(20_000);
                for _ in 0..10 {
                    if !s.send(&burst).await {
                        break;
                    }
                }
                s.listen(Duration::from_secs(2)).await;
            }
        });
        let pool = pool(&pki, quick());
        let base = alloc::reset();
        let err = connect(&pool, addr).await.unwrap_err();
        let peak = alloc::peak_above(base);
        assert!(
            err.to_string().contains("ENHANCE_YOUR_CALM"),
            "{name}: {err}"
        );
        assert!(peak < 8 << 20, "{name}: {:.1} MiB", mib(peak));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_continuation_flood_from_a_server_ends_its_connection() {
    let pki = Pki::new();
    let addr = hostile(&pki, |mut s| async move {
        let Some(id) = until_connect(&mut s).await else {
            return;
        };
        let mut flood = frame(HEADERS, 0, id, &[0x88]);
        for _ in 0..100_000 {
            flood.extend(frame(CONTINUATION, 0, id, &[]));
        }
        s.send(&flood).await;
        s.listen(Duration::from_secs(2)).await;
    });
    let pool = pool(&pki, quick());
    let err = connect(&pool, addr).await.unwrap_err();
    assert!(err.to_string().contains("ENHANCE_YOUR_CALM"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_refusing_every_stream_costs_one_retry() {
    let pki = Pki::new();
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = conns.clone();
    let addr = hostile(&pki, move |mut s| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            while let Some(id) = until_connect(&mut s).await {
                s.send(&rst(id, REFUSED_STREAM)).await;
            }
        }
    });
    let pool = pool(&pki, quick());
    for _ in 0..3 {
        let err = connect(&pool, addr).await.unwrap_err();
        assert!(err.to_string().contains("REFUSED_STREAM"), "{err}");
    }
    // One connection, then one more per refused retry at most.
    let made = conns.load(std::sync::atomic::Ordering::SeqCst);
    assert!(made <= 4, "{made} connections for 3 refused tunnels");
}

#[tokio::test(flavor = "current_thread")]
async fn data_beyond_the_window_and_window_overflow_from_a_server_are_refused() {
    let pki = Pki::new();
    // The tunnel is read only once the overflow is refused: a reader that kept up would give
    // the server window as it went, and nothing would overflow.
    let refused = Arc::new(tokio::sync::Notify::new());
    let told = refused.clone();
    let addr = hostile(&pki, move |mut s| {
        let told = told.clone();
        async move {
            let Some(id) = until_connect(&mut s).await else {
                return;
            };
            s.send(&frame(HEADERS, END_HEADERS, id, &[0x88])).await;
            // 5 MiB against the client's 4 MiB stream window.
            let chunk = frame(DATA, 0, id, &vec![0u8; 64 * 1024]);
            for _ in 0..80 {
                s.send(&chunk).await;
            }
            let reset = s
                .until(Duration::from_secs(5), |f| f.kind == RST_STREAM)
                .await;
            assert_eq!(reset.code(), Some(FLOW_CONTROL_ERROR));
            told.notify_one();
            // The connection's send window past 2^31-1.
            s.send(&window_update(0, 0x7fff_ffff)).await;
            let heard = s.listen(Duration::from_secs(2)).await;
            assert_eq!(heard.goaway(), Some(FLOW_CONTROL_ERROR), "{heard:?}");
        }
    });
    let pool = pool(&pki, quick());
    let mut tunnel = connect(&pool, addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), refused.notified())
        .await
        .expect("the client never reset the overflowing stream");
    let mut sink = Vec::new();
    let err = tunnel.read_to_end(&mut sink).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("FLOW_CONTROL_ERROR"), "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_that_reads_nothing_holds_a_bounded_amount_of_the_clients_memory() {
    let pki = Pki::new();
    let addr = hostile(&pki, |mut s| async move {
        let Some(id) = until_connect(&mut s).await else {
            return;
        };
        // Windows wide open, a 200, then never a read again.
        let mut bytes = settings(&[(0x4, 0x7fff_ffff)]);
        bytes.extend(window_update(0, 0x7fff_0000));
        bytes.extend(frame(HEADERS, END_HEADERS, id, &[0x88]));
        s.send(&bytes).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let pool = pool(&pki, quick());
    let mut tunnel = connect(&pool, addr).await.unwrap();
    let base = alloc::reset();
    let chunk = vec![9u8; 256 * 1024];
    let wrote = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            tunnel.write_all(&chunk).await.unwrap();
        }
    })
    .await;
    assert!(
        wrote.is_err(),
        "writes to a server that reads nothing never waited"
    );
    let peak = alloc::peak_above(base);
    let cfg = Config::default();
    let bound = cfg.max_send_buffer + cfg.tls_write_buffer + (2 << 20);
    assert!(
        peak < bound,
        "{:.1} MiB queued (bound {:.1})",
        mib(peak),
        mib(bound)
    );
}

/// A hostile TLS server: raw records after the handshake.
fn hostile_tls<F, Fut>(pki: &Pki, script: F) -> SocketAddr
where
    F: Fn(RawTls) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let config = pki.server_config();
    let script = Arc::new(script);
    spawn_server(move |tcp| {
        let (config, script) = (config.clone(), script.clone());
        async move { script(RawTls::accept(tcp, config).await).await }
    })
}

/// Reads the client's records until its CONNECT (answering SETTINGS and PING as it comes).
async fn raw_until_connect(s: &mut RawTls) -> Option<u32> {
    let mut buf = Vec::new();
    let mut preface_seen = false;
    loop {
        match s.next_record(Duration::from_secs(10)).await? {
            Record::Data(d) => buf.extend(d),
            _ => continue,
        }
        if !preface_seen && buf.len() >= 24 {
            buf.drain(..24);
            preface_seen = true;
            let hello = s.seal(APPLICATION_DATA, &settings(&[]));
            s.send(&hello).await.ok()?;
        }
        while preface_seen && buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            let answer = match (kind, flags & ACK) {
                (SETTINGS, 0) => frame(SETTINGS, ACK, 0, &[]),
                (PING, 0) => frame(PING, ACK, 0, &payload),
                (HEADERS, _) => return Some(id),
                _ => continue,
            };
            let record = s.seal(APPLICATION_DATA, &answer);
            s.send(&record).await.ok()?;
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_broken_record_from_a_server_gets_bad_record_mac() {
    let pki = Pki::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let addr = hostile_tls(&pki, move |mut s| {
        let tx = tx.lock().unwrap().clone();
        async move {
            if raw_until_connect(&mut s).await.is_none() {
                return;
            }
            let mut r = s.seal(APPLICATION_DATA, &frame(HEADERS, END_HEADERS, 1, &[0x88]));
            let last = r.len() - 1;
            r[last] ^= 1;
            let _ = s.send(&r).await;
            let _ = tx.send(s.alert(Duration::from_secs(3)).await);
        }
    });
    let pool = pool(&pki, quick());
    assert!(connect(&pool, addr).await.is_err());
    let alert = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("the server's report");
    assert_eq!(alert, Some(20), "bad_record_mac");
}

#[tokio::test(flavor = "current_thread")]
async fn a_key_update_flood_from_a_server_is_cut_off() {
    let pki = Pki::new();
    let addr = hostile_tls(&pki, |mut s| async move {
        if raw_until_connect(&mut s).await.is_none() {
            return;
        }
        let mut flood = Vec::new();
        for _ in 0..10_000 {
            flood.extend(s.key_update(true));
        }
        let _ = s.send(&flood).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    });
    let pool = pool(&pki, quick());
    let base = alloc::reset();
    let err = connect(&pool, addr).await.unwrap_err();
    let peak = alloc::peak_above(base);
    assert!(err.to_string().contains("KeyUpdate"), "{err}");
    assert!(peak < 2 << 20, "{:.1} MiB", mib(peak));
}
