//! A pool of persistent connections to one channel: the API the engine calls.
//!
//! Money-safety contract of [`ChannelPool::call`]:
//! - `Ok(msg)`: the channel's answer; act on its class;
//! - `Err(NotSent(_))`: the frame provably never reached a socket write; nothing was done
//!   and the instruction may go to another channel;
//! - `Err(Unknown(_))`: the frame may have reached the channel (deadline passed, line
//!   dropped): the order is PENDING and must be queried on this channel, never failed.
//!   If the answer arrives later it comes through the unsolicited queue as
//!   [`Unsolicited::LateReply`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{self, LinkCtx, Live, Pending, WriteItem};
use crate::channel::message::{Message, Notify, OrderRef, Revoke};
use crate::crypto::Identity;
use crate::wire::header::MerchantNo;

/// Most connections one pool may hold to a channel: beyond this a channel is better
/// served by fixing its latency than by more sockets.
pub const CONNECTIONS_MAX: usize = 64;
/// Most requests in flight on one connection: bounds the pending table and writer queue.
pub const INFLIGHT_PER_CONN_MAX: usize = 16_384;

/// Configuration of one channel's pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Channel id, for logs.
    pub channel: String,
    /// Addresses (primary line first, then backups). Connection `i` starts at address
    /// `i % len` and moves to the next after each failed attempt.
    pub addresses: Vec<SocketAddr>,
    /// Persistent connections to keep (1..=[`CONNECTIONS_MAX`]).
    pub connections: usize,
    /// The switch's institution id at the channel (header `merchant_no`).
    pub institution: MerchantNo,
    /// In-flight bound per connection (1..=[`INFLIGHT_PER_CONN_MAX`]); beyond it on every
    /// connection a call gets `NotSent(Saturated)` at once.
    pub inflight_max_per_conn: usize,
    /// Send an ECHO_REQ after this long without sending anything.
    pub heartbeat: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time for the channel to answer LOGON_REQ.
    pub logon_timeout: Duration,
    /// First reconnect delay (jittered, doubled per failure).
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// How long the id of a timed-out request is remembered so a late answer can still be
    /// handed to the engine. Longer than any deadline.
    pub late_window: Duration,
    /// Label sent at logon.
    pub client_name: String,
}

impl PoolConfig {
    /// Defaults for `addresses` and `institution`: 4 connections, 1024 in flight each,
    /// 10 s heartbeat, backoff 50 ms → 5 s.
    pub fn new(addresses: Vec<SocketAddr>, institution: &str) -> PoolConfig {
        PoolConfig {
            channel: "channel".into(),
            addresses,
            connections: 4,
            institution: MerchantNo::new(institution).unwrap_or_default(),
            inflight_max_per_conn: 1024,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            logon_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            late_window: Duration::from_secs(120),
            client_name: "sluice".into(),
        }
    }

    /// Clamp every bound to its compile-time maximum (config may lower a limit, never
    /// lift it) and to sane minimums.
    fn clamped(mut self) -> PoolConfig {
        self.connections = self.connections.clamp(1, CONNECTIONS_MAX);
        self.inflight_max_per_conn = self.inflight_max_per_conn.clamp(1, INFLIGHT_PER_CONN_MAX);
        self.heartbeat = self.heartbeat.max(Duration::from_millis(10));
        self.backoff_base = self.backoff_base.max(Duration::from_millis(1));
        self.backoff_max = self.backoff_max.max(self.backoff_base);
        self
    }
}

/// Why a call was provably not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSentReason {
    /// Every logged-on connection has `inflight_max_per_conn` requests in flight.
    Saturated,
    /// No connection is logged on right now.
    NoConnection,
    /// The connection closed before the frame was written (or the pool is shutting down).
    Closed,
}

/// Why the outcome of a call is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownReason {
    /// The deadline passed before an answer arrived.
    Timeout,
    /// The connection dropped after the frame may have been written.
    Disconnected,
}

/// A call that produced no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Nothing reached the channel: safe to try another channel.
    #[error("not sent: {0:?}")]
    NotSent(NotSentReason),
    /// The channel may have processed it: PENDING, query this channel.
    #[error("outcome unknown: {0:?}")]
    Unknown(UnknownReason),
}

/// Acknowledges one NOTIFY or REVOKE. Call [`Ack::ack`] after the engine stored it
/// durably; if the connection has gone by then, the channel repeats the notice.
#[derive(Debug)]
pub struct Ack {
    tx: mpsc::Sender<WriteItem>,
    request_id: u64,
    msg: Message,
}

impl Ack {
    pub(crate) fn new(tx: mpsc::Sender<WriteItem>, request_id: u64, msg: Message) -> Ack {
        Ack {
            tx,
            request_id,
            msg,
        }
    }

    /// Queue the acknowledgement on the connection the notice came on. False when that
    /// connection is gone or its queue is full (the channel will repeat the notice).
    pub fn ack(self) -> bool {
        self.tx
            .try_send(WriteItem::Control {
                id: self.request_id,
                msg: self.msg,
            })
            .is_ok()
    }
}

/// Frames from the channel that no caller is waiting for, for the engine.
#[derive(Debug)]
pub enum Unsolicited {
    /// Final result of an order answered PROCESSING (may repeat: same `notify_id`).
    Notification {
        /// The notice.
        notify: Notify,
        /// Acknowledge after storing.
        ack: Ack,
    },
    /// The card holder revoked an agreement at the bank.
    Revocation {
        /// The notice.
        revoke: Revoke,
        /// Acknowledge after storing.
        ack: Ack,
    },
    /// An answer that arrived after its caller's deadline (the caller got `Unknown`):
    /// it settles the PENDING order.
    LateReply {
        /// Correlation id of the request.
        request_id: u64,
        /// The order the answer is about, when it names one.
        order_ref: Option<OrderRef>,
        /// The answer.
        message: Message,
        /// Time from the call to the answer.
        waited: Duration,
    },
}

macro_rules! counters {
    ($( $(#[$m:meta])* $f:ident, )*) => {
        /// Pool counters (relaxed atomics: each is exact, they are not mutually consistent).
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $( pub(crate) $f: AtomicU64, )* }

        /// A snapshot of a pool's counters and latency.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct PoolStats {
            $( $(#[$m])* pub $f: u64, )*
            /// Calls holding an in-flight slot now.
            pub inflight: u64,
            /// Connections logged on now.
            pub connections_ready: u64,
            /// Answered calls' latency (call start to answer), µs: p50.
            pub latency_us_p50: u64,
            /// p99.
            pub latency_us_p99: u64,
            /// p99.9.
            pub latency_us_p999: u64,
            /// Largest.
            pub latency_us_max: u64,
        }

        impl Counters {
            fn fill(&self, s: &mut PoolStats) {
                $( s.$f = self.$f.load(Relaxed); )*
            }
        }
    };
}

counters! {
    /// Connection attempts (TCP connect + logon).
    connect_attempts,
    /// Attempts that failed (connect error, logon refused or unanswered).
    connect_failures,
    /// Logons refused by the channel or failed signature checks (part of the failures).
    logon_rejected,
    /// Logged-on connections that later ended.
    disconnects,
    /// Answers delivered to their caller in time.
    completed,
    /// Calls refused `NotSent(Saturated)`.
    saturated,
    /// Calls refused `NotSent(NoConnection)`.
    no_connection,
    /// Calls resolved `NotSent(Closed)`.
    not_sent_closed,
    /// Calls resolved `Unknown(Timeout)`.
    timeouts,
    /// Calls resolved `Unknown(Disconnected)`.
    unknown_disconnected,
    /// Frames from the channel whose MAC failed (dropped).
    bad_macs,
    /// Frames from the channel that could not be decoded (dropped).
    malformed,
    /// Connections closed because framing was lost.
    framing_errors,
    /// Connections closed after three heartbeat intervals of silence.
    idle_closes,
    /// Answers with an unknown request id.
    unmatched,
    /// Frames of a type the switch never receives.
    unexpected,
    /// Answers handed to the engine as late replies.
    late_replies,
    /// Timed-out ids forgotten after `late_window` without an answer.
    late_expired,
    /// Unsolicited items dropped because the engine's queue was full.
    unsolicited_dropped,
    /// ECHO_REQ sent after idle intervals.
    heartbeats_sent,
}

struct Slot {
    live: ArcSwapOption<Live>,
    hist: Mutex<Histogram<u64>>,
}

struct Inner {
    cfg: PoolConfig,
    identity: Arc<Identity>,
    channel_key: [u8; 32],
    slots: Vec<Slot>,
    rr: AtomicUsize,
    next_id: AtomicU64,
    stats: Counters,
    unsolicited: mpsc::Sender<Unsolicited>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// The connections to one channel.
#[derive(Clone)]
pub struct ChannelPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelPool({})", self.inner.cfg.channel)
    }
}

/// Releases an in-flight slot when the call ends, however it ends (RAII).
struct SlotGuard(Arc<Live>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

impl ChannelPool {
    /// Start the pool: one task per connection, each connecting, logging on and
    /// reconnecting for as long as the pool lives. Must be called inside a tokio runtime.
    pub fn start(
        cfg: PoolConfig,
        identity: Arc<Identity>,
        channel_public_key: [u8; 32],
        unsolicited: mpsc::Sender<Unsolicited>,
    ) -> ChannelPool {
        let cfg = cfg.clamped();
        let slots = (0..cfg.connections)
            .map(|_| Slot {
                live: ArcSwapOption::empty(),
                // 1 µs .. 1 h, 3 significant digits: ~25 KiB per slot.
                hist: Mutex::new(
                    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
                ),
            })
            .collect();
        let inner = Arc::new(Inner {
            cfg,
            identity,
            channel_key: channel_public_key,
            slots,
            rr: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            stats: Counters::default(),
            unsolicited,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        for i in 0..inner.slots.len() {
            let inn = inner.clone();
            inner.tracker.spawn(run_slot(inn, i));
        }
        ChannelPool { inner }
    }

    /// Send `req` and wait for its answer until `deadline` (monotonic clock) from now.
    /// See the module docs for what each outcome means for the money.
    pub async fn call(&self, req: Message, deadline: Duration) -> Result<Message, CallError> {
        let started = Instant::now();
        let inner = &*self.inner;
        let guard = self.reserve()?;
        let live = &guard.0;
        let id = inner.next_id.fetch_add(1, Relaxed);
        let (tx, mut rx) = oneshot::channel();
        live.pending().insert(
            id,
            Pending {
                tx: Some(tx),
                started,
            },
        );
        if live
            .tx
            .try_send(WriteItem::Request { id, msg: req })
            .is_err()
        {
            live.pending().remove(&id);
            inner.stats.not_sent_closed.fetch_add(1, Relaxed);
            return Err(CallError::NotSent(NotSentReason::Closed));
        }
        match tokio::time::timeout_at(started + deadline, &mut rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(CallError::Unknown(UnknownReason::Disconnected)),
            Err(_) => {
                let still_waiting = match live.pending().get_mut(&id) {
                    Some(p) => {
                        p.tx = None; // keep the id: a late answer becomes a LateReply
                        true
                    }
                    None => false,
                };
                if still_waiting {
                    inner.stats.timeouts.fetch_add(1, Relaxed);
                    return Err(CallError::Unknown(UnknownReason::Timeout));
                }
                // The reader or the teardown took the entry just now; its result is on
                // the way (or the sender was dropped).
                rx.await
                    .unwrap_or(Err(CallError::Unknown(UnknownReason::Disconnected)))
            }
        }
    }

    /// Reserve an in-flight slot on a logged-on connection (round robin).
    fn reserve(&self) -> Result<SlotGuard, CallError> {
        let inner = &*self.inner;
        let n = inner.slots.len();
        let start = inner.rr.fetch_add(1, Relaxed);
        let max = inner.cfg.inflight_max_per_conn;
        let mut any = false;
        for k in 0..n {
            let Some(live) = inner.slots[(start + k) % n].live.load_full() else {
                continue;
            };
            any = true;
            if live.inflight.fetch_add(1, Relaxed) < max {
                return Ok(SlotGuard(live));
            }
            live.inflight.fetch_sub(1, Relaxed);
        }
        if any {
            inner.stats.saturated.fetch_add(1, Relaxed);
            Err(CallError::NotSent(NotSentReason::Saturated))
        } else {
            inner.stats.no_connection.fetch_add(1, Relaxed);
            Err(CallError::NotSent(NotSentReason::NoConnection))
        }
    }

    /// Connections logged on now.
    pub fn ready(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|s| s.live.load().is_some())
            .count()
    }

    /// Wait until at least `n` connections are logged on (tests, start-up).
    pub async fn wait_ready(&self, n: usize) {
        while self.ready() < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Counters, in-flight count and the latency histogram's percentiles.
    pub fn stats(&self) -> PoolStats {
        let mut s = PoolStats::default();
        self.inner.stats.fill(&mut s);
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        for slot in &self.inner.slots {
            if let Some(l) = slot.live.load_full() {
                s.inflight += l.inflight.load(Relaxed) as u64;
                s.connections_ready += 1;
            }
            if let Ok(sh) = slot.hist.lock() {
                let _ = h.add(&*sh);
            }
        }
        if !h.is_empty() {
            s.latency_us_p50 = h.value_at_quantile(0.5);
            s.latency_us_p99 = h.value_at_quantile(0.99);
            s.latency_us_p999 = h.value_at_quantile(0.999);
            s.latency_us_max = h.max();
        }
        s
    }

    /// Close every connection; every call in flight resolves (UNKNOWN or NOT SENT) and no
    /// reconnect happens. Waits for the connection tasks to end.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

/// Jittered exponential backoff: uniform in [d/2, d] with d = base · 2^attempt ≤ max.
pub fn backoff(attempt: u32, base: Duration, max: Duration, random: u64) -> Duration {
    let d = base.saturating_mul(1u32 << attempt.min(20)).min(max);
    let half = d / 2;
    let span = (d - half).as_nanos() as u64;
    half + Duration::from_nanos(if span == 0 { 0 } else { random % (span + 1) })
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One connection slot's life: connect, log on, serve, and reconnect — forever, until
/// the pool is shut down. It never gives up while the channel is configured.
async fn run_slot(inner: Arc<Inner>, idx: usize) {
    let cfg = &inner.cfg;
    let slot = &inner.slots[idx];
    let mut rng_state = (idx as u64) ^ conn::now_ms().wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut attempt = 0u32;
    let mut addr_idx = idx;
    loop {
        if inner.cancel.is_cancelled() || cfg.addresses.is_empty() {
            return;
        }
        let addr = cfg.addresses[addr_idx % cfg.addresses.len()];
        inner.stats.connect_attempts.fetch_add(1, Relaxed);
        let id = inner.next_id.fetch_add(1, Relaxed);
        let attempt_fut = conn::connect(cfg, &inner.identity, &inner.channel_key, addr, id);
        let res = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = attempt_fut => r,
        };
        match res {
            Ok((reader, wr, est)) => {
                let up_since = Instant::now();
                let (live, rx) = conn::live(cfg, &inner.cancel);
                slot.live.store(Some(live.clone()));
                tracing::info!(channel = %cfg.channel, %addr, slot = idx, "channel connection up");
                let ctx = LinkCtx {
                    cfg,
                    stats: &inner.stats,
                    hist: &slot.hist,
                    unsolicited: &inner.unsolicited,
                    next_id: &inner.next_id,
                };
                conn::run(ctx, live, rx, reader, wr, est).await;
                slot.live.store(None);
                inner.stats.disconnects.fetch_add(1, Relaxed);
                tracing::warn!(channel = %cfg.channel, %addr, slot = idx, "channel connection down");
                // A line that stayed up a while starts backoff afresh; one that drops at
                // once keeps backing off (a channel that accepts and closes is not hammered).
                if up_since.elapsed() >= Duration::from_secs(1) {
                    attempt = 0;
                } else {
                    attempt = attempt.saturating_add(1);
                }
            }
            Err(e) => {
                inner.stats.connect_failures.fetch_add(1, Relaxed);
                if matches!(e, conn::ConnectError::Handshake(_)) {
                    inner.stats.logon_rejected.fetch_add(1, Relaxed);
                }
                tracing::debug!(channel = %cfg.channel, %addr, error = %e, attempt, "channel connect failed");
                attempt = attempt.saturating_add(1);
                addr_idx = addr_idx.wrapping_add(1);
            }
        }
        let d = backoff(
            attempt,
            cfg.backoff_base,
            cfg.backoff_max,
            splitmix(&mut rng_state),
        );
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(d) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_capped_and_never_overflows() {
        let base = Duration::from_millis(50);
        let max = Duration::from_secs(5);
        for a in [0u32, 1, 5, 30, u32::MAX] {
            for r in [0u64, 1, u64::MAX / 3, u64::MAX] {
                let d = backoff(a, base, max, r);
                let full = base.saturating_mul(1u32 << a.min(20)).min(max);
                assert!(d >= full / 2 && d <= full, "{a} {r} {d:?}");
            }
        }
        assert_eq!(backoff(100, base, max, 0), Duration::from_millis(2500));
    }
}
