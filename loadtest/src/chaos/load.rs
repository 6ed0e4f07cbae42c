//! The checked load of a chaos run: debits on merchant 0's connections, each with its own
//! order id and its own amount (so the simulators' ledgers, keyed by the switch's order
//! reference, can be mapped back to orders by amount), every answer and every NOTIFY
//! recorded. Connections that die (switch killed) are re-established and logged on again;
//! undelivered notifications then arrive on the new ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sluice::client::{Client, ClientConfig, ClientError};
use sluice::message::{self as lm, Message, Reason, Status};

use crate::gen::{outcome, MerchantKey};

/// Amount ranges (fen) of the kinds of orders, all below the simulators' per-transaction
/// maximum; an order's amount is its range's base plus its index.
pub const AMOUNT_LOAD: u64 = 100;
/// Probe debits.
pub const AMOUNT_PROBE: u64 = 2_000_000;
/// Replayed debits of the hostile lender.
pub const AMOUNT_REPLAY: u64 = 3_000_000;
/// Clean debits after the fault.
pub const AMOUNT_CLEAN: u64 = 4_000_000;
/// The calibration of the overload scenario (closed loop).
pub const AMOUNT_CALIBRATE: u64 = 1_000_000;
/// The overload itself.
pub const AMOUNT_OVERLOAD: u64 = 1_200_000;

/// What the lender side knows of one order.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// The order's amount (unique per order).
    pub amount: u64,
    /// Every answer's (status, reason).
    pub told: Vec<(Status, Reason)>,
    /// Calls without an answer (timeout, connection closed).
    pub errors: u32,
}

impl Record {
    /// Accepted by the switch: answered SUCCESS, FAILED or PENDING at least once.
    pub fn acknowledged(&self) -> bool {
        self.told
            .iter()
            .any(|(s, _)| matches!(s, Status::Success | Status::Failed | Status::Pending))
    }
}

/// Every order and notification of a run, by order id.
#[derive(Default)]
pub struct Book {
    /// Orders sent.
    pub orders: Mutex<HashMap<String, Record>>,
    /// NOTIFYs received: (notify id, status) per order id, repeats included.
    pub notified: Mutex<HashMap<String, Vec<(u64, Status)>>>,
    /// BUSY answers (any order).
    pub busy: AtomicU64,
}

impl Book {
    /// Note an order about to be sent.
    pub fn sent(&self, id: &str, amount: u64) {
        let mut o = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        o.entry(id.to_string()).or_default().amount = amount;
    }

    /// Note the result of one call for `id`.
    pub fn answered(&self, id: &str, r: &Result<sluice::client::Response, ClientError>) {
        let mut o = self.orders.lock().unwrap_or_else(|e| e.into_inner());
        let rec = o.entry(id.to_string()).or_default();
        match r.as_ref().ok().and_then(|r| outcome(&r.msg)) {
            Some(out) => {
                if out.status == Status::Busy {
                    self.busy.fetch_add(1, Relaxed);
                }
                rec.told.push((out.status, out.reason));
            }
            None => rec.errors += 1,
        }
    }

    fn notify(&self, n: &lm::Notify) {
        if n.kind != lm::NotifyKind::OrderFinal {
            return;
        }
        let mut m = self.notified.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(n.order_id.as_str().to_string())
            .or_default()
            .push((n.notify_id, n.result.status));
    }
}

/// Phase of a run, for the probe's latency.
pub const PHASE_BASELINE: u8 = 0;
/// Faults being injected.
pub const PHASE_ATTACK: u8 = 1;
/// Faults removed, load still running.
pub const PHASE_RECOVERY: u8 = 2;

/// Connections of merchant 0, re-established when they die.
pub struct Pool {
    slots: Vec<RwLock<Option<Arc<Client>>>>,
    dead: Vec<AtomicBool>,
    addr: std::net::SocketAddr,
    key: MerchantKey,
    book: Arc<Book>,
    timeout: Duration,
    /// Successful (re)connections, first ones included.
    pub connects: AtomicU64,
}

impl Pool {
    /// `n` connection slots; [`Pool::maintain`] fills them.
    pub fn new(
        n: usize,
        addr: std::net::SocketAddr,
        key: MerchantKey,
        book: Arc<Book>,
        timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            slots: (0..n).map(|_| RwLock::new(None)).collect(),
            dead: (0..n).map(|_| AtomicBool::new(true)).collect(),
            addr,
            key,
            book,
            timeout,
            connects: AtomicU64::new(0),
        })
    }

    /// Client of slot `i`, if connected.
    pub fn get(&self, i: usize) -> Option<Arc<Client>> {
        let i = i % self.slots.len();
        if self.dead[i].load(Relaxed) {
            return None;
        }
        self.slots[i]
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Mark slot `i` dead (its connection closed).
    pub fn died(&self, i: usize) {
        self.dead[i % self.slots.len()].store(true, Relaxed);
    }

    /// Connect and log on every dead slot once; spawn a task per new client that records
    /// its notifications. Returns how many slots are up.
    pub async fn maintain(&self) -> usize {
        let mut up = 0;
        for i in 0..self.slots.len() {
            if !self.dead[i].load(Relaxed) {
                up += 1;
                continue;
            }
            let Ok(c) = connect(self.addr, &self.key, self.timeout).await else {
                continue;
            };
            let c = Arc::new(c);
            spawn_notify_drain(c.clone(), self.book.clone());
            *self.slots[i].write().unwrap_or_else(|e| e.into_inner()) = Some(c);
            self.dead[i].store(false, Relaxed);
            self.connects.fetch_add(1, Relaxed);
            up += 1;
        }
        up
    }

    /// Drop every client (their notification tasks end once drained).
    pub fn close(&self) {
        for (s, d) in self.slots.iter().zip(&self.dead) {
            d.store(true, Relaxed);
            *s.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// Connect and log on as `key`.
pub async fn connect(
    addr: std::net::SocketAddr,
    key: &MerchantKey,
    timeout: Duration,
) -> anyhow::Result<Client> {
    let c = Client::connect(
        addr,
        ClientConfig {
            merchant: key.merchant.clone(),
            key_id: key.key_id,
            secret: key.secret.clone(),
            auto_ack: true,
            timeout,
        },
    )
    .await?;
    let r = c.logon().await?;
    match outcome(&r.msg) {
        Some(o) if o.status == Status::Success => Ok(c),
        other => anyhow::bail!("logon refused: {other:?}"),
    }
}

/// Record `c`'s notifications until nobody else holds it and nothing more arrives.
pub fn spawn_notify_drain(c: Arc<Client>, book: Arc<Book>) {
    tokio::spawn(async move {
        loop {
            match c.next_notification(Duration::from_millis(300)).await {
                Some(n) => book.notify(&n),
                None if Arc::strong_count(&c) == 1 => return,
                None => {}
            }
        }
    });
}

/// A debit of `agreement` for `amount` under `order_id`.
pub fn debit(order_id: &str, agreement: u64, amount: u64) -> Message {
    lm::DebitReq {
        order_id: lm::OrderId::new(order_id).expect("order id fits"),
        agreement_id: lm::AgreementId(agreement),
        amount: lm::Fen(amount),
        currency: lm::Currency,
        purpose: lm::Purpose::new("chaos").expect("purpose fits"),
    }
    .into()
}

/// The open-loop generator: `rate` debits per second over the pool until `stop`.
pub struct Load {
    /// Orders sent.
    pub sent: AtomicU64,
    /// Sends skipped because no connection was up (switch down).
    pub skipped: AtomicU64,
}

impl Load {
    /// Run until `stop` is set; returns when every call has finished. Order `i` is
    /// `tag` + `i` for `amount_base` + `i` fen.
    pub async fn run(
        pool: Arc<Pool>,
        book: Arc<Book>,
        agreements: Arc<Vec<u64>>,
        tag: String,
        amount_base: u64,
        rate: f64,
        stop: Arc<AtomicBool>,
    ) -> Load {
        let stats = Load {
            sent: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        };
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut i = 0u64;
        while !stop.load(Relaxed) {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let slot = i as usize;
            let Some(c) = pool.get(slot) else {
                stats.skipped.fetch_add(1, Relaxed);
                i += 1;
                continue;
            };
            let id = format!("{tag}{i}");
            let amount = amount_base + i;
            let agreement =
                agreements[(crate::gen::splitmix(i) % agreements.len() as u64) as usize];
            book.sent(&id, amount);
            stats.sent.fetch_add(1, Relaxed);
            let (book, pool) = (book.clone(), pool.clone());
            tasks.spawn(async move {
                let r = c.call(debit(&id, agreement, amount)).await;
                if matches!(r, Err(ClientError::Closed)) {
                    pool.died(slot);
                }
                book.answered(&id, &r);
            });
            // Reap finished calls as we go (bounded memory on long runs).
            while tasks.try_join_next().is_some() {}
            i += 1;
        }
        while tasks.join_next().await.is_some() {}
        stats
    }
}

/// A healthy session's latency, per phase: one call at a time on its own connection.
pub struct Probe {
    /// Latency histograms (µs) per phase.
    pub hist: Mutex<[Histogram<u64>; 3]>,
    /// Calls without an answer.
    pub errors: AtomicU64,
}

impl Probe {
    /// Probe until `stop`: a debit (recorded in `book`) when `debits`, else an order query
    /// (answered by the switch alone), every `every`.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        addr: std::net::SocketAddr,
        key: MerchantKey,
        book: Arc<Book>,
        agreement: u64,
        debits: bool,
        tag: String,
        phase: Arc<AtomicU8>,
        stop: Arc<AtomicBool>,
    ) -> Probe {
        let h = || Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("bounds");
        let probe = Probe {
            hist: Mutex::new([h(), h(), h()]),
            errors: AtomicU64::new(0),
        };
        let every = Duration::from_millis(20);
        let mut client: Option<Arc<Client>> = None;
        let mut j = 0u64;
        while !stop.load(Relaxed) {
            let c = match &client {
                Some(c) => c.clone(),
                None => match connect(addr, &key, Duration::from_secs(10)).await {
                    Ok(c) => {
                        let c = Arc::new(c);
                        spawn_notify_drain(c.clone(), book.clone());
                        client = Some(c.clone());
                        c
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let p = phase.load(Relaxed) as usize;
            let t = Instant::now();
            let r = if debits {
                let id = format!("{tag}{j}");
                book.sent(&id, AMOUNT_PROBE + j);
                let r = c.call(debit(&id, agreement, AMOUNT_PROBE + j)).await;
                book.answered(&id, &r);
                r
            } else {
                c.call(lm::OrderQueryReq {
                    order_id: lm::OrderId::new("chaos-probe").expect("fits"),
                })
                .await
            };
            j += 1;
            match r {
                Ok(_) => {
                    let us = t.elapsed().as_micros() as u64;
                    let _ =
                        probe.hist.lock().unwrap_or_else(|e| e.into_inner())[p].record(us.max(1));
                }
                Err(e) => {
                    probe.errors.fetch_add(1, Relaxed);
                    if matches!(e, ClientError::Closed) {
                        client = None;
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
        probe
    }

    /// p99 of a phase, ms (`None` without samples).
    pub fn p99_ms(&self, phase: u8) -> Option<f64> {
        let h = &self.hist.lock().unwrap_or_else(|e| e.into_inner())[phase as usize];
        (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0)
    }

    /// Samples in a phase.
    pub fn samples(&self, phase: u8) -> u64 {
        self.hist.lock().unwrap_or_else(|e| e.into_inner())[phase as usize].len()
    }
}
