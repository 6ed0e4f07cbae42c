//! The payment engine: an I/O-free state machine in the manner of quinn-proto.
//!
//! Every entry point takes an event (a lender request, a channel result, a due query, a
//! channel notification) and the current time, changes in-memory state, and returns the
//! [`Action`]s the I/O shell must carry out **in order**:
//! - [`Action::Journal`] — make this record durable; nothing after it may run before it is;
//! - [`Action::Dispatch`] — send this message to a channel, then feed the result back
//!   with [`Engine::dispatch_result`];
//! - [`Action::Reply`] — answer the lender request being handled;
//! - [`Action::Notify`] — push a notification to the merchant (kept until acknowledged);
//! - [`Action::Query`] — call [`Engine::query_due`] for this order at this time.
//!
//! The engine never reads a clock and never awaits. It is safe to call from many session
//! tasks at once: state lives in `DashMap`s and every transition happens under one entry's
//! lock, never across an `.await` (there are none here).
//!
//! Money safety (DESIGN.md §4) lives in [`order::Order`] (attempts and failover) and here:
//! orders are created through the map's entry API, so one (merchant, order id) is
//! accepted at most once however many requests race; every final state produces exactly
//! one notification id.

pub mod agreement;
pub(crate) mod chunk_file;
mod fifo;
pub mod limits_book;
pub mod order;
pub mod record;
mod replay;
pub mod route;
pub mod settled;
mod slot_index;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::channel::message::{
    self as ch, AgreementNo, Code, OrderRef, RspClass, RspCode, Serial, SignRef,
};
use crate::message::{
    self as lm, AgreementId, BankCode, CardNo, CardType, ChannelId, Currency, Fen, Name,
    NotifyKind, OrderId, OrderType, Outcome, Purpose, Reason, Status,
};
use crate::wire::field::{Ascii, Digits};
use crate::wire::header::MerchantNo;

use agreement::{
    Agreement, AgreementStore, ChannelAgreement, ChannelAgreementState, PiiHash, PiiHasher,
    CHANNELS_PER_AGREEMENT_MAX,
};
use order::{AttemptResult, Order, OrderKey, OrderKind, Phase, Step};
pub use record::Record;
pub(crate) use replay::Resumed;
pub use route::{ChannelConfig, ChannelTable, Product, RoutingPolicy};
use settled::Facts;

use crate::health::{Health, HealthConfig, Observation, Override, RoutingMetrics};
use limits_book::LimitsBook;
use order::AttemptOutcome;
use route::{ChannelState, Decision, LocalTime};

/// Shards of the live-order map (see `Engine::new`).
const ORDER_SHARDS: usize = 256;

/// Default of [`EngineConfig::settle_after_ms`]: one minute of full detail (the admin
/// view's router reasons) after an order is final. A live order costs ~2 KB of memory in
/// a running switch, so the window times the peak order rate bounds that part: 1 GB at
/// 8.8k orders/s for one minute (BENCHMARKS.md).
pub const SETTLE_AFTER_MS_DEFAULT: u64 = 60_000;

/// Default of [`EngineConfig::detailed_final_max`]: at most this many final orders keep
/// their full detail; past it the oldest settle before their window ends. The window
/// alone let memory and every snapshot grow with the order rate: at 23k debits/s the
/// 60 s window held ~1.4M live orders (~2.8 GB) and each snapshot rewrote them all, a
/// 1.5-3 s pass that stalled a loaded 2-core machine (BENCHMARKS.md, eleventh session).
/// 100,000 keeps the whole minute up to ~1,700 final orders a second and bounds the
/// detailed part at ~200 MB and ~0.2 s of snapshot.
pub const DETAILED_FINAL_MAX_DEFAULT: usize = 100_000;

/// Engine settings (times in milliseconds).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// First query of a PENDING order this long after it went pending.
    pub query_delay_ms: u64,
    /// Query backoff doubles up to this.
    pub query_backoff_max_ms: u64,
    /// A query answered ORDER_NOT_FOUND is trusted only this long after the attempt was
    /// sent (CHANNEL.md §8.3: a request may still be in transit before that).
    pub not_found_grace_ms: u64,
    /// A pre-bind not confirmed within this time expires.
    pub bind_ttl_ms: u64,
    /// First re-send of an unacknowledged notification after this long; doubles.
    pub notify_retry_ms: u64,
    /// Re-send interval cap.
    pub notify_retry_max_ms: u64,
    /// Most pending binds held at once (each waits for an SMS code); beyond it pre-binds
    /// are answered BUSY.
    pub binds_max: usize,
    /// Prefix of channel order references, unique per switch start (e.g. start time in
    /// base 36), so references never repeat across restarts.
    pub ref_prefix: String,
    /// Merchant classes, rules, score weights, exploration, stickiness.
    pub routing: RoutingPolicy,
    /// Health windows and breaker thresholds.
    pub health: HealthConfig,
    /// A final, durable order keeps its full detail (statement text, router decision,
    /// reference index) this long after it finished; then only its compact
    /// [`settled::Settled`] form is kept for the rest of the idempotency retention.
    pub settle_after_ms: u64,
    /// At most this many final, durable orders keep their full detail at once: when more
    /// are waiting to settle, the oldest settle before `settle_after_ms` has passed
    /// (memory and snapshot size stay bounded whatever the order rate).
    pub detailed_final_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            query_delay_ms: 2_000,
            query_backoff_max_ms: 60_000,
            not_found_grace_ms: 30_000,
            bind_ttl_ms: 300_000,
            notify_retry_ms: 10_000,
            notify_retry_max_ms: 300_000,
            binds_max: 100_000,
            ref_prefix: "S".into(),
            routing: RoutingPolicy::default(),
            health: HealthConfig::default(),
            settle_after_ms: SETTLE_AFTER_MS_DEFAULT,
            detailed_final_max: DETAILED_FINAL_MAX_DEFAULT,
        }
    }
}

/// Routes a channel result back to what the dispatch was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// An order attempt (PAY or PAYOUT).
    Attempt {
        /// Order.
        key: OrderKey,
        /// Attempt reference.
        order_ref: OrderRef,
        /// Whether a lender request waits for this order's answer (false for the debit
        /// of a sign-and-pay, which is answered by notification only).
        reply: bool,
    },
    /// A query of a PENDING order.
    Query {
        /// Order.
        key: OrderKey,
        /// Attempt reference queried.
        order_ref: OrderRef,
    },
    /// Identity check of a pre-bind.
    Verify {
        /// Bind reference.
        bind_ref: u64,
    },
    /// Sign step of a bind confirm.
    Sign {
        /// Bind reference.
        bind_ref: u64,
    },
    /// Unsign of a cancelled agreement on one channel.
    Unsign {
        /// Agreement.
        agreement: AgreementId,
    },
}

/// A message for a channel.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// What the result is for.
    pub token: Token,
    /// Which channel.
    pub channel: ChannelId,
    /// The request.
    pub msg: ch::Message,
}

/// What came of a dispatch.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum DispatchResult {
    /// The channel answered.
    Answer(ch::Message),
    /// Provably never written to the channel.
    NotSent,
    /// Written (or possibly written) but no answer: outcome unknown.
    Unknown,
}

/// A notification for a merchant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Merchant to deliver to.
    pub merchant: MerchantNo,
    /// The message.
    pub msg: lm::Notify,
}

/// What the I/O shell must do, in order.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Make durable before running the next action.
    Journal(Record),
    /// Send to a channel and feed the result back.
    Dispatch(Dispatch),
    /// Answer the lender request being handled.
    Reply(lm::Message),
    /// Deliver to the merchant; re-sent until acknowledged.
    Notify(Notification),
    /// Call [`Engine::query_due`] for this order at `at_ms`.
    Query {
        /// Order.
        key: OrderKey,
        /// Attempt to query.
        order_ref: OrderRef,
        /// When (ms since the epoch).
        at_ms: u64,
    },
}

/// Actions from one event.
pub type Actions = Vec<Action>;

/// Card data a payout needs to be re-sent on the next channel after a NOT_PROCESSED
/// answer. Held in memory only while an attempt is in flight; never journaled.
#[derive(Clone)]
struct PayoutCard {
    card_type: CardType,
    bank: BankCode,
    card_no: CardNo,
    name: Name,
}

/// A pre-bind waiting for its SMS code.
#[derive(Debug, Clone)]
struct PendingBind {
    merchant: MerchantNo,
    card_hash: PiiHash,
    id_hash: PiiHash,
    card_last4: Digits<4>,
    bank: BankCode,
    card_type: CardType,
    /// Channels still to try for the identity check, then the one that sent the SMS.
    channel: ChannelId,
    remaining: Vec<ChannelId>,
    sign_ref: SignRef,
    expires_at_ms: u64,
    /// Sign-and-pay: the debit to make once signed.
    then_pay: Option<(OrderId, u64, Purpose)>,
    /// Whether the identity check got its SMS out (confirm allowed).
    sms_sent: bool,
    /// The four elements, only until the identity check is answered (for failover).
    elements: Option<Box<Elements>>,
}

#[derive(Clone)]
struct Elements {
    card_no: CardNo,
    id_no: lm::IdNo,
    name: Name,
    phone: lm::Phone,
}

impl std::fmt::Debug for Elements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Elements({:?}, {:?})", self.card_no, self.id_no)
    }
}

/// Unacknowledged notification.
#[derive(Debug, Clone)]
struct Outgoing {
    merchant: MerchantNo,
    msg: lm::Notify,
    next_at_ms: u64,
    sends: u32,
    /// The record it announces is durable: only then may it be sent again (re-sends,
    /// logon). Its first send is the `Action::Notify` that follows the record.
    durable: bool,
}

/// Counters of things that deserve an operator's eye.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Channel results contradicting a final state (reconciliation must look).
    pub mismatches: AtomicU64,
    /// Repeated channel notifications for already-final orders.
    pub duplicate_channel_results: AtomicU64,
    /// Orders accepted.
    pub orders_accepted: AtomicU64,
    /// Orders final.
    pub orders_final: AtomicU64,
}

/// The engine.
pub struct Engine {
    cfg: EngineConfig,
    table: ArcSwap<ChannelTable>,
    channel_up: DashMap<ChannelId, bool>,
    hasher: PiiHasher,
    agreements: AgreementStore,
    /// Live orders. Boxed: the map's buckets hold their values inline and a table runs
    /// between half and seven eighths full (and doubles when deletions fill it up), so a
    /// ~350-byte `Order` inline cost up to twice that per order.
    orders: DashMap<OrderKey, Box<Order>>,
    /// Final orders past their detail window (see [`settled`]); read after `orders`.
    settled: settled::SettledStore,
    /// Final, durable orders in the order they became so, waiting to be settled:
    /// (finished at, key).
    to_settle: Mutex<fifo::ChunkedFifo<(u64, OrderKey)>>,
    by_ref: agreement::FxDashMap<OrderRef, OrderKey>,
    payout_cards: DashMap<OrderKey, PayoutCard>,
    binds: agreement::FxDashMap<u64, PendingBind>,
    outbox: agreement::FxDashMap<u64, Outgoing>,
    seq: AtomicU64,
    policy: ArcSwap<RoutingPolicy>,
    health: Health,
    book: LimitsBook,
    /// What each open attempt holds in the limits book, released or spent once.
    reservations: DashMap<OrderRef, Reservation>,
    explore_seq: AtomicU64,
    /// Set once any channel was marked up or down (until then routing skips the lookup).
    up_marked: std::sync::atomic::AtomicBool,
    /// Counters.
    pub stats: EngineStats,
}

/// What an attempt holds in the [`LimitsBook`] until it is final.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    channel: ChannelId,
    product: Product,
    amount: u64,
    /// Card counter held (card hash, local day).
    card: Option<(PiiHash, i64)>,
    /// Fund position held.
    fund: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("orders", &self.orders.len())
            .field("agreements", &self.agreements.len())
            .finish()
    }
}

fn reply_outcome(status: Status, reason: Reason) -> Outcome {
    Outcome::new(status, reason)
}

fn code_text(code: RspCode) -> Ascii<8> {
    Ascii::new(code.as_str()).unwrap_or_default()
}

impl Engine {
    /// A new engine. `pii_secret` keys the card and ID hashes (≥ 32 bytes); `seq_base`
    /// seeds ids (agreement ids, bind refs, notification ids) so they never repeat across
    /// restarts (the shell passes the start time in ms × 1000, or the journal's maximum).
    pub fn new(cfg: EngineConfig, table: ChannelTable, pii_secret: &[u8], seq_base: u64) -> Engine {
        // Agreement ids have their own dense sequence (the store keeps runs of them
        // together), starting at the same time-based base as every other id.
        let agreements = AgreementStore::new();
        agreements.advance_ids_past(seq_base.saturating_sub(1));
        let health = Health::new(cfg.health.clone(), table.channels.iter().map(|c| c.id));
        let book = LimitsBook::new();
        book.configure_funds(&table);
        Engine {
            policy: ArcSwap::from_pointee(cfg.routing.clone()),
            health,
            book,
            reservations: DashMap::new(),
            explore_seq: AtomicU64::new(seq_base),
            up_marked: std::sync::atomic::AtomicBool::new(false),
            cfg,
            table: ArcSwap::from_pointee(table),
            channel_up: DashMap::new(),
            hasher: PiiHasher::new(pii_secret),
            agreements,
            // Many small shards: a snapshot read-locks one shard at a time while it
            // encodes it, and retention retains one at a time, so writers to that shard
            // wait for ~1/256 of the live orders instead of 1/8 (measured: with 8 shards
            // and 740k live orders each snapshot stalled requests for ~100 ms per shard).
            orders: DashMap::with_shard_amount(ORDER_SHARDS),
            settled: settled::SettledStore::new(),
            to_settle: Mutex::new(fifo::ChunkedFifo::default()),
            // As many shards as `orders` (one entry per live attempt, per live payout):
            // with eight, the shards doubled together, ~10-17 ms each under their lock.
            by_ref: DashMap::with_hasher_and_shard_amount(Default::default(), ORDER_SHARDS),
            payout_cards: DashMap::with_shard_amount(ORDER_SHARDS),
            binds: DashMap::default(),
            outbox: DashMap::default(),
            seq: AtomicU64::new(seq_base.max(1)),
            stats: EngineStats::default(),
        }
    }

    fn next_id(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn next_ref(&self, tag: char) -> String {
        format!("{}{tag}{:x}", self.cfg.ref_prefix, self.next_id())
    }

    /// The agreement store (import, admin).
    pub fn agreements(&self) -> &AgreementStore {
        &self.agreements
    }

    /// The PII hasher (import).
    pub fn hasher(&self) -> &PiiHasher {
        &self.hasher
    }

    /// Replace the channel table (reload). Health, breakers, counters and fund balances
    /// carry over; new channels start fresh.
    pub fn set_table(&self, table: ChannelTable) {
        self.health.ensure(table.channels.iter().map(|c| c.id));
        self.book.configure_funds(&table);
        self.table.store(Arc::new(table));
    }

    /// The channel table in use.
    pub fn table(&self) -> Arc<ChannelTable> {
        self.table.load_full()
    }

    /// The routing policy in use (admin: the health score uses its weights).
    pub fn policy(&self) -> Arc<RoutingPolicy> {
        self.policy.load_full()
    }

    /// Replace the routing policy (reload).
    pub fn set_policy(&self, policy: RoutingPolicy) {
        self.policy.store(Arc::new(policy));
    }

    /// Channel health (admin: overrides, breaker reset; metrics).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Card counters, fund positions, volumes (admin: fund top-ups).
    pub fn limits(&self) -> &LimitsBook {
        &self.book
    }

    /// Operator switch for a channel and product. False for an unknown channel.
    pub fn set_override(&self, channel: &ChannelId, product: Product, o: Override) -> bool {
        self.health.set_override(channel, product.index(), o)
    }

    /// The last routing decision for an order: candidates in order (with score, fee and
    /// what placed them) and why every other channel was excluded.
    pub fn route_decision(&self, key: &OrderKey) -> Option<Decision> {
        self.orders.get(key)?.decision.as_deref().cloned()
    }

    /// Health, breaker, fund and volume figures (render with
    /// [`RoutingMetrics::render_metrics`]).
    pub fn routing_metrics(&self, now_ms: u64) -> RoutingMetrics {
        RoutingMetrics {
            health: self.health.snapshot(now_ms),
            funds: self.book.funds_snapshot(),
            volumes: self.book.volumes_snapshot(&self.table.load(), now_ms),
        }
    }

    /// Forget per-card counters of past days (call every few minutes).
    pub fn prune_limits(&self, now_ms: u64) {
        self.book.prune(now_ms);
    }

    /// Route an instruction against the current table, policy and run-time state, without
    /// accepting anything (admin "where would this go now", benches). `card` is the card
    /// hash whose daily counters apply.
    pub fn route_preview(&self, req: &route::Request<'_>, card: Option<&PiiHash>) -> Decision {
        self.decide(req, card)
    }

    /// Route an instruction against the current table, policy and run-time state.
    fn decide(&self, req: &route::Request<'_>, card: Option<&PiiHash>) -> Decision {
        let table = self.table.load();
        let policy = self.policy.load();
        let pi = req.product.index();
        let counters = match card {
            Some(h) if req.product != Product::Sign => self.book.card_counters(h),
            _ => Vec::new(),
        };
        let up_marked = self.up_marked.load(Ordering::Relaxed);
        let states: Vec<ChannelState> = table
            .channels
            .iter()
            .map(|c| {
                let (health, operator) = self.health.route_view(&c.id, pi, req.now_ms);
                let t = c.terms(req.product);
                let mut st = ChannelState {
                    up: !up_marked || self.is_up(&c.id),
                    health,
                    operator,
                    ..ChannelState::default()
                };
                let limited = t.card_daily_amount_fen > 0 || t.card_daily_count > 0;
                if (limited || !t.fee.tiers.is_empty()) && req.product != Product::Sign {
                    let lt = LocalTime::at(req.now_ms, c.utc_offset_min);
                    if let Some(x) = counters.iter().find(|x| {
                        limited && x.channel == c.id && x.product == req.product && x.day == lt.day
                    }) {
                        (st.card_day_fen, st.card_day_count) = (x.amount_fen, x.count);
                    }
                    if !t.fee.tiers.is_empty() {
                        st.month_volume_fen =
                            self.book.month_volume(&c.id, req.product, lt.month());
                    }
                }
                if req.product == Product::Payout && c.fund.is_some() {
                    st.fund_available_fen = self.book.fund_available(&c.id);
                }
                st
            })
            .collect();
        route::route(req, &table, &policy, &states)
    }

    /// A draw for exploration (splitmix64 of a counter: cheap, well spread).
    fn explore_draw(&self) -> u64 {
        let mut z = self
            .explore_seq
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Book an attempt starting on `channel`: breaker probe, card counter, fund position.
    fn attempt_started(
        &self,
        kind: &OrderKind,
        amount: u64,
        channel: ChannelId,
        order_ref: OrderRef,
        now_ms: u64,
    ) {
        self.health.admit(&channel, now_ms);
        let (product, card) = match kind {
            OrderKind::Payout { card_hash } => (Product::Payout, Some(*card_hash)),
            OrderKind::Debit { agreement } => (
                Product::Debit,
                self.agreements.record(*agreement).map(|a| a.card_hash()),
            ),
        };
        let table = self.table.load();
        let Some(c) = table.channels.iter().find(|c| c.id == channel) else {
            return;
        };
        let t = c.terms(product);
        let card = card
            .filter(|_| t.card_daily_amount_fen > 0 || t.card_daily_count > 0)
            .map(|h| {
                let day = LocalTime::at(now_ms, c.utc_offset_min).day;
                self.book.reserve_card(&h, channel, product, day, amount);
                (h, day)
            });
        let fund = product == Product::Payout && self.book.fund_reserve(&channel, amount);
        self.reservations.insert(
            order_ref,
            Reservation {
                channel,
                product,
                amount,
                card,
                fund,
            },
        );
    }

    /// Feed health with an attempt's first result, and release or spend what it holds
    /// once its outcome is settled.
    fn attempt_settled(
        &self,
        attempt: &order::Attempt,
        prev: AttemptOutcome,
        result: &AttemptResult,
        now_ms: u64,
    ) {
        let cur = attempt.outcome;
        if prev == AttemptOutcome::InFlight && cur != AttemptOutcome::InFlight {
            let latency_ms = now_ms.saturating_sub(attempt.sent_at_ms);
            let obs = match (cur, result) {
                (AttemptOutcome::NotSent, _) => Observation::NotSent,
                (AttemptOutcome::Unknown, _) => Observation::Timeout,
                (_, AttemptResult::Answered { class, code, .. }) => {
                    Observation::answered(*class, *code, latency_ms)
                }
                _ => Observation::Timeout,
            };
            self.health.record(&attempt.channel, obs, now_ms);
        }
        let done = matches!(cur, AttemptOutcome::Success(_));
        let undone = cur.definitively_not_processed() || matches!(cur, AttemptOutcome::Declined(_));
        if !(done || undone) {
            return;
        }
        let Some((_, r)) = self.reservations.remove(&attempt.order_ref) else {
            return;
        };
        if done {
            if r.fund {
                self.book.fund_spend(&r.channel, r.amount);
            }
            let offset = self
                .table
                .load()
                .channels
                .iter()
                .find(|c| c.id == r.channel)
                .map(|c| c.utc_offset_min)
                .unwrap_or(480);
            self.book.add_volume(
                r.channel,
                r.product,
                LocalTime::at(now_ms, offset),
                r.amount,
            );
        } else {
            if r.fund {
                self.book.fund_release(&r.channel, r.amount);
            }
            if let Some((card, day)) = r.card {
                self.book
                    .release_card(&card, r.channel, r.product, day, r.amount);
            }
        }
    }

    /// Mark a channel up (has a logged-on connection) or down.
    pub fn set_channel_up(&self, channel: ChannelId, up: bool) {
        self.up_marked.store(true, Ordering::Relaxed);
        self.channel_up.insert(channel, up);
    }

    fn is_up(&self, channel: &ChannelId) -> bool {
        self.channel_up.get(channel).map(|v| *v).unwrap_or(true)
    }

    /// A fresh agreement id (import).
    pub fn new_agreement_id(&self) -> AgreementId {
        self.agreements.next_id()
    }

    /// Number of orders held (live and settled).
    pub fn order_count(&self) -> usize {
        self.orders.len() + self.settled.len()
    }

    /// Number of orders held in the compact settled form.
    pub fn settled_count(&self) -> usize {
        self.settled.len()
    }

    /// A copy of an order (admin, tests); a settled order without its statement text.
    pub fn order(&self, key: &OrderKey) -> Option<Order> {
        if let Some(o) = self.orders.get(key) {
            return Some(Order::clone(&o));
        }
        self.settled.get(key).map(|s| s.to_order(*key))
    }

    /// What a repeat or a query may see of an order: the live map first, then the
    /// settled one (an order moving between them is in one or both, never neither; see
    /// [`Engine::settle_final_orders_before`]).
    fn facts(&self, key: &OrderKey) -> Option<Facts> {
        if let Some(o) = self.orders.get(key) {
            return Some(Facts::of_order(&o));
        }
        self.settled.get(key).map(|s| Facts::of_settled(&s))
    }

    // ----- orders -------------------------------------------------------------------

    /// DEBIT_REQ.
    pub fn debit(&self, merchant: MerchantNo, req: &lm::DebitReq, now_ms: u64) -> Actions {
        self.debit_inner(merchant, req, now_ms, true)
    }

    fn debit_inner(
        &self,
        merchant: MerchantNo,
        req: &lm::DebitReq,
        now_ms: u64,
        reply: bool,
    ) -> Actions {
        let key = (merchant, req.order_id);
        let kind = OrderKind::Debit {
            agreement: req.agreement_id,
        };
        let reject = |reason| {
            vec![Action::Reply(
                lm::DebitRsp {
                    result: reply_outcome(Status::Rejected, reason),
                    order_id: req.order_id.0,
                    channel: ChannelId::empty(),
                }
                .into(),
            )]
        };
        if let Some(dup) = self.duplicate(&key, &kind, req.amount.0) {
            return dup;
        }
        let Some(a) = self.agreements.get(req.agreement_id) else {
            return reject(Reason::UNKNOWN_AGREEMENT);
        };
        if a.merchant != merchant {
            return reject(Reason::UNKNOWN_AGREEMENT);
        }
        if a.state() != lm::AgreementState::Active {
            return reject(Reason::AGREEMENT_REVOKED);
        }
        let decision = self.decide(
            &route::Request {
                product: Product::Debit,
                merchant,
                amount_fen: req.amount.0,
                bank: a.bank,
                card_type: a.card_type,
                agreement: Some(&a),
                now_ms,
                explore: self.explore_draw(),
            },
            Some(&a.card_hash),
        );
        if decision.candidates.is_empty() {
            return reject(Reason::NO_CHANNEL);
        }
        self.accept_order(
            key,
            kind,
            req.amount.0,
            req.purpose,
            decision,
            None,
            now_ms,
            reply,
        )
    }

    /// PAYOUT_REQ.
    pub fn payout(&self, merchant: MerchantNo, req: &lm::PayoutReq, now_ms: u64) -> Actions {
        let key = (merchant, req.order_id);
        let card_hash = self.hasher.card(req.card_no.expose());
        let kind = OrderKind::Payout { card_hash };
        if let Some(dup) = self.duplicate(&key, &kind, req.amount.0) {
            return dup;
        }
        let decision = self.decide(
            &route::Request {
                product: Product::Payout,
                merchant,
                amount_fen: req.amount.0,
                bank: req.bank_code,
                card_type: req.card_type,
                agreement: None,
                now_ms,
                explore: self.explore_draw(),
            },
            Some(&card_hash),
        );
        if decision.candidates.is_empty() {
            return vec![Action::Reply(
                lm::PayoutRsp {
                    result: reply_outcome(Status::Rejected, Reason::NO_CHANNEL),
                    order_id: req.order_id.0,
                    channel: ChannelId::empty(),
                }
                .into(),
            )];
        }
        let card = PayoutCard {
            card_type: req.card_type,
            bank: req.bank_code,
            card_no: req.card_no,
            name: req.name,
        };
        self.accept_order(
            key,
            kind,
            req.amount.0,
            req.purpose,
            decision,
            Some(card),
            now_ms,
            true,
        )
    }

    /// The answer to a repeated order request, or `None` when the order id is new.
    fn duplicate(&self, key: &OrderKey, kind: &OrderKind, amount: u64) -> Option<Actions> {
        let o = self.facts(key)?;
        let msg = if o.same_content(kind, amount) {
            // Only a durable state may be told (rule 3); before the acceptance is durable
            // the repeat is answered BUSY: nothing done by it, retry with the same id.
            let out = match o.durable {
                Some(mut d) => {
                    d.reason = Reason::DUPLICATE_ORDER;
                    d
                }
                None => reply_outcome(Status::Busy, Reason::OVERLOADED),
            };
            facts_reply(key, &o, out)
        } else {
            facts_reply(
                key,
                &o,
                reply_outcome(Status::Rejected, Reason::ORDER_CONFLICT),
            )
        };
        Some(vec![Action::Reply(msg)])
    }

    #[allow(clippy::too_many_arguments)]
    fn accept_order(
        &self,
        key: OrderKey,
        kind: OrderKind,
        amount: u64,
        purpose: Purpose,
        decision: Decision,
        card: Option<PayoutCard>,
        now_ms: u64,
        reply: bool,
    ) -> Actions {
        let order_ref = match OrderRef::new(&self.next_ref('O')) {
            Ok(r) => r,
            Err(_) => return vec![],
        };
        let route = decision.candidates.clone();
        let mut order = Order::new(key, kind, amount, purpose, route, now_ms);
        // Kept with the order, so only an order this request accepted has it (not a
        // duplicate's).
        order.decision = Some(Box::new(decision));
        let attempt = *order
            .start_next_attempt(order_ref, now_ms)
            .expect("a new order with candidates may start");
        // The entry API makes acceptance atomic: of two racing requests with the same
        // order id, exactly one inserts; the other is answered as a duplicate.
        //
        // Concurrency note: the entry guard holds the shard's write lock, so the
        // duplicate answer (which reads the same shard) is built only after it is dropped.
        //
        // A vacant live entry is checked against the settled orders while its shard lock
        // is held: settling inserts there before it removes here, so an order settled
        // meanwhile is found (lock order: `orders`, then `settled`, never the reverse).
        let inserted = match self.orders.entry(key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(_) if self.settled.contains_key(&key) => false,
            Entry::Vacant(v) => {
                v.insert(Box::new(order));
                true
            }
        };
        if !inserted {
            return self.duplicate(&key, &kind, amount).unwrap_or_default();
        }
        self.stats.orders_accepted.fetch_add(1, Ordering::Relaxed);
        self.by_ref.insert(order_ref, key);
        self.attempt_started(&kind, amount, attempt.channel, order_ref, now_ms);
        if let Some(c) = card {
            self.payout_cards.insert(key, c);
        }
        let mut out = vec![
            Action::Journal(Record::OrderAccepted {
                key,
                kind,
                amount,
                purpose,
                at_ms: now_ms,
            }),
            Action::Journal(Record::AttemptStarted {
                key,
                channel: attempt.channel,
                order_ref,
                at_ms: now_ms,
            }),
        ];
        match self.attempt_message(&key, &attempt.channel, order_ref) {
            Some(msg) => out.push(Action::Dispatch(Dispatch {
                token: Token::Attempt {
                    key,
                    order_ref,
                    reply,
                },
                channel: attempt.channel,
                msg,
            })),
            None => out.extend(self.attempt_result(
                &key,
                &order_ref,
                AttemptResult::NotSent,
                now_ms,
                reply,
            )),
        }
        out
    }

    /// The PAY or PAYOUT request for an attempt.
    fn attempt_message(
        &self,
        key: &OrderKey,
        channel: &ChannelId,
        order_ref: OrderRef,
    ) -> Option<ch::Message> {
        let o = self.orders.get(key)?;
        let purpose = o.purpose;
        match o.kind {
            OrderKind::Debit { agreement } => {
                let ca = self
                    .agreements
                    .record(agreement)?
                    .on_channel(channel)
                    .filter(|c| c.state == ChannelAgreementState::Active)?;
                Some(
                    ch::PayReq {
                        order_ref,
                        agreement_no: ca.agreement_no,
                        amount: Fen(o.amount),
                        currency: Currency,
                        purpose,
                    }
                    .into(),
                )
            }
            OrderKind::Payout { .. } => {
                let c = self.payout_cards.get(key)?;
                Some(
                    ch::PayoutReq {
                        order_ref,
                        amount: Fen(o.amount),
                        currency: Currency,
                        card_type: c.card_type,
                        bank_code: c.bank,
                        card_no: c.card_no,
                        name: c.name,
                        purpose,
                    }
                    .into(),
                )
            }
        }
    }

    /// Apply an attempt result and produce the follow-up actions. `reply` says whether a
    /// lender request is waiting for this order's answer.
    fn attempt_result(
        &self,
        key: &OrderKey,
        order_ref: &OrderRef,
        result: AttemptResult,
        now_ms: u64,
        reply: bool,
    ) -> Actions {
        let mut out = Vec::new();
        let Some(mut o) = self.orders.get_mut(key) else {
            return out;
        };
        let Some(idx) = o.attempt_index(order_ref) else {
            return out;
        };
        let prev = o.attempts[idx].outcome;
        let step = o.apply(idx, result, now_ms);
        self.attempt_settled(&o.attempts[idx], prev, &result, now_ms);
        match step {
            Step::Final => {
                self.stats.orders_final.fetch_add(1, Ordering::Relaxed);
                let notify_id = self.next_id();
                out.push(Action::Journal(Record::OrderFinal {
                    key: *key,
                    outcome: o.outcome,
                    order_ref: Some(*order_ref),
                    notify_id,
                    at_ms: now_ms,
                }));
                if reply {
                    out.push(Action::Reply(order_reply(&o, o.outcome)));
                }
                let n = self.order_notification(&o, notify_id);
                self.outbox.insert(
                    notify_id,
                    Outgoing {
                        merchant: key.0,
                        msg: n.msg.clone(),
                        next_at_ms: now_ms + self.cfg.notify_retry_ms,
                        sends: 1,
                        durable: false,
                    },
                );
                out.push(Action::Notify(n));
                drop(o);
                self.payout_cards.remove(key);
            }
            Step::TryNext => {
                let prev = o.attempts[idx].outcome;
                let Ok(next_ref) = OrderRef::new(&self.next_ref('O')) else {
                    return out;
                };
                let attempt = *o
                    .start_next_attempt(next_ref, now_ms)
                    .expect("TryNext means another attempt is allowed");
                let (kind, amount) = (o.kind, o.amount);
                drop(o);
                self.by_ref.insert(next_ref, *key);
                self.attempt_started(&kind, amount, attempt.channel, next_ref, now_ms);
                out.push(Action::Journal(Record::AttemptOutcome {
                    key: *key,
                    order_ref: *order_ref,
                    outcome: prev,
                }));
                out.push(Action::Journal(Record::AttemptStarted {
                    key: *key,
                    channel: attempt.channel,
                    order_ref: next_ref,
                    at_ms: now_ms,
                }));
                match self.attempt_message(key, &attempt.channel, next_ref) {
                    Some(msg) => out.push(Action::Dispatch(Dispatch {
                        token: Token::Attempt {
                            key: *key,
                            order_ref: next_ref,
                            reply,
                        },
                        channel: attempt.channel,
                        msg,
                    })),
                    None => out.extend(self.attempt_result(
                        key,
                        &next_ref,
                        AttemptResult::NotSent,
                        now_ms,
                        reply,
                    )),
                }
            }
            Step::Query => {
                out.push(Action::Journal(Record::AttemptOutcome {
                    key: *key,
                    order_ref: *order_ref,
                    outcome: o.attempts[idx].outcome,
                }));
                if reply {
                    out.push(Action::Reply(order_reply(&o, o.outcome)));
                }
                out.push(Action::Query {
                    key: *key,
                    order_ref: *order_ref,
                    at_ms: now_ms + self.cfg.query_delay_ms,
                });
                drop(o);
                // Pending orders are never re-sent elsewhere: the card data can go.
                self.payout_cards.remove(key);
            }
            Step::Unchanged | Step::Mismatch => {
                if step == Step::Mismatch {
                    self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        merchant = %key.0, order_id = key.1.as_str(), order_ref = %order_ref,
                        "channel result contradicts the order's final state; not applied"
                    );
                } else if o.phase == Phase::Final {
                    self.stats
                        .duplicate_channel_results
                        .fetch_add(1, Ordering::Relaxed);
                }
                if reply {
                    // Nothing journaled here: tell the durable state only (rule 3). The
                    // order may be final in memory with its record still being written.
                    let told = o
                        .durable
                        .unwrap_or_else(|| reply_outcome(Status::Pending, Reason::OK));
                    out.push(Action::Reply(order_reply(&o, told)));
                }
            }
        }
        out
    }

    fn order_notification(&self, o: &Order, notify_id: u64) -> Notification {
        let agreement_id = match o.kind {
            OrderKind::Debit { agreement } => agreement.0,
            OrderKind::Payout { .. } => 0,
        };
        Notification {
            merchant: o.key.0,
            msg: lm::Notify {
                notify_id,
                kind: NotifyKind::OrderFinal,
                result: o.outcome,
                order_id: o.key.1 .0,
                order_type: order_type(&o.kind) as u8,
                amount: o.amount,
                agreement_id,
                channel: o.channel(),
                finished_at_ms: o.finished_at_ms,
            },
        }
    }

    /// ORDER_QUERY_REQ (read only).
    pub fn order_query(&self, merchant: MerchantNo, req: &lm::OrderQueryReq) -> lm::Message {
        match self.facts(&(merchant, req.order_id)) {
            Some(o) => lm::OrderQueryRsp {
                // The durable state only (rule 3); BUSY while the acceptance is not.
                result: o
                    .durable
                    .unwrap_or_else(|| reply_outcome(Status::Busy, Reason::OVERLOADED)),
                order_id: req.order_id.0,
                order_type: order_type(&o.kind) as u8,
                amount: o.amount,
                channel: o.channel,
                attempts: o.attempts,
                accepted_at_ms: o.accepted_at_ms,
                finished_at_ms: o.finished_at_ms,
            }
            .into(),
            None => lm::OrderQueryRsp {
                result: reply_outcome(Status::Rejected, Reason::UNKNOWN_ORDER),
                order_id: req.order_id.0,
                order_type: 0,
                amount: 0,
                channel: ChannelId::empty(),
                attempts: 0,
                accepted_at_ms: 0,
                finished_at_ms: 0,
            }
            .into(),
        }
    }

    /// A PENDING order's query time came.
    pub fn query_due(&self, key: &OrderKey, order_ref: &OrderRef, _now_ms: u64) -> Actions {
        let Some(mut o) = self.orders.get_mut(key) else {
            return vec![];
        };
        if o.phase != Phase::Pending || o.current().map(|a| &a.order_ref) != Some(order_ref) {
            return vec![];
        }
        o.queries += 1;
        let channel = o.channel();
        vec![Action::Dispatch(Dispatch {
            token: Token::Query {
                key: *key,
                order_ref: *order_ref,
            },
            channel,
            msg: ch::QueryReq {
                order_ref: *order_ref,
            }
            .into(),
        })]
    }

    fn requery(&self, key: &OrderKey, order_ref: &OrderRef, now_ms: u64) -> Actions {
        let queries = self.orders.get(key).map(|o| o.queries).unwrap_or(0);
        let delay = self
            .cfg
            .query_delay_ms
            .saturating_mul(1u64 << queries.min(16))
            .min(self.cfg.query_backoff_max_ms);
        vec![Action::Query {
            key: *key,
            order_ref: *order_ref,
            at_ms: now_ms + delay,
        }]
    }

    /// Feed back what came of a [`Dispatch`].
    pub fn dispatch_result(&self, token: &Token, result: DispatchResult, now_ms: u64) -> Actions {
        match token {
            Token::Attempt {
                key,
                order_ref,
                reply,
            } => {
                let r = match result {
                    DispatchResult::NotSent => AttemptResult::NotSent,
                    DispatchResult::Unknown => AttemptResult::Unknown,
                    DispatchResult::Answer(m) => order_answer(&m, order_ref),
                };
                self.attempt_result(key, order_ref, r, now_ms, *reply)
            }
            Token::Query { key, order_ref } => {
                let answered = match result {
                    DispatchResult::Answer(ch::Message::QueryRsp(q))
                        if &q.order_ref == order_ref =>
                    {
                        q
                    }
                    _ => return self.requery(key, order_ref, now_ms),
                };
                if answered.code.known() == Some(Code::ORDER_NOT_FOUND) {
                    let sent_at = self
                        .orders
                        .get(key)
                        .and_then(|o| o.current().map(|a| a.sent_at_ms))
                        .unwrap_or(now_ms);
                    if now_ms < sent_at + self.cfg.not_found_grace_ms {
                        return self.requery(key, order_ref, now_ms);
                    }
                }
                if answered.class == RspClass::Processing {
                    return self.requery(key, order_ref, now_ms);
                }
                let r = AttemptResult::Answered {
                    class: answered.class,
                    code: answered.code,
                    serial: answered.channel_serial,
                };
                let out = self.attempt_result(key, order_ref, r, now_ms, false);
                if out.is_empty() {
                    self.requery(key, order_ref, now_ms)
                } else {
                    out
                }
            }
            Token::Verify { bind_ref } => self.verify_result(*bind_ref, result, now_ms),
            Token::Sign { bind_ref } => self.sign_result(*bind_ref, result, now_ms),
            Token::Unsign { agreement } => {
                if !matches!(result, DispatchResult::Answer(ref m) if m.result().map(|r| r.1) == Some(RspClass::Success))
                {
                    tracing::warn!(agreement = agreement.0, "unsign not confirmed by the channel; the agreement stays cancelled at sluice");
                }
                vec![]
            }
        }
    }

    /// A frame the channel sent on its own: result notification, revocation, or a reply
    /// that arrived after its deadline.
    pub fn channel_unsolicited(
        &self,
        channel: &ChannelId,
        msg: &ch::Message,
        now_ms: u64,
    ) -> Actions {
        match msg {
            ch::Message::Notify(n) => self.order_result_by_ref(
                &n.order_ref,
                AttemptResult::Answered {
                    class: n.class,
                    code: n.code,
                    serial: n.channel_serial,
                },
                now_ms,
            ),
            ch::Message::PayRsp(_) | ch::Message::PayoutRsp(_) => match msg.order_ref() {
                Some(r) => {
                    let res = order_answer(msg, r);
                    self.order_result_by_ref(r, res, now_ms)
                }
                None => vec![],
            },
            ch::Message::QueryRsp(q)
                if q.class.is_final() && q.code.known() != Some(Code::ORDER_NOT_FOUND) =>
            {
                self.order_result_by_ref(
                    &q.order_ref,
                    AttemptResult::Answered {
                        class: q.class,
                        code: q.code,
                        serial: q.channel_serial,
                    },
                    now_ms,
                )
            }
            ch::Message::Revoke(r) => self.revocation(channel, &r.agreement_no, now_ms),
            _ => vec![],
        }
    }

    fn order_result_by_ref(&self, order_ref: &OrderRef, r: AttemptResult, now_ms: u64) -> Actions {
        let Some(key) = self.by_ref.get(order_ref).map(|k| *k) else {
            tracing::warn!(order_ref = %order_ref, "channel result for an unknown order reference");
            return vec![];
        };
        self.attempt_result(&key, order_ref, r, now_ms, false)
    }

    /// The shell calls this once `rec` is durable: from then on the state it records may
    /// be told to a repeated request or a query.
    pub fn record_durable(&self, rec: &Record) {
        match rec {
            Record::OrderFinal { notify_id, .. } | Record::RevocationNotice { notify_id, .. } => {
                if let Some(mut n) = self.outbox.get_mut(notify_id) {
                    n.durable = true;
                }
            }
            _ => {}
        }
        let (key, outcome) = match rec {
            Record::OrderAccepted { key, .. } => (key, None),
            Record::AttemptOutcome { key, outcome, .. } => match outcome {
                order::AttemptOutcome::Unknown => (
                    key,
                    Some(reply_outcome(Status::Pending, Reason::OUTCOME_UNKNOWN)),
                ),
                order::AttemptOutcome::Processing(_) => {
                    (key, Some(reply_outcome(Status::Pending, Reason::OK)))
                }
                _ => return,
            },
            Record::OrderFinal { key, outcome, .. } => (key, Some(*outcome)),
            _ => return,
        };
        if let Some(mut o) = self.orders.get_mut(key) {
            match outcome {
                // A final durable state is never replaced by an earlier one.
                Some(out) if !o.durable.is_some_and(|d| d.status.is_final()) => {
                    o.durable = Some(out);
                    if out.status.is_final() {
                        let at = o.finished_at_ms;
                        drop(o);
                        self.to_settle
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push_back((at, *key));
                    }
                }
                None if o.durable.is_none() => {
                    o.durable = Some(reply_outcome(Status::Pending, Reason::OK))
                }
                _ => {}
            }
        }
    }

    // ----- notifications -------------------------------------------------------------

    /// NOTIFY_ACK from the lender. Returns the journal action when it acknowledged a
    /// pending notification of this merchant.
    pub fn notify_ack(&self, merchant: &MerchantNo, notify_id: u64) -> Actions {
        match self
            .outbox
            .remove_if(&notify_id, |_, o| &o.merchant == merchant)
        {
            Some(_) => vec![Action::Journal(Record::NotifyAcked { notify_id })],
            None => vec![],
        }
    }

    /// Notifications due for a re-send at `now_ms` (their next time is pushed back with
    /// doubling intervals). Bounded by `max` per call.
    pub fn notifications_due(&self, now_ms: u64, max: usize) -> Vec<Notification> {
        let mut due = Vec::new();
        for mut e in self.outbox.iter_mut() {
            if due.len() >= max {
                break;
            }
            if e.durable && e.next_at_ms <= now_ms {
                e.sends += 1;
                let back = self
                    .cfg
                    .notify_retry_ms
                    .saturating_mul(1u64 << e.sends.min(16))
                    .min(self.cfg.notify_retry_max_ms);
                e.next_at_ms = now_ms + back;
                due.push(Notification {
                    merchant: e.merchant,
                    msg: e.msg.clone(),
                });
            }
        }
        due
    }

    /// Every unacknowledged notification of a merchant (sent after a logon).
    pub fn notifications_for(&self, merchant: &MerchantNo, max: usize) -> Vec<Notification> {
        self.outbox
            .iter()
            .filter(|e| &e.merchant == merchant && e.durable)
            .take(max)
            .map(|e| Notification {
                merchant: e.merchant,
                msg: e.msg.clone(),
            })
            .collect()
    }

    /// Unacknowledged notifications held.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    // ----- agreements ----------------------------------------------------------------

    /// PREBIND_REQ.
    pub fn prebind(&self, merchant: MerchantNo, req: &lm::PreBindReq, now_ms: u64) -> Actions {
        self.start_bind(
            merchant,
            BindRequest {
                card_type: req.card_type,
                bank: req.bank_code,
                elements: Elements {
                    card_no: req.card_no,
                    id_no: req.id_no,
                    name: req.name,
                    phone: req.phone,
                },
                then_pay: None,
                backup: req.mode == lm::BindMode::Backup,
            },
            now_ms,
        )
    }

    /// SIGN_AND_PAY_REQ.
    pub fn sign_and_pay(
        &self,
        merchant: MerchantNo,
        req: &lm::SignAndPayReq,
        now_ms: u64,
    ) -> Actions {
        if let Some(o) = self.facts(&(merchant, req.order_id)) {
            // The durable state only (rule 3), as for a repeated DEBIT_REQ: BUSY until the
            // acceptance is durable.
            let out = match o.durable {
                Some(mut d) => {
                    d.reason = Reason::DUPLICATE_ORDER;
                    d
                }
                None => reply_outcome(Status::Busy, Reason::OVERLOADED),
            };
            // The agreement record precedes the acceptance in the journal, so it is
            // durable once the acceptance is; before that its id is not told either.
            let agreement_id = match (o.kind, o.durable) {
                (OrderKind::Debit { agreement }, Some(_)) => agreement.0,
                _ => 0,
            };
            return vec![Action::Reply(
                lm::SignAndPayRsp {
                    result: out,
                    bind_ref: 0,
                    agreement_id,
                }
                .into(),
            )];
        }
        self.start_bind(
            merchant,
            BindRequest {
                card_type: req.card_type,
                bank: req.bank_code,
                elements: Elements {
                    card_no: req.card_no,
                    id_no: req.id_no,
                    name: req.name,
                    phone: req.phone,
                },
                then_pay: Some((req.order_id, req.amount.0, req.purpose)),
                backup: false,
            },
            now_ms,
        )
    }

    fn bind_reply(then_pay: bool, result: Outcome, bind_ref: u64, agreement_id: u64) -> Action {
        Action::Reply(if then_pay {
            lm::SignAndPayRsp {
                result,
                bind_ref,
                agreement_id,
            }
            .into()
        } else {
            lm::PreBindRsp {
                result,
                bind_ref,
                agreement_id,
            }
            .into()
        })
    }

    fn start_bind(&self, merchant: MerchantNo, b: BindRequest, now_ms: u64) -> Actions {
        let pay = b.then_pay.is_some();
        let card_hash = self.hasher.card(b.elements.card_no.expose());
        let existing = self
            .agreements
            .find_by_card(&merchant, &card_hash)
            .and_then(|id| self.agreements.get(id))
            .filter(|a| a.state() == lm::AgreementState::Active);
        if b.backup && existing.is_none() {
            return vec![Self::bind_reply(
                pay,
                reply_outcome(Status::Rejected, Reason::UNKNOWN_AGREEMENT),
                0,
                0,
            )];
        }
        if let (false, Some(id)) = (b.backup, existing.as_ref().map(|a| a.id)) {
            if let Some(a) = self.agreements.get(id) {
                if a.state() == lm::AgreementState::Active {
                    return vec![Self::bind_reply(
                        pay,
                        reply_outcome(Status::Success, Reason::ALREADY_SIGNED),
                        0,
                        id.0,
                    )];
                }
            }
        }
        if self.binds.len() >= self.cfg.binds_max {
            self.expire_binds(now_ms);
            if self.binds.len() >= self.cfg.binds_max {
                return vec![Self::bind_reply(
                    pay,
                    reply_outcome(Status::Busy, Reason::OVERLOADED),
                    0,
                    0,
                )];
            }
        }
        let mut decision = self.decide(
            &route::Request {
                product: Product::Sign,
                merchant,
                amount_fen: 0,
                bank: b.bank,
                card_type: b.card_type,
                agreement: None,
                now_ms,
                explore: self.explore_draw(),
            },
            None,
        );
        if let (true, Some(a)) = (b.backup, &existing) {
            // A backup goes to a channel the agreement is not signed on yet.
            decision.candidates.retain(|c| a.on_channel(c).is_none());
        }
        if decision.candidates.is_empty() {
            return vec![Self::bind_reply(
                pay,
                reply_outcome(Status::Rejected, Reason::NO_CHANNEL),
                0,
                0,
            )];
        }
        let bind_ref = self.next_id();
        let Ok(sign_ref) = SignRef::new(&self.next_ref('B')) else {
            return vec![];
        };
        let channel = decision.candidates.remove(0);
        let card = b.elements.card_no.expose();
        let pending = PendingBind {
            merchant,
            card_hash,
            id_hash: self.hasher.id(b.elements.id_no.expose()),
            card_last4: Digits::new(&card[card.len().saturating_sub(4)..]).unwrap_or_default(),
            bank: b.bank,
            card_type: b.card_type,
            channel,
            remaining: decision.candidates,
            sign_ref,
            expires_at_ms: now_ms + self.cfg.bind_ttl_ms,
            then_pay: b.then_pay,
            sms_sent: false,
            elements: Some(Box::new(b.elements)),
        };
        let msg = verify_message(&pending);
        self.binds.insert(bind_ref, pending);
        vec![Action::Dispatch(Dispatch {
            token: Token::Verify { bind_ref },
            channel,
            msg,
        })]
    }

    fn expire_binds(&self, now_ms: u64) {
        self.binds.retain(|_, b| b.expires_at_ms > now_ms);
    }

    fn verify_result(&self, bind_ref: u64, result: DispatchResult, now_ms: u64) -> Actions {
        let Some(mut b) = self.binds.get_mut(&bind_ref) else {
            return vec![];
        };
        let pay = b.then_pay.is_some();
        let answer = match result {
            DispatchResult::Answer(ch::Message::VerifyRsp(v)) if v.sign_ref == b.sign_ref => {
                Some(v)
            }
            DispatchResult::Answer(ch::Message::VerifyRsp(_)) | DispatchResult::Unknown => None,
            DispatchResult::Answer(m) => match m.result() {
                Some((_, RspClass::NotProcessed)) => return self.next_verify(b, bind_ref, pay),
                _ => None,
            },
            DispatchResult::NotSent => return self.next_verify(b, bind_ref, pay),
        };
        let Some(v) = answer else {
            drop(b);
            self.binds.remove(&bind_ref);
            return vec![Self::bind_reply(
                pay,
                reply_outcome(Status::Failed, Reason::OUTCOME_UNKNOWN),
                0,
                0,
            )];
        };
        match v.class {
            RspClass::Success if v.code.known() == Some(Code::ALREADY_SIGNED) => {
                let channel = b.channel;
                let pending = b.clone();
                drop(b);
                self.binds.remove(&bind_ref);
                let Ok(no) = AgreementNo::new(v.agreement_no.as_str()) else {
                    return vec![Self::bind_reply(
                        pay,
                        reply_outcome(Status::Failed, Reason::INTERNAL_ERROR),
                        0,
                        0,
                    )];
                };
                let (id, rec) = self.store_agreement(&pending, channel, no);
                // Already signed at the channel: answer ALREADY_SIGNED with the agreement
                // id; a sign-and-pay debits nothing (the lender sends a DEBIT_REQ).
                vec![
                    rec,
                    Self::bind_reply(
                        pending.then_pay.is_some(),
                        reply_outcome(Status::Success, Reason::ALREADY_SIGNED),
                        0,
                        id.0,
                    ),
                ]
            }
            RspClass::Success | RspClass::Processing => {
                b.sms_sent = true;
                b.elements = None;
                let status = if pay {
                    Status::Pending
                } else {
                    Status::Success
                };
                vec![Self::bind_reply(
                    pay,
                    reply_outcome(status, Reason::OK),
                    bind_ref,
                    0,
                )]
            }
            RspClass::NotProcessed => self.next_verify(b, bind_ref, pay),
            RspClass::Declined => {
                drop(b);
                self.binds.remove(&bind_ref);
                let mut o = reply_outcome(Status::Failed, Reason::CHANNEL_DECLINED);
                o.channel_code = code_text(v.code);
                let _ = now_ms;
                vec![Self::bind_reply(pay, o, 0, 0)]
            }
        }
    }

    fn next_verify(
        &self,
        mut b: dashmap::mapref::one::RefMut<'_, u64, PendingBind>,
        bind_ref: u64,
        pay: bool,
    ) -> Actions {
        if b.remaining.is_empty() || b.elements.is_none() {
            drop(b);
            self.binds.remove(&bind_ref);
            return vec![Self::bind_reply(
                pay,
                reply_outcome(Status::Rejected, Reason::NO_CHANNEL),
                0,
                0,
            )];
        }
        b.channel = b.remaining.remove(0);
        let msg = verify_message(&b);
        vec![Action::Dispatch(Dispatch {
            token: Token::Verify { bind_ref },
            channel: b.channel,
            msg,
        })]
    }

    fn store_agreement(
        &self,
        b: &PendingBind,
        channel: ChannelId,
        no: AgreementNo,
    ) -> (AgreementId, Action) {
        let mut a = Agreement {
            id: self.new_agreement_id(),
            merchant: b.merchant,
            card_hash: b.card_hash,
            id_hash: b.id_hash,
            card_last4: b.card_last4,
            bank: b.bank,
            card_type: b.card_type,
            cancelled: false,
            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
        };
        a.add_channel(ChannelAgreement {
            channel,
            agreement_no: no,
            state: ChannelAgreementState::Active,
        });
        let id = self.agreements.upsert(a);
        let stored = self.agreements.get(id).expect("just stored");
        (id, Action::Journal(Record::Agreement(Box::new(stored))))
    }

    /// BIND_CONFIRM_REQ.
    pub fn bind_confirm(
        &self,
        merchant: MerchantNo,
        req: &lm::BindConfirmReq,
        now_ms: u64,
    ) -> Actions {
        let bind_ref = req.bind_ref.0;
        let bad = || {
            vec![Action::Reply(
                lm::BindConfirmRsp {
                    result: reply_outcome(Status::Failed, Reason::BAD_SMS_CODE),
                    agreement_id: 0,
                    channel: ChannelId::empty(),
                }
                .into(),
            )]
        };
        let Some(b) = self.binds.get(&bind_ref) else {
            return bad();
        };
        if b.merchant != merchant || !b.sms_sent || b.expires_at_ms <= now_ms {
            return bad();
        }
        vec![Action::Dispatch(Dispatch {
            token: Token::Sign { bind_ref },
            channel: b.channel,
            msg: ch::SignReq {
                sign_ref: b.sign_ref,
                sms_code: req.sms_code,
            }
            .into(),
        })]
    }

    fn sign_result(&self, bind_ref: u64, result: DispatchResult, now_ms: u64) -> Actions {
        let Some(b) = self.binds.get(&bind_ref).map(|b| b.clone()) else {
            return vec![];
        };
        let fail = |status, reason, code: Option<RspCode>| {
            let mut o = reply_outcome(status, reason);
            if let Some(c) = code {
                o.channel_code = code_text(c);
            }
            vec![Action::Reply(
                lm::BindConfirmRsp {
                    result: o,
                    agreement_id: 0,
                    channel: b.channel,
                }
                .into(),
            )]
        };
        let s = match result {
            DispatchResult::Answer(ch::Message::SignRsp(s)) if s.sign_ref == b.sign_ref => s,
            DispatchResult::NotSent => return fail(Status::Failed, Reason::NO_CHANNEL, None),
            DispatchResult::Answer(m) => {
                return fail(
                    Status::Failed,
                    Reason::OUTCOME_UNKNOWN,
                    m.result().map(|r| r.0),
                )
            }
            DispatchResult::Unknown => return fail(Status::Failed, Reason::OUTCOME_UNKNOWN, None),
        };
        match s.class {
            RspClass::Success => {
                let Ok(no) = AgreementNo::new(s.agreement_no.as_str()) else {
                    return fail(Status::Failed, Reason::INTERNAL_ERROR, Some(s.code));
                };
                self.binds.remove(&bind_ref);
                let (id, rec) = self.store_agreement(&b, b.channel, no);
                let mut out = vec![
                    rec,
                    Action::Reply(
                        lm::BindConfirmRsp {
                            result: Outcome::ok(),
                            agreement_id: id.0,
                            channel: b.channel,
                        }
                        .into(),
                    ),
                ];
                if let Some((order_id, amount, purpose)) = b.then_pay {
                    // Sign-and-pay: the debit follows; its result is notified.
                    let req = lm::DebitReq {
                        order_id,
                        agreement_id: id,
                        amount: Fen(amount),
                        currency: Currency,
                        purpose,
                    };
                    out.extend(self.debit_inner(b.merchant, &req, now_ms, false));
                }
                out
            }
            RspClass::Declined => fail(Status::Failed, Reason::BAD_SMS_CODE, Some(s.code)),
            RspClass::NotProcessed => fail(Status::Failed, Reason::NO_CHANNEL, Some(s.code)),
            RspClass::Processing => fail(Status::Failed, Reason::OUTCOME_UNKNOWN, Some(s.code)),
        }
    }

    /// AGREEMENT_QUERY_REQ (read only).
    pub fn agreement_query(
        &self,
        merchant: MerchantNo,
        req: &lm::AgreementQueryReq,
    ) -> lm::Message {
        match self
            .agreements
            .get(req.agreement_id)
            .filter(|a| a.merchant == merchant)
        {
            Some(a) => {
                let mut active = a.active_channels().map(|c| c.channel);
                lm::AgreementQueryRsp {
                    result: Outcome::ok(),
                    agreement_id: a.id.0,
                    state: a.state() as u8,
                    card_type: a.card_type as u8,
                    bank_code: a.bank,
                    card_last4: a.card_last4,
                    primary_channel: active.next().unwrap_or_default(),
                    backup_channel: active.next().unwrap_or_default(),
                }
                .into()
            }
            None => lm::AgreementQueryRsp {
                result: reply_outcome(Status::Rejected, Reason::UNKNOWN_AGREEMENT),
                agreement_id: req.agreement_id.0,
                state: 0,
                card_type: 0,
                bank_code: BankCode::empty(),
                card_last4: Digits::empty(),
                primary_channel: ChannelId::empty(),
                backup_channel: ChannelId::empty(),
            }
            .into(),
        }
    }

    /// AGREEMENT_CANCEL_REQ: cancelled at sluice at once (no more debits), then unsigned on
    /// every channel.
    pub fn agreement_cancel(&self, merchant: MerchantNo, req: &lm::AgreementCancelReq) -> Actions {
        let id = req.agreement_id;
        let reply = |result| {
            Action::Reply(
                lm::AgreementCancelRsp {
                    result,
                    agreement_id: id.0,
                }
                .into(),
            )
        };
        let Some(a) = self.agreements.get(id).filter(|a| a.merchant == merchant) else {
            return vec![reply(reply_outcome(
                Status::Rejected,
                Reason::UNKNOWN_AGREEMENT,
            ))];
        };
        if a.cancelled {
            return vec![reply(Outcome::ok())];
        }
        let unsign: Vec<ChannelAgreement> = a.active_channels().copied().collect();
        let updated = self.agreements.update(id, |a| {
            a.cancelled = true;
            for c in a.channels.iter_mut().flatten() {
                if c.state == ChannelAgreementState::Active {
                    c.state = ChannelAgreementState::Cancelled;
                }
            }
            a.clone()
        });
        let mut out = Vec::new();
        if let Some(a) = updated {
            out.push(Action::Journal(Record::Agreement(Box::new(a))));
        }
        out.push(reply(Outcome::ok()));
        for c in unsign {
            out.push(Action::Dispatch(Dispatch {
                token: Token::Unsign { agreement: id },
                channel: c.channel,
                msg: ch::UnsignReq {
                    agreement_no: c.agreement_no,
                }
                .into(),
            }));
        }
        out
    }

    fn revocation(&self, channel: &ChannelId, no: &AgreementNo, now_ms: u64) -> Actions {
        let Some(id) = self.agreements.find_by_channel_no(channel, no) else {
            tracing::warn!(channel = %channel, "revocation for an unknown channel agreement");
            return vec![];
        };
        let changed = self.agreements.update(id, |a| {
            let mut changed = false;
            for c in a.channels.iter_mut().flatten() {
                if &c.channel == channel && c.state == ChannelAgreementState::Active {
                    c.state = ChannelAgreementState::Revoked;
                    changed = true;
                }
            }
            changed.then(|| a.clone())
        });
        let Some(Some(a)) = changed else {
            return vec![]; // already revoked: a repeated notice
        };
        let notify_id = self.next_id();
        let msg = lm::Notify {
            notify_id,
            kind: NotifyKind::AgreementRevoked,
            result: Outcome::ok(),
            order_id: Ascii::empty(),
            order_type: 0,
            amount: 0,
            agreement_id: id.0,
            channel: *channel,
            finished_at_ms: now_ms,
        };
        self.outbox.insert(
            notify_id,
            Outgoing {
                merchant: a.merchant,
                msg: msg.clone(),
                next_at_ms: now_ms + self.cfg.notify_retry_ms,
                sends: 1,
                durable: false,
            },
        );
        vec![
            Action::Journal(Record::Agreement(Box::new(a.clone()))),
            Action::Journal(Record::RevocationNotice {
                agreement: id,
                channel: *channel,
                notify_id,
            }),
            Action::Notify(Notification {
                merchant: a.merchant,
                msg,
            }),
        ]
    }
}

struct BindRequest {
    card_type: CardType,
    bank: BankCode,
    elements: Elements,
    then_pay: Option<(OrderId, u64, Purpose)>,
    /// Backup signing: add a channel to the card's existing agreement.
    backup: bool,
}

fn verify_message(b: &PendingBind) -> ch::Message {
    let e = b.elements.as_ref().expect("elements kept until verified");
    ch::VerifyReq {
        sign_ref: b.sign_ref,
        card_type: b.card_type,
        bank_code: b.bank,
        card_no: e.card_no,
        id_no: e.id_no,
        name: e.name,
        phone: e.phone,
    }
    .into()
}

fn order_type(kind: &OrderKind) -> OrderType {
    match kind {
        OrderKind::Debit { .. } => OrderType::Debit,
        OrderKind::Payout { .. } => OrderType::Payout,
    }
}

/// The response to a DEBIT_REQ or PAYOUT_REQ for an order.
fn order_reply(o: &Order, result: Outcome) -> lm::Message {
    kind_reply(&o.kind, &o.key, o.channel(), result)
}

fn facts_reply(key: &OrderKey, o: &Facts, result: Outcome) -> lm::Message {
    kind_reply(&o.kind, key, o.channel, result)
}

fn kind_reply(
    kind: &OrderKind,
    key: &OrderKey,
    channel: ChannelId,
    result: Outcome,
) -> lm::Message {
    match kind {
        OrderKind::Debit { .. } => lm::DebitRsp {
            result,
            order_id: key.1 .0,
            channel,
        }
        .into(),
        OrderKind::Payout { .. } => lm::PayoutRsp {
            result,
            order_id: key.1 .0,
            channel,
        }
        .into(),
    }
}

/// Classify a channel's answer to a PAY/PAYOUT attempt.
fn order_answer(m: &ch::Message, order_ref: &OrderRef) -> AttemptResult {
    match m {
        ch::Message::PayRsp(r) if &r.order_ref == order_ref => AttemptResult::Answered {
            class: r.class,
            code: r.code,
            serial: r.channel_serial,
        },
        ch::Message::PayoutRsp(r) if &r.order_ref == order_ref => AttemptResult::Answered {
            class: r.class,
            code: r.code,
            serial: r.channel_serial,
        },
        // A REJECT says the channel did nothing with the frame.
        ch::Message::Reject(r) if r.class == RspClass::NotProcessed => AttemptResult::Answered {
            class: r.class,
            code: r.code,
            serial: Serial::empty(),
        },
        // Anything else is not an answer about this attempt: the outcome stays unknown.
        _ => AttemptResult::Unknown,
    }
}
