//! Hostile HTTP/2 clients (with a valid mesh certificate) against a real `hbone::Server`.

use std::time::{Duration, Instant};

use hbone::Config;

use crate::raw::*;
use crate::{Behaviour, alloc, elsewhere, hear, legit_round_trip, mib, target};

const QUIET: Duration = Duration::from_secs(2);

/// The HEADERS frame of a well-formed CONNECT (to 10.0.0.1:80) opening stream `id`.
fn open(id: u32) -> Vec<u8> {
    headers(id, 0, &connect_block("10.0.0.1:80", &[]))
}

/// `n` streams opened (ids 1, 3, 5, ...), each followed at once by what `then` makes for it.
fn streams_then(n: u32, then: impl Fn(u32) -> Vec<u8>) -> Vec<u8> {
    (0..n)
        .flat_map(|i| [open(2 * i + 1), then(2 * i + 1)].concat())
        .collect()
}

/// Asserts that no more than `limit` handlers ran at once, that the connection ended with
/// ENHANCE_YOUR_CALM, and that the server still serves.
async fn calmed_with_bounded_handlers(t: &crate::Target, heard: &Heard, limit: usize) {
    assert!(
        t.stats.peak() <= limit,
        "{} handlers ran at once on one connection (limit {limit})",
        t.stats.peak()
    );
    assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{heard:?}");
    legit_round_trip(t).await;
}

/// A config with a small stream limit, so that limit tests need few streams.
fn ten_streams() -> Config {
    let mut c = Config::default();
    c.max_concurrent_streams = 10;
    c
}

/// An HPACK block that adds a 4,000-byte field to the decoder's dynamic table (index 62), and
/// then `refs` one-byte references to it: each decodes to 4 KiB.
fn bomb(refs: usize) -> (Vec<u8>, Vec<u8>) {
    let mut seed = connect_block("10.0.0.1:80", &[]);
    literal_indexed(&mut seed, b"x-bomb", &[b'a'; 4000]);
    let mut refs_block = Vec::with_capacity(refs);
    for _ in 0..refs {
        indexed(&mut refs_block, 62);
    }
    (seed, refs_block)
}

#[tokio::test(flavor = "current_thread")]
async fn an_hpack_bomb_on_a_skipped_stream_is_refused_unread() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let base = alloc::reset();
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let (seed, refs) = bomb(16 * 1024 - 64);
        out.extend_from_slice(&headers(5, 0, &seed));
        // Stream 3 was skipped: it can never be opened now (RFC 9113 5.1.1).
        out.extend_from_slice(&headers(3, 0, &refs));
        out
    })
    .await;
    let peak = alloc::peak_above(base);
    assert!(
        peak < 2 << 20,
        "the server allocated {:.1} MiB for a 16 KiB header block",
        mib(peak)
    );
    assert_eq!(heard.goaway(), Some(PROTOCOL_ERROR), "{heard:?}");
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_hpack_bomb_on_a_closed_stream_costs_little_and_the_server_survives() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let base = alloc::reset();
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let (seed, refs) = bomb(255 * 1024);
        out.extend_from_slice(&headers(1, 0, &seed));
        out.extend_from_slice(&rst(1, CANCEL));
        // 255 KiB of references (a gibibyte decoded) on the stream just closed.
        out.extend_from_slice(&headers(1, 0, &refs));
        out
    })
    .await;
    let peak = alloc::peak_above(base);
    assert!(
        peak < 4 << 20,
        "the server allocated {:.1} MiB for an HPACK bomb",
        mib(peak)
    );
    assert!(heard.goaway().is_some(), "no GOAWAY: {heard:?}");
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_hpack_bomb_on_a_new_stream_is_refused_within_the_header_list_limit() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let base = alloc::reset();
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let (seed, refs) = bomb(4 * 1024);
        out.extend_from_slice(&headers(1, 0, &seed));
        let mut block = connect_block("10.0.0.1:80", &[]);
        block.extend_from_slice(&refs);
        out.extend_from_slice(&headers(3, 0, &block));
        out
    })
    .await;
    let peak = alloc::peak_above(base);
    assert!(
        peak < 2 << 20,
        "the server allocated {:.1} MiB for a 4 KiB header block",
        mib(peak)
    );
    // Decoded, the block is 16 MiB: far past any list we accept.
    assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{heard:?}");
    // Stream 1 may or may not reach its handler before the connection ends; stream 3 never.
    assert!(
        t.stats.started() <= 1,
        "the bomb's stream reached the handler"
    );
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn thirty_two_thousand_fields_on_a_closed_stream_do_not_panic_the_connection() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        out.extend_from_slice(&open(1));
        out.extend_from_slice(&rst(1, CANCEL));
        // 32,769 one-byte fields (`:method: GET`, static index 2): one more than an
        // `http::HeaderMap` can hold.
        let fields = vec![0x82u8; 32_769];
        out.extend_from_slice(&headers(1, 0, &fields));
        out
    })
    .await;
    // A connection task that panics sends nothing: the GOAWAY shows it handled the frame.
    assert!(heard.goaway().is_some(), "no GOAWAY: {heard:?}");
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn thirty_two_thousand_fields_on_a_new_stream_are_refused() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let mut block = connect_block("10.0.0.1:80", &[]);
        // `x: ` literals, 3 bytes each, 32 + 1 bytes each as HTTP/2 counts them.
        for _ in 0..32_769 {
            block.extend_from_slice(&[0x40, 1, b'x', 0][..]);
        }
        out.extend_from_slice(&headers(1, 0, &block));
        out
    })
    .await;
    assert!(
        heard.goaway().is_some() || !heard.answered().is_empty() || !heard.resets().is_empty(),
        "the stream was neither refused nor the connection closed: {heard:?}"
    );
    assert_eq!(t.stats.started(), 0);
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn made_you_reset_cannot_start_more_handlers_than_the_stream_limit() {
    // CVE-2025-8671: each CONNECT is followed by a WINDOW_UPDATE of 0, so the server resets the
    // stream itself, while its handler goes on dialing.
    let t = target(ten_streams(), Behaviour::SlowDial(Duration::from_secs(2))).await;
    let heard = hear(&t, || streams_then(300, |id| window_update(id, 0))).await;
    calmed_with_bounded_handlers(&t, &heard, 10).await;
}

#[tokio::test(flavor = "current_thread")]
async fn rapid_reset_cannot_start_more_handlers_than_the_stream_limit() {
    // CVE-2023-44487: open and reset, again and again.
    let t = target(ten_streams(), Behaviour::SlowDial(Duration::from_secs(2))).await;
    let heard = hear(&t, || streams_then(1000, |id| rst(id, CANCEL))).await;
    calmed_with_bounded_handlers(&t, &heard, 10).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_connect_with_path_scheme_or_protocol_is_malformed() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let pseudo: [&[u8]; 3] = [b":path", b":scheme", b":protocol"];
        for (i, name) in pseudo.iter().enumerate() {
            let mut block = Vec::new();
            literal(&mut block, b":method", b"CONNECT");
            literal(&mut block, name, b"x");
            literal(&mut block, b":authority", b"10.0.0.1:80");
            out.extend_from_slice(&headers(2 * i as u32 + 1, 0, &block));
        }
        // And one without :authority.
        let mut block = Vec::new();
        literal(&mut block, b":method", b"CONNECT");
        out.extend_from_slice(&headers(7, 0, &block));
        out
    })
    .await;
    assert_eq!(
        heard.resets(),
        vec![
            (1, PROTOCOL_ERROR),
            (3, PROTOCOL_ERROR),
            (5, PROTOCOL_ERROR),
            (7, PROTOCOL_ERROR)
        ],
        "{heard:?}"
    );
    assert_eq!(
        t.stats.started(),
        0,
        "a malformed CONNECT reached the handler"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_continuation_flood_of_empty_frames_ends_the_connection() {
    // CVE-2024-27316: a header block that never ends.
    let t = target(Config::default(), Behaviour::Echo).await;
    let started = Instant::now();
    let heard = hear(&t, || {
        let head = frame(HEADERS, 0, 1, &connect_block("10.0.0.1:80", &[]));
        [head, frame(CONTINUATION, 0, 1, &[]).repeat(100_000)].concat()
    })
    .await;
    assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{heard:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_header_block_larger_than_the_cap_is_refused_before_it_is_read() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let base = alloc::reset();
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let mut block = connect_block("10.0.0.1:80", &[]);
        while block.len() < 250 * 1024 {
            literal(&mut block, b"x-pad", &[b'p'; 1000]);
        }
        out.extend_from_slice(&headers(1, 0, &block));
        out
    })
    .await;
    assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{heard:?}");
    let peak = alloc::peak_above(base);
    assert!(peak < 2 << 20, "{:.1} MiB for one HEADERS frame", mib(peak));
    assert_eq!(t.stats.started(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_lower_stream_id_after_a_higher_one_is_a_protocol_error() {
    let t = target(Config::default(), Behaviour::Echo).await;
    let heard = hear(&t, move || [open(5), open(3)].concat()).await;
    assert_eq!(heard.goaway(), Some(PROTOCOL_ERROR), "{heard:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_2019_family_each_ends_in_a_goaway_with_bounded_memory() {
    // CVE-2019-9512 ping flood, -9513 resource loop (priorities), -9515 settings flood, -9518
    // empty frames: each frame is legal once; a flood of them, unread answers and all, must cost
    // a bounded amount and end the connection.
    let first = open(1);
    let floods: Vec<(&str, Vec<u8>)> = vec![
        ("ping", frame(PING, 0, 0, &[7; 8])),
        ("priority", frame(PRIORITY, 0, 1, &[0, 0, 0, 3, 16])),
        ("settings", settings(&[(0x4, 65_535)])),
        ("empty data", frame(DATA, 0, 1, &[])),
        ("unknown type", frame(0x42, 0, 0, b"junk")),
    ];
    for (name, unit) in floods {
        let t = target(Config::default(), Behaviour::Echo).await;
        let first = first.clone();
        let base = alloc::reset();
        // 200,000 frames, written without reading a byte of what comes back.
        let heard = hear(&t, move || [first, unit.repeat(200_000)].concat()).await;
        let peak = alloc::peak_above(base);
        assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{name}: {heard:?}");
        assert!(
            peak < 8 << 20,
            "{name}: the server allocated {:.1} MiB",
            mib(peak)
        );
        legit_round_trip(&t).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_reset_flood_provoked_without_reading_is_bounded_and_ends_the_connection() {
    // CVE-2019-9514: frames that make the server reset streams, their RST_STREAMs never read.
    let t = target(
        Config::default(),
        Behaviour::SlowDial(Duration::from_millis(10)),
    )
    .await;
    let base = alloc::reset();
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let mut burst = Vec::new();
        for i in 0..5_000u32 {
            let id = 2 * i + 1;
            burst.extend(open(id));
            // Over the stream's window: FLOW_CONTROL_ERROR.
            burst.extend(frame(DATA, 0, id, &[0; 16]));
            burst.extend(window_update(id, 0x7fff_ffff));
        }
        out.extend_from_slice(&burst);
        out
    })
    .await;
    let peak = alloc::peak_above(base);
    assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{heard:?}");
    assert!(peak < 8 << 20, "the server allocated {:.1} MiB", mib(peak));
    assert!(t.stats.peak() <= 100, "{} handlers at once", t.stats.peak());
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_data_dribble_through_tiny_windows_ends_the_connection() {
    // CVE-2019-9511: a window opened a byte at a time, so the server sends a frame per byte.
    let t = target(Config::default(), Behaviour::Send(1 << 20)).await;
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        out.extend_from_slice(&settings(&[(0x4, 1)]));
        out.extend_from_slice(&headers(1, 0, &connect_block("10.0.0.1:8000", &[])));
        let mut burst = Vec::new();
        for _ in 0..5_000 {
            burst.extend(window_update(1, 1));
        }
        out.extend_from_slice(&burst);
        out
    })
    .await;
    assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{heard:?}");
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn zero_length_header_fields_count_toward_the_list_limit() {
    // CVE-2019-9516: fields of nothing still cost 32 bytes each as HTTP/2 counts them.
    let t = target(Config::default(), Behaviour::Echo).await;
    let base = alloc::reset();
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        let mut block = connect_block("10.0.0.1:80", &[]);
        for _ in 0..500 {
            literal(&mut block, b"x", b"");
        }
        out.extend_from_slice(&headers(1, 0, &block));
        out
    })
    .await;
    let peak = alloc::peak_above(base);
    assert!(peak < 1 << 20, "{:.1} MiB", mib(peak));
    // 500 fields of 33 bytes: over 8 KiB, within four times it: the stream is refused with 431.
    assert_eq!(heard.answered(), vec![1], "{heard:?}");
    assert_eq!(t.stats.started(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_that_does_not_read_holds_a_bounded_amount_of_the_servers_memory() {
    // CVE-2019-9517: wide-open windows, a handler writing 64 MiB, and a client that never reads.
    let t = target(Config::default(), Behaviour::Send(64 << 20)).await;
    let (addr, tls) = (t.addr, t.pki.client_config());
    let base = alloc::reset();
    elsewhere(move || async move {
        let mut c = RawH2::connect(addr, tls).await;
        c.send(&settings(&[(0x4, 0x7fff_ffff)])).await;
        c.send(&window_update(0, 0x7fff_0000)).await;
        c.send(&headers(1, 0, &connect_block("10.0.0.1:8000", &[])))
            .await;
        // Read nothing for a while; the socket buffers fill, then the server must stop.
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(c);
    })
    .await;
    let peak = alloc::peak_above(base);
    let cfg = Config::default();
    let bound = cfg.max_send_buffer + cfg.tls_write_buffer + (4 << 20);
    assert!(
        peak < bound,
        "the server held {:.1} MiB for a client that reads nothing (bound {:.1})",
        mib(peak),
        mib(bound)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn stream_id_misuse_is_a_connection_error() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an even (server) stream id", open(2)),
        ("stream 0", open(0)),
        ("DATA on an idle stream", frame(DATA, 0, 9, b"x")),
        ("RST_STREAM on an idle stream", rst(9, CANCEL)),
        ("WINDOW_UPDATE on an idle stream", window_update(9, 10)),
        (
            "a CONTINUATION without HEADERS",
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
        ),
    ];
    let t = target(Config::default(), Behaviour::Echo).await;
    for (what, bytes) in cases {
        let heard = hear(&t, move || bytes).await;
        assert_eq!(heard.goaway(), Some(PROTOCOL_ERROR), "{what}: {heard:?}");
    }
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn window_overflow_is_a_flow_control_error() {
    let t = target(
        Config::default(),
        Behaviour::SlowDial(Duration::from_secs(1)),
    )
    .await;
    let (addr, tls) = (t.addr, t.pki.client_config());
    let heard = elsewhere(move || async move {
        let mut c = RawH2::connect(addr, tls).await;
        c.send(&open(1)).await;
        // The stream's window past 2^31-1: that stream is reset.
        c.send(&window_update(1, 0x7fff_ffff)).await;
        let reset = c.until(QUIET, |f| f.kind == RST_STREAM).await;
        // The connection's: the connection ends.
        c.send(&window_update(0, 0x7fff_ffff)).await;
        (reset, c.listen(QUIET).await)
    })
    .await;
    assert_eq!(
        (heard.0.stream, heard.0.code()),
        (1, Some(FLOW_CONTROL_ERROR))
    );
    assert_eq!(heard.1.goaway(), Some(FLOW_CONTROL_ERROR), "{:?}", heard.1);
    // And through SETTINGS: an initial window that overflows an open stream's.
    let heard = hear(&t, || {
        [
            open(1),
            window_update(1, 0x7fff_0000),
            settings(&[(0x4, 0x7fff_ffff)]),
        ]
        .concat()
    })
    .await;
    assert_eq!(heard.goaway(), Some(FLOW_CONTROL_ERROR), "{heard:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_connects_are_reset_and_never_reach_the_handler() {
    // RFC 9113 §8.2-8.5; what h2 resets with PROTOCOL_ERROR, we reset the same way.
    let t = target(Config::default(), Behaviour::Echo).await;
    let a: &'static [u8] = b"10.0.0.1:80";
    type Fields = Vec<(&'static [u8], &'static [u8])>;
    // A well-formed CONNECT's two fields, then what breaks it.
    let connect_and = |more: Fields| -> Fields {
        [
            vec![(&b":method"[..], &b"CONNECT"[..]), (b":authority", a)],
            more,
        ]
        .concat()
    };
    let cases: Vec<(&str, Fields, u8)> = vec![
        ("uppercase name", connect_and(vec![(b"X-Up", b"1")]), 0),
        (
            "connection-specific",
            connect_and(vec![(b"connection", b"x")]),
            0,
        ),
        (
            "te other than trailers",
            connect_and(vec![(b"te", b"gzip")]),
            0,
        ),
        ("repeated pseudo", connect_and(vec![(b":authority", a)]), 0),
        ("unknown pseudo", connect_and(vec![(b":foo", b"1")]), 0),
        (
            "response pseudo",
            connect_and(vec![(b":status", b"200")]),
            0,
        ),
        ("newline in a value", connect_and(vec![(b"x", b"a\nb")]), 0),
        ("CONNECT ending its stream", connect_and(vec![]), END_STREAM),
        (
            "pseudo after regular",
            vec![(b":method", b"CONNECT"), (b"x", b"1"), (b":authority", a)],
            0,
        ),
        ("no method", vec![(b":authority", a)], 0),
        (
            "authority with a space",
            vec![(b":method", b"CONNECT"), (b":authority", b"10.0.0.1 :80")],
            0,
        ),
        (
            "GET without :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", a),
            ],
            0,
        ),
    ];
    let n = cases.len();
    let heard = hear(&t, move || {
        let mut out = Vec::new();
        for (i, (_, fields, flags)) in cases.iter().enumerate() {
            let mut block = Vec::new();
            for (name, value) in fields {
                literal(&mut block, name, value);
            }
            out.extend_from_slice(&headers(2 * i as u32 + 1, *flags, &block));
        }
        out
    })
    .await;
    let expected: Vec<(u32, u32)> = (0..n).map(|i| (2 * i as u32 + 1, PROTOCOL_ERROR)).collect();
    assert_eq!(heard.resets(), expected, "{heard:?}");
    assert!(heard.goaway().is_none(), "{heard:?}");
    assert_eq!(t.stats.started(), 0);
    // A well-formed CONNECT to a destination that is no ip:port is answered 400, not reset.
    let (addr, tls) = (t.addr, t.pki.client_config());
    let heard = elsewhere(move || async move {
        let mut c = RawH2::connect(addr, tls).await;
        c.send(&headers(1, 0, &connect_block("-bad-.example:80", &[])))
            .await;
        c.until(QUIET, |f| f.kind == HEADERS).await
    })
    .await;
    assert_eq!(heard.payload, vec![0x80 | 12], "400 from the static table");
}

#[tokio::test(flavor = "current_thread")]
async fn streams_past_the_limit_are_refused_then_the_connection_calmed() {
    let t = target(ten_streams(), Behaviour::SlowDial(Duration::from_secs(3))).await;
    let heard = hear(&t, || (0..400u32).flat_map(|i| open(2 * i + 1)).collect()).await;
    // The connection may end (its refusals spent) before the ten accepted reach their handlers.
    assert!(t.stats.peak() <= 10, "{} handlers at once", t.stats.peak());
    let refused = heard
        .resets()
        .iter()
        .filter(|(_, code)| *code == REFUSED_STREAM)
        .count();
    assert!(refused >= 190, "{heard:?}");
    assert_eq!(heard.goaway(), Some(ENHANCE_YOUR_CALM), "{heard:?}");
    legit_round_trip(&t).await;
}

#[tokio::test(flavor = "current_thread")]
async fn slowloris_before_tls_delays_no_one() {
    // 400 sockets that never send a byte (more than the 256 handshake slots), and 100 that send
    // half a ClientHello and stall: a legitimate client is served at once.
    let t = target(Config::default(), Behaviour::Echo).await;
    let addr = t.addr;
    let base = alloc::reset();
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let attacker = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut held = Vec::new();
                for i in 0..500 {
                    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                    if i % 5 == 0 {
                        use tokio::io::AsyncWriteExt;
                        // A TLS record header promising 512 bytes, and 10 of them.
                        let _ = s.write_all(&[22, 3, 1, 2, 0, 1, 0, 1, 252, 3]).await;
                    }
                    held.push(s);
                }
                let _ = ready_tx.send(());
                let _ = hold_rx.await;
                drop(held);
            })
    });
    ready_rx.await.unwrap();
    // Let the server take them all in.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = alloc::peak_above(base);
    assert!(
        held < 500 * 8 * 1024,
        "500 stalled sockets held {:.1} MiB of the server's memory",
        mib(held)
    );
    let took = legit_round_trip(&t).await;
    assert!(
        took < Duration::from_secs(1),
        "a legitimate tunnel took {took:?} beside 500 stalled sockets"
    );
    let _ = hold_tx.send(());
    attacker.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn slowloris_after_tls_delays_no_one() {
    // 300 clients that finished TLS: some never send the preface, some send half of it, some
    // leave a header block unfinished.
    let t = target(Config::default(), Behaviour::Echo).await;
    let (addr, tls) = (t.addr, t.pki.client_config());
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let attacker = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                use tokio::io::AsyncWriteExt;
                let mut held = Vec::new();
                for i in 0..300 {
                    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
                    let mut s = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await
                        .unwrap();
                    match i % 3 {
                        0 => {}
                        1 => {
                            let _ = s.write_all(&PREFACE[..10]).await;
                        }
                        _ => {
                            let mut bytes = PREFACE.to_vec();
                            bytes.extend(settings(&[]));
                            bytes.extend(frame(HEADERS, 0, 1, &connect_block("10.0.0.1:80", &[])));
                            let _ = s.write_all(&bytes).await;
                        }
                    }
                    let _ = s.flush().await;
                    held.push(s);
                }
                let _ = ready_tx.send(());
                let _ = hold_rx.await;
                drop(held);
            })
    });
    ready_rx.await.unwrap();
    let took = legit_round_trip(&t).await;
    assert!(
        took < Duration::from_secs(1),
        "a legitimate tunnel took {took:?} beside 300 stalled connections"
    );
    let _ = hold_tx.send(());
    attacker.await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn framing_errors_get_the_error_code_rfc_9113_names() {
    let t = target(
        Config::default(),
        Behaviour::SlowDial(Duration::from_millis(500)),
    )
    .await;
    let first = open(1);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "a frame over SETTINGS_MAX_FRAME_SIZE",
            frame(DATA, 0, 1, &vec![0; (256 << 10) + 1]),
            FRAME_SIZE_ERROR,
        ),
        (
            "a PING of 7 bytes",
            frame(PING, 0, 0, &[0; 7]),
            FRAME_SIZE_ERROR,
        ),
        (
            "an undecodable header block",
            headers(3, 0, &[0xff, 0xff, 0xff, 0xff, 0xff]),
            COMPRESSION_ERROR,
        ),
        (
            "PUSH_PROMISE from a client",
            frame(0x5, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]),
            PROTOCOL_ERROR,
        ),
    ];
    for (what, bytes, code) in cases {
        let first = first.clone();
        let heard = hear(&t, move || [first, bytes].concat()).await;
        assert_eq!(heard.goaway(), Some(code), "{what}: {heard:?}");
    }
    // DATA after the client's END_STREAM closes that stream only (RFC 9113 §5.1, half-closed).
    let heard = hear(&t, move || {
        [
            first,
            frame(DATA, END_STREAM, 1, b"last"),
            frame(DATA, 0, 1, b"after the end"),
        ]
        .concat()
    })
    .await;
    assert_eq!(heard.resets(), vec![(1, STREAM_CLOSED)], "{heard:?}");
    assert!(heard.goaway().is_none(), "{heard:?}");
}
