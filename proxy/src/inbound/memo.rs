//! What an inbound connection's copy carries to another process when it moves (an upgrade):
//! the client, the destination (the CONNECT authority, or the plaintext connection's original
//! destination), when it began; and how it is read back there, trusting nothing.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use prost::Message;

use super::InboundOutcome;
use crate::handoff::proto::InboundTunnel;

/// The longest memo taken: an address, an authority and a time.
const MAX_MEMO: usize = 1024;

/// What an inbound tunnel's copy carries to another process.
pub(super) fn memo(outcome: &InboundOutcome, now: SystemTime) -> Vec<u8> {
    InboundTunnel {
        source: outcome.source.to_string(),
        destination: outcome.destination.clone(),
        started_unix_ms: crate::moving::started_unix_ms(now, outcome.duration),
    }
    .encode_to_vec()
}

/// A memo read back: the client, the authority's address and text, when the tunnel began.
#[derive(Debug)]
pub(super) struct Memo {
    pub(super) source: SocketAddr,
    pub(super) destination: SocketAddr,
    pub(super) authority: String,
    pub(super) started: SystemTime,
}

pub(super) fn read_memo(memo: &[u8]) -> Result<Memo, String> {
    if memo.len() > MAX_MEMO {
        return Err(format!(
            "a memo of {} bytes, more than {MAX_MEMO}",
            memo.len()
        ));
    }
    let m = InboundTunnel::decode(memo).map_err(|e| format!("its memo: {e}"))?;
    let source = m
        .source
        .parse()
        .map_err(|e| format!("its memo's source {:?}: {e}", m.source))?;
    let destination = m
        .destination
        .parse::<hbone::Authority>()
        .ok()
        .and_then(|a| a.socket_addr())
        .ok_or_else(|| format!("its memo's destination {:?} is not ip:port", m.destination))?;
    Ok(Memo {
        source,
        destination,
        authority: m.destination,
        started: SystemTime::UNIX_EPOCH + Duration::from_millis(m.started_unix_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memo_reads_back_and_a_bad_one_is_refused_naming_its_field() {
        let mut outcome = InboundOutcome::new(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".into(),
            true,
        );
        outcome.duration = Duration::from_secs(2);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m = read_memo(&memo(&outcome, now)).unwrap();
        assert_eq!(m.source, outcome.source);
        assert_eq!(m.destination.to_string(), "10.0.0.2:8080");
        assert_eq!(m.started, now - Duration::from_secs(2));

        let bad = |source: &str, destination: &str| {
            let memo = InboundTunnel {
                source: source.into(),
                destination: destination.into(),
                started_unix_ms: 0,
            }
            .encode_to_vec();
            read_memo(&memo).err().unwrap()
        };
        assert!(bad("nope", "10.0.0.2:80").contains("source"));
        assert!(bad("10.0.0.1:1", "web.default:80").contains("destination"));
        assert!(read_memo(&[0xff; 4]).is_err());
        assert!(
            read_memo(&[0; MAX_MEMO + 1])
                .unwrap_err()
                .contains("more than")
        );
    }
}
