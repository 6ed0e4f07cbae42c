//! Final orders past their detail window, kept in a compact form for the rest of the
//! idempotency retention (issue 7: memory per retained order).
//!
//! A live [`Order`] carries what it needs while it can still change: the statement text to
//! re-send, the channels not tried yet, the query backoff, the router's decision, an index
//! entry per channel reference. Once it is final, durable and older than
//! `EngineConfig::settle_after_ms`, none of that is read again. What stays is what a
//! repeated request (same content or not), an ORDER_QUERY, a snapshot and reconciliation
//! need: the content that identifies a repeat, the outcome, the times, and the attempts
//! with their channel references.
//!
//! Concurrency rule (see `Engine::settle_final_orders_before`): an order is inserted here
//! *before* it is removed from the live map, and readers look in the live map first, so a
//! reader never misses an order that is moving between the two.

use smallvec::SmallVec;

use super::order::{Attempt, Order, OrderKey, OrderKind, Phase};
use crate::message::{ChannelId, Outcome, Purpose};

/// A settled (final, durable, past its detail window) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Debit or payout, with the content that identifies a repeat.
    pub kind: OrderKind,
    /// Amount in fen.
    pub amount: u64,
    /// The final outcome (durable).
    pub outcome: Outcome,
    /// When the order was accepted.
    pub accepted_at_ms: u64,
    /// When it became final.
    pub finished_at_ms: u64,
    /// Every attempt, oldest first (one inline; failovers spill to the heap).
    pub attempts: SmallVec<[Attempt; 1]>,
}

impl Settled {
    /// The settled form of a final order.
    pub fn of(o: &Order) -> Settled {
        debug_assert_eq!(o.phase, Phase::Final);
        Settled {
            kind: o.kind,
            amount: o.amount,
            outcome: o.outcome,
            accepted_at_ms: o.accepted_at_ms,
            finished_at_ms: o.finished_at_ms,
            attempts: o.attempts.iter().copied().collect(),
        }
    }

    /// The channel of the last attempt (empty when none).
    pub fn channel(&self) -> ChannelId {
        self.attempts.last().map(|a| a.channel).unwrap_or_default()
    }

    /// The order as a live [`Order`] would show it (snapshots, reconciliation, the admin
    /// view). The statement text and the query count are not kept: empty and 0.
    pub fn to_order(&self, key: OrderKey) -> Order {
        Order {
            key,
            kind: self.kind,
            amount: self.amount,
            purpose: Purpose::default(),
            phase: Phase::Final,
            outcome: self.outcome,
            attempts: self.attempts.to_vec(),
            remaining: Vec::new(),
            accepted_at_ms: self.accepted_at_ms,
            finished_at_ms: self.finished_at_ms,
            queries: 0,
            durable: Some(self.outcome),
        }
    }
}

/// What a repeated request, a query or the admin view needs of an order, live or settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts {
    pub kind: OrderKind,
    pub amount: u64,
    /// The latest durable state (`None` until the acceptance is durable).
    pub durable: Option<Outcome>,
    pub channel: ChannelId,
    pub attempts: u8,
    pub accepted_at_ms: u64,
    pub finished_at_ms: u64,
}

impl Facts {
    pub fn of_order(o: &Order) -> Facts {
        Facts {
            kind: o.kind,
            amount: o.amount,
            durable: o.durable,
            channel: o.channel(),
            attempts: o.attempts.len() as u8,
            accepted_at_ms: o.accepted_at_ms,
            finished_at_ms: o.finished_at_ms,
        }
    }

    pub fn of_settled(s: &Settled) -> Facts {
        Facts {
            kind: s.kind,
            amount: s.amount,
            durable: Some(s.outcome),
            channel: s.channel(),
            attempts: s.attempts.len() as u8,
            accepted_at_ms: s.accepted_at_ms,
            finished_at_ms: s.finished_at_ms,
        }
    }

    /// True when a repeated request has the same content.
    pub fn same_content(&self, kind: &OrderKind, amount: u64) -> bool {
        &self.kind == kind && self.amount == amount
    }
}
