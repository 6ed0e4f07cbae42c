//! Latency histograms (hdrhistogram) and counters.
//!
//! Lender latency is recorded per request message type, from the moment the frame was
//! decoded to the moment its response was written to the socket buffer. Upstream round
//! trips are recorded per channel. A histogram is a `Mutex<Histogram>`: recording costs
//! one uncontended lock and an array increment (see `benches/engine.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use dashmap::DashMap;
use hdrhistogram::Histogram;

use crate::message::{ChannelId, Message, Outcome, CATALOGUE};

/// Highest latency tracked, microseconds (60 s); slower is clamped into the top bucket.
const LATENCY_US_MAX: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds")
}

/// Summary of one histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Maximum, µs.
    pub max_us: u64,
}

fn summarize(h: &Histogram<u64>) -> Summary {
    Summary {
        count: h.len(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

/// Counters of refusals and overload.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests answered BUSY.
    pub busy: AtomicU64,
    /// Frames refused for a bad MAC or unknown key.
    pub bad_mac: AtomicU64,
    /// Frames refused for framing, length, type, version or header fields.
    pub malformed: AtomicU64,
    /// Requests refused by session rules (logon, merchant, timestamp, request id).
    pub session_refused: AtomicU64,
    /// Connections refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Lender requests holding an in-flight slot now (gauge; see [`InflightGauge`]).
    pub inflight: AtomicU64,
}

/// Counts one lender request in [`Counters::inflight`] while it lives (RAII: the count
/// comes down however the request's task ends).
pub struct InflightGauge(std::sync::Arc<Metrics>);

impl InflightGauge {
    /// Count one more request in flight.
    pub fn new(m: &std::sync::Arc<Metrics>) -> InflightGauge {
        m.counters.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGauge(m.clone())
    }
}

impl Drop for InflightGauge {
    fn drop(&mut self) {
        self.0.counters.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upper bounds of the Prometheus latency histogram buckets, µs (500 µs … 30 s: a lender
/// answer within the switch's own overhead up to a channel deadline).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 30_000_000,
];

/// The response types whose outcome is an order's or agreement's result (the ones an
/// operator counts by status and reason).
fn answer_outcome(msg: &Message) -> Option<&Outcome> {
    Some(match msg {
        Message::DebitRsp(m) => &m.result,
        Message::PayoutRsp(m) => &m.result,
        Message::SignAndPayRsp(m) => &m.result,
        Message::PreBindRsp(m) => &m.result,
        Message::BindConfirmRsp(m) => &m.result,
        Message::AgreementCancelRsp(m) => &m.result,
        Message::Notify(m) => &m.result,
        _ => return None,
    })
}

/// All metrics of a running switch.
pub struct Metrics {
    lender: Vec<(u8, Mutex<Histogram<u64>>)>,
    upstream: DashMap<ChannelId, Mutex<Histogram<u64>>>,
    /// Answers by (message type, status, reason): orders by type, status and reason code.
    answers: DashMap<(&'static str, &'static str, &'static str), AtomicU64>,
    /// Counters.
    pub counters: Counters,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            lender: CATALOGUE
                .iter()
                .filter(|(c, ..)| crate::message::is_lender_request(*c))
                .map(|(c, ..)| (*c, Mutex::new(histogram())))
                .collect(),
            upstream: DashMap::new(),
            answers: DashMap::new(),
            counters: Counters::default(),
        }
    }
}

impl Metrics {
    /// Record a lender request's latency.
    pub fn record_lender(&self, code: u8, us: u64) {
        if let Some((_, h)) = self.lender.iter().find(|(c, _)| *c == code) {
            h.lock()
                .unwrap_or_else(|p| p.into_inner())
                .saturating_record(us.max(1));
        }
    }

    /// Record an upstream round trip.
    pub fn record_upstream(&self, channel: &ChannelId, us: u64) {
        self.upstream
            .entry(*channel)
            .or_insert_with(|| Mutex::new(histogram()))
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_record(us.max(1));
    }

    /// Per lender request type: (wire name, summary), types with samples only.
    pub fn lender_summary(&self) -> Vec<(&'static str, Summary)> {
        self.lender
            .iter()
            .filter_map(|(c, h)| {
                let h = h.lock().unwrap_or_else(|p| p.into_inner());
                let name = CATALOGUE.iter().find(|x| x.0 == *c).map(|x| x.1)?;
                (!h.is_empty()).then(|| (name, summarize(&h)))
            })
            .collect()
    }

    /// Per channel: (channel, summary).
    pub fn upstream_summary(&self) -> Vec<(ChannelId, Summary)> {
        self.upstream
            .iter()
            .map(|e| {
                let h = e.value().lock().unwrap_or_else(|p| p.into_inner());
                (*e.key(), summarize(&h))
            })
            .collect()
    }

    /// Count an answer written to a lender (or a notification) by type, status and
    /// reason, when it carries an order's or agreement's outcome.
    pub fn record_answer(&self, msg: &Message) {
        if let Some(o) = answer_outcome(msg) {
            let k = (msg.wire_name(), o.status.name(), o.reason.name());
            if let Some(c) = self.answers.get(&k) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.answers
                .entry(k)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Answers by (type, status, reason), sorted.
    pub fn answers(&self) -> Vec<((&'static str, &'static str, &'static str), u64)> {
        let mut v: Vec<_> = self
            .answers
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        v.sort();
        v
    }

    /// Per lender request type with samples: (wire name, cumulative count at or below
    /// each of [`LATENCY_BUCKETS_US`], count, sum of µs).
    pub fn lender_buckets(&self) -> Vec<(&'static str, Vec<u64>, u64, u64)> {
        self.lender
            .iter()
            .filter_map(|(c, h)| {
                let h = h.lock().unwrap_or_else(|p| p.into_inner());
                let name = CATALOGUE.iter().find(|x| x.0 == *c).map(|x| x.1)?;
                if h.is_empty() {
                    return None;
                }
                // One pass over the recorded values (not one `count_between` scan per
                // bucket: /metrics is scraped often and the histogram has ~50k slots).
                let mut b = vec![0u64; LATENCY_BUCKETS_US.len()];
                let mut sum = 0u64;
                for v in h.iter_recorded() {
                    let (at, n) = (v.value_iterated_to(), v.count_at_value());
                    // Buckets by the slot's lowest value (as `count_between` counts), the
                    // sum by its middle (3 significant digits: within 0.1%).
                    let value = h.lowest_equivalent(at);
                    sum = sum.saturating_add(h.median_equivalent(at).saturating_mul(n));
                    if let Some(i) = LATENCY_BUCKETS_US.iter().position(|&le| value <= le) {
                        b[i] += n;
                    }
                }
                for i in 1..b.len() {
                    b[i] += b[i - 1];
                }
                Some((name, b, h.len(), sum))
            })
            .collect()
    }

    /// Increment a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debit_req() -> u8 {
        CATALOGUE.iter().find(|x| x.1 == "DEBIT_REQ").unwrap().0
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_match_a_scan_per_bucket() {
        let m = Metrics::default();
        for us in [300, 1_500, 5_000, 70_000, 45_000_000] {
            m.record_lender(debit_req(), us);
        }
        let all = m.lender_buckets();
        let (name, b, count, sum) = &all[0];
        assert_eq!((*name, *count), ("DEBIT_REQ", 5));
        let le = |x: u64| b[LATENCY_BUCKETS_US.iter().position(|&l| l == x).unwrap()];
        assert_eq!(
            (
                le(500),
                le(1_000),
                le(2_000),
                le(5_000),
                le(50_000),
                le(100_000)
            ),
            (1, 1, 2, 3, 3, 4)
        );
        assert_eq!(
            *b.last().unwrap(),
            4,
            "45 s is above the top bucket, only in +Inf"
        );
        let exact: u64 = 300 + 1_500 + 5_000 + 70_000 + 45_000_000;
        assert!(sum.abs_diff(exact) <= exact / 1000, "{sum} vs {exact}");
        // The same figures as the naive one-scan-per-bucket computation.
        let h = m
            .lender
            .iter()
            .find(|(c, _)| *c == debit_req())
            .unwrap()
            .1
            .lock()
            .unwrap();
        let naive: Vec<u64> = LATENCY_BUCKETS_US
            .iter()
            .map(|&l| h.count_between(0, l))
            .collect();
        assert_eq!(b, &naive);
    }

    #[test]
    fn answers_count_by_type_status_and_reason() {
        use crate::message::{DebitRsp, EchoRsp, Reason, Status};
        let m = Metrics::default();
        let ok = Message::DebitRsp(DebitRsp {
            result: Outcome::new(Status::Success, Reason::OK),
            order_id: Default::default(),
            channel: Default::default(),
        });
        m.record_answer(&ok);
        m.record_answer(&ok);
        m.record_answer(&Message::EchoRsp(EchoRsp { nonce: 1 }));
        assert_eq!(m.answers(), vec![(("DEBIT_RSP", "SUCCESS", "OK"), 2)]);
    }
}
