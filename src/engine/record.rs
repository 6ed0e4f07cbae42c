//! Journal records: every state change the engine makes, emitted as
//! [`Action::Journal`](super::Action::Journal) *before* any action that tells the lender
//! or a channel about it (DESIGN.md §4 rule 3).
//!
//! No record carries a clear card or ID number: agreements are recorded with keyed
//! hashes and the last four digits only.

use super::agreement::Agreement;
use super::order::{AttemptOutcome, OrderKey, OrderKind};
use crate::channel::message::OrderRef;
use crate::message::{AgreementId, ChannelId, Outcome, Purpose};

/// One journaled state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An order was accepted and its first attempt is about to be sent.
    OrderAccepted {
        /// Idempotency key.
        key: OrderKey,
        /// Debit or payout and its identifying content.
        kind: OrderKind,
        /// Amount in fen.
        amount: u64,
        /// Statement text.
        purpose: Purpose,
        /// Acceptance time.
        at_ms: u64,
    },
    /// An attempt on a channel is about to be sent (recorded before the bytes leave, so
    /// that after a crash the order is queried, never sent again elsewhere).
    AttemptStarted {
        /// Order.
        key: OrderKey,
        /// Channel.
        channel: ChannelId,
        /// Channel order reference of this attempt.
        order_ref: OrderRef,
        /// When.
        at_ms: u64,
    },
    /// What became of an attempt (non-final outcomes: not sent, not processed, unknown,
    /// processing).
    AttemptOutcome {
        /// Order.
        key: OrderKey,
        /// Which attempt.
        order_ref: OrderRef,
        /// Outcome.
        outcome: AttemptOutcome,
    },
    /// The order reached its final state; `notify_id` is the one notification for it.
    OrderFinal {
        /// Order.
        key: OrderKey,
        /// Final status and reason.
        outcome: Outcome,
        /// Attempt that decided it.
        order_ref: Option<OrderRef>,
        /// Notification id.
        notify_id: u64,
        /// When.
        at_ms: u64,
    },
    /// An agreement was created or changed (signed, backup added, cancelled, revoked).
    Agreement(Box<Agreement>),
    /// The lender acknowledged a notification.
    NotifyAcked {
        /// Notification id.
        notify_id: u64,
    },
    /// A bank-side revocation notification was queued for the lender.
    RevocationNotice {
        /// Agreement.
        agreement: AgreementId,
        /// Channel that revoked it.
        channel: ChannelId,
        /// Notification id.
        notify_id: u64,
    },
}
