//! The handoff format between an old and a new proxy: what is encoded is decoded the same,
//! versions are agreed or refused with both sides named, and a hostile or broken message is
//! refused naming the field.

mod common;
#[path = "../../fuzz/seed_corpus.rs"]
mod seed_corpus;

use hbone::handoff::{ConnectionState, CopyState, SessionState, StreamState, TlsState};
use prost::Message;
use proxy::handoff::{
    Carried, CarriedItem, CarriedPlain, CarriedTunnel, MAX_MESSAGE, Offer, PlainKind, VERSION,
    VERSIONS, answer, decode_answer, decode_connection, decode_moved, decode_offer,
    encode_connection, encode_moved, proto,
};
use proxy::outbound::PoolKey;

/// A connection with every field set to something other than its default.
fn connection() -> Carried {
    Carried {
        pod: "uid-1".into(),
        outbound: Some(PoolKey {
            source: "spiffe://cluster.local/ns/default/sa/sleep"
                .parse()
                .unwrap(),
            expected: vec![
                "spiffe://cluster.local/ns/default/sa/a".parse().unwrap(),
                "spiffe://cluster.local/ns/default/sa/b".parse().unwrap(),
            ],
        }),
        state: state(),
        tunnels: vec![
            CarriedTunnel {
                stream_id: 7,
                copy: CopyState {
                    to_app: b"for the app".to_vec(),
                    to_app_eof: true,
                    to_app_done: false,
                    from_app: b"from the app".to_vec(),
                    from_app_eof: false,
                    from_app_done: true,
                    transferred: hbone::Transferred {
                        a_to_b: 12,
                        b_to_a: 34,
                    },
                },
                memo: b"memo".to_vec(),
            },
            CarriedTunnel {
                stream_id: 9,
                copy: CopyState::default(),
                memo: Vec::new(),
            },
        ],
    }
}

fn state() -> ConnectionState {
    ConnectionState {
        tls: TlsState {
            suite: 0x1302,
            tx_secret: vec![1; 48].into(),
            tx_seq: 7,
            rx_secret: vec![2; 48].into(),
            rx_seq: 9,
            plaintext: b"opened".to_vec(),
            ciphertext: vec![23, 3, 3, 0, 2, 9, 9],
            handshake: vec![24, 0],
            unsent: b"sealed".to_vec(),
            read_closed: true,
            write_closed: true,
            answer_pending: true,
            peer_certificates: vec![b"cert one".to_vec(), b"cert two".to_vec()],
            alpn: Some(b"h2".to_vec()),
        },
        session: SessionState {
            client: true,
            stream_window: 1 << 22,
            connection_window: 1 << 24,
            max_frame_size: 1 << 18,
            max_concurrent_streams: 100,
            max_header_list_size: 8192,
            peer_initial_window: 65_535,
            peer_max_frame_size: 16_384,
            peer_max_concurrent_streams: 250,
            next_local_id: 11,
            last_peer_id: 0,
            send_window: -5,
            recv_window: 1 << 23,
            recv_unacked: 77,
            hpack_table_size: 4096,
            hpack_entries: vec![
                (b"x-a".to_vec(), b"1".to_vec()),
                (b"x-b".to_vec(), Vec::new()),
            ],
            unsent: b"frames".to_vec(),
            goaway_received: Some(9),
            going_away: true,
            ping_outstanding: Some(*b"pingpong"),
            streams: vec![
                StreamState {
                    id: 7,
                    unread: b"unread".to_vec(),
                    recv_eof: true,
                    recv_window: -3,
                    recv_unacked: 5,
                    send_window: 1 << 20,
                    send_eof: false,
                },
                StreamState {
                    id: 9,
                    unread: Vec::new(),
                    recv_eof: false,
                    recv_window: 1,
                    recv_unacked: 0,
                    send_window: 0,
                    send_eof: true,
                },
            ],
        },
        received: b"half a frame".to_vec(),
    }
}

#[test]
fn a_connection_decodes_to_what_was_encoded() {
    let state = connection();
    assert_eq!(
        decode_connection(&encode_connection(&state)).unwrap(),
        state
    );
    // Optional fields absent stay absent.
    let mut sparse = connection();
    sparse.state.tls.alpn = None;
    sparse.state.session.goaway_received = None;
    sparse.state.session.ping_outstanding = None;
    sparse.tunnels.clear();
    sparse.outbound = None;
    assert_eq!(
        decode_connection(&encode_connection(&sparse)).unwrap(),
        sparse
    );
}

#[test]
fn versions_are_agreed_or_refused_naming_both_sides() {
    let offer = decode_offer(
        &Offer {
            versions: vec![VERSION + 1, VERSION],
            sender: "ztunnel 0.2".into(),
        }
        .encode_to_vec(),
    )
    .unwrap();
    let yes = answer(&offer);
    assert_eq!(decode_answer(&yes.encode_to_vec()), Ok(VERSION));
    // An old proxy of version 1 gets version 1 (inbound connections only).
    let old = answer(&Offer {
        versions: vec![1],
        sender: "ztunnel 0.1".into(),
    });
    assert_eq!(decode_answer(&old.encode_to_vec()), Ok(1));
    let no = answer(&Offer {
        versions: vec![VERSION + 1],
        sender: "ztunnel 0.3".into(),
    });
    let e = decode_answer(&no.encode_to_vec()).unwrap_err().to_string();
    assert!(
        e.contains("ztunnel 0.3") && e.contains(&format!("versions {VERSIONS:?}")),
        "{e}"
    );
    let chose = proto::Answer {
        version: VERSION + 7,
        refusal: String::new(),
    };
    let e = decode_answer(&chose.encode_to_vec())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not offered"), "{e}");
    assert!(decode_offer(&[0xff; 5000]).is_err());
}

#[test]
fn broken_and_hostile_messages_are_refused_naming_the_field() {
    let good = encode_connection(&connection());
    let refused = |bytes: &[u8]| decode_connection(bytes).unwrap_err().to_string();
    // Cut short anywhere inside: never a panic, an error or (at a field's end) a smaller state.
    for cut in 0..good.len() {
        let _ = decode_connection(&good[..cut]);
    }
    assert!(refused(&good[..good.len() - 3]).contains("connection"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.tls = None;
    assert!(refused(&m.encode_to_vec()).contains("connection.tls is missing"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.session = None;
    assert!(refused(&m.encode_to_vec()).contains("connection.session is missing"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.tls.as_mut().unwrap().tx_secret = vec![0; 4096];
    assert!(refused(&m.encode_to_vec()).contains("tx_secret"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.tls.as_mut().unwrap().suite = 0x10000;
    assert!(refused(&m.encode_to_vec()).contains("suite"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.tls.as_mut().unwrap().peer_certificates = vec![vec![1]; 1000];
    assert!(refused(&m.encode_to_vec()).contains("peer_certificates"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.session.as_mut().unwrap().hpack_entries = vec![proto::HpackEntry::default(); 1000];
    assert!(refused(&m.encode_to_vec()).contains("hpack_entries"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.session.as_mut().unwrap().streams = vec![proto::Stream::default(); 20_000];
    assert!(refused(&m.encode_to_vec()).contains("streams"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.tunnels = vec![proto::Tunnel::default(); 3];
    assert!(refused(&m.encode_to_vec()).contains("connection.tunnels: 3 tunnels on 2 streams"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.tunnels[1].memo = vec![0; 5000];
    assert!(refused(&m.encode_to_vec()).contains("connection.tunnels[1].memo"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.outbound.as_mut().unwrap().source = "sleep".into();
    assert!(refused(&m.encode_to_vec()).contains("connection.outbound.source \"sleep\""));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.outbound.as_mut().unwrap().expected[1] = "spiffe://".into();
    assert!(refused(&m.encode_to_vec()).contains("connection.outbound.expected[1]"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.outbound.as_mut().unwrap().expected.reverse();
    assert!(refused(&m.encode_to_vec()).contains("not sorted"));
    let mut m = proto::Connection::decode(&good[..]).unwrap();
    m.pod = "p".repeat(300);
    assert!(refused(&m.encode_to_vec()).contains("connection.pod"));
    assert!(refused(&vec![0u8; MAX_MESSAGE + 1]).contains("more than"));
}

fn plain() -> CarriedItem {
    CarriedItem::Plain(CarriedPlain {
        pod: "uid-2".into(),
        kind: PlainKind::Passthrough,
        copy: connection().tunnels[0].copy.clone(),
        memo: b"memo".to_vec(),
    })
}

#[test]
fn version_2_items_decode_to_what_was_encoded_and_bad_ones_are_refused_naming_the_field() {
    for item in [CarriedItem::Connection(connection()), plain()] {
        assert_eq!(decode_moved(&encode_moved(&item)).unwrap(), item);
    }
    let refused = |m: proto::Moved| decode_moved(&m.encode_to_vec()).unwrap_err().to_string();
    assert!(refused(proto::Moved { item: None }).contains("moved.item is missing"));
    let good = proto::Moved::decode(&encode_moved(&plain())[..]).unwrap();
    let with = |change: fn(&mut proto::Plain)| {
        let mut m = good.clone();
        let Some(proto::moved::Item::Plain(p)) = m.item.as_mut() else {
            unreachable!()
        };
        change(p);
        m
    };
    assert!(refused(with(|p| p.kind = 0)).contains("plain.kind 0"));
    assert!(refused(with(|p| p.kind = 9)).contains("plain.kind 9"));
    assert!(refused(with(|p| p.copy = None)).contains("plain.copy is missing"));
    assert!(
        refused(with(|p| p.copy.as_mut().unwrap().memo = vec![0; 5000]))
            .contains("plain.copy.memo")
    );
    assert!(refused(with(|p| p.pod = "p".repeat(300))).contains("plain.pod"));
    // A connection inside is checked as one alone.
    let mut m =
        proto::Moved::decode(&encode_moved(&CarriedItem::Connection(connection()))[..]).unwrap();
    if let Some(proto::moved::Item::Connection(c)) = m.item.as_mut() {
        c.tls = None;
    }
    assert!(refused(m).contains("connection.tls is missing"));
}

/// The seeds of the `handoff_decode` fuzz target; `HANDOFF_WRITE_SEEDS=1` writes them anew.
#[test]
fn handoff_decode_target_over_seed_corpus() {
    if std::env::var_os("HANDOFF_WRITE_SEEDS").is_some() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/handoff_decode");
        std::fs::create_dir_all(&dir).unwrap();
        let offer = Offer {
            versions: vec![VERSION],
            sender: "seed".into(),
        };
        for (name, bytes) in [
            ("connection.bin", encode_connection(&connection())),
            (
                "moved_connection.bin",
                encode_moved(&CarriedItem::Connection(connection())),
            ),
            ("moved_plain.bin", encode_moved(&plain())),
            ("offer.bin", offer.encode_to_vec()),
            ("answer.bin", answer(&offer).encode_to_vec()),
            (
                "truncated.bin",
                encode_connection(&connection())[..40].to_vec(),
            ),
        ] {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let files = seed_corpus::seeds("handoff_decode");
    assert!(files.len() >= 4);
    for data in &files {
        proxy::handoff::fuzz_decode(data);
    }
    assert!(files.iter().any(|f| decode_connection(f).is_ok()));
    assert!(files.iter().any(|f| decode_moved(f).is_ok()));
}

mod channel {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::path::PathBuf;

    use proxy::handoff::{Channel, Listener, MAX_MESSAGE};

    fn socket_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("handoff-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("handoff.sock")
    }

    #[test]
    fn messages_and_their_sockets_cross_and_a_closed_peer_is_seen() {
        let path = socket_path("cross");
        let listener = Listener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        let old = std::thread::spawn(move || {
            let channel = listener.accept().unwrap();
            // Two connected sockets: one end goes across, we keep the other.
            let (mut kept, moved) = std::os::unix::net::UnixStream::pair().unwrap();
            channel.send(b"first", &[moved.as_fd()]).unwrap();
            drop(moved);
            let big: Vec<u8> = (0..10 << 20).map(|i| (i % 253) as u8).collect();
            channel.send(&big, &[]).unwrap();
            kept.write_all(b"through the moved socket").unwrap();
            let mut answer = [0u8; 4];
            kept.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"back");
        });
        let new = Channel::connect(&path).unwrap();
        let (msg, fds) = new.recv().unwrap().unwrap();
        assert_eq!((msg.as_slice(), fds.len()), (&b"first"[..], 1));
        let mut moved = std::os::unix::net::UnixStream::from(fds.into_iter().next().unwrap());
        let (big, none) = new.recv().unwrap().unwrap();
        assert_eq!((big.len(), none.len()), (10 << 20, 0));
        assert!(big.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8));
        let mut got = vec![0u8; 24];
        moved.read_exact(&mut got).unwrap();
        assert_eq!(got, b"through the moved socket");
        moved.write_all(b"back").unwrap();
        old.join().unwrap();
        assert!(new.recv().unwrap().is_none(), "the old proxy closed");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_lying_length_a_cut_message_and_a_stranger_are_refused() {
        let path = socket_path("lies");
        let listener = Listener::bind(&path).unwrap();
        let writer = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
                raw.write_all(&((MAX_MESSAGE as u32) + 1).to_be_bytes())
                    .unwrap();
                let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
                raw.write_all(&100u32.to_be_bytes()).unwrap();
                raw.write_all(b"only ten b").unwrap();
            }
        });
        let e = listener.accept().unwrap().recv().unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        let e = listener.accept().unwrap().recv().unwrap_err().to_string();
        assert!(e.contains("closed in the middle"), "{e}");
        writer.join().unwrap();

        // Another user (the socket opened to everyone for the test): refused by its uid.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        let stranger = std::process::Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(format!(
                "import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({:?}); time.sleep(1)",
                path.to_string_lossy()
            ))
            .spawn()
            .expect("setpriv and /usr/bin/python3 (installed with the test tools)");
        // Fail loudly, not hang, if the stranger never connects.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(listener.accept().map(drop)));
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the stranger connected")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("uid 65534"), "{e}");
        let _ = stranger.wait_with_output();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

/// Live HBONE connections handed from one server to another across a real handoff channel:
/// their sockets and their tunnels' app sockets passed as descriptors (more tunnels than one
/// message can carry), the bytes going on both ways, and a message that lies about its
/// descriptors refused.
mod transfer {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use hbone::handoff::{Copied, copy_tunnel_movable, traffic_secret_log};
    use hbone::{Authority, Config, InboundConnect, Pool, Server, StaticTls};
    use http::HeaderMap;
    use identity::DevCa;
    use proxy::handoff::{
        Channel, Handed, Listener, MAX_FDS, PlainKind, VERSION, recv_moved, send_moved,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::common::{HOUR, echo_app, id};

    fn server(ca: &DevCa, app: SocketAddr) -> Server<impl hbone::ConnectHandler> {
        let creds = ca.issue(&id("web"), HOUR).unwrap();
        let mut tls =
            identity::tls::server_config(creds.chain, creds.key, ca.roots(), "cluster.local")
                .unwrap();
        tls.key_log = traffic_secret_log();
        let mut config = Config::default();
        config.movable = true;
        config.max_concurrent_streams = 1000;
        Server::new(
            config,
            Arc::new(tls),
            move |req: InboundConnect| async move {
                let mut app = TcpStream::connect(app).await.unwrap();
                let mut tunnel = req.accept().unwrap();
                let memo = b"memo".to_vec();
                let _ = copy_tunnel_movable(&mut tunnel, &mut app, memo, None).await;
            },
        )
    }

    fn socket_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("handoff-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("handoff.sock")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_connections_cross_the_channel_with_more_tunnels_than_one_message_carries() {
        let tunnels = MAX_FDS + 20;
        let ca = DevCa::generate("cluster.local").unwrap();
        let app = echo_app(std::net::Ipv4Addr::LOCALHOST.into()).await;
        let (old, new) = (server(&ca, app), server(&ca, app));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = old.clone();
        tokio::spawn(async move { serving.serve(listener).await });
        let creds = ca.issue(&id("sleep"), HOUR).unwrap();
        let tls = identity::tls::client_config(creds.chain, creds.key, ca.roots(), vec![id("web")])
            .unwrap();
        let mut config = Config::default();
        config.max_concurrent_streams = 1000;
        let pool = Pool::new(config, StaticTls(Arc::new(tls)));
        let authority: Authority = app.to_string().parse().unwrap();
        let mut open = Vec::new();
        for n in 0..tunnels {
            let mut t = pool
                .connect((), addr, &authority, HeaderMap::new())
                .await
                .unwrap();
            let said = format!("before {n}");
            t.write_all(said.as_bytes()).await.unwrap();
            let mut back = vec![0u8; said.len()];
            t.read_exact(&mut back).await.unwrap();
            open.push(t);
        }
        assert_eq!(
            pool.connection_count(),
            1,
            "one connection carries them all"
        );

        let path = socket_path("transfer");
        let waiting = Listener::bind(&path).unwrap();
        let handed = old.hand_off(Duration::from_secs(5)).await;
        assert!(handed.stayed.is_empty(), "{:?}", handed.stayed);
        let sender = std::thread::spawn(move || {
            let channel = waiting.accept().unwrap();
            for moved in handed.moved {
                let item = Handed::Connection {
                    pod: "pod-uid".into(),
                    outbound: None,
                    connection: moved,
                };
                send_moved(&channel, VERSION, &item).unwrap();
                // The old process's copies close with it; the other process holds duplicates.
            }
        });
        let received = tokio::task::spawn_blocking(move || {
            let channel = Channel::connect(&path).unwrap();
            let mut received = Vec::new();
            while let Some(moved) = recv_moved(&channel, VERSION).unwrap() {
                received.push(moved);
            }
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
            received
        })
        .await
        .unwrap();
        sender.join().unwrap();
        assert_eq!(received.len(), 1);
        let Some(Handed::Connection {
            pod,
            outbound,
            connection: moved,
        }) = received.into_iter().next()
        else {
            panic!("not a connection");
        };
        assert_eq!(pod, "pod-uid");
        assert_eq!(outbound, None);
        assert_eq!(moved.tunnels.len(), tunnels);
        for adopted in new.adopt(moved).unwrap() {
            assert_eq!(adopted.memo, b"memo");
            tokio::spawn(async move {
                let mut tunnel = adopted.tunnel;
                let mut app = TcpStream::from_std(adopted.app).unwrap();
                let copied =
                    copy_tunnel_movable(&mut tunnel, &mut app, adopted.memo, Some(adopted.copy))
                        .await;
                assert!(matches!(copied, Ok(Copied::Done(_))), "{copied:?}");
            });
        }
        for (n, mut t) in open.into_iter().enumerate() {
            let said = format!("after {n}");
            t.write_all(said.as_bytes()).await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut back))
                .await
                .expect("a moved tunnel stalled")
                .unwrap();
            assert_eq!(back, said.as_bytes(), "tunnel {n}");
        }
    }

    #[test]
    fn a_connection_whose_descriptors_do_not_match_its_tunnels_is_refused() {
        use std::os::fd::AsFd;
        let path = socket_path("mismatch");
        let waiting = Listener::bind(&path).unwrap();
        let message = super::encode_connection(&super::connection());
        let sender = std::thread::spawn(move || {
            let channel = waiting.accept().unwrap();
            // Two tunnels: three descriptors wanted, one sent, then a message of bytes.
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            channel.send(&message, &[a.as_fd()]).unwrap();
            channel.send(b"not descriptors", &[]).unwrap();
        });
        let channel = Channel::connect(&path).unwrap();
        // Version 1's message: a bare connection.
        let e = recv_moved(&channel, 1).unwrap_err().to_string();
        assert!(e.contains("2 tunnels came with 1 descriptors"), "{e}");
        sender.join().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_plain_connection_passes_with_its_two_sockets_and_not_in_version_1() {
        use std::io::{Read, Write};
        let pair = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let near = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (far, _) = listener.accept().unwrap();
            (near, far)
        };
        let ((mut client, client_side), (mut server, server_side)) = (pair(), pair());
        let copy = hbone::handoff::CopyState {
            to_app: b"held for the server".to_vec(),
            from_app_eof: true,
            ..Default::default()
        };
        let item = Handed::Plain {
            pod: "pod-uid".into(),
            kind: PlainKind::InboundPlaintext,
            copy: hbone::handoff::MovedPlain {
                a: client_side.into(),
                b: server_side.into(),
                copy: copy.clone(),
                memo: b"memo".to_vec(),
            },
        };
        let path = socket_path("plain");
        let waiting = Listener::bind(&path).unwrap();
        let sender = std::thread::spawn(move || {
            let channel = waiting.accept().unwrap();
            let e = send_moved(&channel, 1, &item).unwrap_err().to_string();
            assert!(e.contains("version 1"), "{e}");
            send_moved(&channel, VERSION, &item).unwrap();
        });
        let channel = Channel::connect(&path).unwrap();
        let received = recv_moved(&channel, VERSION).unwrap();
        sender.join().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
        let Some(Handed::Plain { pod, kind, copy: m }) = received else {
            panic!("not a plain connection: {received:?}");
        };
        assert_eq!(
            (pod.as_str(), kind, &m.copy, &m.memo[..]),
            ("pod-uid", PlainKind::InboundPlaintext, &copy, &b"memo"[..])
        );
        // The client's socket first, then the other.
        let (mut a, mut b) = (
            std::net::TcpStream::from(m.a),
            std::net::TcpStream::from(m.b),
        );
        a.write_all(b"to the client").unwrap();
        b.write_all(b"to the server").unwrap();
        let mut got = [0u8; 13];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to the client");
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to the server");
    }
}
