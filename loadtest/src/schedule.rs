//! Open-loop send schedule: the time of every send is fixed in advance from the target
//! rate, so a stalled server cannot slow the generator down and hide its own latency
//! (no coordinated omission). Latency is measured from these scheduled times.
//!
//! The rate ramps linearly from 0 to `rate_per_s` over `ramp_s` seconds, then stays.
//! Pure arithmetic, no clock: the driver adds the offsets to its start instant.

use std::time::Duration;

/// A linear ramp to a constant rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Target rate after the ramp, sends per second (> 0).
    pub rate_per_s: f64,
    /// Ramp length, seconds (0 = full rate from the start).
    pub ramp_s: f64,
}

impl Schedule {
    /// Sends scheduled during the ramp (the ramp's area: rate × ramp / 2).
    fn ramp_sends(&self) -> f64 {
        self.rate_per_s * self.ramp_s / 2.0
    }

    /// Offset from the start of send number `i` (0-based).
    ///
    /// During the ramp the cumulative count is `n(t) = R t² / (2 T)`, so send `i` is at
    /// `t = sqrt(2 T i / R)`; after it, one send every `1 / R` seconds.
    pub fn offset(&self, i: u64) -> Duration {
        let i = i as f64;
        let n_ramp = self.ramp_sends();
        let s = if self.ramp_s > 0.0 && i < n_ramp {
            (2.0 * self.ramp_s * i / self.rate_per_s).sqrt()
        } else {
            self.ramp_s + (i - n_ramp) / self.rate_per_s
        };
        Duration::from_secs_f64(s)
    }

    /// Number of sends due by `elapsed` (sends `0..n` have offsets ≤ `elapsed`).
    pub fn due(&self, elapsed: Duration) -> u64 {
        let t = elapsed.as_secs_f64();
        let n = if self.ramp_s > 0.0 && t < self.ramp_s {
            self.rate_per_s * t * t / (2.0 * self.ramp_s)
        } else {
            self.ramp_sends() + (t - self.ramp_s) * self.rate_per_s
        };
        // `floor + 1`: send 0 is due at offset 0. Correct floating-point edge cases so
        // that `offset(due(t) - 1) <= t < offset(due(t))` always holds.
        let mut k = n.max(0.0).floor() as u64 + 1;
        while k > 0 && self.offset(k - 1) > elapsed {
            k -= 1;
        }
        while self.offset(k) <= elapsed {
            k += 1;
        }
        k
    }

    /// True when send `i` falls inside the ramp (not counted in the summary).
    pub fn in_ramp(&self, i: u64) -> bool {
        (i as f64) < self.ramp_sends()
    }

    /// Sends scheduled in a run of `duration` (including the ramp).
    pub fn total(&self, duration: Duration) -> u64 {
        self.due(duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_rate_is_evenly_spaced() {
        let s = Schedule {
            rate_per_s: 50_000.0,
            ramp_s: 0.0,
        };
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(50_000), Duration::from_secs(1));
        assert_eq!(s.offset(1), Duration::from_micros(20));
        assert_eq!(s.due(Duration::ZERO), 1);
        assert_eq!(s.due(Duration::from_micros(19)), 1);
        assert_eq!(s.due(Duration::from_micros(20)), 2);
        assert_eq!(s.total(Duration::from_secs(10)), 500_001);
    }

    #[test]
    fn ramp_sends_half_as_many_then_full_rate() {
        let s = Schedule {
            rate_per_s: 10_000.0,
            ramp_s: 2.0,
        };
        // The ramp holds R T / 2 = 10,000 sends, the first second a quarter of them.
        assert_eq!(s.due(Duration::from_secs(1)), 2_501);
        assert_eq!(s.offset(10_000), Duration::from_secs(2));
        assert_eq!(s.due(Duration::from_secs(3)), 20_001);
        assert!(s.in_ramp(9_999) && !s.in_ramp(10_000));
        // Offsets never go backwards across the ramp's end.
        let mut last = Duration::ZERO;
        for i in 9_990..10_010 {
            let o = s.offset(i);
            assert!(o >= last, "{i}: {o:?} < {last:?}");
            last = o;
        }
    }

    #[test]
    fn due_and_offset_agree() {
        let s = Schedule {
            rate_per_s: 123_457.0,
            ramp_s: 0.7,
        };
        for us in (0..3_000_000).step_by(7_919) {
            let t = Duration::from_micros(us);
            let n = s.due(t);
            assert!(s.offset(n - 1) <= t && s.offset(n) > t, "t={t:?} n={n}");
        }
    }
}
