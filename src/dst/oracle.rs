//! The invariants, checked against the banks' ledgers and the journal's durable prefix —
//! never against the engine's own opinion of itself:
//!
//! - **executed at most once**: over every attempt of one order, at most one entry in all
//!   the banks' ledgers, and no attempt reference arriving twice (rule 1, rule 2);
//! - **told = ledger**: an order told SUCCESS has exactly one successful ledger entry, an
//!   order told FAILED has none that moved money;
//! - **one final state**: never two different final states told for one order, and one
//!   notification id per order (rule 4);
//! - **durable first**: every state told to a lender (reply, query answer, notification,
//!   agreement id) is backed by a record in the durable prefix of the journal when it is
//!   told, and every attempt is journaled durably before it is sent (rule 3);
//! - **never lost**: an order once acknowledged exists after every recovery, and at the
//!   end every acknowledged order is final, told to its lender, and matches the ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::channel::{executed, SimChannel};
use crate::channel::OrderRef;
use crate::engine::order::{OrderKey, Phase};
use crate::engine::{Dispatch, Engine, Notification, Record, Token};
use crate::message::{self as lm, NotifyKind, Reason, Status};

/// An order as the oracle knows it: what the lender was told and where it was sent.
#[derive(Debug, Clone)]
pub struct Told {
    /// The engine's key.
    pub key: OrderKey,
    /// A state other than BUSY/REJECTED was told (the order was accepted).
    pub acked: bool,
    /// The final state told, if any.
    pub final_status: Option<Status>,
    /// Notification ids told for it.
    pub notify_ids: BTreeSet<u64>,
    /// Attempts sent: (channel index, reference).
    pub refs: Vec<(usize, OrderRef)>,
}

/// A broken invariant: (name, detail).
pub type Violation = (&'static str, String);

/// Index of the journal's records by LSN, for the durability checks.
#[derive(Debug, Default)]
struct Index {
    /// LSN of each record (position + 1) and what it says.
    records: Vec<Info>,
    accepted: HashMap<OrderKey, Vec<u64>>,
    attempts: HashMap<OrderRef, u64>,
    finals: HashMap<OrderKey, Vec<(u64, Status, u64)>>,
    agreements: HashMap<u64, u64>,
    revocations: HashMap<u64, u64>,
}

#[derive(Debug, Clone, Copy)]
enum Info {
    Accepted(OrderKey),
    Attempt(OrderRef),
    Final(OrderKey),
    Agreement(u64),
    Revocation(u64),
    Other,
}

/// The oracle's state.
#[derive(Debug, Default)]
pub struct Oracle {
    orders: BTreeMap<(String, String), Told>,
    owner: HashMap<OrderRef, (String, String)>,
    index: Index,
    dirty: BTreeSet<(String, String)>,
}

fn name(k: &OrderKey) -> (String, String) {
    (k.0.as_str().to_string(), k.1 .0.as_str().to_string())
}

impl Oracle {
    /// Note a record appended at `lsn`.
    pub fn index(&mut self, lsn: u64, r: &Record) {
        let ix = &mut self.index;
        debug_assert_eq!(ix.records.len() as u64 + 1, lsn);
        let info = match r {
            Record::OrderAccepted { key, .. } => {
                ix.accepted.entry(*key).or_default().push(lsn);
                Info::Accepted(*key)
            }
            Record::AttemptStarted { order_ref, .. } => {
                ix.attempts.insert(*order_ref, lsn);
                Info::Attempt(*order_ref)
            }
            Record::OrderFinal {
                key,
                outcome,
                notify_id,
                ..
            } => {
                ix.finals
                    .entry(*key)
                    .or_default()
                    .push((lsn, outcome.status, *notify_id));
                Info::Final(*key)
            }
            Record::Agreement(a) => {
                ix.agreements.entry(a.id.0).or_insert(lsn);
                Info::Agreement(a.id.0)
            }
            Record::RevocationNotice { notify_id, .. } => {
                ix.revocations.insert(*notify_id, lsn);
                Info::Revocation(*notify_id)
            }
            _ => Info::Other,
        };
        ix.records.push(info);
    }

    /// A crash kept records `1..=n`: forget the rest.
    pub fn truncate(&mut self, n: u64) {
        let ix = &mut self.index;
        for info in ix.records.drain(n as usize..) {
            match info {
                Info::Accepted(k) => {
                    if let Some(v) = ix.accepted.get_mut(&k) {
                        v.retain(|l| *l <= n);
                    }
                }
                Info::Attempt(r) => {
                    ix.attempts.remove(&r);
                }
                Info::Final(k) => {
                    if let Some(v) = ix.finals.get_mut(&k) {
                        v.retain(|f| f.0 <= n);
                    }
                }
                Info::Agreement(id) => {
                    if ix.agreements.get(&id).is_some_and(|l| *l > n) {
                        ix.agreements.remove(&id);
                    }
                }
                Info::Revocation(id) => {
                    ix.revocations.remove(&id);
                }
                Info::Other => {}
            }
        }
    }

    /// A snapshot of `e` was published: what it holds is durable from now on (LSN 0:
    /// never lost by a crash, whatever happens to the journal's tail).
    pub fn snapshot_published(&mut self, e: &Engine) {
        let (mut agreements, mut orders, mut notes) = (Vec::new(), Vec::new(), Vec::new());
        e.visit_for_snapshot(
            |a| agreements.push(a.id.0),
            |o| {
                orders.push((
                    o.key,
                    o.attempts.iter().map(|a| a.order_ref).collect::<Vec<_>>(),
                ))
            },
            |m, n| notes.push((*m, n.clone())),
        )
        .expect("the simulation's settled chunk files are readable");
        let ix = &mut self.index;
        for a in agreements {
            ix.agreements.insert(a, 0);
        }
        for (key, refs) in orders {
            ix.accepted.entry(key).or_default().push(0);
            for r in refs {
                ix.attempts.insert(r, 0);
            }
        }
        for (m, n) in notes {
            match n.kind {
                NotifyKind::OrderFinal => {
                    if let Ok(o) = lm::OrderId::new(n.order_id.as_str()) {
                        ix.finals.entry((m, o)).or_default().push((
                            0,
                            n.result.status,
                            n.notify_id,
                        ));
                    }
                }
                NotifyKind::AgreementRevoked => {
                    ix.revocations.insert(n.notify_id, 0);
                }
            }
        }
    }

    fn entry(&mut self, key: &OrderKey) -> &mut Told {
        self.orders.entry(name(key)).or_insert_with(|| Told {
            key: *key,
            acked: false,
            final_status: None,
            notify_ids: BTreeSet::new(),
            refs: Vec::new(),
        })
    }

    /// The state `status` of `key` is being told to its lender.
    fn told(&mut self, key: &OrderKey, status: Status, durable: u64) -> Result<(), Violation> {
        let n = name(key);
        match status {
            Status::Pending => {
                let ok = self
                    .index
                    .accepted
                    .get(key)
                    .is_some_and(|v| v.iter().any(|l| *l <= durable));
                if !ok {
                    return Err((
                        "durable-first",
                        format!("{n:?} told PENDING before its acceptance was durable"),
                    ));
                }
            }
            Status::Success | Status::Failed => {
                let ok = self
                    .index
                    .finals
                    .get(key)
                    .is_some_and(|v| v.iter().any(|f| f.0 <= durable && f.1 == status));
                if !ok {
                    return Err((
                        "durable-first",
                        format!("{n:?} told {status:?} before a durable final record said so"),
                    ));
                }
            }
            Status::Rejected | Status::Busy => return Ok(()),
        }
        let t = self.entry(key);
        t.acked = true;
        if status.is_final() {
            if let Some(prev) = t.final_status {
                if prev != status {
                    return Err((
                        "one-final-state",
                        format!("{n:?} told {prev:?} and then {status:?}"),
                    ));
                }
            }
            t.final_status = Some(status);
            self.dirty.insert(n);
        }
        Ok(())
    }

    /// A reply to merchant `m` is being sent.
    /// `order` is the order id of a SIGN_AND_PAY_REQ (its answer does not carry it).
    pub fn on_reply(
        &mut self,
        m: crate::wire::header::MerchantNo,
        named: Option<lm::OrderId>,
        msg: &lm::Message,
        durable: u64,
    ) -> Result<(), Violation> {
        let order = |id: &crate::wire::field::Ascii<32>| -> Option<OrderKey> {
            lm::OrderId::new(id.as_str()).ok().map(|o| (m, o))
        };
        match msg {
            lm::Message::DebitRsp(r) => match order(&r.order_id) {
                Some(k) => self.told(&k, r.result.status, durable),
                None => Ok(()),
            },
            lm::Message::PayoutRsp(r) => match order(&r.order_id) {
                Some(k) => self.told(&k, r.result.status, durable),
                None => Ok(()),
            },
            lm::Message::OrderQueryRsp(r) => {
                let Some(k) = order(&r.order_id) else {
                    return Ok(());
                };
                if r.result.reason == Reason::UNKNOWN_ORDER {
                    if self.orders.get(&name(&k)).is_some_and(|t| t.acked) {
                        return Err((
                            "never-lost",
                            format!("{:?} acknowledged earlier, now UNKNOWN_ORDER", name(&k)),
                        ));
                    }
                    return Ok(());
                }
                self.told(&k, r.result.status, durable)
            }
            lm::Message::SignAndPayRsp(r) => {
                if r.result.reason == Reason::DUPLICATE_ORDER {
                    // About the order the request names, not about a signing.
                    if let Some(o) = named {
                        self.told(&(m, o), r.result.status, durable)?;
                    }
                } else if r.agreement_id != 0 {
                    self.agreement_durable(r.agreement_id, durable)?;
                }
                Ok(())
            }
            lm::Message::PreBindRsp(r) if r.agreement_id != 0 => {
                self.agreement_durable(r.agreement_id, durable)
            }
            lm::Message::BindConfirmRsp(r) if r.agreement_id != 0 => {
                self.agreement_durable(r.agreement_id, durable)
            }
            _ => Ok(()),
        }
    }

    fn agreement_durable(&self, id: u64, durable: u64) -> Result<(), Violation> {
        if self
            .index
            .agreements
            .get(&id)
            .is_some_and(|l| *l <= durable)
        {
            Ok(())
        } else {
            Err((
                "durable-first",
                format!("agreement {id} told before its record was durable"),
            ))
        }
    }

    /// A notification is being sent.
    pub fn on_notify(&mut self, n: &Notification, durable: u64) -> Result<(), Violation> {
        if n.msg.kind == NotifyKind::AgreementRevoked {
            let id = n.msg.notify_id;
            if !self
                .index
                .revocations
                .get(&id)
                .is_some_and(|l| *l <= durable)
            {
                return Err((
                    "durable-first",
                    format!("revocation notice {id} sent before its record was durable"),
                ));
            }
            return Ok(());
        }
        let Ok(o) = lm::OrderId::new(n.msg.order_id.as_str()) else {
            return Err(("notification", format!("bad order id in {:?}", n.msg)));
        };
        let key = (n.merchant, o);
        let status = n.msg.result.status;
        let id = n.msg.notify_id;
        let ok = self.index.finals.get(&key).is_some_and(|v| {
            v.iter()
                .any(|f| f.0 <= durable && f.1 == status && f.2 == id)
        });
        if !ok {
            return Err((
                "durable-first",
                format!(
                    "{:?} notified {status:?} (notify id {id}) before a durable final record with that id",
                    name(&key)
                ),
            ));
        }
        self.told(&key, status, durable)?;
        let t = self.entry(&key);
        t.notify_ids.insert(id);
        if t.notify_ids.len() > 1 {
            return Err((
                "one-notification-id",
                format!("{:?} notified with ids {:?}", name(&key), t.notify_ids),
            ));
        }
        Ok(())
    }

    /// An attempt is being sent to channel `c`.
    pub fn on_dispatch(&mut self, d: &Dispatch, c: usize, durable: u64) -> Result<(), Violation> {
        let Token::Attempt { key, order_ref, .. } = &d.token else {
            return Ok(());
        };
        if !self
            .index
            .attempts
            .get(order_ref)
            .is_some_and(|l| *l <= durable)
        {
            return Err((
                "durable-first",
                format!("attempt {order_ref} sent before its AttemptStarted was durable"),
            ));
        }
        let n = name(key);
        self.owner.insert(*order_ref, n.clone());
        self.entry(key).refs.push((c, *order_ref));
        self.dirty.insert(n);
        Ok(())
    }

    /// The bank touched `order_ref`: check its order after this step.
    pub fn touched(&mut self, r: &OrderRef) {
        if let Some(n) = self.owner.get(r) {
            self.dirty.insert(n.clone());
        }
    }

    /// Check every order touched since the last call against the ledgers.
    pub fn check_dirty(&mut self, chans: &[SimChannel]) -> Result<(), Violation> {
        let dirty = std::mem::take(&mut self.dirty);
        for n in dirty {
            if let Some(t) = self.orders.get(&n) {
                check_order(&n, t, chans)?;
            }
        }
        Ok(())
    }

    /// After a recovery: every acknowledged order is there, in the state it was told.
    pub fn check_recovered(&self, e: &Engine) -> Result<(), Violation> {
        for (n, t) in &self.orders {
            if !t.acked {
                continue;
            }
            let Some(o) = e.order(&t.key) else {
                return Err((
                    "never-lost",
                    format!("{n:?} was acknowledged but is gone after recovery"),
                ));
            };
            if let Some(s) = t.final_status {
                if o.phase != Phase::Final || o.outcome.status != s {
                    return Err((
                        "one-final-state",
                        format!(
                            "{n:?} told {s:?}, recovered as {:?} {:?}",
                            o.phase, o.outcome.status
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// At the end, once the world settled: every acknowledged order final, told, and in
    /// the ledger as told; every ledger entry belongs to an order told that result.
    pub fn check_end(
        &self,
        chans: &[SimChannel],
        seen: &dyn Fn(&OrderKey) -> Option<Status>,
    ) -> Result<(), Violation> {
        for (n, t) in &self.orders {
            check_order(n, t, chans)?;
            if !t.acked {
                continue;
            }
            let Some(s) = t.final_status else {
                return Err(("settled", format!("{n:?} acknowledged but never final")));
            };
            if seen(&t.key) != Some(s) {
                return Err((
                    "settled",
                    format!("{n:?} final {s:?} but the lender saw {:?}", seen(&t.key)),
                ));
            }
        }
        for (c, ch) in chans.iter().enumerate() {
            ch.bank
                .check_consistency()
                .map_err(|e| ("bank-books", format!("channel {c}: {e}")))?;
            for e in ch.bank.ledger.snapshot() {
                let Some(n) = self.owner.get(&e.order_ref) else {
                    return Err((
                        "ledger-orphan",
                        format!("channel {c} has {} which no attempt sent", e.order_ref),
                    ));
                };
                let t = &self.orders[n];
                if matches!(e.state, crate::sim::EntryState::Processing { .. }) {
                    return Err(("settled", format!("{} still processing", e.order_ref)));
                }
                let want = if e.succeeded() {
                    Status::Success
                } else {
                    Status::Failed
                };
                if t.final_status != Some(want) {
                    return Err((
                        "told-equals-ledger",
                        format!(
                            "{n:?}: ledger {} says {want:?}, lender told {:?}",
                            e.order_ref, t.final_status
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Counts for the summary: (acknowledged, success, failed).
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for t in self.orders.values() {
            c.0 += t.acked as u64;
            c.1 += (t.final_status == Some(Status::Success)) as u64;
            c.2 += (t.final_status == Some(Status::Failed)) as u64;
        }
        c
    }
}

fn check_order(n: &(String, String), t: &Told, chans: &[SimChannel]) -> Result<(), Violation> {
    let mut entries = Vec::new();
    for (c, r) in &t.refs {
        if let Some(e) = chans[*c].bank.ledger.get(r) {
            entries.push(e);
        }
    }
    if entries.len() > 1 {
        return Err((
            "executed-once",
            format!(
                "{n:?} has {} attempts in the banks' books: {:?}",
                entries.len(),
                entries.iter().map(|e| e.order_ref).collect::<Vec<_>>()
            ),
        ));
    }
    if let Some(e) = entries.iter().find(|e| e.duplicates > 0) {
        return Err((
            "executed-once",
            format!(
                "{n:?}: attempt {} reached the bank {} more times",
                e.order_ref, e.duplicates
            ),
        ));
    }
    match t.final_status {
        Some(Status::Success) if !entries.first().is_some_and(|e| e.succeeded()) => Err((
            "told-equals-ledger",
            format!("{n:?} told SUCCESS but no successful ledger entry"),
        )),
        Some(Status::Failed) if entries.iter().any(|e| executed(e)) => Err((
            "told-equals-ledger",
            format!("{n:?} told FAILED but money moved"),
        )),
        _ => Ok(()),
    }
}
