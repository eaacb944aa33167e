//! HTTP/2 frame layout (RFC 9113 §4 and §6): the 9-byte header, the frame types and flags HBONE
//! uses, error codes and SETTINGS parameters. Pure functions over bytes.

use bytes::{BufMut, BytesMut};

/// Length of a frame header.
pub(crate) const HEADER_LEN: usize = 9;
/// The client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The flow-control window every stream and the connection start with.
pub(crate) const DEFAULT_WINDOW: u32 = 65_535;
/// The frame size every peer must accept.
pub(crate) const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest flow-control window (2^31 - 1).
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;

/// Frame types.
pub(crate) mod kind {
    pub(crate) const DATA: u8 = 0x0;
    pub(crate) const HEADERS: u8 = 0x1;
    pub(crate) const PRIORITY: u8 = 0x2;
    pub(crate) const RST_STREAM: u8 = 0x3;
    pub(crate) const SETTINGS: u8 = 0x4;
    pub(crate) const PUSH_PROMISE: u8 = 0x5;
    pub(crate) const PING: u8 = 0x6;
    pub(crate) const GOAWAY: u8 = 0x7;
    pub(crate) const WINDOW_UPDATE: u8 = 0x8;
    pub(crate) const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub(crate) mod flag {
    pub(crate) const END_STREAM: u8 = 0x1;
    pub(crate) const ACK: u8 = 0x1;
    pub(crate) const END_HEADERS: u8 = 0x4;
    pub(crate) const PADDED: u8 = 0x8;
    pub(crate) const PRIORITY: u8 = 0x20;
}

/// SETTINGS parameter identifiers.
pub(crate) mod setting {
    pub(crate) const ENABLE_PUSH: u16 = 0x2;
    pub(crate) const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub(crate) const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub(crate) const MAX_FRAME_SIZE: u16 = 0x5;
    pub(crate) const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    /// RFC 8441: extended CONNECT; we never offer it, but its value must be 0 or 1.
    pub(crate) const ENABLE_CONNECT_PROTOCOL: u16 = 0x8;
}

/// An HTTP/2 error code (RFC 9113 §7), as sent in RST_STREAM and GOAWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reason(pub(crate) u32);

impl Reason {
    pub(crate) const NO_ERROR: Reason = Reason(0x0);
    pub(crate) const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub(crate) const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub(crate) const STREAM_CLOSED: Reason = Reason(0x5);
    pub(crate) const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub(crate) const REFUSED_STREAM: Reason = Reason(0x7);
    pub(crate) const CANCEL: Reason = Reason(0x8);
    pub(crate) const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub(crate) const ENHANCE_YOUR_CALM: Reason = Reason(0xb);

    /// The code's name as RFC 9113 spells it.
    pub(crate) fn name(self) -> &'static str {
        const NAMES: [&str; 14] = [
            "NO_ERROR",
            "PROTOCOL_ERROR",
            "INTERNAL_ERROR",
            "FLOW_CONTROL_ERROR",
            "SETTINGS_TIMEOUT",
            "STREAM_CLOSED",
            "FRAME_SIZE_ERROR",
            "REFUSED_STREAM",
            "CANCEL",
            "COMPRESSION_ERROR",
            "CONNECT_ERROR",
            "ENHANCE_YOUR_CALM",
            "INADEQUATE_SECURITY",
            "HTTP_1_1_REQUIRED",
        ];
        NAMES
            .get(self.0 as usize)
            .copied()
            .unwrap_or("unknown error code")
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (0x{:x})", self.name(), self.0)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) len: u32,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
}

impl Head {
    /// Reads a header from the first 9 bytes of `b` (the caller checks the length).
    pub(crate) fn parse(b: &[u8]) -> Head {
        Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt.
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// The header's 9 bytes.
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let l = self.len.to_be_bytes();
        let s = self.stream.to_be_bytes();
        [
            l[1], l[2], l[3], self.kind, self.flags, s[0], s[1], s[2], s[3],
        ]
    }

    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Appends a whole frame to `out`.
pub(crate) fn put_frame(out: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let head = Head {
        len: payload.len() as u32,
        kind,
        flags,
        stream,
    };
    out.put_slice(&head.encode());
    out.put_slice(payload);
}

/// Appends a SETTINGS frame carrying `values`.
pub(crate) fn put_settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    let head = Head {
        len: (values.len() * 6) as u32,
        kind: kind::SETTINGS,
        flags: 0,
        stream: 0,
    };
    out.put_slice(&head.encode());
    for (id, value) in values {
        out.put_u16(*id);
        out.put_u32(*value);
    }
}

/// Appends a WINDOW_UPDATE frame.
pub(crate) fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_frame(
        out,
        kind::WINDOW_UPDATE,
        0,
        stream,
        &increment.to_be_bytes(),
    );
}

/// Appends a RST_STREAM frame.
pub(crate) fn put_reset(out: &mut BytesMut, stream: u32, reason: Reason) {
    put_frame(out, kind::RST_STREAM, 0, stream, &reason.0.to_be_bytes());
}

/// Appends a GOAWAY frame without debug data.
pub(crate) fn put_goaway(out: &mut BytesMut, last_stream: u32, reason: Reason) {
    let mut payload = [0u8; 8];
    payload[..4].copy_from_slice(&last_stream.to_be_bytes());
    payload[4..].copy_from_slice(&reason.0.to_be_bytes());
    put_frame(out, kind::GOAWAY, 0, 0, &payload);
}

/// A 32-bit big-endian value at `at` (the caller checks the length).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The SETTINGS parameters of a SETTINGS payload, or `None` if its length is not a multiple of 6.
pub(crate) fn parse_settings(payload: &[u8]) -> Option<impl Iterator<Item = (u16, u32)> + '_> {
    if !payload.len().is_multiple_of(6) {
        return None;
    }
    Some(
        payload
            .chunks_exact(6)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32_at(c, 2))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_survives_encoding_and_ignores_the_reserved_bit() {
        let head = Head {
            len: 0x00_12_34_56,
            kind: kind::DATA,
            flags: flag::END_STREAM | flag::PADDED,
            stream: 0x7fff_fffe,
        };
        let mut bytes = head.encode();
        assert_eq!(bytes, [0x12, 0x34, 0x56, 0, 0x9, 0x7f, 0xff, 0xff, 0xfe]);
        assert_eq!(Head::parse(&bytes), head);
        bytes[5] |= 0x80;
        assert_eq!(Head::parse(&bytes).stream, 0x7fff_fffe);
    }

    #[test]
    fn settings_are_pairs_of_six_bytes() {
        let mut out = BytesMut::new();
        put_settings(
            &mut out,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::MAX_FRAME_SIZE, 1 << 18),
            ],
        );
        let head = Head::parse(&out);
        assert_eq!((head.len, head.kind, head.stream), (12, kind::SETTINGS, 0));
        let parsed: Vec<_> = parse_settings(&out[HEADER_LEN..]).unwrap().collect();
        assert_eq!(parsed, [(2, 0), (5, 1 << 18)]);
        assert!(parse_settings(&[0; 7]).is_none());
    }

    #[test]
    fn reasons_print_their_rfc_names() {
        assert_eq!(Reason::CANCEL.to_string(), "CANCEL (0x8)");
        assert_eq!(Reason(0x42).to_string(), "unknown error code (0x42)");
    }
}
