//! The request headers HBONE peers exchange with a CONNECT (see SPEC.md, "Request headers").
//!
//! Istio's ztunnel sends `forwarded` (the original client address), `baggage` (who the client
//! is) and `traceparent` (a W3C trace context, fresh per connection). None of them is required
//! for the tunnel to work; peers use them for logs, metrics and tracing.

use std::net::{IpAddr, SocketAddr};

use http::HeaderValue;
use http::header::HeaderName;
use rand::RngCore;

/// `forwarded` (RFC 7239).
pub const FORWARDED: HeaderName = http::header::FORWARDED;
/// `baggage` (W3C Baggage).
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// `traceparent` (W3C Trace Context).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `for="<ip:port>"`, the original client address (IPv6 in brackets, always quoted).
pub fn forwarded_for(client: SocketAddr) -> HeaderValue {
    HeaderValue::try_from(format!("for=\"{client}\"")).expect("a socket address is a valid header")
}

/// Reads the client address from the first `for=` element of a `forwarded` header.
///
/// Accepts `for=ip`, `for="ip:port"` and `for="[v6]:port"`; returns `None` for anything else
/// (obfuscated identifiers, `unknown`, malformed values).
pub fn parse_forwarded_for(value: &HeaderValue) -> Option<IpAddr> {
    let text = value.to_str().ok()?;
    let first = text.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.eq_ignore_ascii_case("for").then_some(value.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    if let Some(inner) = node.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return inner.parse().ok();
    }
    node.parse().ok()
}

/// A fresh `traceparent`: version 00, random trace and parent ids, not sampled.
pub fn traceparent() -> HeaderValue {
    let mut rng = rand::rng();
    let mut trace = [0u8; 16];
    let mut parent = [0u8; 8];
    // All-zero ids are invalid in W3C Trace Context; draw again in that (2^-64) case.
    while trace == [0; 16] {
        rng.fill_bytes(&mut trace);
    }
    while parent == [0; 8] {
        rng.fill_bytes(&mut parent);
    }
    // "00-" 32 hex digits "-" 16 hex digits "-00", written in place (this runs once per
    // outbound connection, and `format!` per byte cost more than the rest of the headers).
    let mut value = [0u8; 55];
    value[..3].copy_from_slice(b"00-");
    hex_into(&trace, &mut value[3..35], HEX_LOWER);
    value[35] = b'-';
    hex_into(&parent, &mut value[36..52], HEX_LOWER);
    value[52..].copy_from_slice(b"-00");
    HeaderValue::from_bytes(&value).expect("hex is a valid header")
}

/// Builds a `baggage` value describing the client workload, as Istio's ztunnel does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// The workload kind (`deployment`, `pod`, ...) and name: `k8s.<kind>.name`.
    pub workload: Option<(String, String)>,
    /// `service.name` (the canonical service).
    pub service_name: Option<String>,
    /// `service.version` (the canonical revision).
    pub service_version: Option<String>,
}

impl Baggage {
    /// The header value; members whose value is unset are omitted. Values are percent-encoded
    /// where W3C Baggage requires it.
    pub fn to_header(&self) -> HeaderValue {
        let mut out = String::with_capacity(160);
        let mut push = |key: [&str; 3], value: Option<&str>| {
            let Some(value) = value else { return };
            if !out.is_empty() {
                out.push(',');
            }
            key.iter().for_each(|part| out.push_str(part));
            out.push('=');
            encode_baggage_value(value, &mut out);
        };
        push(["k8s.cluster.name", "", ""], self.cluster.as_deref());
        push(["k8s.namespace.name", "", ""], self.namespace.as_deref());
        if let Some((kind, name)) = &self.workload {
            let kind = kind.to_ascii_lowercase();
            if !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphanumeric()) {
                push(["k8s.", &kind, ".name"], Some(name));
            }
        }
        push(["service.name", "", ""], self.service_name.as_deref());
        push(["service.version", "", ""], self.service_version.as_deref());
        HeaderValue::try_from(out).expect("encoded baggage is a valid header")
    }
}

/// Appends `value` to `out`, percent-encoding what W3C Baggage does not allow as is.
fn encode_baggage_value(value: &str, out: &mut String) {
    for b in value.bytes() {
        let plain = b.is_ascii_alphanumeric() || b"-._~!#$&'*+^`|/:?@".contains(&b);
        if plain {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
            out.push(char::from(HEX_UPPER[usize::from(b & 0xf)]));
        }
    }
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Writes `bytes` as hex digits into `out` (twice as long as `bytes`).
fn hex_into(bytes: &[u8], out: &mut [u8], digits: &[u8; 16]) {
    debug_assert_eq!(out.len(), 2 * bytes.len());
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = digits[usize::from(b >> 4)];
        pair[1] = digits[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips() {
        for addr in ["10.1.2.3:4567", "[fd00::7]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(addr)), Some(addr.ip()));
        }
        let plain = HeaderValue::from_static("for=192.0.2.60;proto=http;by=203.0.113.43");
        assert_eq!(
            parse_forwarded_for(&plain),
            Some("192.0.2.60".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for(&HeaderValue::from_static("for=unknown")),
            None
        );
        assert_eq!(
            parse_forwarded_for(&HeaderValue::from_static("proto=http")),
            None
        );
    }

    #[test]
    fn traceparent_is_well_formed_and_fresh() {
        let a = traceparent();
        let b = traceparent();
        assert_ne!(a, b);
        let text = a.to_str().unwrap();
        let parts: Vec<_> = text.split('-').collect();
        assert_eq!(parts.len(), 4, "{text}");
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
        // W3C Trace Context: lower-case hex, and no all-zero id.
        for id in &parts[1..3] {
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{text}"
            );
            assert!(id.bytes().any(|b| b != b'0'), "{text}");
        }
    }

    #[test]
    fn hex_digits_follow_the_bytes() {
        let mut out = [0u8; 6];
        hex_into(&[0x00, 0xa5, 0xff], &mut out, HEX_LOWER);
        assert_eq!(&out, b"00a5ff");
        hex_into(&[0x0f, 0x10, 0x9c], &mut out, HEX_UPPER);
        assert_eq!(&out, b"0F109C");
    }

    #[test]
    fn baggage_lists_what_is_set() {
        let b = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload: Some(("Deployment".into(), "sleep".into())),
            service_name: Some("sleep".into()),
            service_version: Some("v 1,é".into()),
        };
        assert_eq!(
            b.to_header(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v%201%2C%C3%A9"
        );
        let only_version = Baggage {
            service_version: Some("2".into()),
            ..Baggage::default()
        };
        assert_eq!(only_version.to_header(), "service.version=2");
        assert_eq!(Baggage::default().to_header(), "");
    }
}
