//! Restoring the engine after a restart: snapshot entries, then the journal's tail, then
//! one pass that settles what the crash left open (issue 6).
//!
//! Replay is *idempotent and absolute*: every record sets a value rather than adding to
//! one, and a record whose effect is already present changes nothing. That is what lets
//! a snapshot be taken while the engine runs (see `journal::snapshot`): records written
//! while the snapshot was being taken are replayed over it and the result is the same.
//!
//! After replay, [`Engine::finish_recovery`] enforces DESIGN.md §4 across the restart:
//! an order that may have reached a channel without a final state becomes PENDING and is
//! *queried* on that channel — never sent again (rule 2); an order that provably never
//! reached any channel is failed with `NO_CHANNEL` (nothing moved); ids restart past
//! every id seen so no notification or agreement id is ever reused.

use std::sync::atomic::Ordering;

use super::agreement::Agreement;
use super::order::{AttemptOutcome, Order, OrderKey, Phase};
use super::settled::Settled;
use super::{Engine, Outgoing, Record};
use crate::channel::message::{OrderRef, RspCode};
use crate::message::{self as lm, NotifyKind, Outcome, Reason, Status};
use crate::wire::field::Ascii;
use crate::wire::header::MerchantNo;

/// What [`Engine::finish_recovery`] found and did.
#[derive(Debug, Default)]
pub(crate) struct Resumed {
    /// Orders left PENDING by the crash, to query on their channel: (order, attempt
    /// reference to query, when). The shell schedules each as an `Action::Query`.
    pub pending: Vec<(OrderKey, OrderRef, u64)>,
    /// Orders that provably never reached a channel and were failed now; these records
    /// must be journaled before the switch serves (the notifications are already queued).
    pub failed: Vec<Record>,
    /// Final orders dropped because they finished longer ago than the retention.
    pub evicted: usize,
}

impl Engine {
    /// Make every later id (agreement ids, notification ids, bind refs, order refs)
    /// larger than `id`.
    pub(crate) fn restore_seq_past(&self, id: u64) {
        self.seq.fetch_max(id.saturating_add(1), Ordering::Relaxed);
        self.agreements.advance_ids_past(id);
    }

    /// The next id the engine would hand out (snapshots record it).
    pub(crate) fn seq_now(&self) -> u64 {
        self.seq
            .load(Ordering::Relaxed)
            .max(self.agreements.peek_next_id())
    }

    /// Order refs of this start look like `{ref_prefix}O{hex}`; one with our prefix
    /// moves the sequence past its number (a restart normally has a new prefix anyway).
    fn note_ref(&self, r: &OrderRef) {
        if let Some(rest) = r.as_str().strip_prefix(self.cfg.ref_prefix.as_str()) {
            if let Some(n) = rest.get(1..).and_then(|h| u64::from_str_radix(h, 16).ok()) {
                self.restore_seq_past(n);
            }
        }
    }

    /// Put back an agreement from a snapshot or an `Agreement` record, exactly as
    /// recorded (including cancelled and revoked channel states).
    pub(crate) fn restore_agreement(&self, a: Agreement) {
        self.restore_seq_past(a.id.0);
        let id = a.id;
        if self.agreements.get(id).is_none() {
            // `upsert` keeps `cancelled` and the channel states of a new agreement.
            self.agreements.upsert(a);
        } else {
            // `upsert` indexes new channel numbers; then set the exact recorded state.
            self.agreements.upsert(a.clone());
            self.agreements.update(id, move |cur| *cur = a);
        }
    }

    /// Put back an agreement from a snapshot into a fresh engine (entries are distinct
    /// agreements, so no lookup by card first).
    pub(crate) fn restore_agreement_fresh(&self, a: Agreement) {
        self.restore_seq_past(a.id.0);
        self.agreements.insert_exact(a);
    }

    /// Put back a whole order from a snapshot. A final order that finished before the
    /// detail window at `now_ms` goes straight to its settled form (a restart with days
    /// of retained orders never holds them all in full).
    pub(crate) fn restore_order(&self, o: Order, now_ms: u64) {
        for a in &o.attempts {
            self.note_ref(&a.order_ref);
        }
        if o.phase == Phase::Final
            && o.finished_at_ms < now_ms.saturating_sub(self.cfg.settle_after_ms)
        {
            self.orders.remove(&o.key);
            self.settled.insert_all(&[(o.key, Settled::of(&o))]);
            return;
        }
        for a in &o.attempts {
            self.by_ref.insert(a.order_ref, o.key);
        }
        self.settled.remove(&o.key);
        self.orders.insert(o.key, Box::new(o));
    }

    /// Put back an unacknowledged notification; it is re-sent from `now_ms` on.
    pub(crate) fn restore_notification(&self, merchant: MerchantNo, msg: lm::Notify, now_ms: u64) {
        self.restore_seq_past(msg.notify_id);
        self.outbox.insert(
            msg.notify_id,
            Outgoing {
                merchant,
                msg,
                next_at_ms: now_ms,
                sends: 0,
                durable: true,
            },
        );
    }

    /// Visit the state a snapshot keeps, in the order that makes a concurrent snapshot
    /// safe: agreements, then orders, then notifications. Returns the id sequence read
    /// *before* the visit, or the error of a settled-order chunk file that could not be
    /// read.
    ///
    /// Concurrency note: a final order's notification is queued while its map entry is
    /// still locked, so an order seen final here has its notification in the outbox by
    /// the time the outbox is visited (unless the lender acknowledged it meanwhile).
    pub(crate) fn visit_for_snapshot(
        &self,
        agreement: impl FnMut(&Agreement),
        order: impl FnMut(&Order),
        notification: impl FnMut(&MerchantNo, &lm::Notify),
    ) -> std::io::Result<u64> {
        self.visit_for_snapshot_from(0, agreement, order, notification)
    }

    /// [`Engine::visit_for_snapshot`] leaving out the settled orders of chunks numbered
    /// below `settled_from` (a snapshot that refers to their files instead; see
    /// [`Engine::settled_disk_range`]).
    pub(crate) fn visit_for_snapshot_from(
        &self,
        settled_from: u64,
        mut agreement: impl FnMut(&Agreement),
        mut order: impl FnMut(&Order),
        mut notification: impl FnMut(&MerchantNo, &lm::Notify),
    ) -> std::io::Result<u64> {
        let seq = self.seq_now();
        self.agreements.for_each(&mut agreement);
        // Live orders first, then settled ones: an order settled during the visit is
        // inserted there before it leaves the live map, so it is seen at least once (twice
        // is harmless: restoring is idempotent).
        for o in self.orders.iter() {
            order(o.value());
        }
        self.settled
            .for_each_from(settled_from, |key, s| order(&s.to_order(key)))?;
        for n in self.outbox.iter() {
            notification(&n.merchant, &n.msg);
        }
        Ok(seq)
    }

    /// Write full chunks of settled orders to files in `dir` (the journal directory)
    /// and keep only their index in memory. Call once, before recovery.
    pub fn keep_settled_in(&self, dir: &std::path::Path) {
        self.settled.attach_dir(dir);
    }

    /// The settled-order chunks on disk that a snapshot refers to instead of copying
    /// (`[lo, hi)`), after writing any full chunk still in memory. The write error, if
    /// any, is logged; the chunk is then copied into the snapshot instead.
    pub(crate) fn settled_disk_range(&self) -> (u64, u64) {
        if let Err(e) = self.settled.seal() {
            tracing::error!(error = %e, "settled orders: a full chunk could not be written; the snapshot copies it");
        }
        self.settled.disk_range()
    }

    /// Put back settled-order chunk `seq` from its file in `dir` (snapshot restore).
    pub(crate) fn restore_settled_chunk(
        &self,
        dir: &std::path::Path,
        seq: u64,
        cutoff_ms: u64,
    ) -> Result<usize, String> {
        self.settled.load_chunk(dir, seq, cutoff_ms)
    }

    /// Number new settled-order chunks from `seq` on (snapshot restore).
    pub(crate) fn number_settled_chunks_from(&self, seq: u64) {
        self.settled.number_chunks_from(seq);
    }

    /// This engine with `n` settled orders per chunk file instead of 4096 (the
    /// simulation, whose runs settle a few thousand orders).
    pub(crate) fn with_settled_chunk_len(mut self, n: usize) -> Engine {
        self.settled = super::settled::SettledStore::with_chunk_len(n);
        self
    }

    /// The directory settled-order chunks are written to, if any.
    pub(crate) fn settled_dir(&self) -> Option<&std::path::Path> {
        self.settled.dir()
    }

    /// Apply one journal record (idempotent; see the module doc). `now_ms` stamps
    /// revocation notices, whose original time the record does not carry.
    pub(crate) fn replay(&self, rec: Record, now_ms: u64) {
        match rec {
            Record::OrderAccepted {
                key,
                kind,
                amount,
                purpose,
                at_ms,
            } => {
                // A settled order is final: its acceptance replayed again changes nothing.
                if !self.settled.contains_key(&key) {
                    self.orders.entry(key).or_insert_with(|| {
                        Box::new(Order::new(key, kind, amount, purpose, Vec::new(), at_ms))
                    });
                }
            }
            Record::AttemptStarted {
                key,
                channel,
                order_ref,
                at_ms,
            } => {
                self.note_ref(&order_ref);
                let Some(mut o) = self.orders.get_mut(&key) else {
                    return;
                };
                if o.attempt_index(&order_ref).is_none() && o.phase != Phase::Final {
                    o.remaining.retain(|c| c != &channel);
                    o.attempts.push(super::order::Attempt {
                        channel,
                        order_ref,
                        sent_at_ms: at_ms,
                        outcome: AttemptOutcome::InFlight,
                    });
                    o.phase = Phase::InFlight;
                    o.outcome = Outcome::new(Status::Pending, Reason::OK);
                }
                drop(o);
                self.by_ref.insert(order_ref, key);
            }
            Record::AttemptOutcome {
                key,
                order_ref,
                outcome,
            } => {
                let Some(mut o) = self.orders.get_mut(&key) else {
                    return;
                };
                let Some(idx) = o.attempt_index(&order_ref) else {
                    return;
                };
                if o.phase == Phase::Final {
                    return;
                }
                o.attempts[idx].outcome = outcome;
                match outcome {
                    AttemptOutcome::Unknown => {
                        o.phase = Phase::Pending;
                        o.outcome = Outcome::new(Status::Pending, Reason::OUTCOME_UNKNOWN);
                    }
                    AttemptOutcome::Processing(_) => {
                        o.phase = Phase::Pending;
                        o.outcome = Outcome::new(Status::Pending, Reason::OK);
                    }
                    _ => {}
                }
            }
            Record::OrderFinal {
                key,
                outcome,
                order_ref,
                notify_id,
                at_ms,
            } => {
                self.restore_seq_past(notify_id);
                let Some(mut o) = self.orders.get_mut(&key) else {
                    return;
                };
                o.phase = Phase::Final;
                o.outcome = outcome;
                o.finished_at_ms = at_ms;
                if let Some(idx) = order_ref.and_then(|r| o.attempt_index(&r)) {
                    let code = RspCode::new(outcome.channel_code.as_str()).ok();
                    match (outcome.status, outcome.reason, code) {
                        (Status::Success, _, Some(c)) => {
                            o.attempts[idx].outcome = AttemptOutcome::Success(c)
                        }
                        (Status::Failed, Reason::CHANNEL_DECLINED, Some(c)) => {
                            o.attempts[idx].outcome = AttemptOutcome::Declined(c)
                        }
                        _ => {}
                    }
                }
                let n = self.order_notification(&o, notify_id);
                drop(o);
                self.outbox.entry(notify_id).or_insert(Outgoing {
                    merchant: n.merchant,
                    msg: n.msg,
                    next_at_ms: now_ms,
                    sends: 0,
                    durable: true,
                });
            }
            Record::Agreement(a) => self.restore_agreement(*a),
            Record::NotifyAcked { notify_id } => {
                self.outbox.remove(&notify_id);
            }
            Record::RevocationNotice {
                agreement,
                channel,
                notify_id,
            } => {
                self.restore_seq_past(notify_id);
                let Some(a) = self.agreements.get(agreement) else {
                    return;
                };
                let msg = lm::Notify {
                    notify_id,
                    kind: NotifyKind::AgreementRevoked,
                    result: Outcome::ok(),
                    order_id: Ascii::empty(),
                    order_type: 0,
                    amount: 0,
                    agreement_id: agreement.0,
                    channel,
                    finished_at_ms: now_ms,
                };
                self.outbox.entry(notify_id).or_insert(Outgoing {
                    merchant: a.merchant,
                    msg,
                    next_at_ms: now_ms,
                    sends: 0,
                    durable: true,
                });
            }
        }
    }

    /// Settle what a crash left open, once every record is replayed:
    /// - an order whose last attempt may have reached its channel (in flight, unknown,
    ///   processing) becomes PENDING (`OUTCOME_UNKNOWN` unless the channel had said
    ///   PROCESSING) and is returned for a query on that channel — it is never re-sent;
    /// - an order that provably never reached any channel (no attempt journaled, or
    ///   every attempt not sent / not processed) is failed with `NO_CHANNEL`; its record
    ///   is returned for the journal and its notification queued;
    /// - final orders that finished more than `retention_ms` ago are dropped (their
    ///   order ids may be reused after that).
    pub(crate) fn finish_recovery(&self, now_ms: u64, retention_ms: u64) -> Resumed {
        let mut out = Resumed::default();
        let cutoff_ms = now_ms.saturating_sub(retention_ms);
        let mut finals = Vec::new();
        for mut o in self.orders.iter_mut() {
            if o.phase == Phase::Final {
                continue;
            }
            let last = o.attempts.last().map(|a| (a.order_ref, a.outcome));
            match last {
                Some((r, AttemptOutcome::InFlight | AttemptOutcome::Unknown)) => {
                    let i = o.attempts.len() - 1;
                    o.attempts[i].outcome = AttemptOutcome::Unknown;
                    o.phase = Phase::Pending;
                    o.outcome = Outcome::new(Status::Pending, Reason::OUTCOME_UNKNOWN);
                    out.pending.push((o.key, r, now_ms));
                }
                Some((r, AttemptOutcome::Processing(_))) => {
                    o.phase = Phase::Pending;
                    out.pending.push((o.key, r, now_ms));
                }
                Some((r, AttemptOutcome::Success(c))) => finals.push((
                    o.key,
                    Status::Success,
                    Reason::OK,
                    c.as_str().into(),
                    Some(r),
                )),
                Some((r, AttemptOutcome::Declined(c))) => finals.push((
                    o.key,
                    Status::Failed,
                    Reason::CHANNEL_DECLINED,
                    c.as_str().into(),
                    Some(r),
                )),
                Some((r, AttemptOutcome::NotSent | AttemptOutcome::NotProcessed(_))) => finals
                    .push((
                        o.key,
                        Status::Failed,
                        Reason::NO_CHANNEL,
                        String::new(),
                        Some(r),
                    )),
                None => finals.push((
                    o.key,
                    Status::Failed,
                    Reason::NO_CHANNEL,
                    String::new(),
                    None,
                )),
            }
        }
        // Ids in a fixed order (the map's iteration order is random per process), so a
        // recovery is reproducible — the deterministic simulation replays it exactly.
        finals.sort_by(|a, b| {
            (a.0 .0.as_str(), a.0 .1.as_str()).cmp(&(b.0 .0.as_str(), b.0 .1.as_str()))
        });
        for (key, status, reason, code, order_ref) in finals {
            let Some(mut o) = self.orders.get_mut(&key) else {
                continue;
            };
            let notify_id = self.next_id();
            o.phase = Phase::Final;
            o.finished_at_ms = now_ms;
            o.outcome = Outcome {
                status,
                reason,
                field: 0,
                channel_code: Ascii::new(&code).unwrap_or_default(),
            };
            self.stats.orders_final.fetch_add(1, Ordering::Relaxed);
            out.failed.push(Record::OrderFinal {
                key,
                outcome: o.outcome,
                order_ref,
                notify_id,
                at_ms: now_ms,
            });
            let n = self.order_notification(&o, notify_id);
            drop(o);
            self.outbox.insert(
                notify_id,
                Outgoing {
                    merchant: n.merchant,
                    msg: n.msg,
                    next_at_ms: now_ms,
                    sends: 0,
                    durable: true,
                },
            );
        }
        out.evicted = self.evict_final_orders_before(cutoff_ms);
        // Everything recovered came from the journal (the FAILED states above are journaled
        // by the caller before the switch serves anyone). Final orders queue for settling,
        // oldest first.
        let mut finals = Vec::new();
        for mut o in self.orders.iter_mut() {
            o.durable = Some(o.outcome);
            if o.phase == Phase::Final {
                finals.push((o.finished_at_ms, o.key));
            }
        }
        finals.sort_unstable_by(|a, b| {
            (a.0, a.1 .0.as_str(), a.1 .1.as_str()).cmp(&(b.0, b.1 .0.as_str(), b.1 .1.as_str()))
        });
        let mut q = self.to_settle.lock().unwrap_or_else(|p| p.into_inner());
        q.clear();
        q.extend(finals);
        drop(q);
        out
    }

    /// Settle the orders whose detail window ended by `now_ms` (see
    /// [`Engine::settle_final_orders_before`]), and the oldest final orders beyond
    /// `EngineConfig::detailed_final_max` whatever their age.
    pub fn settle_due(&self, now_ms: u64) -> usize {
        self.settle_final_orders(
            now_ms.saturating_sub(self.cfg.settle_after_ms),
            self.cfg.detailed_final_max,
        )
    }

    /// Move final, durable orders that finished before `cutoff_ms` to their compact
    /// settled form (see [`super::settled`]), dropping what only a live order needs: the
    /// reference index entries, the router's decision, the payout card. Returns how many
    /// moved. The shell calls it every few seconds with `now - settle_after_ms`.
    ///
    /// Concurrency: each order is inserted into the settled map *before* it is removed
    /// from the live one, and every reader looks at the live map first, so an order is
    /// never absent from both; acceptance checks the settled map while it holds the live
    /// entry's lock (see `accept_order`). A final order never changes, so the copy taken
    /// here stays exact.
    pub fn settle_final_orders_before(&self, cutoff_ms: u64) -> usize {
        self.settle_final_orders(cutoff_ms, usize::MAX)
    }

    /// [`Engine::settle_final_orders_before`] `cutoff_ms`, and beyond that the oldest
    /// queued final orders until at most `keep_max` are left waiting (taken in the order
    /// their final records became durable).
    pub fn settle_final_orders(&self, cutoff_ms: u64, keep_max: usize) -> usize {
        const BATCH: usize = 4096;
        let mut moved = 0;
        loop {
            let keys: Vec<OrderKey> = {
                let mut q = self.to_settle.lock().unwrap_or_else(|p| p.into_inner());
                let mut over = q.len().saturating_sub(keep_max);
                q.take_front_while(BATCH, |e| {
                    let take = e.0 < cutoff_ms || over > 0;
                    over = over.saturating_sub(1);
                    take
                })
                .into_iter()
                .map(|e| e.1)
                .collect()
            };
            if keys.is_empty() {
                return moved;
            }
            let batch: Vec<(OrderKey, Settled)> = keys
                .into_iter()
                .filter_map(|key| match self.orders.get(&key) {
                    Some(o)
                        if o.phase == Phase::Final
                            && o.durable.is_some_and(|d| d.status.is_final()) =>
                    {
                        Some((key, Settled::of(&o)))
                    }
                    // Already settled or evicted, or not what the queue said.
                    _ => None,
                })
                .collect();
            // Settled first, then out of the live map.
            self.settled.insert_all(&batch);
            for (key, settled) in &batch {
                self.orders.remove_if(key, |_, o| o.phase == Phase::Final);
                for a in &settled.attempts {
                    self.by_ref.remove(&a.order_ref);
                }
                self.payout_cards.remove(key);
            }
            moved += batch.len();
        }
    }

    /// Forget final orders that finished before `cutoff_ms` (the idempotency retention):
    /// bounds memory and snapshot size. Returns how many were dropped. Orders not final
    /// are never dropped.
    pub fn evict_final_orders_before(&self, cutoff_ms: u64) -> usize {
        let mut refs = Vec::new();
        let mut dropped = 0;
        // The router's decision goes with its order.
        self.orders.retain(|_, o| {
            let drop = o.phase == Phase::Final && o.finished_at_ms < cutoff_ms;
            if drop {
                dropped += 1;
                refs.extend(o.attempts.iter().map(|a| a.order_ref));
            }
            !drop
        });
        for r in refs {
            self.by_ref.remove(&r);
        }
        dropped + self.settled.evict_before(cutoff_ms)
    }
}
