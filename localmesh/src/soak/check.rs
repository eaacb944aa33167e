//! What each soak connection is checked against, as data: the bytes it must see come back, and
//! the outcome the policy in force when it was made calls for. No I/O here.
//!
//! Bytes: a connection sends the deterministic stream of its seed ([`stream_bytes`]) through
//! the echo app and checks what comes back against the same stream ([`Verifier`]); a wrong byte
//! is "changed", a clean end before everything sent came back is "lost".
//!
//! Outcomes: [`Oracle`] keeps the times the soak's policy flipped between allowing and denying
//! its traffic, and the windows in which a fault may cut connections (a proxy killed, say); a
//! connection made within `grace` of a flip may end either way, one that fails inside a fault's
//! window is excused, and nothing else is.

use std::time::Duration;

/// The stream of seed `seed` from `offset` on, into `out`: 8-byte blocks of splitmix64 over
/// (seed, block number), so any offset is computed without the bytes before it.
pub fn stream_bytes(seed: u64, offset: u64, out: &mut [u8]) {
    let mut at = offset;
    let mut i = 0;
    while i < out.len() {
        let block = splitmix64(seed ^ (at / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes();
        let from = (at % 8) as usize;
        let n = (8 - from).min(out.len() - i);
        out[i..i + n].copy_from_slice(&block[from..from + n]);
        i += n;
        at += n as u64;
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checks the bytes coming back against the stream, in order, in pieces of any size.
#[derive(Debug, Clone)]
pub struct Verifier {
    seed: u64,
    /// How many bytes have been checked and found right.
    pub checked: u64,
    expected: Vec<u8>,
}

impl Verifier {
    /// For the stream of `seed`, from its start.
    pub fn new(seed: u64) -> Self {
        Verifier {
            seed,
            checked: 0,
            expected: Vec::new(),
        }
    }

    /// Checks `got` (the next bytes); `Err(offset)` names the first wrong byte's place in the
    /// stream.
    pub fn check(&mut self, got: &[u8]) -> Result<(), u64> {
        self.expected.resize(got.len(), 0);
        stream_bytes(self.seed, self.checked, &mut self.expected);
        match got.iter().zip(&self.expected).position(|(a, b)| a != b) {
            Some(i) => Err(self.checked + i as u64),
            None => {
                self.checked += got.len() as u64;
                Ok(())
            }
        }
    }
}

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything sent came back, right, and the connection ended cleanly.
    Served,
    /// The connection was refused before any byte came back (what a denying policy does: the
    /// client's proxy resets it, or the connect fails).
    Denied,
    /// The connection broke after some bytes came back right (reset, timeout): a cut, not a
    /// silent loss.
    Cut {
        /// Bytes that came back right before the cut.
        checked: u64,
        /// Why (`reset`, `timeout`, ...).
        reason: &'static str,
    },
    /// It ended cleanly with fewer bytes back than were sent: bytes silently lost.
    Lost {
        /// Sent.
        sent: u64,
        /// Came back.
        echoed: u64,
    },
    /// A byte came back different.
    Changed {
        /// Its place in the stream.
        at: u64,
    },
}

/// What the policy calls for at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Served.
    Allowed,
    /// Denied.
    Denied,
    /// Just around a policy change: either.
    Either,
}

/// A wrong outcome, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wrong {
    /// Bytes lost or changed (never acceptable).
    BytesLostOrChanged,
    /// An allowed connection refused or cut outside every fault's window.
    AllowedRefused,
    /// A denied connection served (never acceptable).
    DeniedServed,
    /// A connection between ambient pods served without mutual TLS (never acceptable).
    Plaintext,
}

impl Wrong {
    /// The name in the summary line and the report.
    pub fn name(self) -> &'static str {
        match self {
            Wrong::BytesLostOrChanged => "bytes_lost_or_changed",
            Wrong::AllowedRefused => "allowed_refused",
            Wrong::DeniedServed => "denied_served",
            Wrong::Plaintext => "plaintext",
        }
    }
}

/// The policy's timeline and the faults' windows, in time since the soak began.
#[derive(Debug, Clone)]
pub struct Oracle {
    /// (when, whether the soak's traffic is allowed from then on), in order.
    flips: Vec<(Duration, bool)>,
    /// (from, to): a fault may cut connections alive in between.
    faults: Vec<(Duration, Duration)>,
    /// How long around a flip either outcome is right (a policy reaches every proxy within
    /// moments, not at once).
    pub grace: Duration,
}

impl Oracle {
    /// Allowing (or not) from the start, with `grace` around each flip.
    pub fn new(allowed: bool, grace: Duration) -> Self {
        Oracle {
            flips: vec![(Duration::ZERO, allowed)],
            faults: Vec::new(),
            grace,
        }
    }

    /// From `at` on, the traffic is allowed (or not).
    pub fn flip(&mut self, at: Duration, allowed: bool) {
        self.flips.push((at, allowed));
        self.flips.sort_by_key(|(t, _)| *t);
    }

    /// A fault may cut connections alive between `from` and `to`.
    pub fn fault(&mut self, from: Duration, to: Duration) {
        self.faults.push((from, to));
    }

    /// What a connection made at `at` should get.
    pub fn expect(&self, at: Duration) -> Expect {
        if self
            .flips
            .iter()
            .skip(1)
            .any(|(t, _)| at + self.grace >= *t && at <= *t + self.grace)
        {
            return Expect::Either;
        }
        let allowed = self
            .flips
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .is_none_or(|(_, a)| *a);
        if allowed {
            Expect::Allowed
        } else {
            Expect::Denied
        }
    }

    /// Whether the policy turned to denying while the connection alive from `from` to `to` was
    /// open (within `grace` either way): the proxies then close it, as they must.
    pub fn denied_during(&self, from: Duration, to: Duration) -> bool {
        self.flips
            .iter()
            .skip(1)
            .any(|(t, allowed)| !allowed && *t <= to + self.grace && *t + self.grace >= from)
    }

    /// Whether a fault's window overlaps the connection alive from `from` to `to`.
    pub fn excused(&self, from: Duration, to: Duration) -> bool {
        self.faults.iter().any(|(a, b)| from <= *b && *a <= to)
    }

    /// Judges a connection alive from `from` to `to` that ended with `outcome`: the wrong kind,
    /// if it is wrong.
    pub fn judge(&self, from: Duration, to: Duration, outcome: &Outcome) -> Option<Wrong> {
        match (outcome, self.expect(from)) {
            (Outcome::Lost { .. } | Outcome::Changed { .. }, _) => Some(Wrong::BytesLostOrChanged),
            (Outcome::Served, Expect::Denied) => Some(Wrong::DeniedServed),
            (Outcome::Denied | Outcome::Cut { .. }, Expect::Allowed)
                if !self.excused(from, to) && !self.denied_during(from, to) =>
            {
                Some(Wrong::AllowedRefused)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_the_same_from_any_offset_and_pieces_of_any_size_check() {
        let mut whole = vec![0u8; 1000];
        stream_bytes(7, 0, &mut whole);
        let mut part = vec![0u8; 13];
        stream_bytes(7, 501, &mut part);
        assert_eq!(part, whole[501..514]);
        let mut other = vec![0u8; 1000];
        stream_bytes(8, 0, &mut other);
        assert_ne!(other, whole);
        let mut v = Verifier::new(7);
        for piece in whole.chunks(37) {
            v.check(piece).unwrap();
        }
        assert_eq!(v.checked, 1000);
        let mut v = Verifier::new(7);
        let mut bad = whole.clone();
        bad[600] ^= 1;
        v.check(&bad[..500]).unwrap();
        assert_eq!(v.check(&bad[500..]), Err(600));
    }

    #[test]
    fn the_oracle_allows_either_outcome_only_around_a_flip_and_excuses_only_fault_windows() {
        let s = Duration::from_secs;
        let mut o = Oracle::new(true, s(2));
        o.flip(s(10), false);
        o.flip(s(20), true);
        o.fault(s(30), s(31));
        assert_eq!(o.expect(s(5)), Expect::Allowed);
        assert_eq!(o.expect(s(9)), Expect::Either);
        assert_eq!(o.expect(s(11)), Expect::Either);
        assert_eq!(o.expect(s(15)), Expect::Denied);
        assert_eq!(o.expect(s(25)), Expect::Allowed);
        let cut = Outcome::Cut {
            checked: 10,
            reason: "reset",
        };
        assert_eq!(
            o.judge(s(15), s(16), &Outcome::Served),
            Some(Wrong::DeniedServed)
        );
        assert_eq!(o.judge(s(15), s(16), &Outcome::Denied), None);
        assert_eq!(
            o.judge(s(5), s(6), &Outcome::Denied),
            Some(Wrong::AllowedRefused)
        );
        assert_eq!(o.judge(s(5), s(6), &cut), Some(Wrong::AllowedRefused));
        // A long connection alive through the fault may be cut; one after it may not.
        assert_eq!(o.judge(s(25), s(30), &cut), None);
        assert_eq!(o.judge(s(32), s(33), &cut), Some(Wrong::AllowedRefused));
        // Lost or changed bytes are wrong whatever the policy and the faults.
        let lost = Outcome::Lost {
            sent: 10,
            echoed: 9,
        };
        assert_eq!(
            o.judge(s(30), s(30), &lost),
            Some(Wrong::BytesLostOrChanged)
        );
        assert_eq!(
            o.judge(s(9), s(10), &Outcome::Changed { at: 3 }),
            Some(Wrong::BytesLostOrChanged)
        );
        assert_eq!(o.judge(s(9), s(10), &Outcome::Served), None);
        // A long connection made while allowed and cut by the deny at 10 s: the policy's doing.
        assert_eq!(o.judge(s(1), s(10), &cut), None);
        // Cut before the deny came: wrong.
        assert_eq!(o.judge(s(1), s(5), &cut), Some(Wrong::AllowedRefused));
        // Cut a moment before the deny was recorded (the proxies acted first): the deny's too.
        assert_eq!(o.judge(s(1), Duration::from_millis(9_900), &cut), None);
    }
}
