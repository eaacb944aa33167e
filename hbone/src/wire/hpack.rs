//! Header blocks: our encoder (RFC 7541 literals, no dynamic table) and the checks on a decoded
//! block (RFC 9113 §8.2-8.3) that turn it into a request or a response head.
//!
//! Why no dynamic table when sending: an HBONE CONNECT carries a handful of headers whose values
//! change per tunnel (`:authority`, `traceparent`), so indexing them saves little and would make
//! the peer keep state for us. Decoding uses `loona-hpack`, which supports everything a peer may
//! send (dynamic table, Huffman strings).

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::hpack_table::{Entries, Representation, TableCopy, representations};

/// The size of the decoder's dynamic table: the protocol default, which we never change.
pub(crate) const TABLE_SIZE: usize = 4096;

/// A block that decodes to more than this many times the header list limit ends the connection,
/// as `h2` does (its `MAX_HEADER_LIST_ABUSE_MULTIPLIER`); up to it, only the stream is refused.
pub(crate) const ABUSE_FACTOR: u64 = 4;

/// Static-table indices we refer to by name (RFC 7541 Appendix A).
const AUTHORITY: usize = 1;
const METHOD: usize = 2;
const STATUS: usize = 8;

/// Why a header block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    /// The block could not be decoded: a connection error (COMPRESSION_ERROR).
    #[error("undecodable header block: {0}")]
    Compression(String),
    /// The block is larger than `max_header_list_size` (as HTTP/2 counts: name + value + 32):
    /// the stream is refused, the connection goes on.
    #[error("header list of more than {0} bytes")]
    TooLarge(u32),
    /// The block decodes to more than [`ABUSE_FACTOR`] times `max_header_list_size`: no peer
    /// sends that by mistake (an HPACK bomb), so the connection ends (ENHANCE_YOUR_CALM).
    #[error("a header block that decodes to more than {0} bytes (an HPACK bomb)")]
    Abusive(u64),
    /// Decoded, but not a valid HTTP/2 message head: a stream error (PROTOCOL_ERROR).
    #[error("malformed header block: {0}")]
    Malformed(String),
}

/// A decoded request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) method: Vec<u8>,
    pub(crate) authority: Option<String>,
    pub(crate) headers: HeaderMap,
}

/// A decoded response head. HBONE clients act on the status only; the headers are checked for
/// form and dropped.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
}

/// Encodes a CONNECT request head.
pub(crate) fn encode_connect(out: &mut BytesMut, authority: &str, headers: &HeaderMap) {
    put_indexed_name(out, METHOD, b"CONNECT");
    put_indexed_name(out, AUTHORITY, authority.as_bytes());
    put_headers(out, headers);
}

/// Encodes a response head.
pub(crate) fn encode_response(out: &mut BytesMut, status: StatusCode, headers: &HeaderMap) {
    match status.as_u16() {
        // Fully indexed static entries (RFC 7541 Appendix A, 8-14).
        200 => out.put_u8(0x80 | 8),
        204 => out.put_u8(0x80 | 9),
        400 => out.put_u8(0x80 | 12),
        404 => out.put_u8(0x80 | 13),
        500 => out.put_u8(0x80 | 14),
        _ => put_indexed_name(out, STATUS, status.as_str().as_bytes()),
    }
    put_headers(out, headers);
}

fn put_headers(out: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        // Literal without indexing, new name (RFC 7541 §6.2.2).
        out.put_u8(0);
        put_string(out, name.as_str().as_bytes());
        put_string(out, value.as_bytes());
    }
}

/// A literal without indexing whose name is static-table entry `index`.
fn put_indexed_name(out: &mut BytesMut, index: usize, value: &[u8]) {
    put_int(out, 0x00, 4, index);
    put_string(out, value);
}

/// A string literal without Huffman coding.
fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_int(out, 0x00, 7, s.len());
    out.put_slice(s);
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the bits above the prefix.
pub(super) fn put_int(out: &mut BytesMut, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

/// One peer's decoding state (its dynamic table lives for the whole connection).
pub(crate) struct Decoder {
    inner: loona_hpack::Decoder<'static>,
    /// A copy of the dynamic table, kept only for a connection that may move to another process
    /// (`None` otherwise, or once it could not follow a block).
    copy: Option<TableCopy>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hpack::Decoder")
    }
}

/// Pseudo-header fields and regular fields of a block, checked for order and form.
struct Fields {
    pseudo: Vec<(Vec<u8>, Vec<u8>)>,
    headers: HeaderMap,
}

impl Decoder {
    pub(crate) fn new() -> Decoder {
        let mut inner = loona_hpack::Decoder::new();
        inner.set_max_allowed_table_size(TABLE_SIZE);
        Decoder { inner, copy: None }
    }

    /// A decoder that keeps a copy of its dynamic table, so it can be rebuilt elsewhere.
    pub(crate) fn movable() -> Decoder {
        Decoder {
            copy: Some(TableCopy::new(TABLE_SIZE)),
            ..Decoder::new()
        }
    }

    /// The dynamic table's size limit and entries (oldest first), when a copy was kept.
    pub(crate) fn table(&self) -> Option<(usize, Entries)> {
        self.copy.as_ref().map(TableCopy::export)
    }

    /// A decoder whose dynamic table holds `entries` (oldest first) within `max` bytes, as a
    /// moved connection's peer expects; refused when they do not fit, or `max` is more than we
    /// allow.
    pub(crate) fn with_table(max: usize, entries: Entries) -> Result<Decoder, String> {
        let (copy, block) = TableCopy::import(max, entries, TABLE_SIZE, TABLE_SIZE)?;
        let mut decoder = Decoder::new();
        decoder
            .inner
            .decode_with_cb(&block, |_, _| {})
            .map_err(|e| format!("rebuilding the HPACK table: {e}"))?;
        decoder.copy = Some(copy);
        Ok(decoder)
    }

    /// [`Decoder::decode`], for the table copy's tests.
    #[cfg(test)]
    pub(super) fn decode_for_test(
        &mut self,
        block: &[u8],
        each: impl FnMut(std::borrow::Cow<'_, [u8]>, std::borrow::Cow<'_, [u8]>),
    ) -> Result<(), HeadError> {
        self.decode(block, each)
    }

    /// Decodes `block`, each field to `each`, and keeps the table's copy in step.
    fn decode(
        &mut self,
        block: &[u8],
        mut each: impl FnMut(std::borrow::Cow<'_, [u8]>, std::borrow::Cow<'_, [u8]>),
    ) -> Result<(), HeadError> {
        if self.copy.is_none() {
            return self
                .inner
                .decode_with_cb(block, each)
                .map_err(|e| HeadError::Compression(e.to_string()));
        }
        let reps = representations(block);
        let inserts: Vec<bool> = reps
            .iter()
            .flatten()
            .filter_map(|r| match r {
                Representation::Field { inserts } => Some(*inserts),
                Representation::SizeUpdate(_) => None,
            })
            .collect();
        let mut inserted = Vec::new();
        let mut i = 0;
        let decoded = self.inner.decode_with_cb(block, |name, value| {
            if inserts.get(i).copied().unwrap_or(false) {
                inserted.push((name.to_vec(), value.to_vec()));
            }
            i += 1;
            each(name, value);
        });
        decoded.map_err(|e| HeadError::Compression(e.to_string()))?;
        let followed = match (&reps, self.copy.as_mut()) {
            (Some(reps), Some(copy)) => copy.follow(reps, inserted),
            _ => false,
        };
        if !followed {
            tracing::warn!(
                "HPACK: the dynamic table's copy lost step with a block; this connection can no longer move"
            );
            self.copy = None;
        }
        Ok(())
    }

    /// Decodes a request head; `Malformed` and `TooLarge` errors leave the decoder usable.
    ///
    /// A CONNECT (the only request HBONE serves) must carry `:authority` and must not carry
    /// `:scheme`, `:path` (RFC 9113 §8.5) or `:protocol` (extended CONNECT, RFC 8441, which we
    /// do not offer); any other request must carry `:scheme` and a non-empty `:path` (§8.3.1).
    /// `:authority` must be a valid URI authority, as `h2` requires.
    pub(crate) fn request(&mut self, block: &[u8], limit: u32) -> Result<RequestHead, HeadError> {
        let fields = self.fields(block, limit)?;
        let mut method = None;
        let mut authority = None;
        let mut scheme = None;
        let mut path = None;
        let mut protocol = None;
        for (name, value) in fields.pseudo {
            let slot = match name.as_slice() {
                b":method" => &mut method,
                b":authority" => &mut authority,
                b":scheme" => &mut scheme,
                b":path" => &mut path,
                b":protocol" => &mut protocol,
                other => return Err(malformed_pseudo(other)),
            };
            if slot.replace(value).is_some() {
                return Err(HeadError::Malformed(format!(
                    "{} appears twice",
                    String::from_utf8_lossy(&name)
                )));
            }
        }
        let method = method.ok_or_else(|| HeadError::Malformed("no :method".to_owned()))?;
        let malformed = |why: &str| Err(HeadError::Malformed(why.to_owned()));
        if protocol.is_some() {
            return malformed(":protocol without SETTINGS_ENABLE_CONNECT_PROTOCOL");
        }
        if method == b"CONNECT" {
            if scheme.is_some() || path.is_some() {
                return malformed("a CONNECT with :scheme or :path");
            }
            if authority.is_none() {
                return malformed("a CONNECT without :authority");
            }
        } else if scheme.is_none() || path.as_ref().is_none_or(Vec::is_empty) {
            return malformed("a request without :scheme or :path");
        }
        let authority = match authority {
            Some(a) => {
                if http::uri::Authority::try_from(a.as_slice()).is_err() {
                    return malformed(":authority is not a valid authority");
                }
                Some(
                    String::from_utf8(a)
                        .map_err(|_| HeadError::Malformed(":authority is not UTF-8".to_owned()))?,
                )
            }
            None => None,
        };
        Ok(RequestHead {
            method,
            authority,
            headers: fields.headers,
        })
    }

    /// Decodes a response head.
    pub(crate) fn response(&mut self, block: &[u8], limit: u32) -> Result<ResponseHead, HeadError> {
        let fields = self.fields(block, limit)?;
        let mut status = None;
        for (name, value) in fields.pseudo {
            if name != b":status" {
                return Err(malformed_pseudo(&name));
            }
            if status.replace(value).is_some() {
                return Err(HeadError::Malformed(":status appears twice".to_owned()));
            }
        }
        let status = status.ok_or_else(|| HeadError::Malformed("no :status".to_owned()))?;
        let status = (status.len() == 3)
            .then(|| StatusCode::from_bytes(&status).ok())
            .flatten()
            .ok_or_else(|| {
                HeadError::Malformed(format!(
                    "bad :status {:?}",
                    String::from_utf8_lossy(&status)
                ))
            })?;
        Ok(ResponseHead { status })
    }

    /// Decodes a block whose fields are only checked for form (trailers).
    pub(crate) fn trailers(&mut self, block: &[u8], limit: u32) -> Result<(), HeadError> {
        let fields = self.fields(block, limit)?;
        match fields.pseudo.first() {
            Some((name, _)) => Err(malformed_pseudo(name)),
            None => Ok(()),
        }
    }

    /// Decodes a block nobody will read (a response to a stream we dropped), only so the dynamic
    /// table stays in step with the peer's: nothing is kept, and a block that decodes to more than
    /// [`ABUSE_FACTOR`] times `limit` is `Abusive` all the same.
    pub(crate) fn discard(&mut self, block: &[u8], limit: u32) -> Result<(), HeadError> {
        let abusive = ABUSE_FACTOR * u64::from(limit);
        let mut size = 0u64;
        self.decode(block, |name, value| {
            size += (name.len() + value.len() + 32) as u64;
        })?;
        if size > abusive {
            return Err(HeadError::Abusive(abusive));
        }
        Ok(())
    }

    /// Decodes the whole block (the dynamic table must see all of it even when it is refused),
    /// keeping fields only while the list is within `limit`, then checks them.
    fn fields(&mut self, block: &[u8], limit: u32) -> Result<Fields, HeadError> {
        let abusive = ABUSE_FACTOR * u64::from(limit);
        let mut list = Vec::new();
        let mut size = 0u64;
        self.decode(block, |name, value| {
            size += (name.len() + value.len() + 32) as u64;
            if size <= u64::from(limit) {
                list.push((name.into_owned(), value.into_owned()));
            }
        })?;
        if size > abusive {
            return Err(HeadError::Abusive(abusive));
        }
        if size > u64::from(limit) {
            return Err(HeadError::TooLarge(limit));
        }
        let mut fields = Fields {
            pseudo: Vec::new(),
            // At most `limit / 32` fields are kept; `try_` all the same, so no limit a caller
            // configures can make the map's capacity overflow (a panic).
            headers: HeaderMap::try_with_capacity(list.len())
                .map_err(|_| HeadError::TooLarge(limit))?,
        };
        for (name, value) in list {
            if name.first() == Some(&b':') {
                if !fields.headers.is_empty() {
                    return Err(HeadError::Malformed(format!(
                        "pseudo-header {} after a regular header",
                        String::from_utf8_lossy(&name)
                    )));
                }
                fields.pseudo.push((name, value));
                continue;
            }
            fields
                .headers
                .try_append(check_name(&name)?, check_value(&name, &value)?)
                .map_err(|_| HeadError::TooLarge(limit))?;
        }
        Ok(fields)
    }
}

fn malformed_pseudo(name: &[u8]) -> HeadError {
    HeadError::Malformed(format!(
        "unexpected pseudo-header {}",
        String::from_utf8_lossy(name)
    ))
}

/// A regular header name: lowercase, a valid token, not connection-specific (RFC 9113 §8.2).
fn check_name(name: &[u8]) -> Result<HeaderName, HeadError> {
    let bad = |why: &str| {
        HeadError::Malformed(format!("header {:?} {why}", String::from_utf8_lossy(name)))
    };
    if name.iter().any(u8::is_ascii_uppercase) {
        return Err(bad("has uppercase letters"));
    }
    if matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
    ) {
        return Err(bad("is connection-specific"));
    }
    HeaderName::from_bytes(name).map_err(|_| bad("is not a valid name"))
}

fn check_value(name: &[u8], value: &[u8]) -> Result<HeaderValue, HeadError> {
    let bad = |why: &str| {
        HeadError::Malformed(format!("header {:?} {why}", String::from_utf8_lossy(name)))
    };
    if name == b"te" && value != b"trailers" {
        return Err(bad("may only be \"trailers\""));
    }
    if value.first().is_some_and(|b| *b == b' ' || *b == b'\t')
        || value.last().is_some_and(|b| *b == b' ' || *b == b'\t')
    {
        return Err(bad("has surrounding whitespace"));
    }
    HeaderValue::from_bytes(value).map_err(|_| bad("has a forbidden character"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_static(n),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_connect_we_encode_decodes_to_the_same_head() {
        let mut out = BytesMut::new();
        let headers = header_map(&[("baggage", "k8s.cluster.name=c"), ("forwarded", "for=1")]);
        encode_connect(&mut out, "10.0.0.7:8080", &headers);
        let head = Decoder::new().request(&out, 8192).unwrap();
        assert_eq!(head.method, b"CONNECT");
        assert_eq!(head.authority.as_deref(), Some("10.0.0.7:8080"));
        assert_eq!(head.headers, headers);
    }

    #[test]
    fn responses_use_the_static_table_and_decode_back() {
        for code in [200u16, 204, 401, 503, 400] {
            let mut out = BytesMut::new();
            let status = StatusCode::from_u16(code).unwrap();
            encode_response(&mut out, status, &header_map(&[("x-a", "b")]));
            let head = Decoder::new().response(&out, 8192).unwrap();
            assert_eq!(head.status, status);
        }
        let mut out = BytesMut::new();
        encode_response(&mut out, StatusCode::OK, &HeaderMap::new());
        assert_eq!(&out[..], [0x88]);
    }

    #[test]
    fn long_values_use_multi_byte_lengths() {
        let value = "v".repeat(300);
        let mut out = BytesMut::new();
        encode_connect(&mut out, "a:1", &header_map(&[("x-long", &value)]));
        let head = Decoder::new().request(&out, 8192).unwrap();
        assert_eq!(head.headers["x-long"], value.as_str());
    }

    /// Encodes raw (name, value) literals, for blocks our encoder would never produce.
    fn raw(fields: &[(&[u8], &[u8])]) -> BytesMut {
        let mut out = BytesMut::new();
        for (n, v) in fields {
            out.put_u8(0);
            put_string(&mut out, n);
            put_string(&mut out, v);
        }
        out
    }

    #[test]
    fn malformed_heads_are_refused_with_the_reason() {
        type Fields<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: &[(Fields<'_>, &str)] = &[
            (&[(b":authority", b"a:1")], "no :method"),
            (&[(b":method", b"CONNECT"), (b":method", b"GET")], "twice"),
            (
                &[(b":method", b"CONNECT"), (b":status", b"200")],
                "unexpected",
            ),
            (
                &[
                    (b":method", b"CONNECT"),
                    (b"x", b"1"),
                    (b":authority", b"a:1"),
                ],
                "after",
            ),
            (&[(b":method", b"CONNECT"), (b"X-Up", b"1")], "uppercase"),
            (
                &[(b":method", b"CONNECT"), (b"connection", b"close")],
                "connection-specific",
            ),
            (&[(b":method", b"CONNECT"), (b"te", b"gzip")], "trailers"),
            (&[(b":method", b"CONNECT"), (b"x", b"a\nb")], "forbidden"),
            (&[(b":method", b"CONNECT"), (b"x", b" a")], "whitespace"),
        ];
        for (fields, why) in cases {
            let err = Decoder::new().request(&raw(fields), 8192).unwrap_err();
            assert!(
                matches!(&err, HeadError::Malformed(m) if m.contains(why)),
                "{fields:?}: {err}"
            );
        }
        let err = Decoder::new()
            .response(&raw(&[(b":status", b"20")]), 8192)
            .unwrap_err();
        assert!(err.to_string().contains("bad :status"), "{err}");
    }

    #[test]
    fn a_connect_is_malformed_with_scheme_path_or_protocol_or_without_authority() {
        let a: &[u8] = b"10.0.0.1:80";
        type Fields<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: &[(Fields<'_>, &str)] = &[
            (
                &[
                    (b":method", b"CONNECT"),
                    (b":authority", a),
                    (b":path", b"/"),
                ],
                ":path",
            ),
            (
                &[
                    (b":method", b"CONNECT"),
                    (b":authority", a),
                    (b":scheme", b"https"),
                ],
                ":scheme",
            ),
            (
                &[
                    (b":method", b"CONNECT"),
                    (b":authority", a),
                    (b":protocol", b"ws"),
                ],
                ":protocol",
            ),
            (&[(b":method", b"CONNECT")], "without :authority"),
            (
                &[(b":method", b"CONNECT"), (b":authority", b"a b:1")],
                "authority",
            ),
            (
                &[(b":method", b"GET"), (b":authority", a)],
                "without :scheme",
            ),
        ];
        for (fields, why) in cases {
            let err = Decoder::new().request(&raw(fields), 8192).unwrap_err();
            assert!(
                matches!(&err, HeadError::Malformed(m) if m.contains(why)),
                "{fields:?}: {err}"
            );
        }
        let get = raw(&[
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/"),
        ]);
        assert_eq!(Decoder::new().request(&get, 8192).unwrap().method, b"GET");
    }

    #[test]
    fn a_discarded_block_keeps_nothing_and_still_has_a_limit() {
        let mut d = Decoder::new();
        // 100 fields of 33 bytes: within 4 times 1,000; 200 are not.
        let mut block = BytesMut::new();
        for _ in 0..100 {
            block.extend_from_slice(&raw(&[(b"x", b"")]));
        }
        assert!(d.discard(&block, 1000).is_ok());
        block.extend_from_slice(&block.clone());
        assert_eq!(d.discard(&block, 1000), Err(HeadError::Abusive(4000)));
    }

    #[test]
    fn the_size_limit_counts_as_http2_does() {
        // 7 + 7 + 32 = 46 bytes for ":method: CONNECT", 10 + 3 + 32 = 45 for ":authority: a:1".
        let block = raw(&[(b":method", b"CONNECT"), (b":authority", b"a:1")]);
        assert!(Decoder::new().request(&block, 91).is_ok());
        assert_eq!(
            Decoder::new().request(&block, 90).unwrap_err(),
            HeadError::TooLarge(90)
        );
        // Four times the limit decoded is no mistake: the connection ends.
        assert!(matches!(
            Decoder::new().request(&block, 22),
            Err(HeadError::Abusive(88))
        ));
    }

    #[test]
    fn garbage_is_a_compression_error_not_a_panic() {
        for block in [
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
            &[0x80],
            &[0x3f, 0xe1, 0x1f],
            &[0x02],
        ] {
            let err = Decoder::new().request(block, 8192).unwrap_err();
            assert!(
                matches!(err, HeadError::Compression(_)),
                "{block:?}: {err:?}"
            );
        }
    }
}
