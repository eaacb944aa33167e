//! The session driven in memory: two sessions pumped into each other, or raw frames.

use super::streams::COPY_BELOW;
use super::*;

fn limits() -> Limits {
    Limits {
        stream_window: 1 << 20,
        connection_window: 4 << 20,
        max_frame_size: 1 << 16,
        max_concurrent_streams: 2,
        max_header_list_size: 8192,
        max_send_buffer: 1 << 20,
        ..Limits::from_config(&crate::Config::default())
    }
}

/// Moves everything each side queued to the other until neither has anything to say.
fn pump(a: &mut Session, b: &mut Session) {
    loop {
        if a.out.is_empty() && b.out.is_empty() {
            return;
        }
        let mut ab = a.out.split();
        let _ = b.recv(&mut ab, Instant::now());
        let mut ba = b.out.split();
        let _ = a.recv(&mut ba, Instant::now());
    }
}

fn pair() -> (Session, Session) {
    let mut client = Session::new(Role::Client, limits());
    let mut server = Session::new(Role::Server, limits());
    pump(&mut client, &mut server);
    assert!(client.got_settings() && server.got_settings());
    (client, server)
}

fn cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

fn accept(server: &mut Session) -> Incoming {
    match server.poll_accept(&mut cx()) {
        Poll::Ready(Some(incoming)) => incoming,
        other => panic!("no request: {other:?}"),
    }
}

/// Opens a stream and has the server accept it with 200.
fn tunnel(client: &mut Session, server: &mut Session) -> u32 {
    let id = client.open("a:1", &HeaderMap::new()).unwrap();
    pump(client, server);
    assert_eq!(accept(server).id, id);
    server
        .respond(id, StatusCode::OK, &HeaderMap::new(), false)
        .unwrap();
    id
}

fn send(s: &mut Session, id: u32, data: &[u8]) {
    let n = match s.poll_send_capacity(id, &mut cx()) {
        Poll::Ready(Ok(n)) => n,
        other => panic!("no capacity: {other:?}"),
    };
    assert!(n >= data.len());
    s.take_send(id, data.len(), false);
    s.out.extend_from_slice(&data_head(id, data.len(), false));
    s.out.extend_from_slice(data);
}

fn recv_all(s: &mut Session, id: u32) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    loop {
        match s.poll_recv(id, &mut cx()) {
            Poll::Ready(Ok(Recv::Data(d))) => got.extend_from_slice(&d),
            Poll::Ready(Ok(Recv::Eof)) => return (got, true),
            Poll::Pending => return (got, false),
            Poll::Ready(Err(f)) => panic!("stream failed: {f}"),
        }
    }
}

#[test]
fn a_tunnel_opens_carries_bytes_both_ways_and_closes() {
    let (mut client, mut server) = pair();
    let id = client.open("10.0.0.7:80", &HeaderMap::new()).unwrap();
    pump(&mut client, &mut server);
    let req = accept(&mut server);
    assert_eq!(
        (req.id, req.head.authority.as_deref()),
        (id, Some("10.0.0.7:80"))
    );
    server
        .respond(id, StatusCode::OK, &HeaderMap::new(), false)
        .unwrap();
    send(&mut client, id, b"ping");
    client.send_end(id).unwrap();
    pump(&mut client, &mut server);
    match client.poll_response(id, &mut cx()) {
        Poll::Ready(Ok(head)) => assert_eq!(head.status, StatusCode::OK),
        other => panic!("{other:?}"),
    }
    assert_eq!(recv_all(&mut server, id), (b"ping".to_vec(), true));
    send(&mut server, id, b"pong");
    server.send_end(id).unwrap();
    pump(&mut client, &mut server);
    assert_eq!(recv_all(&mut client, id), (b"pong".to_vec(), true));
    // Closed both ways: dropping the handles sends nothing.
    client.drop_stream(id);
    server.drop_stream(id);
    assert!(client.out.is_empty() && server.out.is_empty());
}

#[test]
fn dropping_an_open_stream_cancels_it_and_returns_its_window() {
    let (mut client, mut server) = pair();
    let id = tunnel(&mut client, &mut server);
    send(&mut server, id, &[1; 1000]);
    pump(&mut client, &mut server);
    client.drop_stream(id);
    pump(&mut client, &mut server);
    assert!(matches!(
        server.poll_recv(id, &mut cx()),
        Poll::Ready(Err(Failure::Reset {
            reason: Reason::CANCEL,
            remote: true
        }))
    ));
    assert_eq!(client.recv_unacked, 1000, "the dropped bytes count as read");
}

#[test]
fn a_reset_after_end_stream_leaves_the_received_bytes_readable() {
    let (mut client, mut server) = pair();
    let id = tunnel(&mut client, &mut server);
    send(&mut server, id, b"all of it");
    server.send_end(id).unwrap();
    server.drop_stream(id); // the client never ended its side: CANCEL
    pump(&mut client, &mut server);
    let _ = client.poll_response(id, &mut cx());
    assert_eq!(recv_all(&mut client, id), (b"all of it".to_vec(), true));
    assert!(matches!(
        client.poll_send_capacity(id, &mut cx()),
        Poll::Ready(Err(Failure::Reset {
            reason: Reason::CANCEL,
            remote: true
        }))
    ));
}

#[test]
fn data_beyond_the_stream_window_resets_only_that_stream() {
    let (mut client, mut server) = pair();
    let id = tunnel(&mut client, &mut server);
    // Ignore the window: 17 frames of 64 KiB against a 1 MiB window.
    for _ in 0..17 {
        let head = Head {
            len: 1 << 16,
            kind: kind::DATA,
            flags: 0,
            stream: id,
        };
        server.out.extend_from_slice(&head.encode());
        server.out.extend_from_slice(&[0; 1 << 16]);
    }
    pump(&mut client, &mut server);
    assert!(client.failure().is_none(), "the connection survives");
    assert!(matches!(
        client.poll_recv(id, &mut cx()),
        Poll::Ready(Err(Failure::Reset {
            reason: Reason::FLOW_CONTROL_ERROR,
            remote: false
        }))
    ));
}

#[test]
fn the_server_refuses_streams_beyond_its_limit() {
    let (mut client, mut server) = pair();
    // The client thinks it may open 3 (its view of the limit is bypassed here).
    client.peer.max_concurrent_streams = 3;
    let ids: Vec<u32> = (0..3)
        .map(|_| client.open("a:1", &HeaderMap::new()).unwrap())
        .collect();
    pump(&mut client, &mut server);
    accept(&mut server);
    accept(&mut server);
    assert!(server.poll_accept(&mut cx()).is_pending());
    assert!(matches!(
        client.poll_response(ids[2], &mut cx()),
        Poll::Ready(Err(f)) if f.is_retryable()
    ));
}

#[test]
fn streams_reset_by_the_client_count_until_their_handlers_let_go() {
    let (mut client, mut server) = pair();
    client.peer.max_concurrent_streams = u32::MAX;
    // "Rapid reset": open and reset at once, again and again.
    let mut accepted = Vec::new();
    for _ in 0..5 {
        let id = client.open("a:1", &HeaderMap::new()).unwrap();
        client.reset(id, Reason::CANCEL);
        client.drop_stream(id);
        pump(&mut client, &mut server);
        if let Poll::Ready(Some(incoming)) = server.poll_accept(&mut cx()) {
            accepted.push(incoming.id);
        }
    }
    assert_eq!(accepted.len(), 2, "the limit is 2 handlers at a time");
    // Once the handlers are done with them, new streams are served again.
    for id in accepted {
        server.drop_stream(id);
    }
    let id = client.open("a:1", &HeaderMap::new()).unwrap();
    pump(&mut client, &mut server);
    assert_eq!(accept(&mut server).id, id);
}

#[test]
fn a_client_respects_the_servers_stream_limit() {
    let (mut client, _server) = pair();
    client.open("a:1", &HeaderMap::new()).unwrap();
    client.open("a:1", &HeaderMap::new()).unwrap();
    assert!(client.open("a:1", &HeaderMap::new()).is_err());
}

#[test]
fn goaway_fails_the_streams_it_does_not_cover_as_retryable() {
    let (mut client, mut server) = pair();
    let first = client.open("a:1", &HeaderMap::new()).unwrap();
    pump(&mut client, &mut server);
    accept(&mut server);
    let second = client.open("a:1", &HeaderMap::new()).unwrap();
    frame::put_goaway(&mut server.out, first, Reason::NO_ERROR);
    pump(&mut client, &mut server);
    assert!(!client.can_open());
    assert!(client.poll_response(first, &mut cx()).is_pending());
    assert!(matches!(
        client.poll_response(second, &mut cx()),
        Poll::Ready(Err(f)) if f.is_retryable()
    ));
}

#[test]
fn a_server_going_away_keeps_its_streams_and_refuses_later_ones_as_retryable() {
    let (mut client, mut server) = pair();
    let first = client.open("a:1", &HeaderMap::new()).unwrap();
    pump(&mut client, &mut server);
    assert_eq!(accept(&mut server).id, first);
    assert_eq!(server.open_streams(), 1);
    // The client opens another before it hears the GOAWAY.
    let crossing = client.open("a:1", &HeaderMap::new()).unwrap();
    server.go_away();
    pump(&mut client, &mut server);
    assert!(!client.can_open(), "the client heard the GOAWAY");
    assert!(
        server.poll_accept(&mut cx()).is_pending(),
        "a stream after our GOAWAY was accepted"
    );
    assert!(matches!(
        client.poll_response(crossing, &mut cx()),
        Poll::Ready(Err(f)) if f.is_retryable()
    ));
    // The stream accepted before goes on.
    assert!(client.poll_response(first, &mut cx()).is_pending());
    assert_eq!(server.open_streams(), 1);
    // Going away twice sends one GOAWAY.
    server.go_away();
    assert!(server.out.is_empty());
}

#[test]
fn a_client_that_sent_goaway_opens_no_more_streams() {
    let (mut client, mut server) = pair();
    let first = client.open("a:1", &HeaderMap::new()).unwrap();
    frame::put_goaway(&mut client.out, 0, Reason::NO_ERROR);
    pump(&mut client, &mut server);
    assert_eq!(accept(&mut server).id, first);
    // Past its own GOAWAY (our session would not send it; a hostile client does).
    let late = client.next_local_id;
    client.next_local_id += 2;
    let mut block = BytesMut::new();
    hpack::encode_connect(&mut block, "a:1", &HeaderMap::new());
    frame::put_frame(
        &mut client.out,
        kind::HEADERS,
        flag::END_HEADERS,
        late,
        &block,
    );
    pump(&mut client, &mut server);
    assert!(
        server.poll_accept(&mut cx()).is_pending(),
        "a stream after GOAWAY"
    );
}

#[test]
fn pings_are_answered_and_matched() {
    let (mut client, mut server) = pair();
    client.send_ping();
    assert!(client.poll_pong(&mut cx()).is_pending());
    pump(&mut client, &mut server);
    assert!(matches!(client.poll_pong(&mut cx()), Poll::Ready(Ok(()))));
}

#[test]
fn a_header_block_may_span_continuation_frames() {
    let (mut client, mut server) = pair();
    client.peer.max_frame_size = 16; // forces CONTINUATION frames
    let headers: HeaderMap = [(
        http::header::FORWARDED,
        "for=10.0.0.1;by=x".parse().unwrap(),
    )]
    .into_iter()
    .collect();
    let id = client
        .open("web.default.svc.cluster.local:80", &headers)
        .unwrap();
    pump(&mut client, &mut server);
    let req = accept(&mut server);
    assert_eq!(req.id, id);
    assert_eq!(req.head.headers, headers);
}

#[test]
fn protocol_errors_close_the_connection_with_goaway() {
    let cases: &[(&[u8], Reason)] = &[
        // A frame interrupting a header block.
        (
            &[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82, 0, 0, 0, 6, 0, 0, 0, 0, 0],
            Reason::PROTOCOL_ERROR,
        ),
        // DATA on a stream never opened.
        (&[0, 0, 1, 0, 0, 0, 0, 0, 9, 0], Reason::PROTOCOL_ERROR),
        // A PING of the wrong length.
        (&[0, 0, 1, 6, 0, 0, 0, 0, 0, 0], Reason::FRAME_SIZE_ERROR),
        // A frame above our SETTINGS_MAX_FRAME_SIZE.
        (&[0x01, 0, 1, 0, 0, 0, 0, 0, 1], Reason::FRAME_SIZE_ERROR),
        // A WINDOW_UPDATE of 0 on the connection.
        (
            &[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Reason::PROTOCOL_ERROR,
        ),
        // SETTINGS_ENABLE_CONNECT_PROTOCOL of 2 (found by the differential fuzz target).
        (
            &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 2],
            Reason::PROTOCOL_ERROR,
        ),
    ];
    for (bytes, reason) in cases {
        let (_client, mut server) = pair();
        let err = server
            .recv(&mut BytesMut::from(*bytes), Instant::now())
            .unwrap_err();
        assert!(
            matches!(&err, Failure::Protocol { reason: r, .. } if r == reason),
            "{bytes:?}: {err}"
        );
        let goaway = Head::parse(&server.out);
        assert_eq!(goaway.kind, kind::GOAWAY, "{bytes:?}");
        assert_eq!(frame::u32_at(&server.out, HEADER_LEN + 4), reason.0);
    }
}

#[test]
fn the_server_checks_the_preface_and_the_first_frame() {
    let mut server = Session::new(Role::Server, limits());
    let err = server
        .recv(
            &mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]),
            Instant::now(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("preface"), "{err}");
    let mut server = Session::new(Role::Server, limits());
    let mut bytes = BytesMut::from(frame::PREFACE);
    frame::put_frame(&mut bytes, kind::PING, 0, 0, &[0; 8]);
    let err = server.recv(&mut bytes, Instant::now()).unwrap_err();
    assert!(err.to_string().contains("first frame"), "{err}");
}

#[test]
fn small_frames_left_unread_are_copied_together_in_order() {
    let (mut client, mut server) = pair();
    let id = tunnel(&mut client, &mut server);
    // A first frame, then 10,000 one-byte frames and a large one, none of them read yet.
    let mut sent = Vec::new();
    let mut frame_of = |s: &mut Session, data: &[u8]| {
        send(s, id, data);
        sent.extend_from_slice(data);
    };
    frame_of(&mut client, b"first");
    for i in 0..10_000u32 {
        frame_of(&mut client, &[(i % 251) as u8]);
    }
    frame_of(&mut client, &[9u8; COPY_BELOW]);
    frame_of(&mut client, b"last");
    pump(&mut client, &mut server);
    let stream = &server.streams[&id];
    // The first in place, the small ones in one copy, the large one in place, then "last".
    assert_eq!(stream.queue.len(), 3, "queue entries for 10,003 frames");
    assert_eq!(stream.tail.len(), 4);
    assert_eq!(stream.queued, sent.len());
    let (got, _) = recv_all(&mut server, id);
    assert_eq!(got, sent, "the bytes arrived changed or out of order");
    assert_eq!(server.streams[&id].queued, 0);
}

#[test]
fn padding_is_stripped_and_returned_at_once() {
    let (mut client, mut server) = pair();
    let id = tunnel(&mut client, &mut server);
    let mut payload = vec![3u8];
    payload.extend_from_slice(b"abc");
    payload.extend_from_slice(&[0; 3]);
    frame::put_frame(&mut client.out, kind::DATA, flag::PADDED, id, &payload);
    pump(&mut client, &mut server);
    assert_eq!(recv_all(&mut server, id).0, b"abc");
    // All 7 bytes of the frame count as consumed: 3 read, 4 of padding returned unread.
    assert_eq!(server.streams[&id].recv_unacked, 7);
}

/// A pair whose decoders keep a copy of the peer's HPACK table, so either can move.
fn movable_pair() -> (Session, Session) {
    let (mut client, mut server) = (
        Session::new(Role::Client, limits()),
        Session::new(Role::Server, limits()),
    );
    client.decoder = hpack::Decoder::movable();
    server.decoder = hpack::Decoder::movable();
    pump(&mut client, &mut server);
    (client, server)
}

#[test]
fn both_ends_move_between_frames_and_their_streams_go_on() {
    let (mut client, mut server) = movable_pair();
    let a = tunnel(&mut client, &mut server);
    let b = tunnel(&mut client, &mut server);
    pump(&mut client, &mut server);
    assert!(matches!(
        client.poll_response(a, &mut cx()),
        Poll::Ready(Ok(_))
    ));
    assert!(matches!(
        client.poll_response(b, &mut cx()),
        Poll::Ready(Ok(_))
    ));
    // Data in flight both ways, some of it read, some not; b ended by the client.
    send(&mut client, a, &[1; 60_000]);
    send(&mut server, a, &[2; 5_000]);
    send(&mut client, b, b"last words");
    client.take_send(b, 0, true);
    client.out.extend_from_slice(&data_head(b, 0, true));
    pump(&mut client, &mut server);
    let (got, _) = recv_all(&mut server, a);
    assert_eq!(got.len(), 60_000);
    send(&mut client, a, &[3; 1_000]);
    send(&mut server, a, &[4; 300]);
    // Frames queued on both sides, not yet delivered: they move with their sender.
    let client_state = client.state().unwrap();
    let server_state = server.state().unwrap();
    assert!(!client_state.unsent.is_empty() && !server_state.unsent.is_empty());
    for (state, window) in [(&client_state, 4 << 20), (&server_state, 4 << 20)] {
        // Every byte the peer may send is either still allowed, unread, or read and not yet
        // granted back.
        let unread: usize = state.streams.iter().map(|s| s.unread.len()).sum();
        assert_eq!(
            state.recv_window + unread as i64 + i64::from(state.recv_unacked),
            window,
            "{state:?}"
        );
        for s in &state.streams {
            assert_eq!(
                s.recv_window + s.unread.len() as i64 + i64::from(s.recv_unacked),
                1 << 20,
                "{s:?}"
            );
        }
    }
    let mut client = Session::from_state(client_state, limits()).unwrap();
    let mut server = Session::from_state(server_state, limits()).unwrap();
    pump(&mut client, &mut server);
    let (got, eof) = recv_all(&mut server, a);
    assert_eq!((got, eof), (vec![3; 1_000], false));
    let (got, eof) = recv_all(&mut server, b);
    assert_eq!((got, eof), (b"last words".to_vec(), true));
    let (got, _) = recv_all(&mut client, a);
    assert_eq!(got, [vec![2; 5_000], vec![4; 300]].concat());
    // b ends both ways and both let go of it, so the server's limit of 2 has room.
    server.take_send(b, 0, true);
    server.out.extend_from_slice(&data_head(b, 0, true));
    pump(&mut client, &mut server);
    assert_eq!(recv_all(&mut client, b), (Vec::new(), true));
    client.drop_stream(b);
    server.drop_stream(b);
    pump(&mut client, &mut server);
    // New streams after the move: ids go on, headers decode against the moved HPACK tables.
    let c = tunnel(&mut client, &mut server);
    assert!(c > b);
    send(&mut client, c, b"hello");
    pump(&mut client, &mut server);
    assert_eq!(recv_all(&mut server, c).0, b"hello");
}

#[test]
fn a_session_that_has_not_settled_does_not_move_and_bad_states_are_refused() {
    let (mut client, mut server) = movable_pair();
    let id = client.open("a:1", &HeaderMap::new()).unwrap();
    pump(&mut client, &mut server);
    assert!(server.state().unwrap_err().contains("not yet handed"));
    assert!(client.state().unwrap_err().contains("not been answered"));
    let (plain, _) = pair();
    assert!(plain.state().unwrap_err().contains("HPACK"));
    let _ = accept(&mut server);
    server
        .respond(id, StatusCode::OK, &HeaderMap::new(), false)
        .unwrap();
    let good = server.state().unwrap();
    let refused = |change: &dyn Fn(&mut SessionState)| {
        let mut s = good.clone();
        change(&mut s);
        Session::from_state(s, limits()).expect_err("refused")
    };
    assert!(refused(&|s| s.max_frame_size = 100).contains("MAX_FRAME_SIZE"));
    assert!(refused(&|s| s.send_window = 1 << 40).contains("send window"));
    assert!(refused(&|s| s.streams[0].id = 99).contains("never opened"));
    assert!(refused(&|s| s.streams.push(s.streams[0].clone())).contains("twice"));
    assert!(refused(&|s| s.streams[0].unread = vec![0; 10]).contains("does not add up"));
    assert!(refused(&|s| s.recv_unacked += 1).contains("connection window does not add up"));
    assert!(refused(&|s| s.hpack_table_size = 1 << 20).contains("HPACK"));
    assert!(refused(&|s| s.unsent = vec![0; 4 << 20]).contains("unsent"));
    Session::from_state(good, limits()).unwrap();
    pump(&mut client, &mut server);
    let _ = client.poll_response(id, &mut cx());
    let mut bad = client.state().unwrap();
    bad.next_local_id = 2;
    let e = Session::from_state(bad, limits()).expect_err("refused");
    assert!(e.contains("next stream id"), "{e}");
}
