//! The simulator's ledger: every debit and payout it accepted, keyed by the switch's order
//! reference, with a duplicate counter. It is the oracle of the tests: an order reference
//! is executed at most once, and the sum of what moved is what the statement says.
//! Also writes the daily statement file (reconciliation input, `CHANNEL.md` §11).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::channel::message::{OrderRef, RspClass};
use crate::channel::Code;
use crate::message::types::OrderType;

/// State of one order at the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Accepted, answered PROCESSING; `outcome` is what it will become.
    Processing {
        /// The final code it will get.
        outcome: Code,
    },
    /// Final.
    Final {
        /// Final code (`0000` success, or a decline code).
        code: Code,
        /// When it became final, ms since the Unix epoch.
        finished_at_ms: u64,
    },
}

/// One order in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The switch's order reference (the key).
    pub order_ref: OrderRef,
    /// Debit or payout.
    pub kind: OrderType,
    /// Amount in fen.
    pub amount_fen: u64,
    /// The channel's serial number.
    pub serial: String,
    /// The card the money moved on, used only for daily limits and refunds (never logged).
    pub card_key: String,
    /// When it was received, ms since the Unix epoch.
    pub received_at_ms: u64,
    /// Where it stands.
    pub state: EntryState,
    /// How many more times the same reference arrived after the first (each one counted,
    /// none executed).
    pub duplicates: u32,
}

impl LedgerEntry {
    /// (code, class) the order's state is reported with (responses, queries).
    pub fn reported(&self) -> (Code, RspClass) {
        match self.state {
            EntryState::Processing { .. } => (Code::ACCEPTED, RspClass::Processing),
            EntryState::Final { code, .. } => (code, code.class()),
        }
    }

    /// True when the money moved (final success).
    pub fn succeeded(&self) -> bool {
        matches!(self.state, EntryState::Final { code: Code::OK, .. })
    }

    /// Finish time, 0 while processing.
    pub fn finished_at_ms(&self) -> u64 {
        match self.state {
            EntryState::Final { finished_at_ms, .. } => finished_at_ms,
            EntryState::Processing { .. } => 0,
        }
    }
}

/// Every order the simulator accepted.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: HashMap<OrderRef, LedgerEntry>,
    duplicates: u64,
}

impl Ledger {
    /// Make room for `orders` more orders without growing the table. A long load run
    /// asks for it up front: the table doubles by moving every entry while the bank's
    /// lock is held, and at 3.7M orders that stalled the channel for ~5 s — latency the
    /// generator charged to the switch (BENCHMARKS.md, fifth session).
    pub fn reserve(&mut self, orders: usize) {
        self.entries.reserve(orders);
    }

    /// Look up an order.
    pub fn get(&self, r: &OrderRef) -> Option<&LedgerEntry> {
        self.entries.get(r)
    }

    /// Count a duplicate arrival of `r` if it is known; true when it was.
    pub fn note_duplicate(&mut self, r: &OrderRef) -> bool {
        match self.entries.get_mut(r) {
            Some(e) => {
                e.duplicates += 1;
                self.duplicates += 1;
                true
            }
            None => false,
        }
    }

    /// Record a new order. The caller has checked it is not a duplicate.
    pub fn insert(&mut self, e: LedgerEntry) {
        debug_assert!(!self.entries.contains_key(&e.order_ref));
        self.entries.insert(e.order_ref, e);
    }

    /// Make a processing order final; returns the entry, or `None` when it is unknown or
    /// already final (never finalised twice).
    pub fn finalize(&mut self, r: &OrderRef, now_ms: u64) -> Option<LedgerEntry> {
        let e = self.entries.get_mut(r)?;
        let EntryState::Processing { outcome } = e.state else {
            return None;
        };
        e.state = EntryState::Final {
            code: outcome,
            finished_at_ms: now_ms,
        };
        Some(e.clone())
    }

    /// Total duplicate arrivals across all orders (0 when the switch never re-sent a
    /// reference).
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Number of orders.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All entries (unordered copy).
    pub fn snapshot(&self) -> Vec<LedgerEntry> {
        self.entries.values().cloned().collect()
    }

    /// Sum of successful amounts of one kind, fen.
    pub fn succeeded_fen(&self, kind: OrderType) -> u64 {
        self.entries
            .values()
            .filter(|e| e.kind == kind && e.succeeded())
            .map(|e| e.amount_fen)
            .sum()
    }

    /// The statement of one China-time calendar day (`day` = days since 1970-01-01 in
    /// UTC+8): every order that became final that day, sorted by finish time then ref.
    pub fn statement(&self, institution: &str, day: u64) -> String {
        let mut rows: Vec<&LedgerEntry> = self
            .entries
            .values()
            .filter(|e| e.finished_at_ms() > 0 && cst_day(e.finished_at_ms()) == day)
            .collect();
        rows.sort_by(|a, b| {
            (a.finished_at_ms(), a.order_ref.as_str())
                .cmp(&(b.finished_at_ms(), b.order_ref.as_str()))
        });
        let mut s = format!("# sluice-sim statement {} {institution}\n", civil(day));
        for e in rows {
            let (code, _) = e.reported();
            let _ = writeln!(
                s,
                "{}|{}|{}|{}|{}|{}|{}",
                e.order_ref,
                e.serial,
                if e.kind == OrderType::Debit {
                    "DEBIT"
                } else {
                    "PAYOUT"
                },
                e.amount_fen,
                if e.succeeded() { "SUCCESS" } else { "FAILED" },
                code.as_str(),
                e.finished_at_ms()
            );
        }
        s
    }

    /// Write [`Ledger::statement`] to a file.
    pub fn write_statement(&self, path: &Path, institution: &str, day: u64) -> std::io::Result<()> {
        std::fs::write(path, self.statement(institution, day))
    }
}

/// China-time (UTC+8) day number of a timestamp.
pub fn cst_day(ms: u64) -> u64 {
    (ms + 8 * 3_600_000) / 86_400_000
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
pub fn civil(day: u64) -> String {
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(r: &str, state: EntryState) -> LedgerEntry {
        LedgerEntry {
            order_ref: OrderRef::new(r).unwrap(),
            kind: OrderType::Debit,
            amount_fen: 100,
            serial: "S1".into(),
            card_key: String::new(),
            received_at_ms: 0,
            state,
            duplicates: 0,
        }
    }

    #[test]
    fn a_reserved_ledger_takes_its_orders_without_growing() {
        let mut l = Ledger::default();
        l.reserve(5_000);
        let room = l.entries.capacity();
        assert!(room >= 5_000);
        for i in 0..5_000 {
            l.insert(entry(
                &format!("R{i}"),
                EntryState::Processing { outcome: Code::OK },
            ));
        }
        assert_eq!(l.entries.capacity(), room, "no table growth while filling");
        assert_eq!(l.entries.len(), 5_000);
    }

    #[test]
    fn finalizes_once_and_counts_duplicates() {
        let mut l = Ledger::default();
        l.insert(entry("A", EntryState::Processing { outcome: Code::OK }));
        let a = OrderRef::new("A").unwrap();
        assert!(l.note_duplicate(&a));
        assert!(!l.note_duplicate(&OrderRef::new("B").unwrap()));
        assert!(l.finalize(&a, 1_704_164_645_678).is_some());
        assert!(l.finalize(&a, 1_704_164_645_679).is_none());
        assert_eq!(l.duplicates(), 1);
        assert_eq!(l.succeeded_fen(OrderType::Debit), 100);
        let st = l.statement("INST", cst_day(1_704_164_645_678));
        assert_eq!(
            st,
            "# sluice-sim statement 2024-01-02 INST\nA|S1|DEBIT|100|SUCCESS|0000|1704164645678\n"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), "1970-01-01");
        assert_eq!(civil(19_724), "2024-01-02");
        assert_eq!(cst_day(16 * 3_600_000), 1); // 1970-01-01 16:00 UTC is the 2nd in China
    }
}
