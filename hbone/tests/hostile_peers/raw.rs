//! The attacker's tools: HTTP/2 frames and HPACK blocks written byte by byte, a raw HTTP/2 client
//! over an ordinary TLS client, and a raw TLS 1.3 record writer that seals (or breaks) records
//! itself with the keys rustls hands over after its handshake.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

// ----- HTTP/2 frames -----

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One whole frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in values {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn rst(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn headers(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
    frame(HEADERS, flags | END_HEADERS, stream, block)
}

// ----- HPACK -----

/// An HPACK integer with an `n`-bit prefix; `first` holds the bits above it.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal field without indexing, with a new name.
pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// A literal field that the decoder adds to its dynamic table.
pub fn literal_indexed(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x40);
    hpack_string(out, name);
    hpack_string(out, value);
}

/// A field taken whole from the (static or dynamic) table.
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    hpack_int(out, 0x80, 7, index);
}

/// A CONNECT request head for `authority`, plus `extra` fields.
pub fn connect_block(authority: &str, extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    literal(&mut out, b":method", b"CONNECT");
    literal(&mut out, b":authority", authority.as_bytes());
    for (n, v) in extra {
        literal(&mut out, n, v);
    }
    out
}

// ----- reading frames -----

/// A frame as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM, or of a GOAWAY.
    pub fn code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// What a server said back, until it closed or went quiet.
#[derive(Default)]
pub struct Heard {
    pub frames: Vec<Frame>,
    /// The connection ended (EOF or an error) rather than going quiet.
    pub closed: bool,
}

impl std::fmt::Debug for Heard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = |k: u8| self.frames.iter().filter(|x| x.kind == k).count();
        let resets = self.resets();
        write!(
            f,
            "{} frames ({} HEADERS, {} DATA, {} RST_STREAM {:?}{}, {} PING), GOAWAY {:?}, closed {}",
            self.frames.len(),
            count(HEADERS),
            count(DATA),
            resets.len(),
            &resets[..resets.len().min(8)],
            if resets.len() > 8 { "..." } else { "" },
            count(PING),
            self.goaway(),
            self.closed
        )
    }
}

impl Heard {
    /// The GOAWAY's error code, if one came.
    pub fn goaway(&self) -> Option<u32> {
        self.frames
            .iter()
            .find(|f| f.kind == GOAWAY)
            .and_then(Frame::code)
    }

    /// RST_STREAM frames as (stream, code).
    pub fn resets(&self) -> Vec<(u32, u32)> {
        self.frames
            .iter()
            .filter(|f| f.kind == RST_STREAM)
            .map(|f| (f.stream, f.code().unwrap_or(u32::MAX)))
            .collect()
    }

    /// Streams answered with a HEADERS frame.
    pub fn answered(&self) -> Vec<u32> {
        self.frames
            .iter()
            .filter(|f| f.kind == HEADERS)
            .map(|f| f.stream)
            .collect()
    }
}

/// A raw HTTP/2 client over an ordinary TLS 1.3 client (with a mesh certificate): it writes
/// whatever bytes it is given and reads frames back.
pub struct RawH2<S> {
    pub io: S,
    rbuf: Vec<u8>,
}

impl RawH2<tokio_rustls::client::TlsStream<TcpStream>> {
    /// TLS to `addr`, then the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::IpAddress(addr.ip().into());
        let io = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        let mut raw = RawH2 {
            io,
            rbuf: Vec::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(&[]));
        raw.send(&hello).await;
        raw
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawH2<S> {
    /// The server side of `io`: reads the client's preface, sends an empty SETTINGS frame.
    pub async fn serve(mut io: S) -> Self {
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface[..], PREFACE);
        let mut raw = RawH2 {
            io,
            rbuf: Vec::new(),
        };
        raw.send(&settings(&[])).await;
        raw
    }

    /// Writes `bytes`; a server that already closed is not an error (the test reads why).
    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.io.write_all(bytes).await.is_ok() && self.io.flush().await.is_ok()
    }

    /// The next frame, or `None` if the connection ended or nothing came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<Frame, bool> {
        loop {
            if self.rbuf.len() >= 9 {
                let len =
                    u32::from_be_bytes([0, self.rbuf[0], self.rbuf[1], self.rbuf[2]]) as usize;
                if self.rbuf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.rbuf[3],
                        flags: self.rbuf[4],
                        stream: u32::from_be_bytes([
                            self.rbuf[5],
                            self.rbuf[6],
                            self.rbuf[7],
                            self.rbuf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.rbuf[9..9 + len].to_vec(),
                    };
                    self.rbuf.drain(..9 + len);
                    return Ok(f);
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout(wait, self.io.read(&mut chunk)).await {
                Err(_) => return Err(false),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(true),
                Ok(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames until the connection closes or is quiet for `quiet`; answers the server's PINGs
    /// and SETTINGS as a live client would.
    pub async fn listen(&mut self, quiet: Duration) -> Heard {
        let mut heard = Heard::default();
        loop {
            match self.next(quiet).await {
                Ok(f) => {
                    if f.kind == SETTINGS && f.flags & ACK == 0 {
                        self.send(&frame(SETTINGS, ACK, 0, &[])).await;
                    }
                    if f.kind == PING && f.flags & ACK == 0 {
                        self.send(&frame(PING, ACK, 0, &f.payload)).await;
                    }
                    heard.frames.push(f);
                }
                Err(closed) => {
                    heard.closed = closed;
                    return heard;
                }
            }
        }
    }

    /// Frames until one matches `want` (answering PINGs on the way); panics after `limit`.
    pub async fn until(&mut self, limit: Duration, want: impl Fn(&Frame) -> bool) -> Frame {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(f) if want(&f) => return f,
                Ok(f) => {
                    if f.kind == PING && f.flags & ACK == 0 {
                        self.send(&frame(PING, ACK, 0, &f.payload)).await;
                    }
                }
                Err(closed) => panic!("no such frame (connection closed: {closed})"),
            }
        }
    }
}

// ----- raw TLS 1.3 records -----

pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// One direction's record keys.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Keys {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => panic!("unexpected suite"),
        };
        Keys {
            key: LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).unwrap()),
            iv: iv.as_ref().try_into().unwrap(),
            seq,
        }
    }

    fn nonce(&mut self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(n)
    }
}

/// Appends what rustls encodes (one handshake message) to `outgoing`.
fn encode(outgoing: &mut Vec<u8>, mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>) {
    let start = outgoing.len();
    outgoing.resize(start + 16 * 1024, 0);
    let n = match encode(&mut outgoing[start..]) {
        Err(EncodeError::InsufficientSize(need)) => {
            outgoing.resize(start + need.required_size, 0);
            encode(&mut outgoing[start..]).unwrap()
        }
        other => other.unwrap(),
    };
    outgoing.truncate(start + n);
}

/// rustls's side of a raw connection after the handshake (it derives the next keys).
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> (u64, ConnectionTrafficSecrets) {
        match self {
            Kernel::Client(k) => k.update_tx_secret().unwrap(),
            Kernel::Server(k) => k.update_tx_secret().unwrap(),
        }
    }

    fn update_rx(&mut self) -> (u64, ConnectionTrafficSecrets) {
        match self {
            Kernel::Client(k) => k.update_rx_secret().unwrap(),
            Kernel::Server(k) => k.update_rx_secret().unwrap(),
        }
    }
}

/// A TLS 1.3 peer (client or server) that completes rustls's handshake and then writes records
/// itself: valid ones, or broken in a chosen way.
pub struct RawTls {
    pub io: TcpStream,
    kernel: Kernel,
    tx: Keys,
    rx: Keys,
    rbuf: Vec<u8>,
}

/// What a peer's record held, once opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Data(Vec<u8>),
    /// An alert: (level, description).
    Alert(u8, u8),
    Handshake(Vec<u8>),
}

impl RawTls {
    /// Connects and completes the handshake with `config` (which needs secret extraction).
    pub async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> RawTls {
        Self::connect_then(addr, config, |_| Vec::new()).await
    }

    /// Like [`RawTls::connect`], with the records `early` makes sent in the same write as the
    /// client's last handshake flight (so the server reads them together with its Finished).
    pub async fn connect_then(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        early: impl FnOnce(&mut RawTls) -> Vec<u8>,
    ) -> RawTls {
        let mut config = (*config).clone();
        config.enable_secret_extraction = true;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut conn = UnbufferedClientConnection::new(Arc::new(config), name).unwrap();
        let mut io = TcpStream::connect(addr).await.unwrap();
        io.set_nodelay(true).unwrap();
        let mut incoming = vec![0u8; 64 * 1024];
        let mut used = 0;
        let mut outgoing = Vec::new();
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut incoming[..used]);
            let mut read = false;
            let mut done = false;
            match state.unwrap() {
                ConnectionState::EncodeTlsData(mut s) => {
                    encode(&mut outgoing, |out| s.encode(out));
                }
                // Written before the next read, or with the records after the handshake.
                ConnectionState::TransmitTlsData(s) => s.done(),
                ConnectionState::BlockedHandshake => read = true,
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        discard += rec.unwrap().discard;
                    }
                }
                ConnectionState::WriteTraffic(_) => done = true,
                other => panic!("unexpected handshake state {other:?}"),
            }
            incoming.copy_within(discard..used, 0);
            used -= discard;
            if done {
                break;
            }
            if read {
                io.write_all(&outgoing).await.unwrap();
                outgoing.clear();
                let n = io.read(&mut incoming[used..]).await.unwrap();
                assert!(n > 0, "the server closed during the handshake");
                used += n;
            }
        }
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().unwrap();
        let mut raw = RawTls {
            io,
            kernel: Kernel::Client(kernel),
            tx: Keys::new(secrets.tx),
            rx: Keys::new(secrets.rx),
            rbuf: incoming[..used].to_vec(),
        };
        outgoing.extend(early(&mut raw));
        if !outgoing.is_empty() {
            raw.io.write_all(&outgoing).await.unwrap();
        }
        raw
    }

    /// Sends the HTTP/2 preface and SETTINGS and waits for the server's first data record:
    /// from then on, our records reach the server's record layer (not rustls's handshake).
    pub async fn h2_hello(&mut self) {
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(&[]));
        let record = self.seal(APPLICATION_DATA, &hello);
        self.send(&record).await.unwrap();
        loop {
            match self.next_record(Duration::from_secs(5)).await {
                Some(Record::Data(_)) => return,
                Some(_) => {}
                None => panic!("the server said nothing after the preface"),
            }
        }
    }

    /// The server side: accepts `io` with `config` (which needs secret extraction); the client's
    /// records after its Finished are left for `next_record`.
    pub async fn accept(mut io: TcpStream, config: Arc<rustls::ServerConfig>) -> RawTls {
        let mut config = (*config).clone();
        config.enable_secret_extraction = true;
        // No tickets: nothing of ours comes before the first record the test writes.
        config.send_tls13_tickets = 0;
        let mut conn = UnbufferedServerConnection::new(Arc::new(config)).unwrap();
        io.set_nodelay(true).unwrap();
        let mut incoming = vec![0u8; 64 * 1024];
        let mut used = 0;
        let mut outgoing = Vec::new();
        loop {
            // One record at a time: what follows the client's Finished stays ours.
            let fed = if conn.is_handshaking() {
                match incoming[..used].get(3..5) {
                    Some(l) if used >= 5 + u16::from_be_bytes([l[0], l[1]]) as usize => {
                        5 + u16::from_be_bytes([l[0], l[1]]) as usize
                    }
                    _ => used,
                }
            } else {
                0
            };
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut incoming[..fed]);
            let mut read = false;
            let mut done = false;
            match state.unwrap() {
                ConnectionState::EncodeTlsData(mut s) => {
                    encode(&mut outgoing, |out| s.encode(out));
                }
                ConnectionState::TransmitTlsData(s) => {
                    io.write_all(&outgoing).await.unwrap();
                    outgoing.clear();
                    s.done();
                }
                ConnectionState::BlockedHandshake => read = true,
                ConnectionState::WriteTraffic(_) => done = true,
                other => panic!("unexpected handshake state {other:?}"),
            }
            incoming.copy_within(discard..used, 0);
            used -= discard;
            if done && conn.is_handshaking() {
                // Its first flight sent, a server waits for the client's Finished.
                done = false;
                read = true;
            }
            if done {
                break;
            }
            if read {
                let has_record = matches!(incoming[..used].get(3..5),
                    Some(l) if used >= 5 + u16::from_be_bytes([l[0], l[1]]) as usize);
                if discard > 0 && has_record {
                    continue;
                }
                let n = io.read(&mut incoming[used..]).await.unwrap();
                assert!(n > 0, "the client closed during the handshake");
                used += n;
            }
        }
        if !outgoing.is_empty() {
            io.write_all(&outgoing).await.unwrap();
        }
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().unwrap();
        RawTls {
            io,
            kernel: Kernel::Server(kernel),
            tx: Keys::new(secrets.tx),
            rx: Keys::new(secrets.rx),
            rbuf: incoming[..used].to_vec(),
        }
    }

    /// A protected record of `inner_type` carrying `content`, sealed with the current key.
    pub fn seal(&mut self, inner_type: u8, content: &[u8]) -> Vec<u8> {
        let mut body = content.to_vec();
        body.push(inner_type);
        let len = (body.len() + 16) as u16;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.tx.nonce();
        self.tx
            .key
            .seal_in_place_append_tag(nonce, Aad::from(header), &mut body)
            .unwrap();
        let mut out = header.to_vec();
        out.extend(body);
        out
    }

    /// A KeyUpdate record (under the current key); our key moves on after it.
    pub fn key_update(&mut self, requested: bool) -> Vec<u8> {
        let record = self.seal(HANDSHAKE, &[24, 0, 0, 1, u8::from(requested)]);
        self.tx = Keys::new(self.kernel.update_tx());
        record
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await
    }

    /// The next record from the server, opened; `None` at EOF, an error or `wait` of silence.
    /// Handshake messages (tickets) are returned, and a KeyUpdate moves our receive key.
    pub async fn next_record(&mut self, wait: Duration) -> Option<Record> {
        loop {
            if self.rbuf.len() >= 5 {
                let len = u16::from_be_bytes([self.rbuf[3], self.rbuf[4]]) as usize;
                if self.rbuf.len() >= 5 + len {
                    let header: [u8; 5] = self.rbuf[..5].try_into().unwrap();
                    let mut body = self.rbuf[5..5 + len].to_vec();
                    self.rbuf.drain(..5 + len);
                    let nonce = self.rx.nonce();
                    let plain = self
                        .rx
                        .key
                        .open_in_place(nonce, Aad::from(header), &mut body)
                        .ok()?;
                    let last = plain.iter().rposition(|b| *b != 0)?;
                    let content = plain[..last].to_vec();
                    return Some(match plain[last] {
                        APPLICATION_DATA => Record::Data(content),
                        ALERT => Record::Alert(content[0], content[1]),
                        _ => {
                            if content.first() == Some(&24) {
                                self.rx = Keys::new(self.kernel.update_rx());
                            }
                            Record::Handshake(content)
                        }
                    });
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout(wait, self.io.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.rbuf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads until application data holding `marker` arrives (or the connection ends, or
    /// `wait` passes without a record); how many KeyUpdates came on the way, and the data.
    pub async fn key_updates_until(&mut self, marker: &[u8], wait: Duration) -> (usize, Vec<u8>) {
        let mut answers = 0;
        let mut got = Vec::new();
        while let Some(r) = self.next_record(wait).await {
            match r {
                Record::Handshake(m) if m.first() == Some(&24) => answers += 1,
                Record::Data(d) => {
                    got.extend(d);
                    if got.windows(marker.len()).any(|w| w == marker) {
                        break;
                    }
                }
                Record::Handshake(_) | Record::Alert(..) => {}
            }
        }
        (answers, got)
    }

    /// Reads until an alert arrives or the connection ends; the alert's description.
    pub async fn alert(&mut self, wait: Duration) -> Option<u8> {
        loop {
            match self.next_record(wait).await? {
                Record::Alert(_, description) => return Some(description),
                _ => continue,
            }
        }
    }
}
