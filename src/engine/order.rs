//! One order's state machine: attempts on channels, and the failover rule.
//!
//! This is where DESIGN.md §4 rules 1, 2 and 4 are enforced for a single order:
//! - a new attempt (on the next channel) may start only when every earlier attempt
//!   *definitively did not process* the order (never sent, or a NOT_PROCESSED class
//!   answer) — [`Order::may_try_another_channel`];
//! - a timeout or a lost line makes the attempt UNKNOWN: the order goes PENDING and is
//!   queried on that same channel;
//! - a final state (SUCCESS or FAILED) never changes again; a contradicting late result is
//!   counted as a mismatch for reconciliation, never applied.

use crate::channel::message::{OrderRef, RspClass, RspCode, Serial};
use crate::engine::route::Decision;
use crate::message::{AgreementId, ChannelId, OrderId, Outcome, Purpose, Reason, Status};
use crate::wire::field::Ascii;
use crate::wire::header::MerchantNo;

/// Idempotency key of an order: (merchant number, order id).
pub type OrderKey = (MerchantNo, OrderId);

/// What the order does, and the content a repeated request must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// Debit by agreement.
    Debit {
        /// The agreement debited.
        agreement: AgreementId,
    },
    /// Payout to a card.
    Payout {
        /// Keyed hash of the card number (never the number itself).
        card_hash: [u8; 16],
    },
}

/// Where the order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// An attempt has been handed to a channel connection; no answer yet.
    InFlight,
    /// The outcome is not known (timeout, lost line) or the channel is processing; the
    /// order is queried on the channel of its last attempt until final.
    Pending,
    /// SUCCESS or FAILED; never changes again.
    Final,
}

/// What became of one attempt on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Handed to the connection; no answer yet.
    InFlight,
    /// Provably never written to the channel (no connection, saturated).
    NotSent,
    /// The channel answered NOT_PROCESSED: nothing was done there.
    NotProcessed(RspCode),
    /// The channel declined: final FAILED.
    Declined(RspCode),
    /// The channel executed it: final SUCCESS.
    Success(RspCode),
    /// The channel accepted it; final result later.
    Processing(RspCode),
    /// No answer in time, or the line dropped: outcome unknown.
    Unknown,
}

impl AttemptOutcome {
    /// The stored form (journal, snapshots, settled records): a tag and, for the
    /// outcomes that carry one, the channel's code.
    pub fn tag(self) -> (u8, Option<RspCode>) {
        match self {
            AttemptOutcome::InFlight => (0, None),
            AttemptOutcome::NotSent => (1, None),
            AttemptOutcome::NotProcessed(c) => (2, Some(c)),
            AttemptOutcome::Declined(c) => (3, Some(c)),
            AttemptOutcome::Success(c) => (4, Some(c)),
            AttemptOutcome::Processing(c) => (5, Some(c)),
            AttemptOutcome::Unknown => (6, None),
        }
    }

    /// True when the outcome stored with `tag` carries a code.
    pub fn tag_has_code(tag: u8) -> bool {
        (2..=5).contains(&tag)
    }

    /// Back from [`AttemptOutcome::tag`] (`code` is ignored by the tags without one);
    /// `None` for an unknown tag.
    pub fn from_tag(tag: u8, code: RspCode) -> Option<AttemptOutcome> {
        Some(match tag {
            0 => AttemptOutcome::InFlight,
            1 => AttemptOutcome::NotSent,
            2 => AttemptOutcome::NotProcessed(code),
            3 => AttemptOutcome::Declined(code),
            4 => AttemptOutcome::Success(code),
            5 => AttemptOutcome::Processing(code),
            6 => AttemptOutcome::Unknown,
            _ => return None,
        })
    }

    /// True when this attempt certainly did not move money and never will.
    pub fn definitively_not_processed(self) -> bool {
        matches!(
            self,
            AttemptOutcome::NotSent | AttemptOutcome::NotProcessed(_)
        )
    }
}

/// One try of the order on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The channel.
    pub channel: ChannelId,
    /// Channel order reference, unique per attempt (the channel's ledger key).
    pub order_ref: OrderRef,
    /// When it was handed to the channel connection (ms since the epoch).
    pub sent_at_ms: u64,
    /// What became of it.
    pub outcome: AttemptOutcome,
}

/// A channel's answer about an attempt, from its response, a query, a late reply or a
/// notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// Never written to the channel.
    NotSent,
    /// No answer in time, or the line dropped after writing.
    Unknown,
    /// The channel answered with this class and code.
    Answered {
        /// Class byte.
        class: RspClass,
        /// Code text, carried through to the lender.
        code: RspCode,
        /// Channel serial, when assigned.
        serial: Serial,
    },
}

/// What the engine must do after an attempt result was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The order is now final.
    Final,
    /// Try the next candidate channel (the previous attempt definitively did nothing).
    TryNext,
    /// Keep the order PENDING and query it on its current channel.
    Query,
    /// Nothing changes (stale, duplicate, or about an older attempt).
    Unchanged,
    /// The result contradicts the order's final state: count it, do not apply it.
    Mismatch,
}

/// Most channel attempts per order (each only after the previous definitively did
/// nothing); bounds the per-order memory.
pub const ATTEMPTS_MAX: usize = 4;

/// An order and its attempts.
#[derive(Debug, Clone)]
pub struct Order {
    /// Idempotency key.
    pub key: OrderKey,
    /// Debit or payout, with the content that identifies a repeat.
    pub kind: OrderKind,
    /// Amount in fen.
    pub amount: u64,
    /// Statement text, re-sent with an attempt on the next channel.
    pub purpose: Purpose,
    /// Phase.
    pub phase: Phase,
    /// Status and reason as the lender sees them.
    pub outcome: Outcome,
    /// Attempts so far, oldest first (at most [`ATTEMPTS_MAX`]).
    pub attempts: Vec<Attempt>,
    /// Channels not tried yet, in routing order.
    pub remaining: Vec<ChannelId>,
    /// When the order was accepted.
    pub accepted_at_ms: u64,
    /// When it became final (0 while not).
    pub finished_at_ms: u64,
    /// Queries sent while PENDING (drives the backoff).
    pub queries: u32,
    /// The latest state whose journal record is durable: what a repeated request or a
    /// query may be told (DESIGN.md §4 rule 3). `None` until the acceptance is durable.
    pub durable: Option<Outcome>,
    /// The router's decision that accepted it (admin: "why this channel"), while the
    /// order is live. It lives and goes with the order: a map of its own beside the
    /// orders cost an insert and a removal per order, and its eight shards doubled
    /// together (~17 ms each at 917k live orders, a 1 s latency spike at 20k debits/s).
    /// Not journaled: an order loaded from disk has none.
    pub decision: Option<Box<Decision>>,
}

impl Order {
    /// A new accepted order, before its first attempt.
    pub fn new(
        key: OrderKey,
        kind: OrderKind,
        amount: u64,
        purpose: Purpose,
        route: Vec<ChannelId>,
        now_ms: u64,
    ) -> Order {
        Order {
            key,
            kind,
            amount,
            purpose,
            phase: Phase::InFlight,
            outcome: Outcome::new(Status::Pending, Reason::OK),
            attempts: Vec::with_capacity(1),
            remaining: route,
            accepted_at_ms: now_ms,
            finished_at_ms: 0,
            queries: 0,
            durable: None,
            decision: None,
        }
    }

    /// True when a new attempt is allowed by DESIGN.md §4 rule 2: not final, and every
    /// earlier attempt definitively did not process the order.
    pub fn may_try_another_channel(&self) -> bool {
        self.phase != Phase::Final
            && self.attempts.len() < ATTEMPTS_MAX
            && self
                .attempts
                .iter()
                .all(|a| a.outcome.definitively_not_processed())
    }

    /// Start the next attempt on the next remaining channel. Returns `None` (and changes
    /// nothing) when rule 2 forbids it or no channel is left.
    pub fn start_next_attempt(&mut self, order_ref: OrderRef, now_ms: u64) -> Option<&Attempt> {
        if !self.may_try_another_channel() || self.remaining.is_empty() {
            return None;
        }
        let channel = self.remaining.remove(0);
        self.attempts.push(Attempt {
            channel,
            order_ref,
            sent_at_ms: now_ms,
            outcome: AttemptOutcome::InFlight,
        });
        self.phase = Phase::InFlight;
        self.outcome = Outcome::new(Status::Pending, Reason::OK);
        self.attempts.last()
    }

    /// The current (last) attempt.
    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// Index of the attempt with this order reference.
    pub fn attempt_index(&self, order_ref: &OrderRef) -> Option<usize> {
        self.attempts.iter().position(|a| &a.order_ref == order_ref)
    }

    /// The channel of the last attempt (empty when none).
    pub fn channel(&self) -> ChannelId {
        self.current().map(|a| a.channel).unwrap_or_default()
    }

    /// Apply a channel result about attempt `idx`.
    pub fn apply(&mut self, idx: usize, result: AttemptResult, now_ms: u64) -> Step {
        let Some(attempt) = self.attempts.get(idx).copied() else {
            return Step::Unchanged;
        };
        if self.phase == Phase::Final {
            return match result {
                AttemptResult::Answered { class, .. } if class.is_final() => {
                    let agrees = match (class, self.outcome.status) {
                        (RspClass::Success, Status::Success) => {
                            matches!(attempt.outcome, AttemptOutcome::Success(_))
                        }
                        (RspClass::Declined, Status::Failed) => true,
                        _ => false,
                    };
                    if agrees {
                        Step::Unchanged
                    } else {
                        Step::Mismatch
                    }
                }
                _ => Step::Unchanged,
            };
        }
        // An attempt that already definitively did nothing cannot come back to life: a
        // later contradicting answer is a mismatch for reconciliation.
        if attempt.outcome.definitively_not_processed() {
            return match result {
                AttemptResult::Answered { class, .. }
                    if class == RspClass::Success || class == RspClass::Processing =>
                {
                    Step::Mismatch
                }
                _ => Step::Unchanged,
            };
        }
        let is_last = idx + 1 == self.attempts.len();
        debug_assert!(is_last, "only the last attempt can be open");
        match result {
            AttemptResult::NotSent => {
                if attempt.outcome != AttemptOutcome::InFlight {
                    // Was already written (UNKNOWN/PROCESSING): "not sent" cannot apply.
                    return Step::Unchanged;
                }
                self.attempts[idx].outcome = AttemptOutcome::NotSent;
                self.after_not_processed("", now_ms)
            }
            AttemptResult::Unknown => match attempt.outcome {
                AttemptOutcome::InFlight => {
                    self.attempts[idx].outcome = AttemptOutcome::Unknown;
                    self.phase = Phase::Pending;
                    self.outcome = Outcome::new(Status::Pending, Reason::OUTCOME_UNKNOWN);
                    Step::Query
                }
                _ => Step::Unchanged,
            },
            AttemptResult::Answered { class, code, .. } => match class {
                RspClass::Success => {
                    self.attempts[idx].outcome = AttemptOutcome::Success(code);
                    self.finish(Status::Success, Reason::OK, code, now_ms);
                    Step::Final
                }
                RspClass::Declined => {
                    self.attempts[idx].outcome = AttemptOutcome::Declined(code);
                    self.finish(Status::Failed, Reason::CHANNEL_DECLINED, code, now_ms);
                    Step::Final
                }
                RspClass::Processing => {
                    self.attempts[idx].outcome = AttemptOutcome::Processing(code);
                    self.phase = Phase::Pending;
                    self.outcome = Outcome::new(Status::Pending, Reason::OK);
                    Step::Query
                }
                RspClass::NotProcessed => {
                    self.attempts[idx].outcome = AttemptOutcome::NotProcessed(code);
                    self.after_not_processed(code.0.as_str(), now_ms)
                }
            },
        }
    }

    fn after_not_processed(&mut self, code: &str, now_ms: u64) -> Step {
        if self.may_try_another_channel() && !self.remaining.is_empty() {
            return Step::TryNext;
        }
        let code = crate::channel::message::RspCode::new(code).unwrap_or(RspCode(Ascii::empty()));
        self.finish(Status::Failed, Reason::NO_CHANNEL, code, now_ms);
        Step::Final
    }

    fn finish(&mut self, status: Status, reason: Reason, code: RspCode, now_ms: u64) {
        debug_assert!(self.phase != Phase::Final, "a final order never changes");
        self.phase = Phase::Final;
        self.finished_at_ms = now_ms;
        self.outcome = Outcome {
            status,
            reason,
            field: 0,
            channel_code: Ascii::new(code.0.as_str()).unwrap_or_default(),
        };
    }

    /// True when `other` (a repeated request) has the same content as this order.
    pub fn same_content(&self, kind: &OrderKind, amount: u64) -> bool {
        &self.kind == kind && self.amount == amount
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::message::Code;
    use proptest::prelude::*;

    fn order(route: &[&str]) -> Order {
        Order::new(
            (MerchantNo::new("M1").unwrap(), OrderId::new("O1").unwrap()),
            OrderKind::Debit {
                agreement: AgreementId(1),
            },
            100,
            Purpose::new("test").unwrap(),
            route.iter().map(|c| ChannelId::new(c).unwrap()).collect(),
            0,
        )
    }

    fn r(n: u32) -> OrderRef {
        OrderRef::new(&format!("R{n}")).unwrap()
    }

    fn answer(code: Code) -> AttemptResult {
        let (code, class) = code.pair();
        AttemptResult::Answered {
            class,
            code,
            serial: Serial::empty(),
        }
    }

    #[test]
    fn not_processed_fails_over_and_unknown_never_does() {
        let mut o = order(&["A", "B", "C"]);
        o.start_next_attempt(r(1), 0).unwrap();
        assert_eq!(o.apply(0, answer(Code::BUSY), 1), Step::TryNext);
        o.start_next_attempt(r(2), 1).unwrap();
        assert_eq!(o.apply(1, AttemptResult::Unknown, 2), Step::Query);
        assert!(!o.may_try_another_channel());
        assert!(
            o.start_next_attempt(r(3), 3).is_none(),
            "rule 2: no failover after UNKNOWN"
        );
        assert_eq!(o.outcome.reason, Reason::OUTCOME_UNKNOWN);
        assert_eq!(o.apply(1, answer(Code::OK), 4), Step::Final);
        assert_eq!(o.outcome.status, Status::Success);
        assert_eq!(o.channel().as_str(), "B");
    }

    #[test]
    fn final_never_changes_and_contradictions_are_mismatches() {
        let mut o = order(&["A"]);
        o.start_next_attempt(r(1), 0).unwrap();
        assert_eq!(o.apply(0, answer(Code::INSUFFICIENT_FUNDS), 1), Step::Final);
        assert_eq!(
            o.apply(0, answer(Code::INSUFFICIENT_FUNDS), 2),
            Step::Unchanged
        );
        assert_eq!(o.apply(0, answer(Code::OK), 3), Step::Mismatch);
        assert_eq!(o.outcome.status, Status::Failed);
        assert_eq!(o.outcome.channel_code.as_str(), "1001");
    }

    #[test]
    fn all_channels_not_processed_is_failed_no_channel() {
        let mut o = order(&["A", "B"]);
        o.start_next_attempt(r(1), 0).unwrap();
        assert_eq!(o.apply(0, AttemptResult::NotSent, 0), Step::TryNext);
        o.start_next_attempt(r(2), 0).unwrap();
        assert_eq!(o.apply(1, answer(Code::MAINTENANCE), 0), Step::Final);
        assert_eq!(
            (o.outcome.status, o.outcome.reason),
            (Status::Failed, Reason::NO_CHANNEL)
        );
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Answer(usize, Code),
        Unknown(usize),
        NotSent(usize),
        Next,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        let code = proptest::sample::select(Code::ALL.to_vec());
        prop_oneof![
            (0usize..4, code).prop_map(|(i, c)| Ev::Answer(i, c)),
            (0usize..4).prop_map(Ev::Unknown),
            (0usize..4).prop_map(Ev::NotSent),
            Just(Ev::Next),
        ]
    }

    proptest! {
        /// Under any sequence of results, a second attempt only exists when every earlier
        /// attempt definitively did nothing, and a final state never changes.
        #[test]
        fn money_safety_invariants_hold(events in proptest::collection::vec(ev(), 0..40)) {
            let mut o = order(&["A", "B", "C", "D"]);
            o.start_next_attempt(r(0), 0);
            let mut final_outcome = None;
            for (t, e) in events.into_iter().enumerate() {
                let t = t as u64;
                match e {
                    Ev::Answer(i, c) => { o.apply(i, answer(c), t); }
                    Ev::Unknown(i) => { o.apply(i, AttemptResult::Unknown, t); }
                    Ev::NotSent(i) => { o.apply(i, AttemptResult::NotSent, t); }
                    Ev::Next => { o.start_next_attempt(r(t as u32 + 1), t); }
                }
                for w in 1..o.attempts.len() {
                    prop_assert!(o.attempts[..w].iter().all(|a| a.outcome.definitively_not_processed()),
                        "attempt {} started after a non-definitive attempt: {:?}", w, o.attempts);
                }
                let succeeded = o.attempts.iter().filter(|a| matches!(a.outcome, AttemptOutcome::Success(_))).count();
                prop_assert!(succeeded <= 1);
                if let Some(f) = final_outcome {
                    prop_assert_eq!(o.outcome, f, "final changed");
                    prop_assert_eq!(o.phase, Phase::Final);
                }
                if o.phase == Phase::Final {
                    final_outcome = Some(o.outcome);
                    prop_assert!(o.outcome.status.is_final());
                }
            }
        }
    }
}
