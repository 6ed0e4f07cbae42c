//! The generator: persistent lender connections (the project's own [`Client`]), an
//! operation mix, open-loop pacing from a precomputed [`Schedule`] or a closed loop with
//! a window per connection, live progress, and the final [`Report`].
//!
//! Open loop: a pacer thread turns the schedule into a "sends due so far" count
//! (`std::thread::sleep` wakes within ~60 µs, tokio's timer only to 1 ms); `drivers`
//! tasks each own every `drivers`-th send and keep the calls in flight in a
//! `FuturesUnordered`, so a slow answer never delays a later send. Latency is measured
//! from the scheduled time of each send; the service time (from the moment the frame was
//! handed to the connection) is kept beside it to show any generator lag.
//!
//! Closed loop: one task per connection keeps `window` requests in flight; latency is
//! measured from each send. This finds saturation throughput; its latency is not the
//! latency a user at a given rate would see.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;
use sluice::client::{Client, ClientConfig, ClientError, Response};
use sluice::message::{self as lm, Envelope, Message, Reason, Status};
use sluice::wire::header::MerchantNo;
use tokio::sync::watch;

use crate::data;
use crate::report::{self, Report, Summary};
use crate::schedule::Schedule;

/// What the generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The switch: answers are checked and counted by status and reason.
    Sluice,
    /// A plain echo server (directly or through a TCP proxy): every frame comes back.
    Echo,
}

/// How sends are paced.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Send times fixed in advance.
    Open(Schedule),
    /// `window` requests in flight per connection; `warmup_s` not counted.
    Closed {
        /// Requests in flight per connection.
        window: usize,
        /// Seconds at the start not counted in the summary.
        warmup_s: f64,
    },
}

/// Lender operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// DEBIT_REQ on a prepared agreement.
    Debit,
    /// PAYOUT_REQ to a card.
    Payout,
    /// ORDER_QUERY_REQ of a recent order.
    Query,
    /// PREBIND_REQ + BIND_CONFIRM_REQ of a new card (deterministic SMS code).
    Sign,
}

/// Percentages of each operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Debit share.
    pub debit: u32,
    /// Payout share.
    pub payout: u32,
    /// Order query share.
    pub query: u32,
    /// Signing share.
    pub sign: u32,
}

impl Mix {
    /// Parse `debit=70,payout=10,query=15,sign=5` (shares must add up to 100).
    pub fn parse(s: &str) -> Result<Mix> {
        let mut m = Mix {
            debit: 0,
            payout: 0,
            query: 0,
            sign: 0,
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("mix part {part:?}: want op=percent"))?;
            let v: u32 = v.trim().parse().with_context(|| format!("mix {part:?}"))?;
            match k.trim() {
                "debit" => m.debit = v,
                "payout" => m.payout = v,
                "query" => m.query = v,
                "sign" => m.sign = v,
                other => bail!("unknown op {other:?} (debit, payout, query, sign)"),
            }
        }
        if m.debit + m.payout + m.query + m.sign != 100 {
            bail!("mix {s:?} does not add up to 100");
        }
        Ok(m)
    }

    /// The operation of send `i` (a hash of `i`, so the mix is the same in every run).
    pub fn pick(&self, i: u64) -> Op {
        let r = (splitmix(i) % 100) as u32;
        if r < self.debit {
            Op::Debit
        } else if r < self.debit + self.payout {
            Op::Payout
        } else if r < self.debit + self.payout + self.query {
            Op::Query
        } else {
            Op::Sign
        }
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (n, v) in [
            ("debit", self.debit),
            ("payout", self.payout),
            ("query", self.query),
            ("sign", self.sign),
        ] {
            if v > 0 {
                parts.push(format!("{n}={v}"));
            }
        }
        f.write_str(&parts.join(","))
    }
}

/// A well-mixed hash of `x` (SplitMix64).
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One merchant number and its key.
#[derive(Debug, Clone)]
pub struct MerchantKey {
    /// Merchant number.
    pub merchant: String,
    /// Key id.
    pub key_id: u16,
    /// Secret.
    pub secret: Vec<u8>,
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Label in the report.
    pub label: String,
    /// Address to drive.
    pub addr: SocketAddr,
    /// Switch or echo.
    pub target: Target,
    /// Pacing.
    pub mode: Mode,
    /// Persistent connections.
    pub connections: usize,
    /// Open loop: driver tasks.
    pub drivers: usize,
    /// Run length, including the ramp or warm-up.
    pub duration: Duration,
    /// Stop after this many sends (including the ramp).
    pub count: Option<u64>,
    /// Operation mix.
    pub mix: Mix,
    /// Merchants (connection `k` acts for merchant `k % len`).
    pub merchants: Vec<MerchantKey>,
    /// Prepared cards (agreements), card `i` belonging to merchant `i % merchants`.
    pub cards: u64,
    /// Agreement setup requests in flight per connection.
    pub setup_window: usize,
    /// Open loop: most calls in flight per connection; later sends wait (late, and
    /// measured from their scheduled time).
    pub inflight_per_conn: usize,
    /// A call unanswered after this long counts as an error.
    pub timeout: Duration,
    /// Debit and payout amount, fen.
    pub amount_fen: u64,
    /// Smallest pacer sleep, µs.
    pub tick_us: u64,
    /// Print a progress line every second.
    pub progress: bool,
    /// Where to write the interval histogram log (`None`: not written).
    pub hlog: Option<std::path::PathBuf>,
}

/// Answer classes counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Outcome(Status, Reason),
    Echoed(u8),
    Unexpected(u8),
    Timeout,
    Closed,
}

impl Key {
    fn name(self) -> String {
        match self {
            Key::Outcome(s, r) => format!("{}/{}", s.name(), r.name()),
            Key::Echoed(c) => format!("ECHOED/0x{c:02X}"),
            Key::Unexpected(c) => format!("UNEXPECTED/0x{c:02X}"),
            Key::Timeout => "ERROR/timeout".into(),
            Key::Closed => "ERROR/connection closed".into(),
        }
    }

    fn is_error(self) -> bool {
        matches!(self, Key::Timeout | Key::Closed)
    }
}

/// The result block of a response, if it has one.
pub fn outcome(msg: &Message) -> Option<lm::Outcome> {
    Some(match msg {
        Message::LogonRsp(m) => m.result,
        Message::PreBindRsp(m) => m.result,
        Message::BindConfirmRsp(m) => m.result,
        Message::SignAndPayRsp(m) => m.result,
        Message::AgreementQueryRsp(m) => m.result,
        Message::DebitRsp(m) => m.result,
        Message::PayoutRsp(m) => m.result,
        Message::OrderQueryRsp(m) => m.result,
        Message::Reject(m) => m.result,
        _ => return None,
    })
}

fn classify(target: Target, r: &Result<Response, ClientError>) -> Key {
    match r {
        Err(ClientError::Timeout(_)) => Key::Timeout,
        Err(_) => Key::Closed,
        Ok(r) => match (target, outcome(&r.msg)) {
            (Target::Echo, _) => Key::Echoed(r.msg.code()),
            (Target::Sluice, Some(o)) => Key::Outcome(o.status, o.reason),
            (Target::Sluice, None) => Key::Unexpected(r.msg.code()),
        },
    }
}

/// Measurements of one driver; locked per completion (uncontended) and once a second by
/// the progress loop.
struct Stats {
    latency: Histogram<u64>,
    service: Histogram<u64>,
    interval: Histogram<u64>,
    counts: HashMap<Key, u64>,
    completed: u64,
    /// Completions including the ramp (progress line).
    all_done: u64,
    errors: u64,
    last_done: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency: report::histogram(),
            service: report::histogram(),
            interval: report::histogram(),
            counts: HashMap::new(),
            completed: 0,
            all_done: 0,
            errors: 0,
            last_done: None,
        }
    }
}

/// One connection and whom it acts for.
struct Conn {
    client: Client,
    merchant: usize,
    next_request_id: AtomicU64,
    key_id: u16,
    merchant_no: MerchantNo,
}

impl Conn {
    async fn call(&self, msg: Message) -> Result<Response, ClientError> {
        let env = Envelope {
            request_id: self.next_request_id.fetch_add(1, Relaxed),
            timestamp_ms: sluice::app::now_ms(),
            key_id: self.key_id,
            merchant: self.merchant_no,
            flags: 0,
        };
        self.client.call_with(env, &msg).await
    }
}

/// Shared state of a run.
struct Ctx {
    cfg: RunConfig,
    conns: Vec<Conn>,
    /// Agreement ids per merchant (sluice target).
    agreements: Vec<Vec<u64>>,
    /// Most recent order id per merchant, for queries.
    recent: Vec<Mutex<Option<lm::OrderId>>>,
    run_tag: String,
    sign_base: u64,
    sent: AtomicU64,
}

impl Ctx {
    fn order_id(&self, i: u64) -> lm::OrderId {
        lm::OrderId::new(&format!("{}{i:x}", self.run_tag)).expect("order id fits 32 chars")
    }

    /// Remember an answered order of merchant `m` for later queries (a lender queries
    /// orders it has been told about).
    fn answered(&self, m: usize, order_id: lm::OrderId) {
        *self.recent[m].lock().unwrap_or_else(|e| e.into_inner()) = Some(order_id);
    }

    /// Build and carry out send `i` on connection `conn`.
    async fn op(&self, i: u64, conn: usize) -> Result<Response, ClientError> {
        let c = &self.conns[conn];
        let m = c.merchant;
        let amount = lm::Fen(self.cfg.amount_fen);
        let purpose = lm::Purpose::new("sluice-load").expect("purpose fits");
        match self.cfg.mix.pick(i) {
            Op::Debit => {
                let ids = &self.agreements[m];
                let agreement = if ids.is_empty() {
                    1 // echo mode or nothing prepared: any non-zero id
                } else {
                    ids[(splitmix(i ^ 0xD0) % ids.len() as u64) as usize]
                };
                let order_id = self.order_id(i);
                let r = c
                    .call(
                        lm::DebitReq {
                            order_id,
                            agreement_id: lm::AgreementId(agreement),
                            amount,
                            currency: lm::Currency,
                            purpose,
                        }
                        .into(),
                    )
                    .await;
                self.answered(m, order_id);
                r
            }
            Op::Payout => {
                let order_id = self.order_id(i);
                let n = splitmix(i ^ 0x9A) % self.cfg.cards.max(1);
                let r = c
                    .call(
                        lm::PayoutReq {
                            order_id,
                            amount,
                            currency: lm::Currency,
                            card_type: lm::CardType::Debit,
                            bank_code: lm::BankCode::new("ICBC").expect("bank code"),
                            card_no: lm::CardNo::new(&data::card_no(n)).expect("card"),
                            name: lm::Name::new("张三").expect("name"),
                            purpose,
                        }
                        .into(),
                    )
                    .await;
                self.answered(m, order_id);
                r
            }
            Op::Query => {
                let order_id = self.recent[m]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| self.order_id(u64::MAX));
                c.call(lm::OrderQueryReq { order_id }.into()).await
            }
            Op::Sign => {
                let n = self.sign_base + i;
                let r = c.call(data::prebind(n).into()).await?;
                let bind_ref = match (&r.msg, self.cfg.target) {
                    (Message::PreBindRsp(p), Target::Sluice)
                        if p.result.status == Status::Success && p.bind_ref != 0 =>
                    {
                        p.bind_ref
                    }
                    (_, Target::Echo) => 1,
                    _ => return Ok(r),
                };
                let code = data::phone(n);
                c.call(
                    lm::BindConfirmReq {
                        bind_ref: lm::BindRef(bind_ref),
                        sms_code: lm::SmsCode::new(&code[code.len() - 6..]).expect("code"),
                    }
                    .into(),
                )
                .await
            }
        }
    }
}

fn base36(mut n: u64) -> String {
    let mut s = Vec::new();
    while n > 0 {
        let d = (n % 36) as u8;
        s.push(if d < 10 { b'0' + d } else { b'A' + d - 10 });
        n /= 36;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

async fn connect(cfg: &RunConfig) -> Result<Vec<Conn>> {
    let base = sluice::app::now_ms() * 1000;
    let mut conns = Vec::with_capacity(cfg.connections);
    for k in 0..cfg.connections {
        let m = k % cfg.merchants.len();
        let mk = &cfg.merchants[m];
        let client = Client::connect(
            cfg.addr,
            ClientConfig {
                merchant: mk.merchant.clone(),
                key_id: mk.key_id,
                secret: mk.secret.clone(),
                auto_ack: true,
                timeout: cfg.timeout,
            },
        )
        .await
        .with_context(|| format!("connecting to {}", cfg.addr))?;
        let conn = Conn {
            client,
            merchant: m,
            // Disjoint request id ranges per connection: a merchant's connections never
            // reuse an id within the replay window.
            next_request_id: AtomicU64::new(base + ((k as u64) << 36)),
            key_id: mk.key_id,
            merchant_no: MerchantNo::new(&mk.merchant).unwrap_or_default(),
        };
        let r = conn
            .call(
                lm::LogonReq {
                    heartbeat_s: 0,
                    client_name: sluice::wire::field::Ascii::new("sluice-load").unwrap_or_default(),
                }
                .into(),
            )
            .await
            .with_context(|| format!("logon of connection {k}"))?;
        if cfg.target == Target::Sluice {
            match outcome(&r.msg) {
                Some(o) if o.status == Status::Success => {}
                other => bail!("logon of {} refused: {other:?}", mk.merchant),
            }
        }
        conns.push(conn);
    }
    Ok(conns)
}

/// Learn (or make) the agreement id of every prepared card: PREBIND answers
/// ALREADY_SIGNED with the id when the card was imported or signed before; otherwise the
/// simulator sends its deterministic SMS code (the phone's last six digits) and
/// BIND_CONFIRM signs it through the protocol.
async fn setup_agreements(ctx: &Ctx) -> Result<Vec<Vec<u64>>> {
    let m_count = ctx.cfg.merchants.len();
    let mut out = vec![Vec::new(); m_count];
    if ctx.cfg.target != Target::Sluice || ctx.cfg.cards == 0 {
        return Ok(out);
    }
    let t = Instant::now();
    let (mut already, mut signed, mut failed) = (0u64, 0u64, 0u64);
    // Connections of merchant m: every connection k with k % M == m.
    let conns_of: Vec<Vec<usize>> = (0..m_count)
        .map(|m| (0..ctx.conns.len()).filter(|k| k % m_count == m).collect())
        .collect();
    let window = ctx.cfg.setup_window * ctx.conns.len();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0u64;
    let mut first_failure: Option<String> = None;
    loop {
        while next < ctx.cfg.cards && inflight.len() < window {
            let n = next;
            let m = (n % m_count as u64) as usize;
            let ks = &conns_of[m];
            if ks.is_empty() {
                bail!(
                    "merchant {m} has no connection: use at least as many connections as merchants"
                );
            }
            let k = ks[((n / m_count as u64) % ks.len() as u64) as usize];
            let conn = &ctx.conns[k];
            inflight.push(async move {
                let r = conn.call(data::prebind(n).into()).await;
                let r = match r {
                    Ok(Response {
                        msg: Message::PreBindRsp(p),
                        ..
                    }) if p.result.reason == Reason::ALREADY_SIGNED => {
                        return (m, Ok((p.agreement_id, true)))
                    }
                    Ok(Response {
                        msg: Message::PreBindRsp(p),
                        ..
                    }) if p.result.status == Status::Success => p,
                    Ok(other) => return (m, Err(format!("pre-bind: {:?}", other.msg))),
                    Err(e) => return (m, Err(format!("pre-bind: {e}"))),
                };
                let code = data::phone(n);
                let c = conn
                    .call(
                        lm::BindConfirmReq {
                            bind_ref: lm::BindRef(r.bind_ref),
                            sms_code: lm::SmsCode::new(&code[code.len() - 6..]).expect("code"),
                        }
                        .into(),
                    )
                    .await;
                match c {
                    Ok(Response {
                        msg: Message::BindConfirmRsp(b),
                        ..
                    }) if b.result.status == Status::Success => (m, Ok((b.agreement_id, false))),
                    Ok(other) => (m, Err(format!("bind confirm: {:?}", other.msg))),
                    Err(e) => (m, Err(format!("bind confirm: {e}"))),
                }
            });
            next += 1;
        }
        match inflight.next().await {
            None => break,
            Some((m, Ok((id, was_signed)))) => {
                out[m].push(id);
                if was_signed {
                    already += 1;
                } else {
                    signed += 1;
                }
            }
            Some((_, Err(e))) => {
                failed += 1;
                first_failure.get_or_insert(e);
            }
        }
    }
    eprintln!(
        "setup: {} agreements in {:.1} s ({} already signed or imported, {} signed now with \
         the deterministic SMS code, {} failed{})",
        already + signed,
        t.elapsed().as_secs_f64(),
        already,
        signed,
        failed,
        first_failure
            .map(|e| format!("; first: {e}"))
            .unwrap_or_default()
    );
    if already + signed == 0 {
        bail!("no agreement could be set up");
    }
    Ok(out)
}

/// Run the load and return the report.
pub async fn run(cfg: RunConfig) -> Result<Report> {
    if cfg.merchants.is_empty() || cfg.connections == 0 {
        bail!("need at least one merchant and one connection");
    }
    let conns = connect(&cfg).await?;
    let now_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut ctx = Ctx {
        recent: (0..cfg.merchants.len()).map(|_| Mutex::new(None)).collect(),
        conns,
        agreements: Vec::new(),
        run_tag: format!("L{}-", base36(sluice::app::now_ms())),
        // New cards for signing: far above the prepared range, different in every run.
        sign_base: 500_000_000_000 + (now_s % 400_000) * 1_000_000,
        sent: AtomicU64::new(0),
        cfg,
    };
    ctx.agreements = setup_agreements(&ctx).await?;
    let ctx = Arc::new(ctx);
    let drivers = match ctx.cfg.mode {
        Mode::Open(_) => ctx.cfg.drivers.clamp(1, ctx.conns.len()),
        Mode::Closed { .. } => ctx.conns.len(),
    };
    let stats: Vec<Arc<Mutex<Stats>>> = (0..drivers)
        .map(|_| Arc::new(Mutex::new(Stats::new())))
        .collect();
    let start = Instant::now();
    let (measure_from, total) = match ctx.cfg.mode {
        Mode::Open(s) => {
            let mut total = s.total(ctx.cfg.duration);
            if let Some(c) = ctx.cfg.count {
                total = total.min(c);
            }
            (Duration::from_secs_f64(s.ramp_s), total)
        }
        Mode::Closed { warmup_s, .. } => (
            Duration::from_secs_f64(warmup_s),
            ctx.cfg.count.unwrap_or(u64::MAX),
        ),
    };
    let done = tokio_util_like_flag();
    let progress = tokio::spawn(progress_loop(
        ctx.clone(),
        stats.clone(),
        start,
        total,
        done.clone(),
    ));
    let mut tasks = Vec::new();
    match ctx.cfg.mode {
        Mode::Open(schedule) => {
            let (tx, rx) = watch::channel(0u64);
            let tick = Duration::from_micros(ctx.cfg.tick_us.max(1));
            let pacer = std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || pace(schedule, start, total, tick, tx))?;
            for (d, st) in stats.iter().enumerate() {
                tasks.push(tokio::spawn(open_driver(
                    ctx.clone(),
                    d,
                    drivers,
                    schedule,
                    start,
                    total,
                    rx.clone(),
                    st.clone(),
                )));
            }
            drop(rx);
            for t in tasks.drain(..) {
                t.await?;
            }
            let _ = pacer.join();
        }
        Mode::Closed { window, .. } => {
            let next = Arc::new(AtomicU64::new(0));
            let deadline = start + ctx.cfg.duration;
            for (k, st) in stats.iter().enumerate() {
                tasks.push(tokio::spawn(closed_driver(
                    ctx.clone(),
                    k,
                    window,
                    start + measure_from,
                    deadline,
                    total,
                    next.clone(),
                    st.clone(),
                )));
            }
            for t in tasks.drain(..) {
                t.await?;
            }
        }
    }
    done.store(1, Relaxed);
    progress.await??;
    Ok(build_report(&ctx, &stats, start + measure_from))
}

fn tokio_util_like_flag() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(0))
}

/// Publish the number of sends due, sleeping between sends (at least `tick`).
fn pace(schedule: Schedule, start: Instant, total: u64, tick: Duration, tx: watch::Sender<u64>) {
    let mut last = 0;
    loop {
        let due = schedule.due(start.elapsed()).min(total);
        if due != last {
            last = due;
            tx.send_replace(due);
        }
        if due >= total {
            return;
        }
        let next_at = start + schedule.offset(due);
        let now = Instant::now();
        if next_at > now {
            std::thread::sleep((next_at - now).max(tick));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open_driver(
    ctx: Arc<Ctx>,
    d: usize,
    drivers: usize,
    schedule: Schedule,
    start: Instant,
    total: u64,
    mut due_rx: watch::Receiver<u64>,
    stats: Arc<Mutex<Stats>>,
) {
    // This driver's connections: k ≡ d (mod drivers).
    let mine: Vec<usize> = (d..ctx.conns.len()).step_by(drivers).collect();
    let mut next = d as u64;
    let mut rr = 0usize;
    let mut inflight = FuturesUnordered::new();
    let mut pacer_open = true;
    let mut due = 0u64;
    // Calls in flight are bounded: past the bound, sends wait in the generator (their
    // latency still counts from the scheduled time), instead of piling up timers and
    // queued frames that would slow the generator itself.
    let cap = ctx.cfg.inflight_per_conn.max(1) * mine.len();
    loop {
        while next < due && inflight.len() < cap {
            let i = next;
            next += drivers as u64;
            let conn = mine[rr % mine.len()];
            rr += 1;
            let scheduled = start + schedule.offset(i);
            let ctx = ctx.clone();
            ctx.sent.fetch_add(1, Relaxed);
            inflight.push(async move {
                let sent_at = Instant::now();
                let r = ctx.op(i, conn).await;
                (i, scheduled, sent_at, r)
            });
        }
        if next >= total && inflight.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some((i, scheduled, sent_at, r)) = inflight.next(), if !inflight.is_empty() => {
                let ramp = schedule.in_ramp(i);
                complete(&ctx, &stats, scheduled, sent_at, ramp, r);
            }
            changed = due_rx.changed(), if pacer_open => {
                if changed.is_err() {
                    pacer_open = false;
                }
                due = *due_rx.borrow_and_update();
            }
            else => break,
        }
    }
}

fn complete(
    ctx: &Ctx,
    stats: &Mutex<Stats>,
    scheduled: Instant,
    sent_at: Instant,
    in_ramp: bool,
    r: Result<Response, ClientError>,
) {
    let now = Instant::now();
    let key = classify(ctx.cfg.target, &r);
    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
    let lat = now.saturating_duration_since(scheduled).as_nanos() as u64;
    report::record(&mut s.interval, lat);
    s.all_done += 1;
    if in_ramp {
        return;
    }
    report::record(&mut s.latency, lat);
    report::record(
        &mut s.service,
        now.saturating_duration_since(sent_at).as_nanos() as u64,
    );
    *s.counts.entry(key).or_insert(0) += 1;
    s.completed += 1;
    if key.is_error() {
        s.errors += 1;
    }
    s.last_done = Some(now);
}

#[allow(clippy::too_many_arguments)]
async fn closed_driver(
    ctx: Arc<Ctx>,
    conn: usize,
    window: usize,
    measure_from: Instant,
    deadline: Instant,
    total: u64,
    next: Arc<AtomicU64>,
    stats: Arc<Mutex<Stats>>,
) {
    let mut inflight = FuturesUnordered::new();
    let issue = |inflight: &mut FuturesUnordered<_>| {
        if Instant::now() >= deadline {
            return false;
        }
        let i = next.fetch_add(1, Relaxed);
        if i >= total {
            return false;
        }
        let ctx = ctx.clone();
        ctx.sent.fetch_add(1, Relaxed);
        inflight.push(async move {
            let sent_at = Instant::now();
            let r = ctx.op(i, conn).await;
            (sent_at, r)
        });
        true
    };
    for _ in 0..window {
        if !issue(&mut inflight) {
            break;
        }
    }
    while let Some((sent_at, r)) = inflight.next().await {
        complete(&ctx, &stats, sent_at, sent_at, sent_at < measure_from, r);
        issue(&mut inflight);
    }
}

async fn progress_loop(
    ctx: Arc<Ctx>,
    stats: Vec<Arc<Mutex<Stats>>>,
    start: Instant,
    total: u64,
    done: Arc<AtomicU64>,
) -> Result<()> {
    let mut log_file = match &ctx.cfg.hlog {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut ser = V2Serializer::new();
    let mut writer = match log_file.as_mut() {
        Some(f) => Some(
            IntervalLogWriterBuilder::new()
                .with_start_time(SystemTime::now())
                .with_base_time(SystemTime::now())
                .begin_log_with(f, &mut ser)
                .map_err(|e| anyhow::anyhow!("hlog: {e:?}"))?,
        ),
        None => None,
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let dur = ctx.cfg.duration.as_secs_f64();
    let mut last = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        let finished = tokio::select! {
            _ = tick.tick() => false,
            _ = wait_flag(&done) => true,
        };
        let mut iv = report::histogram();
        let (mut completed, mut errors) = (0u64, 0u64);
        for s in &stats {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = iv.add(&s.interval);
            s.interval.reset();
            completed += s.all_done;
            errors += s.errors;
        }
        let now = Instant::now();
        let dt = now.duration_since(last);
        let iv_start = last.duration_since(start);
        last = now;
        if let Some(w) = writer.as_mut() {
            w.write_histogram(&iv, iv_start, dt, Tag::new("latency"))
                .map_err(|e| anyhow::anyhow!("hlog: {e:?}"))?;
        }
        if ctx.cfg.progress {
            let el = now.duration_since(start).as_secs_f64();
            let frac = if total != u64::MAX && total > 0 {
                (ctx.sent.load(Relaxed) as f64 / total as f64).min(1.0)
            } else {
                (el / dur).min(1.0)
            };
            let filled = (frac * 30.0) as usize;
            let line = format!(
                "[{}{}] {:>5.1}s  rate {:>9}/s  p99 {:>9.2} ms  in flight {:>7}  done {}  errors {}",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                el,
                report::grouped((iv.len() as f64 / dt.as_secs_f64().max(1e-9)) as u64),
                iv.value_at_quantile(0.99) as f64 / 1e6,
                ctx.sent.load(Relaxed).saturating_sub(completed),
                report::grouped(completed),
                errors
            );
            let mut e = std::io::stderr().lock();
            if tty {
                let _ = write!(e, "\r{line}");
            } else {
                let _ = writeln!(e, "{line}");
            }
        }
        if finished {
            if ctx.cfg.progress && tty {
                eprintln!();
            }
            break;
        }
    }
    drop(writer);
    if let Some(mut f) = log_file {
        f.flush()?;
    }
    Ok(())
}

async fn wait_flag(flag: &AtomicU64) {
    while flag.load(Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn build_report(ctx: &Ctx, stats: &[Arc<Mutex<Stats>>], measure_from: Instant) -> Report {
    let mut lat = report::histogram();
    let mut svc = report::histogram();
    let mut counts: HashMap<Key, u64> = HashMap::new();
    let (mut completed, mut errors) = (0u64, 0u64);
    let mut last_done = measure_from;
    for s in stats {
        let s = s.lock().unwrap_or_else(|e| e.into_inner());
        let _ = lat.add(&s.latency);
        let _ = svc.add(&s.service);
        for (k, v) in &s.counts {
            *counts.entry(*k).or_insert(0) += v;
        }
        completed += s.completed;
        errors += s.errors;
        if let Some(t) = s.last_done {
            last_done = last_done.max(t);
        }
    }
    let measured_s = last_done.duration_since(measure_from).as_secs_f64();
    let answered = completed - errors;
    let (mode, rate, ramp, window) = match ctx.cfg.mode {
        Mode::Open(s) => ("open", s.rate_per_s, s.ramp_s, 0),
        Mode::Closed { window, warmup_s } => ("closed", 0.0, warmup_s, window),
    };
    Report {
        label: ctx.cfg.label.clone(),
        target: match ctx.cfg.target {
            Target::Sluice => "sluice".into(),
            Target::Echo => "echo".into(),
        },
        addr: ctx.cfg.addr.to_string(),
        mode: mode.into(),
        connections: ctx.conns.len(),
        window,
        rate_per_s: rate,
        ramp_s: ramp,
        measured_s,
        mix: ctx.cfg.mix.to_string(),
        merchants: ctx.cfg.merchants.len(),
        sent: completed,
        completed: answered,
        errors,
        throughput_per_s: if measured_s > 0.0 {
            answered as f64 / measured_s
        } else {
            0.0
        },
        latency_us: Summary::of(&lat),
        service_us: Summary::of(&svc),
        counts: counts.into_iter().map(|(k, v)| (k.name(), v)).collect(),
        curve: report::curve(&lat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_picks_in_proportion() {
        let m = Mix::parse("debit=70,payout=10,query=15,sign=5").unwrap();
        assert_eq!(m.to_string(), "debit=70,payout=10,query=15,sign=5");
        let mut n = [0u32; 4];
        for i in 0..100_000 {
            n[m.pick(i) as usize] += 1;
        }
        for (got, want) in n.iter().zip([70_000, 10_000, 15_000, 5_000]) {
            assert!((*got as i64 - want).abs() < 1_000, "{n:?}");
        }
        assert!(Mix::parse("debit=50").is_err());
        assert!(Mix::parse("refund=100").is_err());
        assert_eq!(Mix::parse("debit=100").unwrap().pick(12345), Op::Debit);
    }

    #[test]
    fn order_tags_fit_the_order_id_field() {
        let tag = format!("L{}-", base36(u64::MAX / 1000));
        assert!(lm::OrderId::new(&format!("{tag}{:x}", u64::MAX)).is_ok());
    }
}
