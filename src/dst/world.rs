//! The simulated world and its event loop.
//!
//! Everything the real shell (`app.rs`) does with the engine's actions happens here
//! against simulated parts: a record is appended to the in-memory journal and the task
//! that emitted it waits for the next fsync; a dispatch crosses the lossy network to a
//! bank and its answer (or a timeout, or a disconnect) comes back later; replies and
//! notifications cross the network to the lenders. Each lender request, channel
//! notification and due query is its own task, as in the real shell.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt::Write as _;

use super::channel::{ChannelProfile, SimChannel};
use super::journal::SimJournal;
use super::oracle::{Oracle, Violation};
use super::{Failure, Options, Sabotage, Summary};
use crate::channel::message::{self as ch, AgreementNo, OrderRef};
use crate::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use crate::engine::order::{OrderKey, Phase};
use crate::engine::{
    Action, ChannelConfig, ChannelTable, DispatchResult, Engine, EngineConfig, Notification,
    Record, Token,
};
use crate::message::{
    self as lm, AgreementId, BankCode, BindMode, BindRef, CardNo, CardType, ChannelId, Currency,
    Fen, IdNo, Name, NotifyKind, OrderId, Purpose, SmsCode, Status,
};
use crate::sim::rng::Rng;
use crate::wire::field::{Ascii, Digits};
use crate::wire::header::MerchantNo;

/// Virtual clock start: 2026-11-23 02:00 UTC (wire timestamps look real).
const T0_MS: u64 = 1_795_399_200_000;
/// Channel request deadline (the pool's `deadline`).
const DEADLINE_MS: u64 = 5_000;
/// Idempotency retention passed to recovery: longer than any run, so nothing is evicted.
const RETENTION_MS: u64 = 30 * 86_400_000;
/// Synthetic resident ID numbers count up from this (region 110105, born 1949-12-31).
const ID_BASE: u64 = 11_010_519_491_231_000;
/// PII key of the simulated switch.
const PII_SECRET: [u8; 32] = [42; 32];

/// A lender request.
#[derive(Debug, Clone)]
enum LReq {
    Debit(lm::DebitReq),
    Payout(lm::PayoutReq),
    Query(lm::OrderQueryReq),
    PreBind(lm::PreBindReq),
    SignAndPay(lm::SignAndPayReq),
    Confirm(lm::BindConfirmReq),
}

#[derive(Debug)]
enum Ev {
    LenderTick(usize),
    LenderSend(usize, LReq),
    LenderArrive(usize, u64, LReq),
    ReplyArrive(usize, u64, lm::Message),
    NotifyArrive(usize, lm::Notify),
    AckArrive(usize, u64),
    LenderLink(usize, bool),
    ChanArrive {
        c: usize,
        did: u64,
        inc: u32,
        gen: u64,
        msg: ch::Message,
    },
    ChanReply {
        c: usize,
        did: u64,
        inc: u32,
        gen: u64,
        msg: ch::Message,
    },
    DispatchTimeout(u32, u64),
    BankFinal(usize, OrderRef),
    ChanNotify {
        c: usize,
        inc: u32,
        gen: u64,
        msg: ch::Message,
    },
    ChanLink(usize, bool),
    Fsync(u32),
    QueryDue(u32, OrderKey, OrderRef),
    NotifyTick(u32),
    Revoke,
    Snapshot,
    Crash,
    Restart,
    Settle,
    SettleCheck,
}

struct Sched {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, sequence): earliest first, ties in scheduling order.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Actions of one event still to carry out (the real shell's `execute` loop).
struct Task {
    actions: VecDeque<Action>,
    reply: Option<(usize, u64)>,
}

struct InFlight {
    task: Task,
    token: Token,
    c: usize,
}

#[derive(Debug, Clone)]
struct LOrder {
    req: LReq,
    final_seen: Option<Status>,
}

struct Lender {
    no: MerchantNo,
    up: bool,
    agreements: Vec<AgreementId>,
    orders: BTreeMap<String, LOrder>,
    outstanding: BTreeMap<u64, LReq>,
    next_order: u64,
}

/// The fault mix of one seed.
#[derive(Debug, Clone)]
struct Faults {
    loss: f64,
    delay_max_ms: u64,
    spike: f64,
    notify_copies_max: u64,
    fsync_max_ms: u64,
    chan_flap_ms: Option<u64>,
    lender_flap_ms: Option<u64>,
    crashes: u64,
    restart_max_ms: u64,
    tick_mean_ms: u64,
    snapshot_every_ms: Option<u64>,
    /// The engine's detail window: final orders older than this are settled (compact)
    /// at every notification tick. Drawn from its own stream of the seed, so the rest of
    /// a seed's run is what it was before settling existed, and the lender must see no
    /// difference.
    settle_after_ms: u64,
    /// Most final orders kept in full detail (`EngineConfig::detailed_final_max`); past
    /// it the oldest settle early. Drawn from a stream of its own, as the window is.
    detailed_final_max: usize,
}

struct World {
    seed: u64,
    opts: Options,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Sched>,
    step: u64,
    trace: VecDeque<String>,
    hash: u64,
    f: Faults,
    settling: bool,
    engine: Option<Engine>,
    inc: u32,
    journal: SimJournal,
    waiting: Vec<(u64, Record, Task)>,
    fsync_pending: bool,
    /// A crash waits for the next journal append (lands inside an fsync window).
    crash_armed: bool,
    /// Directory for snapshot files (created at the first snapshot, removed at drop).
    snap_dir: Option<std::path::PathBuf>,
    /// The newest published snapshot and the LSN replay starts from.
    snapshot: Option<(std::path::PathBuf, u64)>,
    inflight: BTreeMap<u64, InFlight>,
    next_did: u64,
    chans: Vec<SimChannel>,
    chan_ids: Vec<ChannelId>,
    link_up: Vec<bool>,
    link_gen: Vec<u64>,
    bank_notify_seq: u64,
    preloaded: Vec<(usize, String)>,
    lenders: Vec<Lender>,
    next_req: u64,
    card_seq: u64,
    oracle: Oracle,
    sum: Summary,
}

/// Settled orders per chunk file in the simulation (4096 in the switch).
const SETTLED_CHUNK: usize = 16;

impl Drop for World {
    fn drop(&mut self) {
        if let Some(d) = &self.snap_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Run one seed: Ok with what happened, or the first broken invariant.
pub fn run_seed(seed: u64, opts: &Options) -> Result<Summary, Failure> {
    let mut w = World::new(seed, opts.clone());
    w.run()
}

fn fnv(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

fn reply_status(m: &lm::Message) -> Option<(Status, lm::Reason)> {
    let r = match m {
        lm::Message::DebitRsp(r) => r.result,
        lm::Message::PayoutRsp(r) => r.result,
        lm::Message::OrderQueryRsp(r) => r.result,
        lm::Message::PreBindRsp(r) => r.result,
        lm::Message::BindConfirmRsp(r) => r.result,
        lm::Message::SignAndPayRsp(r) => r.result,
        _ => return None,
    };
    Some((r.status, r.reason))
}

/// A Luhn-valid 16-digit card number from a counter.
fn card_number(n: u64) -> String {
    let body = format!("622202{:09}", n % 1_000_000_000);
    let digits: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut d = *d as u32;
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    format!("{body}{}", (10 - sum % 10) % 10)
}

fn engine_config(inc: u32, settle_after_ms: u64, detailed_final_max: usize) -> EngineConfig {
    EngineConfig {
        // Unique per start, as `main.rs` derives it from the start time.
        ref_prefix: format!("R{inc}"),
        settle_after_ms,
        detailed_final_max,
        ..EngineConfig::default()
    }
}

impl World {
    fn new(seed: u64, opts: Options) -> World {
        let mut rng = Rng::new(seed);
        let faults = opts.faults;
        let pick = |rng: &mut Rng, v: &[u64]| v[rng.below(v.len() as u64) as usize];
        let f = Faults {
            loss: if faults {
                [0.0, 0.01, 0.05, 0.15][rng.below(4) as usize]
            } else {
                0.0
            },
            delay_max_ms: pick(&mut rng, &[5, 50, 300, 2_000]),
            spike: if faults { 0.02 } else { 0.0 },
            notify_copies_max: if faults {
                pick(&mut rng, &[1, 2, 4])
            } else {
                1
            },
            fsync_max_ms: pick(&mut rng, &[1, 5, 30, 200]),
            chan_flap_ms: (faults && rng.chance(0.6)).then(|| pick(&mut rng, &[2_000, 8_000])),
            lender_flap_ms: (faults && rng.chance(0.5)).then(|| pick(&mut rng, &[3_000, 10_000])),
            crashes: if faults { rng.below(4) } else { 0 },
            restart_max_ms: pick(&mut rng, &[100, 3_000, 40_000]),
            tick_mean_ms: pick(&mut rng, &[100, 300, 800]),
            snapshot_every_ms: rng.chance(0.5).then(|| pick(&mut rng, &[2_000, 7_000])),
            settle_after_ms: {
                let mut own = Rng::new(seed ^ 0x5e77_1ed0_5e77_1ed0);
                pick(
                    &mut own,
                    &[0, 500, 3_000, crate::engine::SETTLE_AFTER_MS_DEFAULT],
                )
            },
            detailed_final_max: {
                let mut own = Rng::new(seed ^ 0xde7a_11ed_de7a_11ed);
                [0, 5, 40, crate::engine::DETAILED_FINAL_MAX_DEFAULT][own.below(4) as usize]
            },
        };
        let nch = 2 + rng.below(2) as usize;
        let mut chans = Vec::new();
        let mut chan_ids = Vec::new();
        for c in 0..nch {
            let p = ChannelProfile {
                not_processed: [0.0, 0.05, 0.3][rng.below(3) as usize],
                decline: [0.0, 0.1, 0.3][rng.below(3) as usize],
                asynchronous: [0.0, 0.3, 0.8][rng.below(3) as usize],
            };
            chans.push(SimChannel::new(p));
            chan_ids.push(ChannelId::new(&format!("CH{c}")).expect("channel id"));
        }
        let nl = 2 + rng.below(2) as usize;
        let lenders = (0..nl)
            .map(|m| Lender {
                no: MerchantNo::new(&format!("89810000000000{m}")).expect("merchant"),
                up: true,
                agreements: Vec::new(),
                orders: BTreeMap::new(),
                outstanding: BTreeMap::new(),
                next_order: 1,
            })
            .collect();
        let mut w = World {
            seed,
            opts,
            rng,
            now: T0_MS,
            seq: 0,
            queue: BinaryHeap::new(),
            step: 0,
            trace: VecDeque::new(),
            hash: 0xcbf2_9ce4_8422_2325,
            f,
            settling: false,
            engine: None,
            inc: 0,
            journal: SimJournal::default(),
            waiting: Vec::new(),
            fsync_pending: false,
            crash_armed: false,
            snap_dir: None,
            snapshot: None,
            inflight: BTreeMap::new(),
            next_did: 1,
            link_up: vec![true; nch],
            link_gen: vec![0; nch],
            chans,
            chan_ids,
            bank_notify_seq: 1,
            preloaded: Vec::new(),
            lenders,
            next_req: 1,
            card_seq: seed.wrapping_mul(7919) % 100_000_000,
            oracle: Oracle::default(),
            sum: Summary {
                seed,
                ..Summary::default()
            },
        };
        w.sum.seed = seed;
        w
    }

    fn table(&self) -> ChannelTable {
        ChannelTable {
            channels: self
                .chan_ids
                .iter()
                .map(|c| ChannelConfig::open(c.as_str()))
                .collect(),
        }
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Sched {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, d: u64, ev: Ev) {
        self.at(self.now + d, ev)
    }

    fn faulty(&self) -> bool {
        self.opts.faults && !self.settling
    }

    fn lost(&mut self) -> bool {
        let lost = self.faulty() && self.rng.chance(self.f.loss);
        self.sum.lost += lost as u64;
        lost
    }

    fn delay(&mut self) -> u64 {
        let mut d = 1 + self.rng.below(self.f.delay_max_ms);
        if self.faulty() && self.rng.chance(self.f.spike) {
            d += self.rng.below(3_000);
        }
        d
    }

    fn note(&mut self, line: String) {
        self.hash = fnv(self.hash, line.as_bytes());
        if self.opts.verbose {
            println!("{line}");
        }
        if self.trace.len() >= self.opts.trace_tail.max(1) {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn fail(&self, v: Violation) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            at_ms: self.now - T0_MS,
            invariant: v.0,
            detail: v.1,
            trace_tail: self.trace.iter().cloned().collect(),
        }
    }

    // ----- setup ---------------------------------------------------------------------

    fn setup(&mut self) {
        let e = self
            .new_engine()
            .expect("the simulation's directory can be created");
        // Stock agreements, as `sluice import` would journal them.
        for m in 0..self.lenders.len() {
            for i in 0..3u64 {
                self.card_seq += 1;
                let card = card_number(self.card_seq);
                let id_no = format!("{:017}X", ID_BASE + self.card_seq);
                let mut a = Agreement {
                    id: e.new_agreement_id(),
                    merchant: self.lenders[m].no,
                    card_hash: e.hasher().card(&card),
                    id_hash: e.hasher().id(&id_no),
                    card_last4: Digits::new(&card[card.len() - 4..]).expect("digits"),
                    bank: BankCode::new("ICBC").expect("bank"),
                    card_type: CardType::Debit,
                    cancelled: false,
                    channels: [None; CHANNELS_PER_AGREEMENT_MAX],
                };
                let n_on = 1 + self.rng.below(self.chans.len() as u64) as usize;
                let first = self.rng.below(self.chans.len() as u64) as usize;
                for k in 0..n_on {
                    let c = (first + k) % self.chans.len();
                    let no = format!("PRE{m}X{i}X{c}X{}", self.card_seq);
                    self.chans[c]
                        .bank
                        .preload(&no, &card, &id_no, "ICBC", CardType::Debit);
                    self.preloaded.push((c, no.clone()));
                    a.add_channel(ChannelAgreement {
                        channel: self.chan_ids[c],
                        agreement_no: AgreementNo::new(&no).expect("agreement no"),
                        state: ChannelAgreementState::Active,
                    });
                }
                let id = e.agreements().upsert(a);
                let stored = e.agreements().get(id).expect("stored");
                let rec = Record::Agreement(Box::new(stored));
                self.append(&rec);
                self.lenders[m].agreements.push(id);
            }
        }
        self.journal.sync();
        self.engine = Some(e);
        let traffic_end = self.now + self.opts.traffic_ms;
        for m in 0..self.lenders.len() {
            let d = self.rng.below(100);
            self.after(d, Ev::LenderTick(m));
            if let Some(p) = self.f.lender_flap_ms {
                let d = self.rng.below(2 * p);
                self.after(d, Ev::LenderLink(m, false));
            }
        }
        for c in 0..self.chans.len() {
            if let Some(p) = self.f.chan_flap_ms {
                let d = self.rng.below(2 * p);
                self.after(d, Ev::ChanLink(c, false));
            }
        }
        for _ in 0..self.rng.below(3) {
            let d = self.rng.below(self.opts.traffic_ms.max(1));
            self.after(d, Ev::Revoke);
        }
        for _ in 0..self.f.crashes {
            let d = self.rng.below(self.opts.traffic_ms.max(1));
            self.after(d, Ev::Crash);
        }
        if let Some(p) = self.f.snapshot_every_ms {
            let d = self.rng.below(p);
            self.after(d, Ev::Snapshot);
        }
        self.after(1_000, Ev::NotifyTick(self.inc));
        self.at(traffic_end, Ev::Settle);
    }

    fn append(&mut self, r: &Record) -> u64 {
        let lsn = self.journal.append(r);
        self.oracle.index(lsn, r);
        lsn
    }

    // ----- the loop ------------------------------------------------------------------

    fn run(&mut self) -> Result<Summary, Failure> {
        self.setup();
        let end = T0_MS + self.opts.traffic_ms + self.opts.settle_ms;
        while let Some(s) = self.queue.pop() {
            if s.at > end {
                return Err(self.fail(("settled", self.unsettled())));
            }
            self.now = s.at;
            self.step += 1;
            if self.step > self.opts.steps_max {
                return Err(self.fail(("steps", "step limit reached (livelock?)".into())));
            }
            let done = matches!(s.ev, Ev::SettleCheck) && self.settled();
            self.handle(s.ev).map_err(|v| self.fail(v))?;
            self.oracle
                .check_dirty(&self.chans)
                .map_err(|v| self.fail(v))?;
            if done {
                let lenders = &self.lenders;
                let seen = |k: &OrderKey| -> Option<Status> {
                    let l = lenders.iter().find(|l| l.no == k.0)?;
                    l.orders.get(k.1 .0.as_str())?.final_seen
                };
                self.oracle
                    .check_end(&self.chans, &seen)
                    .map_err(|v| self.fail(v))?;
                return Ok(self.summary());
            }
        }
        Err(self.fail(("settled", "event queue ran dry".into())))
    }

    fn summary(&mut self) -> Summary {
        let (acked, ok, failed) = self.oracle.counts();
        self.sum.steps = self.step;
        self.sum.virtual_ms = self.now - T0_MS;
        self.sum.trace_hash = self.hash;
        self.sum.orders_acked = acked;
        self.sum.orders_success = ok;
        self.sum.orders_failed = failed;
        self.sum.ledger_entries = self.chans.iter().map(|c| c.bank.ledger.len() as u64).sum();
        self.sum.clone()
    }

    fn settled(&self) -> bool {
        let Some(e) = &self.engine else {
            return false;
        };
        if !self.waiting.is_empty() || !self.inflight.is_empty() || e.outbox_len() != 0 {
            return false;
        }
        let mut all_final = true;
        e.visit_for_snapshot(|_| {}, |o| all_final &= o.phase == Phase::Final, |_, _| {})
            .expect("the simulation's settled chunk files are readable");
        all_final
            && self.chans.iter().all(|c| {
                c.bank
                    .ledger
                    .snapshot()
                    .iter()
                    .all(|e| e.finished_at_ms() > 0)
            })
    }

    fn unsettled(&self) -> String {
        let mut s = String::new();
        match &self.engine {
            None => s.push_str("switch down; "),
            Some(e) => {
                let _ = write!(s, "outbox {}; ", e.outbox_len());
                e.visit_for_snapshot(
                    |_| {},
                    |o| {
                        if o.phase != Phase::Final {
                            let _ = write!(
                                s,
                                "order {}/{} {:?} attempts {:?}; ",
                                o.key.0.as_str(),
                                o.key.1 .0.as_str(),
                                o.phase,
                                o.attempts
                            );
                        }
                    },
                    |_, _| {},
                )
                .expect("the simulation's settled chunk files are readable");
            }
        }
        let _ = write!(
            s,
            "journal waits {}, in flight {}",
            self.waiting.len(),
            self.inflight.len()
        );
        s
    }

    fn handle(&mut self, ev: Ev) -> Result<(), Violation> {
        match ev {
            Ev::LenderTick(m) => {
                if !self.settling {
                    if self.lenders[m].up {
                        self.lender_act(m);
                    }
                    let d = 1 + self.rng.below(2 * self.f.tick_mean_ms);
                    self.after(d, Ev::LenderTick(m));
                }
                Ok(())
            }
            Ev::LenderSend(m, req) => {
                self.send(m, req);
                Ok(())
            }
            Ev::LenderArrive(m, req_id, req) => self.lender_arrive(m, req_id, req),
            Ev::ReplyArrive(m, req_id, msg) => {
                self.reply_arrive(m, req_id, msg);
                Ok(())
            }
            Ev::NotifyArrive(m, n) => {
                self.note(format!(
                    "t={} lender{m} <- notify id={} {} {:?}",
                    self.now - T0_MS,
                    n.notify_id,
                    n.order_id.as_str(),
                    n.result.status
                ));
                if n.kind == NotifyKind::OrderFinal {
                    if let Some(o) = self.lenders[m].orders.get_mut(n.order_id.as_str()) {
                        o.final_seen = Some(n.result.status);
                    }
                }
                if !self.lost() {
                    let d = self.delay();
                    self.after(d, Ev::AckArrive(m, n.notify_id));
                }
                Ok(())
            }
            Ev::AckArrive(m, id) => {
                let Some(e) = &self.engine else {
                    return Ok(());
                };
                let acts = e.notify_ack(&self.lenders[m].no, id);
                self.note(format!("t={} switch <- ack {id}", self.now - T0_MS));
                self.run_task(Task {
                    actions: acts.into(),
                    reply: None,
                })
            }
            Ev::LenderLink(m, up) => self.lender_link(m, up),
            Ev::ChanArrive {
                c,
                did,
                inc,
                gen,
                msg,
            } => {
                let h = self.chans[c].handle(&msg, self.now, &mut self.rng);
                self.note(format!(
                    "t={} bank{c} <- {} {:?} -> {:?}",
                    self.now - T0_MS,
                    msg.wire_name(),
                    msg.order_ref(),
                    h.answer.as_ref().and_then(|a| a.result()).map(|r| r.0)
                ));
                if let Some(r) = msg.order_ref() {
                    self.oracle.touched(r);
                }
                if let Some(r) = h.finalize {
                    let d = 50 + self.rng.below(20_000);
                    self.after(d, Ev::BankFinal(c, r));
                }
                if let Some(a) = h.answer {
                    if gen == self.link_gen[c] && inc == self.inc && !self.lost() {
                        let d = self.delay();
                        self.after(
                            d,
                            Ev::ChanReply {
                                c,
                                did,
                                inc,
                                gen,
                                msg: a,
                            },
                        );
                    }
                }
                Ok(())
            }
            Ev::ChanReply {
                c,
                did,
                inc,
                gen,
                msg,
            } => {
                if inc != self.inc || gen != self.link_gen[c] || self.engine.is_none() {
                    return Ok(());
                }
                self.note(format!(
                    "t={} switch <- ch{c} {} {:?} did={did}",
                    self.now - T0_MS,
                    msg.wire_name(),
                    msg.result().map(|r| r.0)
                ));
                match self.inflight.remove(&did) {
                    Some(f) => self.resume(f, DispatchResult::Answer(msg)),
                    None => {
                        // A late reply: the shell hands it to the engine as unsolicited.
                        let e = self.engine.as_ref().expect("up");
                        let acts = e.channel_unsolicited(&self.chan_ids[c], &msg, self.now);
                        self.run_task(Task {
                            actions: acts.into(),
                            reply: None,
                        })
                    }
                }
            }
            Ev::DispatchTimeout(inc, did) => {
                if inc != self.inc {
                    return Ok(());
                }
                match self.inflight.remove(&did) {
                    Some(f) => {
                        self.note(format!("t={} timeout did={did}", self.now - T0_MS));
                        self.sum.unknown += 1;
                        let r = if self.opts.sabotage == Some(Sabotage::NotSentOnTimeout) {
                            DispatchResult::NotSent
                        } else {
                            DispatchResult::Unknown
                        };
                        self.resume(f, r)
                    }
                    None => Ok(()),
                }
            }
            Ev::BankFinal(c, r) => {
                let id = self.bank_notify_seq;
                self.bank_notify_seq += 1;
                let Some(msg) = self.chans[c].finalize(&r, self.now, id) else {
                    return Ok(());
                };
                self.note(format!("t={} bank{c} final {r}", self.now - T0_MS));
                self.oracle.touched(&r);
                let copies = 1 + self.rng.below(self.f.notify_copies_max);
                for i in 0..copies {
                    if self.link_up[c] && self.engine.is_some() && !self.lost() {
                        let d = self.delay() + i * self.rng.below(2_000);
                        let (inc, gen) = (self.inc, self.link_gen[c]);
                        self.after(
                            d,
                            Ev::ChanNotify {
                                c,
                                inc,
                                gen,
                                msg: msg.clone(),
                            },
                        );
                    }
                }
                Ok(())
            }
            Ev::ChanNotify { c, inc, gen, msg } => {
                if inc != self.inc || gen != self.link_gen[c] {
                    return Ok(());
                }
                let Some(e) = &self.engine else {
                    return Ok(());
                };
                let acts = e.channel_unsolicited(&self.chan_ids[c], &msg, self.now);
                self.note(format!(
                    "t={} switch <- ch{c} notify {:?}",
                    self.now - T0_MS,
                    msg.order_ref()
                ));
                self.run_task(Task {
                    actions: acts.into(),
                    reply: None,
                })
            }
            Ev::ChanLink(c, up) => self.chan_link(c, up),
            Ev::Fsync(inc) => {
                if inc != self.inc {
                    return Ok(());
                }
                self.fsync_pending = false;
                self.fsync()
            }
            Ev::Snapshot => self.snapshot(),
            Ev::QueryDue(inc, key, r) => {
                if inc != self.inc {
                    return Ok(());
                }
                let Some(e) = &self.engine else {
                    return Ok(());
                };
                let acts = e.query_due(&key, &r, self.now);
                self.run_task(Task {
                    actions: acts.into(),
                    reply: None,
                })
            }
            Ev::NotifyTick(inc) => {
                if inc != self.inc {
                    return Ok(());
                }
                let Some(e) = &self.engine else {
                    return Ok(());
                };
                self.sum.settled += e.settle_due(self.now) as u64;
                let mut due = e.notifications_due(self.now, usize::MAX);
                due.sort_by_key(|n| n.msg.notify_id);
                for n in due {
                    self.tell_notify(n)?;
                }
                self.after(1_000, Ev::NotifyTick(inc));
                Ok(())
            }
            Ev::Revoke => {
                self.revoke();
                Ok(())
            }
            Ev::Crash => {
                if self.rng.chance(0.5) {
                    self.crash_armed = true;
                    Ok(())
                } else {
                    self.crash()
                }
            }
            Ev::Restart => self.restart(),
            Ev::Settle => {
                self.note(format!("t={} settle", self.now - T0_MS));
                self.settling = true;
                for c in 0..self.chans.len() {
                    if !self.link_up[c] {
                        self.chan_link(c, true)?;
                    }
                }
                for m in 0..self.lenders.len() {
                    if !self.lenders[m].up {
                        self.lender_link(m, true)?;
                    }
                    // Ask once more about every order not known final.
                    let open: Vec<LReq> = self.lenders[m]
                        .orders
                        .values()
                        .filter(|o| o.final_seen.is_none())
                        .map(|o| o.req.clone())
                        .collect();
                    for r in open {
                        self.send(m, r);
                    }
                }
                self.after(1_000, Ev::SettleCheck);
                Ok(())
            }
            Ev::SettleCheck => {
                self.after(1_000, Ev::SettleCheck);
                Ok(())
            }
        }
    }

    // ----- lenders -------------------------------------------------------------------

    fn send(&mut self, m: usize, req: LReq) {
        let id = self.next_req;
        self.next_req += 1;
        self.lenders[m].outstanding.insert(id, req.clone());
        if !self.lenders[m].up || self.lost() {
            return;
        }
        let d = self.delay();
        self.after(d, Ev::LenderArrive(m, id, req));
    }

    fn purpose() -> Purpose {
        Purpose::new("repay").expect("purpose")
    }

    fn new_order_id(&mut self, m: usize) -> OrderId {
        let l = &mut self.lenders[m];
        let id = format!("O{m}-{}", l.next_order);
        l.next_order += 1;
        OrderId::new(&id).expect("order id")
    }

    fn lender_act(&mut self, m: usize) {
        let r = self.rng.below(100);
        let n_orders = self.lenders[m].orders.len() as u64;
        let existing = |w: &mut World| -> Option<LOrder> {
            if n_orders == 0 {
                return None;
            }
            let i = w.rng.below(n_orders) as usize;
            w.lenders[m].orders.values().nth(i).cloned()
        };
        let amount = 100 + self.rng.below(300_000);
        let req = match r {
            0..=34 if !self.lenders[m].agreements.is_empty() => {
                let a = &self.lenders[m].agreements;
                let agreement_id = a[self.rng.below(a.len() as u64) as usize];
                let order_id = self.new_order_id(m);
                let req = LReq::Debit(lm::DebitReq {
                    order_id,
                    agreement_id,
                    amount: Fen(amount),
                    currency: Currency,
                    purpose: Self::purpose(),
                });
                self.remember(m, &order_id, &req);
                req
            }
            35..=54 => {
                self.card_seq += 1;
                let order_id = self.new_order_id(m);
                let req = LReq::Payout(lm::PayoutReq {
                    order_id,
                    amount: Fen(amount),
                    currency: Currency,
                    card_type: CardType::Debit,
                    bank_code: BankCode::new("ICBC").expect("bank"),
                    card_no: CardNo::new(&card_number(self.card_seq)).expect("card"),
                    name: Name::new("张三").expect("name"),
                    purpose: Self::purpose(),
                });
                self.remember(m, &order_id, &req);
                req
            }
            55..=69 => match existing(self) {
                Some(o) => o.req,
                None => return,
            },
            70..=72 => match existing(self).map(|o| o.req) {
                Some(LReq::Debit(mut d)) => {
                    d.amount = Fen(d.amount.0 + 1);
                    LReq::Debit(d)
                }
                Some(LReq::Payout(mut p)) => {
                    p.amount = Fen(p.amount.0 + 1);
                    LReq::Payout(p)
                }
                _ => return,
            },
            73..=84 => match existing(self).map(|o| o.req) {
                Some(LReq::Debit(d)) => LReq::Query(lm::OrderQueryReq {
                    order_id: d.order_id,
                }),
                Some(LReq::Payout(p)) => LReq::Query(lm::OrderQueryReq {
                    order_id: p.order_id,
                }),
                Some(LReq::SignAndPay(p)) => LReq::Query(lm::OrderQueryReq {
                    order_id: p.order_id,
                }),
                _ => return,
            },
            85..=90 => {
                self.card_seq += 1;
                let card = card_number(self.card_seq);
                let phone = format!("139{:08}", self.card_seq % 100_000_000);
                let order_id = self.new_order_id(m);
                let req = LReq::SignAndPay(lm::SignAndPayReq {
                    user_id: Ascii::new(&format!("U{}", self.card_seq)).expect("user"),
                    card_type: CardType::Debit,
                    bank_code: BankCode::new("ICBC").expect("bank"),
                    card_no: CardNo::new(&card).expect("card"),
                    id_no: IdNo::new(&format!("{:017}X", ID_BASE + self.card_seq)).expect("id"),
                    name: Name::new("王五").expect("name"),
                    phone: lm::Phone::new(&phone).expect("phone"),
                    order_id,
                    amount: Fen(amount),
                    currency: Currency,
                    purpose: Self::purpose(),
                });
                self.remember(m, &order_id, &req);
                req
            }
            _ => {
                self.card_seq += 1;
                let card = card_number(self.card_seq);
                let phone = format!("138{:08}", self.card_seq % 100_000_000);
                LReq::PreBind(lm::PreBindReq {
                    user_id: Ascii::new(&format!("U{}", self.card_seq)).expect("user"),
                    card_type: CardType::Debit,
                    bank_code: BankCode::new("ICBC").expect("bank"),
                    card_no: CardNo::new(&card).expect("card"),
                    id_no: IdNo::new(&format!("{:017}X", ID_BASE + self.card_seq)).expect("id"),
                    name: Name::new("李四").expect("name"),
                    phone: lm::Phone::new(&phone).expect("phone"),
                    mode: BindMode::Sign,
                })
            }
        };
        self.send(m, req);
    }

    fn remember(&mut self, m: usize, id: &OrderId, req: &LReq) {
        self.lenders[m].orders.insert(
            id.0.as_str().to_string(),
            LOrder {
                req: req.clone(),
                final_seen: None,
            },
        );
    }

    fn lender_arrive(&mut self, m: usize, req_id: u64, req: LReq) -> Result<(), Violation> {
        let Some(e) = &self.engine else {
            return Ok(()); // connection refused: the lender retries later
        };
        self.sum.requests += 1;
        let merchant = self.lenders[m].no;
        let now = self.now;
        let (what, acts) = match &req {
            LReq::Debit(r) => (
                format!("debit {} {}", r.order_id.0.as_str(), r.amount.0),
                e.debit(merchant, r, now),
            ),
            LReq::Payout(r) => (
                format!("payout {} {}", r.order_id.0.as_str(), r.amount.0),
                e.payout(merchant, r, now),
            ),
            LReq::Query(r) => (
                format!("query {}", r.order_id.0.as_str()),
                vec![Action::Reply(e.order_query(merchant, r))],
            ),
            LReq::PreBind(r) => (
                format!("prebind {}", r.user_id.as_str()),
                e.prebind(merchant, r, now),
            ),
            LReq::SignAndPay(r) => (
                format!("sign-and-pay {} {}", r.order_id.0.as_str(), r.amount.0),
                e.sign_and_pay(merchant, r, now),
            ),
            LReq::Confirm(r) => (
                format!("confirm {}", r.bind_ref.0),
                e.bind_confirm(merchant, r, now),
            ),
        };
        self.note(format!("t={} switch <- lender{m} {what}", now - T0_MS));
        self.run_task(Task {
            actions: acts.into(),
            reply: Some((m, req_id)),
        })
    }

    fn reply_arrive(&mut self, m: usize, req_id: u64, msg: lm::Message) {
        let Some(req) = self.lenders[m].outstanding.remove(&req_id) else {
            return;
        };
        let bind = match (&req, &msg) {
            (LReq::PreBind(p), lm::Message::PreBindRsp(r))
                if r.bind_ref != 0 && r.result.status == Status::Success =>
            {
                Some((p.phone, r.bind_ref))
            }
            (LReq::SignAndPay(p), lm::Message::SignAndPayRsp(r))
                if r.bind_ref != 0 && r.result.status == Status::Pending =>
            {
                Some((p.phone, r.bind_ref))
            }
            _ => None,
        };
        match (&req, &msg) {
            _ if bind.is_some() => {
                let (phone, bind_ref) = bind.expect("some");
                // The card holder types the SMS code (sometimes wrongly).
                let phone = phone.expose();
                let code = if self.rng.chance(0.9) {
                    &phone[phone.len() - 6..]
                } else {
                    "000000"
                };
                let confirm = LReq::Confirm(lm::BindConfirmReq {
                    bind_ref: BindRef(bind_ref),
                    sms_code: SmsCode::new(code).expect("code"),
                });
                let d = 500 + self.rng.below(5_000);
                self.after(d, Ev::LenderSend(m, confirm));
            }
            (LReq::Confirm(_), lm::Message::BindConfirmRsp(r))
                if r.result.status == Status::Success && r.agreement_id != 0 =>
            {
                let id = AgreementId(r.agreement_id);
                if !self.lenders[m].agreements.contains(&id) {
                    self.lenders[m].agreements.push(id);
                    self.sum.signed += 1;
                }
            }
            (_, lm::Message::DebitRsp(r)) if r.result.status.is_final() => {
                self.saw_final(m, r.order_id.as_str(), r.result.status)
            }
            (_, lm::Message::PayoutRsp(r)) if r.result.status.is_final() => {
                self.saw_final(m, r.order_id.as_str(), r.result.status)
            }
            _ => {}
        }
        self.note(format!(
            "t={} lender{m} <- {} {:?}",
            self.now - T0_MS,
            msg.wire_name(),
            reply_status(&msg)
        ));
    }

    fn saw_final(&mut self, m: usize, order_id: &str, s: Status) {
        if let Some(o) = self.lenders[m].orders.get_mut(order_id) {
            o.final_seen = Some(s);
        }
    }

    fn lender_link(&mut self, m: usize, up: bool) -> Result<(), Violation> {
        if !up && self.settling {
            return Ok(());
        }
        self.lenders[m].up = up;
        self.note(format!("t={} lender{m} link {up}", self.now - T0_MS));
        if up {
            // Logon: every unacknowledged notification is sent again (session.rs).
            if let Some(e) = &self.engine {
                let mut ns = e.notifications_for(&self.lenders[m].no, usize::MAX);
                ns.sort_by_key(|n| n.msg.notify_id);
                for n in ns {
                    self.tell_notify(n)?;
                }
            }
            if let Some(p) = self.f.lender_flap_ms {
                let d = p / 2 + self.rng.below(p);
                self.after(d, Ev::LenderLink(m, false));
            }
        } else {
            let d = 100 + self.rng.below(5_000);
            self.after(d, Ev::LenderLink(m, true));
        }
        Ok(())
    }

    // ----- the shell -----------------------------------------------------------------

    fn tell_notify(&mut self, n: Notification) -> Result<(), Violation> {
        self.oracle.on_notify(&n, self.journal.durable_lsn())?;
        let Some(m) = self.lenders.iter().position(|l| l.no == n.merchant) else {
            return Ok(());
        };
        if !self.lenders[m].up {
            return Ok(());
        }
        let copies = if self.faulty() && self.rng.chance(0.05) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            if !self.lost() {
                let d = self.delay();
                self.after(d, Ev::NotifyArrive(m, n.msg.clone()));
            }
        }
        Ok(())
    }

    fn run_task(&mut self, mut t: Task) -> Result<(), Violation> {
        while let Some(a) = t.actions.pop_front() {
            if self.engine.is_none() {
                return Ok(()); // crashed meanwhile: the task is gone with the process
            }
            match a {
                Action::Journal(r) => {
                    let lsn = self.append(&r);
                    if self.crash_armed && !self.settling {
                        return self.crash();
                    }
                    if self.opts.sabotage == Some(Sabotage::TellBeforeDurable) {
                        if let Some(e) = &self.engine {
                            e.record_durable(&r);
                        }
                        self.schedule_fsync();
                        continue;
                    }
                    self.schedule_fsync();
                    self.waiting.push((lsn, r, t));
                    return Ok(());
                }
                Action::Dispatch(d) => {
                    let c = self
                        .chan_ids
                        .iter()
                        .position(|x| *x == d.channel)
                        .expect("known channel");
                    if !self.link_up[c] {
                        // Provably never written: no connection.
                        self.sum.not_sent += 1;
                        self.note(format!(
                            "t={} dispatch {} to ch{c}: not sent",
                            self.now - T0_MS,
                            d.msg.wire_name()
                        ));
                        let e = self.engine.as_ref().expect("up");
                        let more = e.dispatch_result(&d.token, DispatchResult::NotSent, self.now);
                        for x in more.into_iter().rev() {
                            t.actions.push_front(x);
                        }
                        continue;
                    }
                    self.oracle.on_dispatch(&d, c, self.journal.durable_lsn())?;
                    let did = self.next_did;
                    self.next_did += 1;
                    self.note(format!(
                        "t={} dispatch {} {:?} to ch{c} did={did}",
                        self.now - T0_MS,
                        d.msg.wire_name(),
                        d.msg.order_ref()
                    ));
                    if !self.lost() {
                        let delay = self.delay();
                        let (inc, gen) = (self.inc, self.link_gen[c]);
                        self.after(
                            delay,
                            Ev::ChanArrive {
                                c,
                                did,
                                inc,
                                gen,
                                msg: d.msg,
                            },
                        );
                    }
                    self.after(DEADLINE_MS, Ev::DispatchTimeout(self.inc, did));
                    self.inflight.insert(
                        did,
                        InFlight {
                            task: t,
                            token: d.token,
                            c,
                        },
                    );
                    return Ok(());
                }
                Action::Reply(msg) => {
                    let Some((m, req_id)) = t.reply else {
                        continue;
                    };
                    let order = match self.lenders[m].outstanding.get(&req_id) {
                        Some(LReq::SignAndPay(r)) => Some(r.order_id),
                        _ => None,
                    };
                    self.oracle.on_reply(
                        self.lenders[m].no,
                        order,
                        &msg,
                        self.journal.durable_lsn(),
                    )?;
                    if self.lenders[m].up && !self.lost() {
                        let d = self.delay();
                        self.after(d, Ev::ReplyArrive(m, req_id, msg));
                    }
                }
                Action::Notify(n) => self.tell_notify(n)?,
                Action::Query {
                    key,
                    order_ref,
                    at_ms,
                } => {
                    let at = at_ms.max(self.now);
                    self.at(at, Ev::QueryDue(self.inc, key, order_ref));
                }
            }
        }
        Ok(())
    }

    /// Everything written is durable: resume the tasks that waited for it.
    fn fsync(&mut self) -> Result<(), Violation> {
        self.journal.sync();
        let durable = self.journal.durable_lsn();
        self.note(format!("t={} fsync lsn={durable}", self.now - T0_MS));
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(lsn, _, _)| *lsn <= durable);
        self.waiting = rest;
        for (_, rec, task) in ready {
            let Some(e) = &self.engine else {
                break; // an armed crash struck while resuming
            };
            e.record_durable(&rec);
            self.run_task(task)?;
        }
        Ok(())
    }

    /// The seed's directory for snapshots and settled-order chunk files (created at the
    /// first use, removed at drop).
    fn dir(&mut self) -> std::io::Result<std::path::PathBuf> {
        if let Some(d) = &self.snap_dir {
            return Ok(d.clone());
        }
        static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // tmpfs when there is one: fsyncs cost nothing there, and durability is
        // simulated anyway.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!(
            "sluice-vopr-{}-{}-{n}",
            std::process::id(),
            self.seed
        ));
        std::fs::create_dir_all(&d)?;
        self.snap_dir = Some(d.clone());
        Ok(d)
    }

    /// A fresh engine as the switch builds one: settled orders in chunk files beside the
    /// snapshots (small chunks, so that a seed's few thousand orders fill some).
    fn new_engine(&mut self) -> Result<Engine, Violation> {
        let dir = self.dir().map_err(|err| ("snapshot", err.to_string()))?;
        let e = Engine::new(
            engine_config(self.inc, self.f.settle_after_ms, self.f.detailed_final_max),
            self.table(),
            &PII_SECRET,
            self.now * 1000,
        )
        .with_settled_chunk_len(SETTLED_CHUNK);
        e.keep_settled_in(&dir);
        Ok(e)
    }

    /// A snapshot as `Journal::snapshot` takes one: write it (replay from the next LSN),
    /// make the journal durable up to there, publish it.
    fn snapshot(&mut self) -> Result<(), Violation> {
        if let Some(p) = self.f.snapshot_every_ms {
            if !self.settling {
                self.after(p, Ev::Snapshot);
            }
        }
        if self.engine.is_none() {
            return Ok(());
        }
        let dir = self.dir().map_err(|err| ("snapshot", err.to_string()))?;
        let e = self.engine.as_ref().expect("up");
        let from = self.journal.next_lsn();
        let (tmp, info) = crate::journal::snapshot::write(
            &dir,
            e,
            from,
            self.now,
            self.now.saturating_sub(RETENTION_MS),
        )
        .map_err(|err| ("snapshot", err.to_string()))?;
        self.fsync()?;
        if self.engine.is_none() {
            // Crashed before publishing: recovery ignores (and deletes) the temporary file.
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        let path = crate::journal::snapshot::publish(&dir, &tmp, from)
            .map_err(|err| ("snapshot", err.to_string()))?;
        if let Some((old, _)) = self.snapshot.replace((path.clone(), from)) {
            if old != path {
                let _ = std::fs::remove_file(old);
            }
        }
        crate::journal::snapshot::prune_chunks(&dir, std::slice::from_ref(&path))
            .map_err(|err| ("snapshot", err.to_string()))?;
        let e = self.engine.as_ref().expect("up");
        self.oracle.snapshot_published(e);
        self.sum.snapshots += 1;
        self.note(format!(
            "t={} snapshot from lsn {from}: {} orders, {} agreements",
            self.now - T0_MS,
            info.orders,
            info.agreements
        ));
        Ok(())
    }

    fn schedule_fsync(&mut self) {
        if !self.fsync_pending {
            self.fsync_pending = true;
            let d = self.rng.below(self.f.fsync_max_ms + 1);
            self.after(d, Ev::Fsync(self.inc));
        }
    }

    fn resume(&mut self, f: InFlight, r: DispatchResult) -> Result<(), Violation> {
        let mut t = f.task;
        let Some(e) = self.engine.as_ref() else {
            return Ok(());
        };
        let more = e.dispatch_result(&f.token, r, self.now);
        for x in more.into_iter().rev() {
            t.actions.push_front(x);
        }
        self.run_task(t)
    }

    fn chan_link(&mut self, c: usize, up: bool) -> Result<(), Violation> {
        if !up && self.settling {
            return Ok(());
        }
        self.note(format!("t={} ch{c} link {up}", self.now - T0_MS));
        self.link_up[c] = up;
        if let Some(e) = &self.engine {
            e.set_channel_up(self.chan_ids[c], up);
        }
        if up {
            if let Some(p) = self.f.chan_flap_ms {
                let d = p / 2 + self.rng.below(p);
                self.after(d, Ev::ChanLink(c, false));
            }
            return Ok(());
        }
        // The connection died: every request written on it is UNKNOWN.
        self.link_gen[c] += 1;
        let dids: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.c == c)
            .map(|(d, _)| *d)
            .collect();
        for did in dids {
            if let Some(f) = self.inflight.remove(&did) {
                self.sum.unknown += 1;
                self.resume(f, DispatchResult::Unknown)?;
            }
        }
        let d = 100 + self.rng.below(5_000);
        self.after(d, Ev::ChanLink(c, true));
        Ok(())
    }

    /// The bank revokes a stock agreement (the card holder cancelled at the bank) and
    /// tells the switch, maybe several times.
    fn revoke(&mut self) {
        if self.preloaded.is_empty() {
            return;
        }
        let i = self.rng.below(self.preloaded.len() as u64) as usize;
        let (c, no) = self.preloaded[i].clone();
        let Some(last4) = self.chans[c].bank.revoke(&no) else {
            return;
        };
        self.sum.revoked += 1;
        self.note(format!("t={} bank{c} revokes {no}", self.now - T0_MS));
        let msg: ch::Message = ch::Revoke {
            notify_id: self.bank_notify_seq,
            agreement_no: AgreementNo::new(&no).expect("agreement no"),
            card_last4: Digits::new(&last4).expect("last4"),
            revoked_at_ms: self.now,
        }
        .into();
        self.bank_notify_seq += 1;
        let copies = 1 + self.rng.below(self.f.notify_copies_max);
        for i in 0..copies {
            if self.link_up[c] && self.engine.is_some() && !self.lost() {
                let d = self.delay() + i * self.rng.below(2_000);
                let (inc, gen) = (self.inc, self.link_gen[c]);
                self.after(
                    d,
                    Ev::ChanNotify {
                        c,
                        inc,
                        gen,
                        msg: msg.clone(),
                    },
                );
            }
        }
    }

    fn crash(&mut self) -> Result<(), Violation> {
        self.crash_armed = false;
        if self.engine.is_none() || self.settling {
            return Ok(());
        }
        self.engine = None;
        self.inc += 1;
        self.waiting.clear();
        self.inflight.clear();
        self.fsync_pending = false;
        self.sum.crashes += 1;
        let s = self
            .journal
            .crash_and_recover(
                &mut self.rng,
                self.opts.sabotage == Some(Sabotage::LoseDurableRecords),
            )
            .map_err(|e| ("journal-readable", e))?;
        self.oracle.truncate(s.records);
        self.sum.crash_extra_records += s.extra_records;
        self.sum.torn_tails += (s.torn_bytes > 0) as u64;
        self.note(format!(
            "t={} CRASH: {} records survive ({} not durable), torn {} bytes",
            self.now - T0_MS,
            s.records,
            s.extra_records,
            s.torn_bytes
        ));
        let d = 10 + self.rng.below(self.f.restart_max_ms);
        self.after(d, Ev::Restart);
        Ok(())
    }

    /// Rebuild the engine from the journal with the code `journal::Recovery::apply` uses
    /// (`replay_and_settle`: parallel replay, then `finish_recovery`), journal the orders
    /// it failed (durably, before serving), then query the PENDING ones.
    fn restart(&mut self) -> Result<(), Violation> {
        let e = self.new_engine()?;
        let mut from = 1;
        if self.snapshot.is_none() {
            // As `Recovery::apply`: no snapshot refers to a chunk file.
            let dir = self.dir().map_err(|err| ("snapshot", err.to_string()))?;
            crate::engine::chunk_file::remove_where(&dir, |_| true)
                .map_err(|err| ("snapshot", err.to_string()))?;
        }
        if let Some((path, lsn)) = &self.snapshot {
            let (_, loaded) = crate::journal::snapshot::load(
                path,
                &e,
                self.now,
                self.now.saturating_sub(RETENTION_MS),
            )
            .map_err(|err| ("journal-readable", err.to_string()))?;
            self.sum.from_chunk_files += loaded.from_chunk_files;
            from = *lsn;
        }
        let (_, mut resumed) = crate::journal::replay_and_settle(
            &e,
            &self.journal.segment(),
            from,
            self.now,
            RETENTION_MS,
        )
        .map_err(|err| ("journal-readable", err.to_string()))?;
        for r in &resumed.failed {
            self.append(r);
        }
        self.journal.sync();
        for c in 0..self.chans.len() {
            e.set_channel_up(self.chan_ids[c], self.link_up[c]);
        }
        self.oracle.check_recovered(&e)?;
        self.note(format!(
            "t={} RESTART: {} orders, {} pending, {} failed",
            self.now - T0_MS,
            e.order_count(),
            resumed.pending.len(),
            resumed.failed.len()
        ));
        resumed.pending.sort_by(|a, b| {
            (a.0 .0.as_str(), a.0 .1 .0.as_str()).cmp(&(b.0 .0.as_str(), b.0 .1 .0.as_str()))
        });
        self.engine = Some(e);
        for (key, r, at) in resumed.pending {
            self.at(at.max(self.now), Ev::QueryDue(self.inc, key, r));
        }
        self.after(1_000, Ev::NotifyTick(self.inc));
        // Lenders log on again: unacknowledged notifications go out at logon.
        for m in 0..self.lenders.len() {
            if self.lenders[m].up {
                let e = self.engine.as_ref().expect("up");
                let mut ns = e.notifications_for(&self.lenders[m].no, usize::MAX);
                ns.sort_by_key(|n| n.msg.notify_id);
                for n in ns {
                    self.tell_notify(n)?;
                }
            }
        }
        Ok(())
    }
}
