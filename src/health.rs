//! Channel health: a sliding time window of outcomes per channel, latency percentiles,
//! a circuit breaker with half-open probes, and the operator's per-product override.
//!
//! I/O-free like the engine: every call takes `now_ms`; nothing here reads a clock, so
//! unit tests drive time by hand (the breaker's "paused time").
//!
//! # What counts
//! Only outcomes the channel is responsible for enter the success rate
//! ([`Observation::channel_fault`]):
//! - success, processing (accepted) → success;
//! - NOT_PROCESSED (busy, maintenance, bank unavailable, bad request), no answer in time,
//!   line dropped, not sent (no connection) → failure;
//! - declines (insufficient funds, card frozen, wrong SMS code …) and
//!   FUNDS_POSITION_LOW (the merchant's prefunded balance, not the channel) are
//!   *neutral*: they prove the channel answers (they reset the consecutive-failure count
//!   and count as a good half-open probe) but are not in the rate's numerator or
//!   denominator.
//!
//! # Breaker
//! `Closed` → `Open` when, inside the window, at least `min_calls` channel-responsible
//! calls were seen and the failure share reaches `failure_rate_ppm`, or when
//! `consecutive_failures` failures come in a row. `Open` lasts `open_ms`, then the breaker
//! is `HalfOpen`: up to `half_open_probes` live instructions are admitted; a failure
//! re-opens it (the open time doubles, up to `open_max_ms`), `half_open_probes`
//! successes close it and clear the window (old failures must not re-trip it at once).
//!
//! Defaults, and why: resilience4j opens at 50 % failures over 100 calls and waits 60 s;
//! Envoy ejects after 5 consecutive errors for 30 s. A payment channel sees fewer calls
//! per second than an RPC mesh and a wrong first choice costs a failover (or a PENDING
//! order), so sluice takes the faster of both: 50 % over ≥ 20 calls in 30 s, or 5 in a
//! row; open 30 s (doubling to 5 min while probes keep failing); 3 probes.
//!
//! Concurrency note: one `Mutex` per channel. Writers (one per attempt result) and
//! readers (one per routing decision) hold it for a few dozen nanoseconds and never
//! across an `.await`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::channel::message::{Code, RspClass, RspCode};
use crate::message::ChannelId;

/// Buckets of the sliding window (the window moves in steps of `window_ms / BUCKETS`).
pub const BUCKETS: usize = 10;
/// Latency bins: 4 per octave of milliseconds up to 65 s (≈ 19 % resolution).
const LAT_BINS: usize = 64;
/// Virtual successful calls added to the window when computing the smoothed success rate,
/// so a channel with little traffic is neither condemned nor crowned by a few calls.
pub const PRIOR_CALLS: u64 = 5;

/// Health and breaker thresholds (all configurable under `[routing.health]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Length of the sliding window, ms.
    pub window_ms: u64,
    /// Channel-responsible calls needed in the window before the failure rate can open
    /// the breaker.
    pub min_calls: u32,
    /// Failure share that opens the breaker, parts per million.
    pub failure_rate_ppm: u32,
    /// Failures in a row that open the breaker (0 = rule off).
    pub consecutive_failures: u32,
    /// First open period, ms.
    pub open_ms: u64,
    /// Longest open period while probes keep failing, ms.
    pub open_max_ms: u64,
    /// Live instructions admitted in half-open; this many successes close the breaker.
    pub half_open_probes: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            window_ms: 30_000,
            min_calls: 20,
            failure_rate_ppm: 500_000,
            consecutive_failures: 5,
            open_ms: 30_000,
            open_max_ms: 300_000,
            half_open_probes: 3,
        }
    }
}

/// What came of one call on a channel, as health sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Success or accepted-for-processing.
    Ok {
        /// Round trip, ms.
        latency_ms: u64,
    },
    /// A decline that is the card's (or merchant's) business, not the channel's.
    Neutral {
        /// Round trip, ms.
        latency_ms: u64,
    },
    /// NOT_PROCESSED for a reason on the channel's side.
    NotProcessed {
        /// Round trip, ms.
        latency_ms: u64,
    },
    /// Written, no answer in time or the line dropped (UNKNOWN).
    Timeout,
    /// Never written: no logged-on connection (or the pool was saturated).
    NotSent,
}

impl Observation {
    /// Classify a channel answer.
    pub fn answered(class: RspClass, code: RspCode, latency_ms: u64) -> Observation {
        match class {
            RspClass::Success | RspClass::Processing => Observation::Ok { latency_ms },
            RspClass::Declined => Observation::Neutral { latency_ms },
            RspClass::NotProcessed if code.known() == Some(Code::FUNDS_POSITION_LOW) => {
                Observation::Neutral { latency_ms }
            }
            RspClass::NotProcessed => Observation::NotProcessed { latency_ms },
        }
    }

    /// True when this is a failure of the channel.
    pub fn channel_fault(self) -> bool {
        matches!(
            self,
            Observation::NotProcessed { .. } | Observation::Timeout | Observation::NotSent
        )
    }

    fn latency_ms(self) -> Option<u64> {
        match self {
            Observation::Ok { latency_ms }
            | Observation::Neutral { latency_ms }
            | Observation::NotProcessed { latency_ms } => Some(latency_ms),
            _ => None,
        }
    }
}

/// Breaker state as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// No traffic until `until_ms`.
    Open {
        /// End of the open period.
        until_ms: u64,
    },
    /// A few probe instructions are admitted.
    HalfOpen {
        /// Probes that may still start.
        probes_left: u32,
        /// Successful probes so far.
        successes: u32,
    },
}

impl BreakerState {
    /// Metric value: 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open { .. } => 1,
            BreakerState::HalfOpen { .. } => 2,
        }
    }

    /// Label for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// The circuit breaker alone (pure state machine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    state: BreakerState,
    consecutive_failures: u32,
    /// Opens since the breaker was last closed (drives the doubling open period).
    reopens: u32,
    /// Times it opened, ever (metric).
    pub opened_total: u64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            consecutive_failures: 0,
            reopens: 0,
            opened_total: 0,
        }
    }
}

/// What a breaker transition asks of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    None,
    Closed,
}

impl Breaker {
    /// The state at `now_ms` (an expired open period becomes half-open).
    pub fn state(&mut self, cfg: &HealthConfig, now_ms: u64) -> BreakerState {
        if let BreakerState::Open { until_ms } = self.state {
            if now_ms >= until_ms {
                self.state = BreakerState::HalfOpen {
                    probes_left: cfg.half_open_probes.max(1),
                    successes: 0,
                };
            }
        }
        self.state
    }

    /// An instruction starts on this channel: in half-open it uses a probe. Returns false
    /// when the breaker admits nothing now (open, or every probe already out).
    pub fn admit(&mut self, cfg: &HealthConfig, now_ms: u64) -> bool {
        match self.state(cfg, now_ms) {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen {
                probes_left,
                successes,
            } => {
                if probes_left == 0 {
                    return false;
                }
                self.state = BreakerState::HalfOpen {
                    probes_left: probes_left - 1,
                    successes,
                };
                true
            }
        }
    }

    fn open(&mut self, cfg: &HealthConfig, now_ms: u64) {
        let period = cfg
            .open_ms
            .saturating_mul(1u64 << self.reopens.min(20))
            .min(cfg.open_max_ms.max(cfg.open_ms));
        self.state = BreakerState::Open {
            until_ms: now_ms.saturating_add(period),
        };
        self.reopens = self.reopens.saturating_add(1);
        self.opened_total += 1;
        self.consecutive_failures = 0;
    }

    /// Apply one outcome. `calls`/`failures` are the window's channel-responsible counts
    /// including this outcome.
    fn on_outcome(
        &mut self,
        cfg: &HealthConfig,
        fault: bool,
        calls: u64,
        failures: u64,
        now_ms: u64,
    ) -> Transition {
        match self.state(cfg, now_ms) {
            BreakerState::Closed => {
                if !fault {
                    self.consecutive_failures = 0;
                    return Transition::None;
                }
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let by_run = cfg.consecutive_failures > 0
                    && self.consecutive_failures >= cfg.consecutive_failures;
                let by_rate = calls >= cfg.min_calls.max(1) as u64
                    && failures * 1_000_000 >= cfg.failure_rate_ppm as u64 * calls;
                if by_run || by_rate {
                    self.open(cfg, now_ms);
                }
                Transition::None
            }
            // Late results of calls started before it opened change nothing.
            BreakerState::Open { .. } => Transition::None,
            BreakerState::HalfOpen {
                probes_left,
                successes,
            } => {
                if fault {
                    self.open(cfg, now_ms);
                    return Transition::None;
                }
                let successes = successes + 1;
                if successes >= cfg.half_open_probes.max(1) {
                    self.state = BreakerState::Closed;
                    self.reopens = 0;
                    self.consecutive_failures = 0;
                    Transition::Closed
                } else {
                    self.state = BreakerState::HalfOpen {
                        probes_left,
                        successes,
                    };
                    Transition::None
                }
            }
        }
    }

    /// Force a state (operator reset, tests).
    pub fn reset(&mut self) {
        *self = Breaker {
            opened_total: self.opened_total,
            ..Breaker::default()
        };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    ok: u64,
    fail: u64,
    neutral: u64,
    timeouts: u64,
    not_sent: u64,
    not_processed: u64,
    lat: [u32; LAT_BINS],
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            ok: 0,
            fail: 0,
            neutral: 0,
            timeouts: 0,
            not_sent: 0,
            not_processed: 0,
            lat: [0; LAT_BINS],
        }
    }
}

impl Counts {
    fn add(&mut self, o: Observation) {
        match o {
            Observation::Ok { .. } => self.ok += 1,
            Observation::Neutral { .. } => self.neutral += 1,
            Observation::NotProcessed { .. } => {
                self.fail += 1;
                self.not_processed += 1
            }
            Observation::Timeout => {
                self.fail += 1;
                self.timeouts += 1
            }
            Observation::NotSent => {
                self.fail += 1;
                self.not_sent += 1
            }
        }
        if let Some(ms) = o.latency_ms() {
            self.lat[lat_bin(ms)] += 1;
        }
    }

    fn sub(&mut self, b: &Counts) {
        self.ok -= b.ok;
        self.fail -= b.fail;
        self.neutral -= b.neutral;
        self.timeouts -= b.timeouts;
        self.not_sent -= b.not_sent;
        self.not_processed -= b.not_processed;
        for (a, x) in self.lat.iter_mut().zip(b.lat.iter()) {
            *a -= *x;
        }
    }
}

/// Bin of a latency: exact below 4 ms, then 4 bins per octave.
fn lat_bin(ms: u64) -> usize {
    let v = ms.min(65_535);
    if v < 4 {
        return v as usize;
    }
    let octave = 63 - v.leading_zeros() as usize; // ≥ 2
    let sub = ((v >> (octave - 2)) & 3) as usize;
    (4 + (octave - 2) * 4 + sub).min(LAT_BINS - 1)
}

/// Upper bound of a bin, ms.
fn lat_upper(bin: usize) -> u64 {
    if bin < 4 {
        return bin as u64;
    }
    let octave = (bin - 4) / 4 + 2;
    let sub = ((bin - 4) % 4) as u64;
    let lower = (4 | sub) << (octave - 2);
    lower + (1u64 << (octave - 2)) - 1
}

/// A sliding window of [`BUCKETS`] buckets with a running total.
#[derive(Debug, Clone)]
struct Window {
    bucket_ms: u64,
    epochs: [u64; BUCKETS],
    buckets: Box<[Counts; BUCKETS]>,
    total: Counts,
}

impl Window {
    fn new(window_ms: u64) -> Window {
        Window {
            bucket_ms: (window_ms / BUCKETS as u64).max(1),
            epochs: [u64::MAX; BUCKETS],
            buckets: Box::new([Counts::default(); BUCKETS]),
            total: Counts::default(),
        }
    }

    /// Drop buckets that fell out of the window at `now_ms`.
    fn advance(&mut self, now_ms: u64) {
        let epoch = now_ms / self.bucket_ms;
        for i in 0..BUCKETS {
            let e = self.epochs[i];
            if e != u64::MAX && e + (BUCKETS as u64) <= epoch {
                let b = self.buckets[i];
                self.total.sub(&b);
                self.buckets[i] = Counts::default();
                self.epochs[i] = u64::MAX;
            }
        }
    }

    fn add(&mut self, o: Observation, now_ms: u64) {
        self.advance(now_ms);
        let epoch = now_ms / self.bucket_ms;
        let i = (epoch % BUCKETS as u64) as usize;
        if self.epochs[i] != epoch {
            // A bucket from an older lap that `advance` kept: only when the clock went back.
            let b = self.buckets[i];
            self.total.sub(&b);
            self.buckets[i] = Counts::default();
            self.epochs[i] = epoch;
        }
        self.buckets[i].add(o);
        self.total.add(o);
    }

    fn clear(&mut self) {
        *self = Window::new(self.bucket_ms * BUCKETS as u64);
    }

    fn percentile_ms(&self, q_ppm: u64) -> Option<u64> {
        let n: u64 = self.total.lat.iter().map(|&c| c as u64).sum();
        if n == 0 {
            return None;
        }
        let rank = (n * q_ppm).div_ceil(1_000_000).max(1);
        let mut seen = 0u64;
        for (bin, &c) in self.total.lat.iter().enumerate() {
            seen += c as u64;
            if seen >= rank {
                return Some(lat_upper(bin));
            }
        }
        None
    }
}

/// The operator's switch for one channel and product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Override {
    /// The breaker decides.
    #[default]
    Auto = 0,
    /// Closed by the operator: no new instructions.
    Off = 1,
    /// Opened by the operator: used even while the breaker is open.
    On = 2,
}

impl Override {
    fn from_u8(v: u8) -> Override {
        match v {
            1 => Override::Off,
            2 => Override::On,
            _ => Override::Auto,
        }
    }

    /// Label for metrics and the admin endpoint.
    pub fn name(self) -> &'static str {
        match self {
            Override::Auto => "auto",
            Override::Off => "off",
            Override::On => "on",
        }
    }
}

/// What the router needs to know about a channel's health (a copy, cheap to take).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthView {
    /// Breaker state now.
    pub breaker: BreakerState,
    /// Smoothed success rate in the window (ppm): `(ok + PRIOR) / (ok + failures + PRIOR)`.
    pub success_ppm: u32,
    /// Channel-responsible calls in the window.
    pub calls: u32,
    /// 90th percentile latency of answers in the window, ms (`None` without answers).
    pub latency_ms_p90: Option<u32>,
}

impl Default for HealthView {
    fn default() -> Self {
        HealthView {
            breaker: BreakerState::Closed,
            success_ppm: 1_000_000,
            calls: 0,
            latency_ms_p90: None,
        }
    }
}

/// Everything about one channel's health, for metrics and the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Channel.
    pub channel: ChannelId,
    /// Breaker state.
    pub breaker: BreakerState,
    /// Times the breaker opened since start.
    pub breaker_opened_total: u64,
    /// Operator override per product (debit, payout, sign).
    pub overrides: [Override; 3],
    /// Successes in the window.
    pub window_ok: u64,
    /// Channel-responsible failures in the window.
    pub window_failures: u64,
    /// Neutral answers (declines) in the window.
    pub window_neutral: u64,
    /// Timeouts / dropped lines after writing, in the window.
    pub window_timeouts: u64,
    /// Not sent (no connection), in the window.
    pub window_not_sent: u64,
    /// NOT_PROCESSED answers in the window.
    pub window_not_processed: u64,
    /// Smoothed success rate, ppm.
    pub success_ppm: u32,
    /// Latency percentiles of answers in the window, ms.
    pub latency_ms_p50: Option<u64>,
    /// p90.
    pub latency_ms_p90: Option<u64>,
    /// p99.
    pub latency_ms_p99: Option<u64>,
    /// Logged-on connections at the last pool observation.
    pub connections_ready: u64,
    /// Connection drops seen by the pool since start.
    pub disconnects_total: u64,
}

#[derive(Debug)]
struct Inner {
    window: Window,
    breaker: Breaker,
    p90_ms: Option<u64>,
    connections_ready: u64,
    disconnects_total: u64,
}

/// One channel's health.
#[derive(Debug)]
pub struct ChannelHealth {
    id: ChannelId,
    inner: Mutex<Inner>,
    overrides: [AtomicU8; 3],
}

impl ChannelHealth {
    fn new(id: ChannelId, cfg: &HealthConfig) -> ChannelHealth {
        ChannelHealth {
            id,
            inner: Mutex::new(Inner {
                window: Window::new(cfg.window_ms),
                breaker: Breaker::default(),
                p90_ms: None,
                connections_ready: 0,
                disconnects_total: 0,
            }),
            overrides: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Health of every channel.
#[derive(Debug)]
pub struct Health {
    cfg: ArcSwap<HealthConfig>,
    channels: ArcSwap<Vec<Arc<ChannelHealth>>>,
}

impl Health {
    /// Health for these channels.
    pub fn new(cfg: HealthConfig, channels: impl IntoIterator<Item = ChannelId>) -> Health {
        let h = Health {
            channels: ArcSwap::from_pointee(Vec::new()),
            cfg: ArcSwap::from_pointee(cfg),
        };
        h.ensure(channels);
        h
    }

    /// Current thresholds.
    pub fn config(&self) -> Arc<HealthConfig> {
        self.cfg.load_full()
    }

    /// Replace the thresholds (reload). Windows keep their data; a new window length
    /// applies to channels added later and after a breaker closes.
    pub fn set_config(&self, cfg: HealthConfig) {
        self.cfg.store(Arc::new(cfg));
    }

    /// Make sure every channel has a health record (channels added by a reload start
    /// fresh; removed channels keep theirs, harmlessly).
    pub fn ensure(&self, ids: impl IntoIterator<Item = ChannelId>) {
        let cur = self.channels.load();
        let mut next: Vec<Arc<ChannelHealth>> = cur.iter().cloned().collect();
        let cfg = self.cfg.load();
        let mut changed = false;
        for id in ids {
            if !next.iter().any(|c| c.id == id) {
                next.push(Arc::new(ChannelHealth::new(id, &cfg)));
                changed = true;
            }
        }
        if changed {
            self.channels.store(Arc::new(next));
        }
    }

    fn get(&self, id: &ChannelId) -> Option<Arc<ChannelHealth>> {
        self.channels.load().iter().find(|c| &c.id == id).cloned()
    }

    /// Run `f` on a channel's record without cloning its `Arc` (the router's hot read).
    fn with<R>(&self, id: &ChannelId, f: impl FnOnce(&ChannelHealth) -> R) -> Option<R> {
        self.channels
            .load()
            .iter()
            .find(|c| &c.id == id)
            .map(|c| f(c))
    }

    /// Record one outcome.
    pub fn record(&self, id: &ChannelId, o: Observation, now_ms: u64) {
        let Some(c) = self.get(id) else { return };
        let cfg = self.cfg.load();
        let mut g = c.lock();
        g.window.add(o, now_ms);
        let (calls, fails) = (g.window.total.ok + g.window.total.fail, g.window.total.fail);
        if g.breaker
            .on_outcome(&cfg, o.channel_fault(), calls, fails, now_ms)
            == Transition::Closed
        {
            g.window.clear();
        }
        g.p90_ms = g.window.percentile_ms(900_000);
    }

    /// An instruction starts on `id` (uses a probe in half-open). False when the breaker
    /// admits nothing now.
    pub fn admit(&self, id: &ChannelId, now_ms: u64) -> bool {
        let Some(c) = self.get(id) else { return true };
        let cfg = self.cfg.load();
        let admitted = c.lock().breaker.admit(&cfg, now_ms);
        admitted
    }

    /// What routing needs, at `now_ms`.
    pub fn view(&self, id: &ChannelId, now_ms: u64) -> HealthView {
        let Some(c) = self.get(id) else {
            return HealthView::default();
        };
        Self::view_of(&c, &self.cfg.load(), now_ms)
    }

    /// [`Health::view`] and [`Health::override_of`] in one lookup (the router's read).
    pub fn route_view(
        &self,
        id: &ChannelId,
        product_index: usize,
        now_ms: u64,
    ) -> (HealthView, Override) {
        let cfg = self.cfg.load();
        self.with(id, |c| {
            let o = c
                .overrides
                .get(product_index)
                .map(|a| Override::from_u8(a.load(Ordering::Relaxed)))
                .unwrap_or_default();
            (Self::view_of(c, &cfg, now_ms), o)
        })
        .unwrap_or((HealthView::default(), Override::Auto))
    }

    fn view_of(c: &ChannelHealth, cfg: &HealthConfig, now_ms: u64) -> HealthView {
        let mut g = c.lock();
        g.window.advance(now_ms);
        let t = g.window.total;
        if t.ok + t.fail == 0 {
            // The samples behind the cached p90 have left the window: the channel is
            // unmeasured again (and scored as fast as the fastest), not stuck with the
            // latency it had when traffic last went there.
            g.p90_ms = None;
        }
        HealthView {
            breaker: g.breaker.state(cfg, now_ms),
            success_ppm: smoothed_ppm(t.ok, t.fail),
            calls: (t.ok + t.fail).min(u32::MAX as u64) as u32,
            latency_ms_p90: g.p90_ms.map(|v| v.min(u32::MAX as u64) as u32),
        }
    }

    /// The operator's override for a channel and product (index: debit 0, payout 1,
    /// sign 2).
    pub fn override_of(&self, id: &ChannelId, product_index: usize) -> Override {
        self.get(id)
            .and_then(|c| {
                c.overrides
                    .get(product_index)
                    .map(|a| Override::from_u8(a.load(Ordering::Relaxed)))
            })
            .unwrap_or_default()
    }

    /// Set the operator's override. False for an unknown channel.
    pub fn set_override(&self, id: &ChannelId, product_index: usize, o: Override) -> bool {
        match self.get(id) {
            Some(c) if product_index < 3 => {
                c.overrides[product_index].store(o as u8, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Close the breaker and clear the window (operator: "the channel is fixed").
    pub fn reset(&self, id: &ChannelId) -> bool {
        let Some(c) = self.get(id) else { return false };
        let mut g = c.lock();
        g.breaker.reset();
        g.window.clear();
        g.p90_ms = None;
        true
    }

    /// What the channel's connection pool reports (logged-on connections, drops so far),
    /// fed periodically by the I/O shell from the pool's echo-kept connections.
    pub fn observe_pool(&self, id: &ChannelId, connections_ready: u64, disconnects_total: u64) {
        if let Some(c) = self.get(id) {
            let mut g = c.lock();
            g.connections_ready = connections_ready;
            g.disconnects_total = disconnects_total;
        }
    }

    /// Snapshots of every channel at `now_ms`.
    pub fn snapshot(&self, now_ms: u64) -> Vec<HealthSnapshot> {
        let cfg = self.cfg.load();
        self.channels
            .load()
            .iter()
            .map(|c| {
                let mut g = c.lock();
                g.window.advance(now_ms);
                let t = g.window.total;
                HealthSnapshot {
                    channel: c.id,
                    breaker: g.breaker.state(&cfg, now_ms),
                    breaker_opened_total: g.breaker.opened_total,
                    overrides: [0, 1, 2]
                        .map(|i| Override::from_u8(c.overrides[i].load(Ordering::Relaxed))),
                    window_ok: t.ok,
                    window_failures: t.fail,
                    window_neutral: t.neutral,
                    window_timeouts: t.timeouts,
                    window_not_sent: t.not_sent,
                    window_not_processed: t.not_processed,
                    success_ppm: smoothed_ppm(t.ok, t.fail),
                    latency_ms_p50: g.window.percentile_ms(500_000),
                    latency_ms_p90: g.window.percentile_ms(900_000),
                    latency_ms_p99: g.window.percentile_ms(990_000),
                    connections_ready: g.connections_ready,
                    disconnects_total: g.disconnects_total,
                }
            })
            .collect()
    }
}

fn smoothed_ppm(ok: u64, fail: u64) -> u32 {
    (((ok + PRIOR_CALLS) * 1_000_000) / (ok + fail + PRIOR_CALLS)) as u32
}

/// Fund position of a payout channel, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FundSnapshot {
    /// Channel.
    pub channel: ChannelId,
    /// Prefunded balance (spent payouts already taken off), fen.
    pub balance_fen: i64,
    /// Reserved by payouts in flight or pending, fen.
    pub reserved_fen: i64,
    /// Alert threshold on the available amount, fen.
    pub alert_fen: i64,
}

impl FundSnapshot {
    /// Balance not reserved, fen.
    pub fn available_fen(&self) -> i64 {
        self.balance_fen - self.reserved_fen
    }
}

/// Today's volume of one channel and product (in the channel's time zone), for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeSnapshot {
    /// Channel.
    pub channel: ChannelId,
    /// `debit`, `payout` or `sign`.
    pub product: &'static str,
    /// Successful amount today, fen.
    pub day_fen: u64,
    /// Successful instructions today.
    pub day_count: u64,
    /// Successful amount this month (drives fee tiers), fen.
    pub month_fen: u64,
}

/// Routing metrics of a running switch: health, breakers, fund positions, volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingMetrics {
    /// Per channel health.
    pub health: Vec<HealthSnapshot>,
    /// Per payout channel with a configured fund position.
    pub funds: Vec<FundSnapshot>,
    /// Per channel and product.
    pub volumes: Vec<VolumeSnapshot>,
}

impl RoutingMetrics {
    /// Prometheus text exposition format (version 0.0.4).
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut s = String::with_capacity(4096);
        let family = |s: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut s,
            "sluice_channel_breaker_state",
            "gauge",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
        );
        for h in &self.health {
            let _ = writeln!(
                s,
                "sluice_channel_breaker_state{{channel=\"{}\"}} {}",
                esc(h.channel.as_str()),
                h.breaker.code()
            );
        }
        family(
            &mut s,
            "sluice_channel_breaker_opened_total",
            "counter",
            "Times the breaker opened.",
        );
        for h in &self.health {
            let _ = writeln!(
                s,
                "sluice_channel_breaker_opened_total{{channel=\"{}\"}} {}",
                esc(h.channel.as_str()),
                h.breaker_opened_total
            );
        }
        family(
            &mut s,
            "sluice_channel_operator_override",
            "gauge",
            "Operator override per product: 0 auto, 1 off, 2 on.",
        );
        for h in &self.health {
            for (i, p) in ["debit", "payout", "sign"].iter().enumerate() {
                let _ = writeln!(
                    s,
                    "sluice_channel_operator_override{{channel=\"{}\",product=\"{p}\"}} {}",
                    esc(h.channel.as_str()),
                    h.overrides[i] as u8
                );
            }
        }
        family(
            &mut s,
            "sluice_channel_success_ratio",
            "gauge",
            "Smoothed success rate of channel-responsible outcomes in the window.",
        );
        for h in &self.health {
            let _ = writeln!(
                s,
                "sluice_channel_success_ratio{{channel=\"{}\"}} {}",
                esc(h.channel.as_str()),
                h.success_ppm as f64 / 1e6
            );
        }
        family(
            &mut s,
            "sluice_channel_window_outcomes",
            "gauge",
            "Outcomes in the sliding window by kind.",
        );
        for h in &self.health {
            for (kind, v) in [
                ("ok", h.window_ok),
                ("failure", h.window_failures),
                ("neutral", h.window_neutral),
                ("timeout", h.window_timeouts),
                ("not_sent", h.window_not_sent),
                ("not_processed", h.window_not_processed),
            ] {
                let _ = writeln!(
                    s,
                    "sluice_channel_window_outcomes{{channel=\"{}\",kind=\"{kind}\"}} {v}",
                    esc(h.channel.as_str())
                );
            }
        }
        family(
            &mut s,
            "sluice_channel_latency_ms",
            "gauge",
            "Answer latency percentiles in the window, ms (bin upper bounds).",
        );
        for h in &self.health {
            for (q, v) in [
                ("0.5", h.latency_ms_p50),
                ("0.9", h.latency_ms_p90),
                ("0.99", h.latency_ms_p99),
            ] {
                if let Some(v) = v {
                    let _ = writeln!(
                        s,
                        "sluice_channel_latency_ms{{channel=\"{}\",quantile=\"{q}\"}} {v}",
                        esc(h.channel.as_str())
                    );
                }
            }
        }
        family(
            &mut s,
            "sluice_channel_connections_ready",
            "gauge",
            "Logged-on connections at the last pool observation.",
        );
        for h in &self.health {
            let _ = writeln!(
                s,
                "sluice_channel_connections_ready{{channel=\"{}\"}} {}",
                esc(h.channel.as_str()),
                h.connections_ready
            );
        }
        family(
            &mut s,
            "sluice_channel_disconnects_total",
            "counter",
            "Logged-on connections that ended.",
        );
        for h in &self.health {
            let _ = writeln!(
                s,
                "sluice_channel_disconnects_total{{channel=\"{}\"}} {}",
                esc(h.channel.as_str()),
                h.disconnects_total
            );
        }
        family(
            &mut s,
            "sluice_channel_fund_fen",
            "gauge",
            "Payout fund position, fen, by part (balance, reserved, available, alert).",
        );
        for f in &self.funds {
            for (part, v) in [
                ("balance", f.balance_fen),
                ("reserved", f.reserved_fen),
                ("available", f.available_fen()),
                ("alert", f.alert_fen),
            ] {
                let _ = writeln!(
                    s,
                    "sluice_channel_fund_fen{{channel=\"{}\",part=\"{part}\"}} {v}",
                    esc(f.channel.as_str())
                );
            }
        }
        family(
            &mut s,
            "sluice_channel_fund_low",
            "gauge",
            "1 when the available fund position is below its alert threshold.",
        );
        for f in &self.funds {
            let _ = writeln!(
                s,
                "sluice_channel_fund_low{{channel=\"{}\"}} {}",
                esc(f.channel.as_str()),
                u8::from(f.available_fen() < f.alert_fen)
            );
        }
        family(
            &mut s,
            "sluice_channel_volume_fen",
            "gauge",
            "Successful amount in the channel's current day and month, fen.",
        );
        for v in &self.volumes {
            for (period, x) in [("day", v.day_fen), ("month", v.month_fen)] {
                let _ = writeln!(
                    s,
                    "sluice_channel_volume_fen{{channel=\"{}\",product=\"{}\",period=\"{period}\"}} {x}",
                    esc(v.channel.as_str()),
                    v.product
                );
            }
        }
        family(
            &mut s,
            "sluice_channel_volume_count",
            "gauge",
            "Successful instructions in the channel's current day.",
        );
        for v in &self.volumes {
            let _ = writeln!(
                s,
                "sluice_channel_volume_count{{channel=\"{}\",product=\"{}\"}} {}",
                esc(v.channel.as_str()),
                v.product,
                v.day_count
            );
        }
        s
    }
}

/// Escape a label value (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            window_ms: 10_000,
            min_calls: 10,
            failure_rate_ppm: 500_000,
            consecutive_failures: 5,
            open_ms: 1_000,
            open_max_ms: 4_000,
            half_open_probes: 2,
        }
    }

    fn id(s: &str) -> ChannelId {
        ChannelId::new(s).unwrap()
    }

    const OK: Observation = Observation::Ok { latency_ms: 10 };
    const NP: Observation = Observation::NotProcessed { latency_ms: 10 };
    const DECLINE: Observation = Observation::Neutral { latency_ms: 10 };

    #[test]
    fn classification_blames_the_channel_only_for_its_own_failures() {
        let c = |code: Code| {
            let (code, class) = code.pair();
            Observation::answered(class, code, 5)
        };
        assert!(!c(Code::OK).channel_fault());
        assert!(!c(Code::ACCEPTED).channel_fault());
        assert_eq!(
            c(Code::INSUFFICIENT_FUNDS),
            Observation::Neutral { latency_ms: 5 }
        );
        assert_eq!(
            c(Code::FUNDS_POSITION_LOW),
            Observation::Neutral { latency_ms: 5 }
        );
        assert!(c(Code::BUSY).channel_fault());
        assert!(c(Code::MAINTENANCE).channel_fault());
        assert!(Observation::Timeout.channel_fault());
        assert!(Observation::NotSent.channel_fault());
    }

    #[test]
    fn declines_do_not_lower_the_success_rate() {
        let h = Health::new(cfg(), [id("A")]);
        for t in 0..50 {
            h.record(&id("A"), DECLINE, t);
        }
        let v = h.view(&id("A"), 100);
        assert_eq!((v.success_ppm, v.calls), (1_000_000, 0));
        assert_eq!(v.breaker, BreakerState::Closed);
    }

    #[test]
    fn breaker_walks_closed_open_half_open_closed_with_paused_time() {
        let h = Health::new(cfg(), [id("A")]);
        let a = id("A");
        for t in 0..4 {
            h.record(&a, NP, t);
        }
        assert_eq!(h.view(&a, 4).breaker, BreakerState::Closed);
        // A decline in between resets the run (the channel answered).
        h.record(&a, DECLINE, 4);
        for t in 5..9 {
            h.record(&a, NP, t);
        }
        assert_eq!(h.view(&a, 9).breaker, BreakerState::Closed);
        h.record(&a, Observation::Timeout, 9);
        assert_eq!(
            h.view(&a, 9).breaker,
            BreakerState::Open { until_ms: 1_009 }
        );
        assert!(!h.admit(&a, 500), "open admits nothing");
        // Time passes (by hand): half-open, two probes admitted, a third refused.
        assert!(matches!(
            h.view(&a, 1_009).breaker,
            BreakerState::HalfOpen { probes_left: 2, .. }
        ));
        assert!(h.admit(&a, 1_010));
        assert!(h.admit(&a, 1_010));
        assert!(!h.admit(&a, 1_010));
        h.record(&a, OK, 1_020);
        assert!(matches!(
            h.view(&a, 1_020).breaker,
            BreakerState::HalfOpen { successes: 1, .. }
        ));
        h.record(&a, OK, 1_030);
        let v = h.view(&a, 1_030);
        assert_eq!(v.breaker, BreakerState::Closed);
        assert_eq!(v.calls, 0, "window cleared on close");
    }

    #[test]
    fn failed_probe_reopens_with_doubling_period_up_to_the_cap() {
        let h = Health::new(cfg(), [id("A")]);
        let a = id("A");
        for t in 0..5 {
            h.record(&a, NP, t);
        }
        assert_eq!(
            h.view(&a, 4).breaker,
            BreakerState::Open { until_ms: 1_004 }
        );
        assert!(h.admit(&a, 1_004));
        h.record(&a, Observation::NotSent, 1_005);
        assert_eq!(
            h.view(&a, 1_005).breaker,
            BreakerState::Open { until_ms: 3_005 }
        );
        assert!(h.admit(&a, 3_005));
        h.record(&a, Observation::Timeout, 3_006);
        assert_eq!(
            h.view(&a, 3_006).breaker,
            BreakerState::Open { until_ms: 7_006 }
        );
        assert!(h.admit(&a, 7_006));
        h.record(&a, NP, 7_007);
        assert_eq!(
            h.view(&a, 7_007).breaker,
            BreakerState::Open { until_ms: 11_007 },
            "capped at open_max_ms"
        );
        assert!(h.reset(&a));
        assert_eq!(h.view(&a, 7_008).breaker, BreakerState::Closed);
    }

    #[test]
    fn failure_rate_opens_only_past_min_calls() {
        let mut c = cfg();
        c.consecutive_failures = 0;
        let h = Health::new(c, [id("A")]);
        let a = id("A");
        // Alternate: 50 % failures, never 5 in a row.
        for t in 0..9 {
            h.record(&a, if t % 2 == 0 { NP } else { OK }, t);
        }
        assert_eq!(h.view(&a, 9).breaker, BreakerState::Closed, "9 < min_calls");
        h.record(&a, OK, 9);
        h.record(&a, NP, 10);
        assert!(matches!(h.view(&a, 10).breaker, BreakerState::Open { .. }));
    }

    #[test]
    fn window_forgets_old_outcomes() {
        let h = Health::new(cfg(), [id("A")]);
        let a = id("A");
        for t in 0..3 {
            h.record(&a, NP, t);
        }
        h.record(&a, OK, 5_000);
        let v = h.view(&a, 5_000);
        assert_eq!(v.calls, 4);
        let v = h.view(&a, 10_500);
        assert_eq!(v.calls, 1, "the first bucket left the window");
        let v = h.view(&a, 16_000);
        assert_eq!(v.calls, 0);
        assert_eq!(v.success_ppm, 1_000_000);
    }

    #[test]
    fn latency_percentiles_follow_the_answers() {
        let h = Health::new(cfg(), [id("A")]);
        let a = id("A");
        for i in 0..100u64 {
            let ms = if i < 90 { 10 } else { 400 };
            h.record(&a, Observation::Ok { latency_ms: ms }, i);
        }
        let s = &h.snapshot(100)[0];
        assert_eq!(s.latency_ms_p50, Some(11)); // bin [10, 11]
        assert_eq!(s.latency_ms_p90, Some(11));
        let p99 = s.latency_ms_p99.unwrap();
        assert!((400..480).contains(&p99), "{p99}");
        for ms in [0u64, 1, 3, 4, 5, 7, 8, 100, 1000, 65_535, 1 << 40] {
            let b = lat_bin(ms);
            assert!(lat_upper(b) >= ms.min(65_535), "{ms} -> {b}");
            assert!(b == 0 || lat_upper(b - 1) < ms.min(65_535), "{ms} -> {b}");
        }
    }

    #[test]
    fn overrides_and_metrics_text() {
        let h = Health::new(cfg(), [id("A"), id("B")]);
        assert!(h.set_override(&id("A"), 1, Override::Off));
        assert!(!h.set_override(&id("Z"), 1, Override::Off));
        assert_eq!(h.override_of(&id("A"), 1), Override::Off);
        assert_eq!(h.override_of(&id("A"), 0), Override::Auto);
        h.record(&id("B"), OK, 1);
        h.observe_pool(&id("B"), 2, 1);
        let m = RoutingMetrics {
            health: h.snapshot(2),
            funds: vec![FundSnapshot {
                channel: id("B"),
                balance_fen: 1_000,
                reserved_fen: 300,
                alert_fen: 800,
            }],
            volumes: vec![VolumeSnapshot {
                channel: id("B"),
                product: "payout",
                day_fen: 5,
                day_count: 1,
                month_fen: 7,
            }],
        };
        let t = m.render_metrics();
        for line in [
            "sluice_channel_breaker_state{channel=\"A\"} 0",
            "sluice_channel_operator_override{channel=\"A\",product=\"payout\"} 1",
            "sluice_channel_connections_ready{channel=\"B\"} 2",
            "sluice_channel_fund_fen{channel=\"B\",part=\"available\"} 700",
            "sluice_channel_fund_low{channel=\"B\"} 1",
            "sluice_channel_volume_fen{channel=\"B\",product=\"payout\",period=\"month\"} 7",
            "sluice_channel_window_outcomes{channel=\"B\",kind=\"ok\"} 1",
        ] {
            assert!(t.contains(line), "{line} missing in\n{t}");
        }
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
