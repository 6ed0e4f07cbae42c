//! The simulator's behaviour profile (TOML): latency, outcome ratios, asynchronous results,
//! faults, maintenance windows. Swapped at run time through `SimHandle::set_profile`
//! (tests flip a channel to "down" or "slow").
//!
//! ```toml
//! latency = { kind = "lognormal", p50_ms = 20.0, p99_ms = 200.0 }
//! decline_ratio = 0.02        # PAY/PAYOUT declined 1001
//! not_processed_ratio = 0.01  # answered 2001 BUSY, nothing recorded
//! async_ratio = 0.3           # answered 3000, final result by NOTIFY
//! async_delay_ms = 500
//! notify_copies = 3           # each NOTIFY sent this many times
//! notify_interval_ms = 200
//! drop_ratio = 0.001          # executed, no answer at all
//! disconnect_every_frames = 0 # 0 = never
//! revocations_per_s = 0.0
//! bad_mac_ratio = 0.0         # answer replaced by a frame with a corrupt MAC
//! garbage_ratio = 0.0         # answer replaced by garbage bytes (framing lost)
//! [[maintenance]]
//! from = "17:00"
//! to = "21:00"
//! ops = ["payout"]
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// Why a profile was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Not valid TOML, or unknown keys.
    #[error("profile: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value out of range.
    #[error("profile: {0}")]
    Invalid(String),
}

/// Latency added before each answer (not before echo answers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Latency {
    /// Always the same.
    Fixed {
        /// Milliseconds.
        ms: f64,
    },
    /// Uniform between two bounds.
    Uniform {
        /// Lower bound, ms.
        min_ms: f64,
        /// Upper bound, ms.
        max_ms: f64,
    },
    /// Log-normal with the given median and 99th percentile (a realistic long tail).
    Lognormal {
        /// Median, ms.
        p50_ms: f64,
        /// 99th percentile, ms (≥ p50).
        p99_ms: f64,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed { ms: 0.0 }
    }
}

/// z-score of the 99th percentile of the standard normal distribution.
const Z99: f64 = 2.326_347_874;

impl Latency {
    /// Draw one latency.
    pub fn sample(&self, rng: &mut Rng) -> Duration {
        let ms = match *self {
            Latency::Fixed { ms } => ms,
            Latency::Uniform { min_ms, max_ms } => min_ms + (max_ms - min_ms) * rng.unit(),
            Latency::Lognormal { p50_ms, p99_ms } => {
                let mu = p50_ms.ln();
                let sigma = (p99_ms.ln() - mu) / Z99;
                (mu + sigma * rng.normal()).exp()
            }
        };
        Duration::from_secs_f64((ms.max(0.0) / 1000.0).min(3600.0))
    }

    fn check(&self) -> Result<(), String> {
        let ok = match *self {
            Latency::Fixed { ms } => ms >= 0.0,
            Latency::Uniform { min_ms, max_ms } => min_ms >= 0.0 && max_ms >= min_ms,
            Latency::Lognormal { p50_ms, p99_ms } => p50_ms > 0.0 && p99_ms >= p50_ms,
        };
        if ok {
            Ok(())
        } else {
            Err(format!("latency {self:?} out of range"))
        }
    }
}

/// An operation a maintenance window can close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// PAY_REQ.
    Debit,
    /// PAYOUT_REQ.
    Payout,
    /// VERIFY_REQ, SIGN_REQ, UNSIGN_REQ.
    Sign,
    /// Every business request (not logon, echo, query).
    All,
}

/// A daily window (China time, UTC+8) in which some operations answer `2002` MAINTENANCE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start, "HH:MM" inclusive.
    pub from: String,
    /// End, "HH:MM" exclusive; "24:00" allowed. A window with `to` < `from` spans midnight.
    pub to: String,
    /// Operations closed during the window.
    pub ops: Vec<Op>,
}

fn minutes(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

impl Window {
    /// True when `op` is closed at `now_ms`.
    pub fn closes(&self, op: Op, now_ms: u64) -> bool {
        if !self.ops.iter().any(|&o| o == op || o == Op::All) {
            return false;
        }
        let (Some(from), Some(to)) = (minutes(&self.from), minutes(&self.to)) else {
            return false;
        };
        let cst_min = ((now_ms / 60_000 + 8 * 60) % (24 * 60)) as u32;
        if from <= to {
            (from..to).contains(&cst_min)
        } else {
            cst_min >= from || cst_min < to
        }
    }
}

/// The behaviour profile. Every field has a default (a perfect, instant channel), so a
/// TOML file lists only what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Channel down: new connections are closed at once and existing ones are dropped.
    pub down: bool,
    /// Latency before each answer.
    pub latency: Latency,
    /// Share of PAY/PAYOUT that pass every check but are declined `1001`.
    pub decline_ratio: f64,
    /// Share of PAY/PAYOUT answered `2001` BUSY without being recorded.
    pub not_processed_ratio: f64,
    /// Share of PAY/PAYOUT answered `3000` PROCESSING, with the result notified later.
    pub async_ratio: f64,
    /// Delay from acceptance to the final result of an asynchronous order, ms.
    pub async_delay_ms: u64,
    /// How many times each NOTIFY is sent (≥ 1).
    pub notify_copies: u32,
    /// Interval between copies of a NOTIFY, ms.
    pub notify_interval_ms: u64,
    /// Share of business requests executed but never answered.
    pub drop_ratio: f64,
    /// Close a connection after every N frames received on it (0 = never). The N-th frame
    /// is processed, its answer is not sent.
    pub disconnect_every_frames: u64,
    /// Bank-side revocations per second (random active agreements).
    pub revocations_per_s: f64,
    /// Maintenance windows.
    pub maintenance: Vec<Window>,
    /// Share of answers replaced by a frame whose MAC is corrupt.
    pub bad_mac_ratio: f64,
    /// Share of answers replaced by garbage bytes (the switch loses framing).
    pub garbage_ratio: f64,
    /// Heartbeat interval announced at logon and used when idle, seconds.
    pub heartbeat_s: u16,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            down: false,
            latency: Latency::default(),
            decline_ratio: 0.0,
            not_processed_ratio: 0.0,
            async_ratio: 0.0,
            async_delay_ms: 100,
            notify_copies: 1,
            notify_interval_ms: 100,
            drop_ratio: 0.0,
            disconnect_every_frames: 0,
            revocations_per_s: 0.0,
            maintenance: Vec::new(),
            bad_mac_ratio: 0.0,
            garbage_ratio: 0.0,
            heartbeat_s: 30,
        }
    }
}

impl Profile {
    /// Parse and check a TOML profile.
    pub fn from_toml(text: &str) -> Result<Profile, ProfileError> {
        let p: Profile = toml::from_str(text)?;
        p.check().map_err(ProfileError::Invalid)?;
        Ok(p)
    }

    /// Check ranges: ratios in [0, 1], outcome ratios summing to at most 1, windows parse.
    pub fn check(&self) -> Result<(), String> {
        self.latency.check()?;
        for (name, r) in [
            ("decline_ratio", self.decline_ratio),
            ("not_processed_ratio", self.not_processed_ratio),
            ("async_ratio", self.async_ratio),
            ("drop_ratio", self.drop_ratio),
            ("bad_mac_ratio", self.bad_mac_ratio),
            ("garbage_ratio", self.garbage_ratio),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("{name} = {r} outside 0..=1"));
            }
        }
        if self.decline_ratio + self.not_processed_ratio + self.async_ratio > 1.0 {
            return Err("decline + not_processed + async ratios exceed 1".into());
        }
        if self.notify_copies == 0 {
            return Err("notify_copies must be at least 1".into());
        }
        if self.revocations_per_s < 0.0 {
            return Err("revocations_per_s is negative".into());
        }
        if self.heartbeat_s == 0 {
            return Err("heartbeat_s must be at least 1".into());
        }
        for w in &self.maintenance {
            if minutes(&w.from).is_none() || minutes(&w.to).is_none() {
                return Err(format!(
                    "maintenance window {}–{}: expected HH:MM",
                    w.from, w.to
                ));
            }
        }
        Ok(())
    }

    /// True when `op` is inside a maintenance window at `now_ms`.
    pub fn in_maintenance(&self, op: Op, now_ms: u64) -> bool {
        self.maintenance.iter().any(|w| w.closes(op, now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let p = Profile::from_toml(
            r#"
            latency = { kind = "lognormal", p50_ms = 20.0, p99_ms = 200.0 }
            decline_ratio = 0.02
            async_ratio = 0.3
            notify_copies = 3
            [[maintenance]]
            from = "17:00"
            to = "21:00"
            ops = ["payout"]
            "#,
        )
        .unwrap();
        assert_eq!(p.notify_copies, 3);
        assert!(Profile::from_toml("bogus = 1").is_err());
        assert!(Profile::from_toml("decline_ratio = 1.5").is_err());
    }

    #[test]
    fn maintenance_window_is_china_time() {
        let w = Window {
            from: "17:00".into(),
            to: "21:00".into(),
            ops: vec![Op::Payout],
        };
        // 2024-01-02 09:30 UTC = 17:30 CST.
        let t = 1_704_187_800_000;
        assert!(w.closes(Op::Payout, t));
        assert!(!w.closes(Op::Debit, t));
        assert!(!w.closes(Op::Payout, t - 3_600_000)); // 16:30 CST
        let night = Window {
            from: "23:00".into(),
            to: "01:00".into(),
            ops: vec![Op::All],
        };
        assert!(night.closes(Op::Debit, 1_704_187_800_000 + 6 * 3_600_000)); // 23:30
    }

    #[test]
    fn lognormal_hits_its_percentiles() {
        let l = Latency::Lognormal {
            p50_ms: 10.0,
            p99_ms: 100.0,
        };
        let mut rng = Rng::new(7);
        let mut v: Vec<f64> = (0..20_000)
            .map(|_| l.sample(&mut rng).as_secs_f64() * 1000.0)
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let p50 = v[v.len() / 2];
        let p99 = v[v.len() * 99 / 100];
        assert!((p50 - 10.0).abs() < 1.0, "{p50}");
        assert!((p99 - 100.0).abs() < 15.0, "{p99}");
    }
}
