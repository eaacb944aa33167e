//! The access log: one line per finished connection, with DESIGN.md's fields, through `tracing`
//! (target `access`), so the binary's log format (plain or JSON, `LOG_FORMAT`) applies to it.
//!
//! Workload names come from the connection's own record, as they were found when it was set up
//! (no lookup in a later state): the source of an inbound connection is the workload at its
//! address (in shared mode the peer proxy dials from inside the source pod), the destination of
//! an outbound one the workload the route chose.

use std::net::SocketAddr;
use std::sync::Arc;

use xds_client::resources::Workload;

use crate::inbound::InboundOutcome;
use crate::outbound::OutboundOutcome;

/// What the access log says about one side of a connection, borrowed from its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    /// Workload name (`-` when unknown).
    pub workload: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// SPIFFE id.
    pub identity: &'a str,
}

impl<'a> Peer<'a> {
    fn of(w: Option<&'a Arc<Workload>>) -> Self {
        match w {
            Some(w) => Peer {
                workload: &w.workload_name,
                namespace: &w.namespace,
                identity: w.identity.as_str(),
            },
            None => Peer {
                workload: "-",
                namespace: "-",
                identity: "-",
            },
        }
    }
}

/// A socket address as text, written without the formatting machinery (an access-log line
/// carries two or three of them, and `SocketAddr`'s `Display` was a fifth of the line's cost).
struct AddrText {
    buf: [u8; 64],
    len: usize,
}

impl AddrText {
    fn new(addr: SocketAddr) -> Self {
        let mut text = AddrText {
            buf: [0; 64],
            len: 0,
        };
        match addr {
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    text.push_decimal(octet.into());
                }
                text.push(b':');
                text.push_decimal(v4.port());
            }
            SocketAddr::V6(v6) => {
                use std::fmt::Write;
                // `[addr]:port` is at most 58 bytes (with a scope id), within the buffer.
                let _ = write!(text, "{v6}");
            }
        }
        text
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    fn push_decimal(&mut self, n: u16) {
        let mut digits = [0u8; 5];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            self.push(d);
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits, dots, colons, brackets, hex digits and `%` were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("-")
    }
}

impl std::fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Logs a finished outbound connection.
pub fn log_outbound(o: &OutboundOutcome) {
    let src = Peer::of(o.source_workload.as_ref());
    let dst = Peer::of(o.destination_workload.as_ref());
    let dst_identity = if o.mtls { dst.identity } else { "-" };
    let (src_addr, dst_addr) = (AddrText::new(o.source.0), AddrText::new(o.destination.0));
    let hbone_addr = o.hbone_target.map(AddrText::new);
    tracing::info!(
        target: "access",
        direction = "outbound",
        src.addr = %src_addr.as_str(),
        src.workload = %src.workload,
        src.namespace = %src.namespace,
        src.identity = src.identity,
        dst.addr = %dst_addr.as_str(),
        dst.hbone_addr = %hbone_addr.as_ref().map_or("-", AddrText::as_str),
        dst.workload = %dst.workload,
        dst.namespace = %dst.namespace,
        dst.identity = dst_identity,
        mtls = o.mtls,
        bytes_sent = o.bytes.0,
        bytes_recv = o.bytes.1,
        duration_ms = o.duration.as_millis() as u64,
        error = o.error.as_deref().unwrap_or("-"),
        "connection complete"
    );
}

/// Logs a finished inbound connection (HBONE or plaintext).
pub fn log_inbound(o: &InboundOutcome) {
    let src = Peer::of(o.source_workload.as_ref());
    let dst = Peer::of(o.destination_workload.as_ref());
    let src_addr = AddrText::new(o.source);
    tracing::info!(
        target: "access",
        direction = "inbound",
        src.addr = %src_addr.as_str(),
        src.workload = %src.workload,
        src.namespace = %src.namespace,
        src.identity = o.source_identity.as_deref().unwrap_or("-"),
        dst.addr = %o.destination,
        dst.workload = %dst.workload,
        dst.namespace = %dst.namespace,
        dst.identity = dst.identity,
        status = o.status,
        bytes_recv = o.bytes.0,
        bytes_sent = o.bytes.1,
        duration_ms = o.duration.as_millis() as u64,
        error = o.error.as_deref().unwrap_or("-"),
        "connection complete"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_their_display() {
        for addr in [
            "0.0.0.0:0",
            "10.0.0.1:8080",
            "255.255.255.255:65535",
            "192.168.100.7:15008",
            "[::1]:443",
            "[fd00:10:244::1c]:15008",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(AddrText::new(addr).as_str(), addr.to_string());
        }
    }
}
