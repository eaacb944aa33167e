//! The `:authority` of an HBONE `CONNECT` request: the destination of the tunneled connection.
//!
//! HBONE peers send `ip:port` (IPv6 in brackets); a hostname form is allowed for callers that
//! resolve names on the far side. Parsing is strict because the authority decides where bytes go:
//! anything that is not exactly one of the three forms is rejected, so a handler never has to
//! second-guess it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Longest hostname accepted (RFC 1035 limit on the textual form).
const MAX_HOST_LEN: usize = 253;
/// Longest single DNS label.
const MAX_LABEL_LEN: usize = 63;

/// A parsed `CONNECT` target: a socket address, or a hostname with a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Authority {
    /// `a.b.c.d:port` or `[v6]:port`.
    Addr(SocketAddr),
    /// `host:port`, where `host` is a DNS name (stored lowercase).
    Host {
        /// The hostname, lowercase, without a trailing dot.
        host: String,
        /// The destination port (never 0).
        port: u16,
    },
}

/// Why an authority string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The string was empty.
    #[error("empty authority")]
    Empty,
    /// No `:port` at the end.
    #[error("authority {0:?} has no port; expected host:port, ip:port or [ipv6]:port")]
    MissingPort(String),
    /// The port is not a number in 1..=65535.
    #[error("authority {input:?} has an invalid port {port:?}; expected 1-65535")]
    BadPort {
        /// The whole authority.
        input: String,
        /// The text after the last colon.
        port: String,
    },
    /// The part in brackets is not an IPv6 address (zone ids are not accepted).
    #[error("authority {0:?} has a bracketed host that is not an IPv6 address")]
    BadIpv6(String),
    /// An IPv6 address without brackets.
    #[error("authority {0:?} looks like an IPv6 address without brackets; use [addr]:port")]
    UnbracketedIpv6(String),
    /// The host is not an IPv4 address nor a valid DNS name.
    #[error("authority {input:?} has an invalid host: {reason}")]
    BadHost {
        /// The whole authority.
        input: String,
        /// What is wrong with the host.
        reason: &'static str,
    },
}

impl Authority {
    /// Parses an authority in one of the forms `a.b.c.d:port`, `[v6]:port` or `host:port`.
    pub fn parse(input: &str) -> Result<Self, AuthorityError> {
        if input.is_empty() {
            return Err(AuthorityError::Empty);
        }
        if let Some(rest) = input.strip_prefix('[') {
            let Some((ip, port)) = rest.split_once("]:") else {
                return if rest.contains(']') {
                    Err(AuthorityError::MissingPort(input.to_owned()))
                } else {
                    Err(AuthorityError::BadIpv6(input.to_owned()))
                };
            };
            let ip = Ipv6Addr::from_str(ip).map_err(|_| AuthorityError::BadIpv6(input.into()))?;
            let port = parse_port(input, port)?;
            return Ok(Authority::Addr(SocketAddr::new(IpAddr::V6(ip), port)));
        }
        let Some((host, port)) = input.rsplit_once(':') else {
            return Err(AuthorityError::MissingPort(input.to_owned()));
        };
        if host.contains(':') {
            return Err(AuthorityError::UnbracketedIpv6(input.to_owned()));
        }
        let port = parse_port(input, port)?;
        if let Ok(ip) = Ipv4Addr::from_str(host) {
            return Ok(Authority::Addr(SocketAddr::new(IpAddr::V4(ip), port)));
        }
        let host = validate_host(input, host)?;
        Ok(Authority::Host { host, port })
    }

    /// The socket address, when the authority is an address.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Authority::Addr(addr) => Some(*addr),
            Authority::Host { .. } => None,
        }
    }

    /// The destination port.
    pub fn port(&self) -> u16 {
        match self {
            Authority::Addr(addr) => addr.port(),
            Authority::Host { port, .. } => *port,
        }
    }
}

impl From<SocketAddr> for Authority {
    fn from(addr: SocketAddr) -> Self {
        Authority::Addr(addr)
    }
}

impl FromStr for Authority {
    type Err = AuthorityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Authority::parse(s)
    }
}

impl fmt::Display for Authority {
    /// Prints the canonical wire form (`SocketAddr`'s display already brackets IPv6).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authority::Addr(addr) => write!(f, "{addr}"),
            Authority::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Body of the `authority` fuzz target, kept here so an ordinary test runs it over the seed corpus.
///
/// Checks the parser's invariants on arbitrary bytes: it never panics, and whatever it accepts
/// prints back to a string that parses to the same value.
#[cfg(feature = "fuzzing")]
pub fn fuzz_authority(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = Authority::parse(text) {
        let printed = parsed.to_string();
        let reparsed = Authority::parse(&printed).expect("a printed authority parses");
        assert_eq!(parsed, reparsed, "round trip of {text:?} via {printed:?}");
        assert_ne!(parsed.port(), 0, "port 0 accepted in {text:?}");
    }
}

fn parse_port(input: &str, port: &str) -> Result<u16, AuthorityError> {
    let bad = || AuthorityError::BadPort {
        input: input.to_owned(),
        port: port.to_owned(),
    };
    // `u16::from_str` accepts a leading '+'; a port is digits only.
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(p) => Ok(p),
    }
}

fn validate_host(input: &str, host: &str) -> Result<String, AuthorityError> {
    let bad = |reason| AuthorityError::BadHost {
        input: input.to_owned(),
        reason,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if host.len() > MAX_HOST_LEN {
        return Err(bad("longer than 253 characters"));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(bad("empty label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(bad("a label is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                "only letters, digits, '-' and '_' are allowed in a label",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with '-'"));
        }
    }
    // A name of digits and dots only is a malformed IPv4 address, not a hostname.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad("not a valid IPv4 address"));
    }
    Ok(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_forms() {
        assert_eq!(
            Authority::parse("10.0.0.1:8080").unwrap(),
            Authority::Addr("10.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            Authority::parse("[fd00::1]:443").unwrap(),
            Authority::Addr("[fd00::1]:443".parse().unwrap())
        );
        assert_eq!(
            Authority::parse("Web-API.default.svc.cluster.local.:80").unwrap(),
            Authority::Host {
                host: "web-api.default.svc.cluster.local".into(),
                port: 80
            }
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:+80",
            "10.0.0.1:8o",
            "fd00::1:443",
            "[fd00::1]",
            "[fd00::1]443",
            "[fe80::1%eth0]:80",
            "[10.0.0.1]:80",
            "1.2.3:80",
            "999.1.1.1:80",
            ":80",
            "a..b:80",
            "-a.b:80",
            "a b:80",
            "user@host:80",
            "host/path:80",
            "host:80/x",
        ] {
            assert!(Authority::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("{}:80", "a".repeat(64));
        assert!(Authority::parse(&long).is_err());
    }

    #[test]
    fn errors_name_the_input() {
        let err = Authority::parse("10.0.0.1:99999").unwrap_err().to_string();
        assert!(
            err.contains("10.0.0.1:99999") && err.contains("99999"),
            "{err}"
        );
    }
}
