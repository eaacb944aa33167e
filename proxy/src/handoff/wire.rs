//! The handoff's messages (`proto/handoff.proto`, package `ambient.handoff.v1`): encoding, and a
//! decoder that bounds the message and every field and names the one it refuses.

use prost::Message;

use hbone::handoff::{ConnectionState, CopyState, SessionState, StreamState, TlsState};
use identity::SpiffeId;

use crate::outbound::PoolKey;

/// The messages, generated from `proto/handoff.proto` by `cargo run -p protogen`.
#[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all)]
pub mod proto {
    include!("../generated/ambient.handoff.v1.rs");
}

pub use proto::{Answer, Offer};

/// The newest format version this build sends and takes. Version 2 added outbound connections
/// (`Connection.outbound`); a version 1 successor gets the inbound ones only.
pub const VERSION: u32 = 2;

/// The versions this build sends and takes, newest first.
pub const VERSIONS: [u32; 2] = [VERSION, 1];

/// The largest message taken: a connection's buffers (its windows' worth of unread data at most,
/// frames and records not yet written) stay well below it.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The most peer certificates and HPACK entries a connection carries (a chain; a 4 KiB table of
/// 32-byte minimum entries).
const MAX_CERTIFICATES: usize = 16;
const MAX_HPACK_ENTRIES: usize = 4096 / 32;
/// The most streams one connection carries.
const MAX_STREAMS: usize = 10_000;
/// The longest secret of a TLS 1.3 suite (SHA-384).
const MAX_SECRET: usize = 48;

/// A handoff message that was refused, and why (naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("handoff message refused: {0}")]
pub struct Refused(pub String);

fn refused(what: impl Into<String>) -> Refused {
    Refused(what.into())
}

/// Decodes the old proxy's offer.
pub fn decode_offer(bytes: &[u8]) -> Result<Offer, Refused> {
    if bytes.len() > 4096 {
        return Err(refused(format!("an offer of {} bytes", bytes.len())));
    }
    let offer = Offer::decode(bytes).map_err(|e| refused(format!("offer: {e}")))?;
    if offer.versions.len() > 64 {
        return Err(refused(format!(
            "an offer of {} versions",
            offer.versions.len()
        )));
    }
    Ok(offer)
}

/// The answer to `offer`: the newest version both sides know, else a refusal naming both sides'.
pub fn answer(offer: &Offer) -> Answer {
    match VERSIONS.iter().find(|v| offer.versions.contains(v)) {
        Some(&version) => Answer {
            version,
            refusal: String::new(),
        },
        None => Answer {
            version: 0,
            refusal: format!(
                "this proxy takes handoff versions {VERSIONS:?}; {} offered {:?}",
                if offer.sender.is_empty() {
                    "the old proxy"
                } else {
                    &offer.sender
                },
                offer.versions
            ),
        },
    }
}

/// Decodes the new proxy's answer: `Ok(version)` to go on, `Err` with its refusal (or why the
/// answer itself is refused) to drain instead.
pub fn decode_answer(bytes: &[u8]) -> Result<u32, Refused> {
    if bytes.len() > 4096 {
        return Err(refused(format!("an answer of {} bytes", bytes.len())));
    }
    let answer = Answer::decode(bytes).map_err(|e| refused(format!("answer: {e}")))?;
    match answer.version {
        v if VERSIONS.contains(&v) => Ok(v),
        0 => Err(refused(format!(
            "the new proxy refused: {}",
            answer.refusal
        ))),
        other => Err(refused(format!(
            "the new proxy chose version {other}, which was not offered"
        ))),
    }
}

/// A moved connection as the handoff carries it, its sockets aside: the pod whose listener
/// accepted it (or whose outbound path dialed it), its state, and its tunnels (each one's
/// application socket is passed after the connection's own, in this order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    /// The pod (its node agent's uid).
    pub pod: String,
    /// For a connection the pod's outbound path dialed: what it was pooled by. `None`: the
    /// pod's inbound listener accepted it.
    pub outbound: Option<PoolKey>,
    /// The connection's TLS and HTTP/2 state.
    pub state: ConnectionState,
    /// Its tunnels, in stream order.
    pub tunnels: Vec<CarriedTunnel>,
}

/// One tunnel of a [`Carried`] connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedTunnel {
    /// Its stream.
    pub stream_id: u32,
    /// Where its copy stood.
    pub copy: CopyState,
    /// What the proxy's inbound or outbound path attached to it.
    pub memo: Vec<u8>,
}

/// The longest pod uid taken.
const MAX_POD: usize = 253;
/// The longest memo taken.
const MAX_MEMO: usize = 4096;

/// Encodes a moved connection (version 1's message; version 2 wraps it, [`encode_moved`]).
pub fn encode_connection(carried: &Carried) -> Vec<u8> {
    connection_proto(carried).encode_to_vec()
}

/// A copy's state as the handoff carries it.
fn tunnel_proto(t: &CarriedTunnel) -> proto::Tunnel {
    proto::Tunnel {
        stream_id: t.stream_id,
        to_app: t.copy.to_app.clone(),
        to_app_eof: t.copy.to_app_eof,
        to_app_done: t.copy.to_app_done,
        from_app: t.copy.from_app.clone(),
        from_app_eof: t.copy.from_app_eof,
        from_app_done: t.copy.from_app_done,
        to_app_bytes: t.copy.transferred.a_to_b,
        from_app_bytes: t.copy.transferred.b_to_a,
        memo: t.memo.clone(),
    }
}

/// A copy's state read back; `what` names it in a refusal.
fn tunnel_from_proto(what: &str, t: proto::Tunnel) -> Result<CarriedTunnel, Refused> {
    if t.memo.len() > MAX_MEMO {
        return Err(refused(format!("{what}.memo: {} bytes", t.memo.len())));
    }
    Ok(CarriedTunnel {
        stream_id: t.stream_id,
        copy: CopyState {
            to_app: t.to_app,
            to_app_eof: t.to_app_eof,
            to_app_done: t.to_app_done,
            from_app: t.from_app,
            from_app_eof: t.from_app_eof,
            from_app_done: t.from_app_done,
            transferred: hbone::Transferred {
                a_to_b: t.to_app_bytes,
                b_to_a: t.from_app_bytes,
            },
        },
        memo: t.memo,
    })
}

fn connection_proto(carried: &Carried) -> proto::Connection {
    let state = &carried.state;
    let tls = &state.tls;
    let s = &state.session;
    proto::Connection {
        tls: Some(proto::Tls {
            suite: u32::from(tls.suite),
            tx_secret: tls.tx_secret.to_vec(),
            tx_seq: tls.tx_seq,
            rx_secret: tls.rx_secret.to_vec(),
            rx_seq: tls.rx_seq,
            plaintext: tls.plaintext.clone(),
            ciphertext: tls.ciphertext.clone(),
            handshake: tls.handshake.clone(),
            unsent: tls.unsent.clone(),
            read_closed: tls.read_closed,
            write_closed: tls.write_closed,
            answer_pending: tls.answer_pending,
            peer_certificates: tls.peer_certificates.clone(),
            alpn: tls.alpn.clone(),
        }),
        session: Some(proto::Session {
            client: s.client,
            stream_window: s.stream_window,
            connection_window: s.connection_window,
            max_frame_size: s.max_frame_size,
            max_concurrent_streams: s.max_concurrent_streams,
            max_header_list_size: s.max_header_list_size,
            peer_initial_window: s.peer_initial_window,
            peer_max_frame_size: s.peer_max_frame_size,
            peer_max_concurrent_streams: s.peer_max_concurrent_streams,
            next_local_id: s.next_local_id,
            last_peer_id: s.last_peer_id,
            send_window: s.send_window,
            recv_window: s.recv_window,
            recv_unacked: s.recv_unacked,
            hpack_table_size: s.hpack_table_size,
            hpack_entries: s
                .hpack_entries
                .iter()
                .map(|(name, value)| proto::HpackEntry {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            unsent: s.unsent.clone(),
            goaway_received: s.goaway_received,
            going_away: s.going_away,
            ping_outstanding: s.ping_outstanding.map(u64::from_be_bytes),
            streams: s
                .streams
                .iter()
                .map(|st| proto::Stream {
                    id: st.id,
                    unread: st.unread.clone(),
                    recv_eof: st.recv_eof,
                    recv_window: st.recv_window,
                    recv_unacked: st.recv_unacked,
                    send_window: st.send_window,
                    send_eof: st.send_eof,
                })
                .collect(),
        }),
        received: state.received.clone(),
        tunnels: carried.tunnels.iter().map(tunnel_proto).collect(),
        pod: carried.pod.clone(),
        outbound: carried.outbound.as_ref().map(|key| proto::OutboundKey {
            source: key.source.to_string(),
            expected: key.expected.iter().map(ToString::to_string).collect(),
        }),
    }
}

/// Decodes a moved connection, bounding the message and each field; the refusal names the
/// field.
pub fn decode_connection(bytes: &[u8]) -> Result<Carried, Refused> {
    if bytes.len() > MAX_MESSAGE {
        return Err(refused(format!(
            "a connection of {} bytes, more than {MAX_MESSAGE}",
            bytes.len()
        )));
    }
    let m = proto::Connection::decode(bytes).map_err(|e| refused(format!("connection: {e}")))?;
    connection_from_proto(m)
}

fn connection_from_proto(m: proto::Connection) -> Result<Carried, Refused> {
    let tls = m.tls.ok_or_else(|| refused("connection.tls is missing"))?;
    let s = m
        .session
        .ok_or_else(|| refused("connection.session is missing"))?;
    let suite = u16::try_from(tls.suite).map_err(|_| {
        refused(format!(
            "connection.tls.suite {} is no cipher suite",
            tls.suite
        ))
    })?;
    for (what, secret) in [("tx_secret", &tls.tx_secret), ("rx_secret", &tls.rx_secret)] {
        if secret.is_empty() || secret.len() > MAX_SECRET {
            return Err(refused(format!(
                "connection.tls.{what} is {} bytes",
                secret.len()
            )));
        }
    }
    if tls.peer_certificates.len() > MAX_CERTIFICATES {
        return Err(refused(format!(
            "connection.tls.peer_certificates: {} certificates",
            tls.peer_certificates.len()
        )));
    }
    if s.hpack_entries.len() > MAX_HPACK_ENTRIES {
        return Err(refused(format!(
            "connection.session.hpack_entries: {} entries",
            s.hpack_entries.len()
        )));
    }
    if s.streams.len() > MAX_STREAMS {
        return Err(refused(format!(
            "connection.session.streams: {} streams",
            s.streams.len()
        )));
    }
    if m.tunnels.len() > s.streams.len() {
        return Err(refused(format!(
            "connection.tunnels: {} tunnels on {} streams",
            m.tunnels.len(),
            s.streams.len()
        )));
    }
    if m.pod.len() > MAX_POD {
        return Err(refused(format!("connection.pod: {} bytes", m.pod.len())));
    }
    let outbound = m.outbound.map(decode_key).transpose()?;
    let mut tunnels = Vec::with_capacity(m.tunnels.len());
    for (i, t) in m.tunnels.into_iter().enumerate() {
        tunnels.push(tunnel_from_proto(&format!("connection.tunnels[{i}]"), t)?);
    }
    let state = ConnectionState {
        tls: TlsState {
            suite,
            tx_secret: tls.tx_secret.into(),
            tx_seq: tls.tx_seq,
            rx_secret: tls.rx_secret.into(),
            rx_seq: tls.rx_seq,
            plaintext: tls.plaintext,
            ciphertext: tls.ciphertext,
            handshake: tls.handshake,
            unsent: tls.unsent,
            read_closed: tls.read_closed,
            write_closed: tls.write_closed,
            answer_pending: tls.answer_pending,
            peer_certificates: tls.peer_certificates,
            alpn: tls.alpn,
        },
        session: SessionState {
            client: s.client,
            stream_window: s.stream_window,
            connection_window: s.connection_window,
            max_frame_size: s.max_frame_size,
            max_concurrent_streams: s.max_concurrent_streams,
            max_header_list_size: s.max_header_list_size,
            peer_initial_window: s.peer_initial_window,
            peer_max_frame_size: s.peer_max_frame_size,
            peer_max_concurrent_streams: s.peer_max_concurrent_streams,
            next_local_id: s.next_local_id,
            last_peer_id: s.last_peer_id,
            send_window: s.send_window,
            recv_window: s.recv_window,
            recv_unacked: s.recv_unacked,
            hpack_table_size: s.hpack_table_size,
            hpack_entries: s
                .hpack_entries
                .into_iter()
                .map(|e| (e.name, e.value))
                .collect(),
            unsent: s.unsent,
            goaway_received: s.goaway_received,
            going_away: s.going_away,
            ping_outstanding: s.ping_outstanding.map(u64::to_be_bytes),
            streams: s
                .streams
                .into_iter()
                .map(|st| StreamState {
                    id: st.id,
                    unread: st.unread,
                    recv_eof: st.recv_eof,
                    recv_window: st.recv_window,
                    recv_unacked: st.recv_unacked,
                    send_window: st.send_window,
                    send_eof: st.send_eof,
                })
                .collect(),
        },
        received: m.received,
    };
    Ok(Carried {
        pod: m.pod,
        outbound,
        state,
        tunnels,
    })
}

/// What a plain connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainKind {
    /// A pod's outbound connection to a destination outside the mesh.
    Passthrough,
    /// A connection to a pod from a client outside the mesh (port 15006).
    InboundPlaintext,
}

/// A moved plain connection as the handoff carries it, its two sockets (the client's first)
/// aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedPlain {
    /// The pod (its node agent's uid).
    pub pod: String,
    /// What it is.
    pub kind: PlainKind,
    /// Where its copy stood (the client in a tunnel's place).
    pub copy: CopyState,
    /// What the proxy attached to it.
    pub memo: Vec<u8>,
}

/// One moved item of version 2.
#[derive(Debug, Clone, PartialEq, Eq)]
// Items live for one handoff, once each; boxing the larger would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum CarriedItem {
    /// An HBONE connection.
    Connection(Carried),
    /// A plain connection.
    Plain(CarriedPlain),
}

/// Encodes a moved item (version 2's message).
pub fn encode_moved(item: &CarriedItem) -> Vec<u8> {
    let item = match item {
        CarriedItem::Connection(c) => proto::moved::Item::Connection(connection_proto(c)),
        CarriedItem::Plain(p) => proto::moved::Item::Plain(proto::Plain {
            pod: p.pod.clone(),
            kind: match p.kind {
                PlainKind::Passthrough => proto::PlainKind::Passthrough,
                PlainKind::InboundPlaintext => proto::PlainKind::InboundPlaintext,
            } as i32,
            copy: Some(tunnel_proto(&CarriedTunnel {
                stream_id: 0,
                copy: p.copy.clone(),
                memo: p.memo.clone(),
            })),
        }),
    };
    proto::Moved { item: Some(item) }.encode_to_vec()
}

/// Decodes a moved item (version 2), bounding the message and each field; the refusal names
/// the field.
pub fn decode_moved(bytes: &[u8]) -> Result<CarriedItem, Refused> {
    if bytes.len() > MAX_MESSAGE {
        return Err(refused(format!(
            "a moved item of {} bytes, more than {MAX_MESSAGE}",
            bytes.len()
        )));
    }
    let m = proto::Moved::decode(bytes).map_err(|e| refused(format!("moved: {e}")))?;
    match m.item {
        None => Err(refused("moved.item is missing")),
        Some(proto::moved::Item::Connection(c)) => {
            connection_from_proto(c).map(CarriedItem::Connection)
        }
        Some(proto::moved::Item::Plain(p)) => {
            if p.pod.len() > MAX_POD {
                return Err(refused(format!("plain.pod: {} bytes", p.pod.len())));
            }
            let kind = match proto::PlainKind::try_from(p.kind) {
                Ok(proto::PlainKind::Passthrough) => PlainKind::Passthrough,
                Ok(proto::PlainKind::InboundPlaintext) => PlainKind::InboundPlaintext,
                _ => return Err(refused(format!("plain.kind {} is unknown", p.kind))),
            };
            let copy = p.copy.ok_or_else(|| refused("plain.copy is missing"))?;
            let copy = tunnel_from_proto("plain.copy", copy)?;
            Ok(CarriedItem::Plain(CarriedPlain {
                pod: p.pod,
                kind,
                copy: copy.copy,
                memo: copy.memo,
            }))
        }
    }
}

/// The most identities an outbound connection may expect (a service's backends' accounts).
const MAX_EXPECTED: usize = 1024;

fn decode_key(key: proto::OutboundKey) -> Result<PoolKey, Refused> {
    let id = |what: String, text: &str| {
        SpiffeId::parse(text)
            .map_err(|e| refused(format!("connection.outbound.{what} {text:?}: {e}")))
    };
    if key.expected.len() > MAX_EXPECTED {
        return Err(refused(format!(
            "connection.outbound.expected: {} identities",
            key.expected.len()
        )));
    }
    let source = id("source".into(), &key.source)?;
    let mut expected = Vec::with_capacity(key.expected.len());
    for (i, e) in key.expected.iter().enumerate() {
        expected.push(id(format!("expected[{i}]"), e)?);
    }
    if !expected.is_sorted() {
        return Err(refused("connection.outbound.expected is not sorted"));
    }
    Ok(PoolKey { source, expected })
}

/// The body of the `handoff_decode` fuzz target: any bytes as each message. No panic, and a
/// connection that decodes encodes back to bytes that decode to the same state.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode(data: &[u8]) {
    let _ = decode_offer(data).map(|offer| answer(&offer));
    let _ = decode_answer(data);
    if let Ok(carried) = decode_connection(data) {
        let again = decode_connection(&encode_connection(&carried)).expect("our own encoding");
        assert!(
            again == carried,
            "a connection changed across encode and decode"
        );
    }
    if let Ok(item) = decode_moved(data) {
        let again = decode_moved(&encode_moved(&item)).expect("our own encoding");
        assert!(
            again == item,
            "a moved item changed across encode and decode"
        );
    }
}
