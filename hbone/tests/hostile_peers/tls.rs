//! Hostile TLS peers: records written by hand against our TLS 1.3 record layer, on a real
//! `hbone::Server` (and, last, against the pool's client side). RFC 8446 §5.2 and §6 say which
//! alert each broken record gets; rustls is the reference for the limits.

use std::time::Duration;

use hbone::Config;

use crate::raw::*;
use crate::{Behaviour, alloc, elsewhere, legit_round_trip, mib, target};

const WAIT: Duration = Duration::from_secs(3);

const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const DECODE_ERROR: u8 = 50;
const ILLEGAL_PARAMETER: u8 = 47;

/// Once the server's record layer runs (it answered our HTTP/2 preface), sends `records(raw)`
/// and returns the alert the server answered with.
async fn alert_for(
    target: &crate::Target,
    records: impl FnOnce(&mut RawTls) -> Vec<u8> + Send + 'static,
) -> Option<u8> {
    let (addr, tls) = (target.addr, target.pki.client_config());
    elsewhere(move || async move {
        let mut c = RawTls::connect(addr, tls).await;
        c.h2_hello().await;
        let bytes = records(&mut c);
        let _ = c.send(&bytes).await;
        c.alert(WAIT).await
    })
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn broken_records_get_the_alert_rfc_8446_names() {
    let t = target(Config::default(), Behaviour::Echo).await;
    // A record whose tag does not verify.
    let alert = alert_for(&t, |c| {
        let mut r = c.seal(APPLICATION_DATA, PREFACE);
        let last = r.len() - 1;
        r[last] ^= 1;
        r
    })
    .await;
    assert_eq!(alert, Some(BAD_RECORD_MAC), "bad tag");
    // A record longer than 2^14 + 256 bytes.
    let alert = alert_for(&t, |_| {
        let mut r = vec![APPLICATION_DATA, 3, 3, 0x48, 0x01];
        r.extend(vec![0u8; 0x4801]);
        r
    })
    .await;
    assert_eq!(alert, Some(RECORD_OVERFLOW), "oversized record");
    // A record that opens to more than 2^14 bytes of plaintext.
    let alert = alert_for(&t, |c| {
        c.seal(APPLICATION_DATA, &vec![0x41; (1 << 14) + 100])
    })
    .await;
    assert_eq!(alert, Some(RECORD_OVERFLOW), "oversized plaintext");
    // A plaintext handshake record after the handshake.
    let alert = alert_for(&t, |_| vec![HANDSHAKE, 3, 3, 0, 4, 24, 0, 0, 0]).await;
    assert_eq!(
        alert,
        Some(UNEXPECTED_MESSAGE),
        "plaintext after the handshake"
    );
    // A protected record that is all padding: no content type.
    let alert = alert_for(&t, |c| c.seal(0, &[0, 0, 0])).await;
    assert_eq!(alert, Some(UNEXPECTED_MESSAGE), "no content type");
    // An alert that is not two bytes.
    let alert = alert_for(&t, |c| c.seal(ALERT, &[2, 40, 1])).await;
    assert_eq!(alert, Some(DECODE_ERROR), "malformed alert");
    // A KeyUpdate whose request is neither 0 nor 1.
    let alert = alert_for(&t, |c| c.seal(HANDSHAKE, &[24, 0, 0, 1, 7])).await;
    assert_eq!(alert, Some(ILLEGAL_PARAMETER), "malformed KeyUpdate");
    // A handshake message the server never expects after the handshake (a ClientHello).
    let alert = alert_for(&t, |c| c.seal(HANDSHAKE, &[1, 0, 0, 1, 0])).await;
    assert_eq!(
        alert,
        Some(UNEXPECTED_MESSAGE),
        "unexpected handshake message"
    );
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn key_updates_both_ways_keep_the_connection_going() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let (addr, tls) = (t.addr, t.pki.client_config());
    let (answers, got) = elsewhere(move || async move {
        let mut c = RawTls::connect(addr, tls).await;
        c.h2_hello().await;
        // Not requested: only our key moves. Requested: the server answers with its own.
        let mut bytes = c.key_update(false);
        bytes.extend(c.key_update(true));
        // And data under the newest key still opens.
        bytes.extend(c.seal(APPLICATION_DATA, &frame(PING, 0, 0, b"pingpong")));
        c.send(&bytes).await.unwrap();
        c.key_updates_until(b"pingpong", WAIT).await
    })
    .await;
    assert_eq!(
        answers, 1,
        "the server's answers to one requested KeyUpdate"
    );
    assert!(
        got.windows(8).any(|w| w == b"pingpong"),
        "no PING answer after the key updates"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_requested_key_updates_queues_one_answer_and_is_cut_off() {
    // Requested KeyUpdates, never reading: rustls keeps at most one answer pending, and allows
    // 32 KeyUpdates between two records of data.
    let t = target(Config::default(), Behaviour::Echo).await;
    let (addr, tls) = (t.addr, t.pki.client_config());
    let base = alloc::reset();
    let (answers, alert) = elsewhere(move || async move {
        let mut c = RawTls::connect(addr, tls).await;
        c.h2_hello().await;
        let mut bytes = Vec::new();
        for _ in 0..32 {
            bytes.extend(c.key_update(true));
        }
        c.send(&bytes).await.unwrap();
        // Some data resets the count; then 100,000 more without reading.
        let ping = c.seal(APPLICATION_DATA, &frame(PING, 0, 0, b"pingpong"));
        c.send(&ping).await.unwrap();
        let mut flood = Vec::new();
        for _ in 0..100_000 {
            flood.extend(c.key_update(true));
        }
        let _ = c.send(&flood).await;
        let mut answers = 0;
        let mut alert = None;
        while let Some(r) = c.next_record(WAIT).await {
            match r {
                Record::Handshake(m) if m.first() == Some(&24) => answers += 1,
                Record::Alert(_, d) => {
                    alert = Some(d);
                    break;
                }
                _ => {}
            }
        }
        (answers, alert)
    })
    .await;
    let peak = alloc::peak_above(base);
    assert!(
        answers <= 2,
        "{answers} KeyUpdate answers to a client that read none of them"
    );
    assert_eq!(alert, Some(UNEXPECTED_MESSAGE), "too many KeyUpdates");
    assert!(peak < 2 << 20, "{:.1} MiB", mib(peak));
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_empty_records_is_cut_off() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let alert = alert_for(&t, |c| {
        let mut bytes = Vec::new();
        for _ in 0..1000 {
            bytes.extend(c.seal(APPLICATION_DATA, &[]));
        }
        bytes
    })
    .await;
    assert_eq!(alert, Some(UNEXPECTED_MESSAGE), "empty records");
}

#[tokio::test(flavor = "current_thread")]
async fn an_end_with_or_without_close_notify_is_told_apart_and_never_ends_a_tunnel_cleanly() {
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    // A server whose connections report how they ended, and whose tunnels report how their
    // reads ended.
    let pki = Arc::new(crate::support::Pki::new());
    let tunnels: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = tunnels.clone();
    let server = hbone::Server::new(
        Config::default(),
        pki.server_config(),
        move |req: hbone::InboundConnect| {
            let seen = seen.clone();
            async move {
                let mut t = req.accept().unwrap();
                let mut got = Vec::new();
                let end = match t.read_to_end(&mut got).await {
                    Ok(_) => format!("clean end after {} bytes", got.len()),
                    Err(e) => format!("error after {} bytes: {e}", got.len()),
                };
                seen.lock().unwrap().push(end);
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ends: Arc<Mutex<Vec<bool>>> = Arc::default();
    let ends2 = ends.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let server = server.clone();
            let ends2 = ends2.clone();
            tokio::spawn(async move {
                let ok = server.serve_connection(tcp).await.is_ok();
                ends2.lock().unwrap().push(ok);
            });
        }
    });
    let tls = pki.client_config();
    for close_notify in [true, false] {
        let tls = tls.clone();
        elsewhere(move || async move {
            use tokio::io::AsyncWriteExt;
            let mut c = RawTls::connect(addr, tls).await;
            c.h2_hello().await;
            let mut h2 = headers(1, 0, &connect_block("10.0.0.1:80", &[]));
            // Half a transfer: no END_STREAM.
            h2.extend(frame(DATA, 0, 1, b"half of it"));
            let bytes = c.seal(APPLICATION_DATA, &h2);
            c.send(&bytes).await.unwrap();
            // Once the tunnel is up (its 200 came), the transfer is cut short.
            while let Some(r) = c.next_record(WAIT).await {
                if matches!(&r, Record::Data(d) if d.windows(2).any(|w| w == [0x88, 0])
                    || d.ends_with(&[0x88]))
                {
                    break;
                }
            }
            if close_notify {
                let bye = c.seal(ALERT, &[1, 0]);
                c.send(&bye).await.unwrap();
            }
            // A TCP FIN, then whatever the server still says.
            c.io.shutdown().await.unwrap();
            while c.next_record(WAIT).await.is_some() {}
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        *ends.lock().unwrap(),
        vec![true, false],
        "connections: an end with close_notify is clean, one without it is not"
    );
    let tunnels = tunnels.lock().unwrap();
    assert_eq!(tunnels.len(), 2, "{tunnels:?}");
    assert!(
        tunnels
            .iter()
            .all(|t| t.starts_with("error after 10 bytes")),
        "a tunnel cut short must end in an error, not a clean end: {tunnels:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_key_update_that_comes_with_the_clients_finished_is_answered() {
    // The client's last flight, its first data and a requested KeyUpdate in one write: rustls's
    // handshake reads them together, and the answer must not be lost in the handover to our
    // record layer.
    let t = target(Config::default(), Behaviour::Echo).await;
    let (addr, tls) = (t.addr, t.pki.client_config());
    let (answers, got) = elsewhere(move || async move {
        let mut c = RawTls::connect_then(addr, tls, |c| {
            let mut hello = PREFACE.to_vec();
            hello.extend(settings(&[]));
            let mut bytes = c.seal(APPLICATION_DATA, &hello);
            bytes.extend(c.key_update(true));
            bytes.extend(c.seal(APPLICATION_DATA, &frame(PING, 0, 0, b"pingpong")));
            bytes
        })
        .await;
        c.key_updates_until(b"pingpong", WAIT).await
    })
    .await;
    assert!(
        got.windows(8).any(|w| w == b"pingpong"),
        "no PING answer: the keys went out of step"
    );
    assert_eq!(
        answers, 1,
        "the server's answers to the requested KeyUpdate"
    );
}
