//! A connection's misbehaviour budget: what a peer may do that costs us and moves nothing
//! forward, before we end the connection with GOAWAY ENHANCE_YOUR_CALM.
//!
//! Why a budget and not a rule per frame: everything counted here is legal HTTP/2 once (a PING,
//! a reset stream, a refused stream). Each is cheap for the peer and costs us work (a handler
//! started, an answer queued, a stream's state), so mature servers cap how much of it one
//! connection gets: `h2` counts locally reset streams and streams reset before they were
//! accepted, Envoy counts empty frames and control frames. Ours is a token bucket per kind of
//! misbehaviour: a burst that legitimate peers never reach, refilled at a steady rate so a
//! connection that lives for days (keepalive PINGs every 10 s, now and then a reset) never runs
//! dry. Time comes in from the caller, so the bucket is tested without a clock.

use std::time::Instant;

/// How much of one kind of misbehaviour a connection may show: `burst` events at once, and
/// `per_second` more for every second that passes (up to `burst` again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Events allowed at once, from a fresh connection or after a quiet spell.
    pub burst: u32,
    /// Events the allowance regains each second.
    pub per_second: u32,
}

impl Allowance {
    /// `burst` at once, `per_second` sustained.
    pub const fn new(burst: u32, per_second: u32) -> Allowance {
        Allowance { burst, per_second }
    }
}

/// One token bucket, in thousandths of an event.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    allowance: Allowance,
    available: u64,
    last: Option<Instant>,
}

impl Bucket {
    pub(crate) fn new(allowance: Allowance) -> Bucket {
        Bucket {
            allowance,
            available: u64::from(allowance.burst) * 1000,
            last: None,
        }
    }

    /// Takes one event at `now`; `false` once the allowance is spent.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let cap = u64::from(self.allowance.burst) * 1000;
        if let Some(last) = self.last {
            let elapsed_ms = now.saturating_duration_since(last).as_millis();
            let regained = elapsed_ms.saturating_mul(u128::from(self.allowance.per_second));
            self.available = (u128::from(self.available) + regained).min(u128::from(cap)) as u64;
        }
        self.last = Some(now);
        if self.available < 1000 {
            return false;
        }
        self.available -= 1000;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_is_allowed_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Allowance::new(3, 10));
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0), "a fourth event at once");
        // 100 ms at 10 per second: one more.
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // A long quiet spell refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));
    }

    #[test]
    fn keepalive_pings_forever_never_run_dry() {
        let t0 = Instant::now();
        let mut b = Bucket::new(Allowance::new(100, 1));
        for i in 0..100_000u64 {
            assert!(b.take(t0 + Duration::from_secs(10 * i)), "ping {i}");
        }
    }

    #[test]
    fn a_zero_allowance_refuses_everything() {
        let mut b = Bucket::new(Allowance::new(0, 0));
        assert!(!b.take(Instant::now()));
    }
}
