//! The last minutes of the switch for the status page's charts: a bounded ring of
//! samples taken every [`SAMPLE_MS`] (success rate, latency, in-flight per channel;
//! throughput and sessions overall). Kept on the server so a page opened at 02:00 shows
//! the ten minutes before it, not only what happened since it was opened.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::Control;
use crate::app::{now_ms, Switch};

/// Sampling period, ms.
pub const SAMPLE_MS: u64 = 2_000;
/// Samples kept: ten minutes at [`SAMPLE_MS`] (about 60 KB for a dozen channels).
pub const SAMPLES_MAX: usize = 300;

/// One channel at one sample.
#[derive(Debug, Clone)]
struct ChannelSample {
    id: String,
    success_ppm: u32,
    latency_ms_p50: Option<u64>,
    latency_ms_p90: Option<u64>,
    inflight: u64,
    up: bool,
}

/// The switch at one moment.
#[derive(Debug, Clone)]
struct Sample {
    t_ms: u64,
    orders_per_s: f64,
    requests_per_s: f64,
    sessions: usize,
    channels: Vec<ChannelSample>,
}

/// The ring, and the counters of the previous sample (for rates).
#[derive(Debug)]
pub struct History {
    ring: VecDeque<Sample>,
    cap: usize,
    last: Option<(u64, u64, u64)>,
}

impl History {
    /// An empty ring of at most `cap` samples.
    pub fn new(cap: usize) -> History {
        History {
            ring: VecDeque::with_capacity(cap),
            cap: cap.max(1),
            last: None,
        }
    }

    fn push(&mut self, s: Sample) {
        if self.ring.len() == self.cap {
            self.ring.pop_front();
        }
        self.ring.push_back(s);
    }

    /// One channel's series: times (ms), success ratio, p50 and p90 latency (ms, null
    /// without answers), in-flight.
    pub fn channel_series(&self, id: &str) -> Value {
        let mut t = Vec::new();
        let mut success = Vec::new();
        let mut p50 = Vec::new();
        let mut p90 = Vec::new();
        let mut inflight = Vec::new();
        let mut up = Vec::new();
        for s in &self.ring {
            if let Some(c) = s.channels.iter().find(|c| c.id == id) {
                t.push(json!(s.t_ms));
                success.push(json!(c.success_ppm as f64 / 1e6));
                p50.push(json!(c.latency_ms_p50));
                p90.push(json!(c.latency_ms_p90));
                inflight.push(json!(c.inflight));
                up.push(json!(c.up));
            }
        }
        json!({ "t": t, "success": success, "p50_ms": p50, "p90_ms": p90, "inflight": inflight, "up": up })
    }

    /// Overall series: times (ms), orders accepted per second, lender requests answered
    /// per second, logged-on sessions.
    pub fn throughput_series(&self) -> Value {
        json!({
            "t": self.ring.iter().map(|s| s.t_ms).collect::<Vec<_>>(),
            "orders_per_s": self.ring.iter().map(|s| s.orders_per_s).collect::<Vec<_>>(),
            "requests_per_s": self.ring.iter().map(|s| s.requests_per_s).collect::<Vec<_>>(),
            "sessions": self.ring.iter().map(|s| s.sessions).collect::<Vec<_>>(),
        })
    }
}

/// Take one sample of `sw` now.
fn sample(sw: &Switch, ctl: &Control) {
    let now = now_ms();
    let rm = sw.engine.routing_metrics(now);
    let table = sw.engine.table();
    let channels = table
        .channels
        .iter()
        .map(|c| {
            let h = rm.health.iter().find(|h| h.channel == c.id);
            let pool = ctl.pools.get(&c.id).map(|p| p.stats());
            ChannelSample {
                id: c.id.to_string(),
                success_ppm: h.map(|h| h.success_ppm).unwrap_or(1_000_000),
                latency_ms_p50: h.and_then(|h| h.latency_ms_p50),
                latency_ms_p90: h.and_then(|h| h.latency_ms_p90),
                inflight: pool.as_ref().map(|p| p.inflight).unwrap_or(0),
                up: pool.map(|p| p.connections_ready > 0).unwrap_or(false),
            }
        })
        .collect();
    let orders = sw.engine.stats.orders_accepted.load(Ordering::Relaxed);
    let requests: u64 = sw
        .metrics
        .lender_summary()
        .iter()
        .map(|(_, m)| m.count)
        .sum();
    let mut h = ctl.history();
    let (orders_per_s, requests_per_s) = match h.last {
        Some((t0, o0, r0)) if now > t0 => {
            let secs = (now - t0) as f64 / 1000.0;
            (
                orders.saturating_sub(o0) as f64 / secs,
                requests.saturating_sub(r0) as f64 / secs,
            )
        }
        _ => (0.0, 0.0),
    };
    h.last = Some((now, orders, requests));
    h.push(Sample {
        t_ms: now,
        orders_per_s,
        requests_per_s,
        sessions: sw.hub.sessions(),
        channels,
    });
}

/// Sample every [`SAMPLE_MS`] until `stop` fires.
pub async fn sample_loop(sw: Arc<Switch>, ctl: Arc<Control>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(SAMPLE_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        sample(&sw, &ctl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: u64) -> Sample {
        Sample {
            t_ms: t,
            orders_per_s: t as f64,
            requests_per_s: 0.0,
            sessions: 1,
            channels: vec![ChannelSample {
                id: "CHA".into(),
                success_ppm: 500_000,
                latency_ms_p50: Some(3),
                latency_ms_p90: None,
                inflight: 2,
                up: true,
            }],
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_samples_only() {
        let mut h = History::new(3);
        for t in 1..=5 {
            h.push(s(t));
        }
        assert_eq!(h.throughput_series()["t"], json!([3, 4, 5]));
        let c = h.channel_series("CHA");
        assert_eq!(c["success"], json!([0.5, 0.5, 0.5]));
        assert_eq!(c["p50_ms"], json!([3, 3, 3]));
        assert_eq!(c["p90_ms"], json!([null, null, null]));
        assert_eq!(h.channel_series("NOPE")["t"], json!([]));
    }
}
