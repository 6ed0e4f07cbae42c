//! The simulated payment company's books, without I/O: agreements (one per card and ID),
//! pending signings and their SMS codes, supported banks and card types, per-transaction
//! and per-card daily limits, the prefunded payout balance, and the ledger.
//! Time and randomness come in as arguments.

use std::collections::HashMap;

use super::ledger::{cst_day, EntryState, Ledger, LedgerEntry};
use super::rng::Rng;
use crate::channel::message::{PayReq, PayoutReq, SignReq, VerifyReq};
use crate::channel::Code;
use crate::message::types::{CardType, OrderType};

/// How SMS codes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SmsMode {
    /// Six random digits, readable from the outbox.
    #[default]
    Random,
    /// The last six digits of the bank-reserved phone (documented in CHANNEL.md §11), so a
    /// load generator can sign without reading the outbox.
    Deterministic,
}

/// What the simulated channel supports and allows.
#[derive(Debug, Clone)]
pub struct BankConfig {
    /// Supported bank codes; empty = every bank.
    pub banks: Vec<String>,
    /// Card types accepted for signing and debits.
    pub debit_card_types: Vec<CardType>,
    /// Card types accepted for payouts.
    pub payout_card_types: Vec<CardType>,
    /// Largest single debit or payout, fen.
    pub per_txn_max_fen: u64,
    /// Largest total per card per China-time day (debits and payouts), fen.
    pub daily_max_fen: u64,
    /// Prefunded balance payouts draw from, fen.
    pub payout_balance_fen: u64,
    /// SMS code mode.
    pub sms_mode: SmsMode,
    /// How long an SMS code is valid, ms.
    pub sms_ttl_ms: u64,
}

impl Default for BankConfig {
    fn default() -> Self {
        BankConfig {
            banks: Vec::new(),
            debit_card_types: vec![CardType::Debit, CardType::Credit],
            payout_card_types: vec![CardType::Debit],
            per_txn_max_fen: 5_000_000,         // 50 000 yuan
            daily_max_fen: 20_000_000,          // 200 000 yuan
            payout_balance_fen: 10_000_000_000, // 100 million yuan
            sms_mode: SmsMode::Random,
            sms_ttl_ms: 300_000,
        }
    }
}

/// One channel agreement.
#[derive(Debug, Clone)]
pub struct Agreement {
    /// Agreement number.
    pub no: String,
    /// Card number (the bank's own record).
    pub card: String,
    /// Card's bank.
    pub bank: String,
    /// Card type.
    pub card_type: CardType,
    /// Set when cancelled by the merchant or revoked at the bank.
    pub ended: bool,
    /// Set when revoked at the bank (answers `1003` rather than `1002`).
    pub revoked: bool,
}

#[derive(Debug, Clone)]
struct PendingSign {
    card: String,
    id_no: String,
    bank: String,
    card_type: CardType,
    code: String,
    expires_ms: u64,
    tries_left: u8,
}

/// Result of a VERIFY_REQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyResult {
    /// An SMS code was "sent" to `phone`.
    SmsSent {
        /// The code.
        code: String,
        /// The bank-reserved phone it went to.
        phone: String,
    },
    /// Already signed: the existing agreement number, no SMS.
    AlreadySigned(String),
    /// Refused.
    Declined(Code),
}

/// Random outcome drawn from the profile for one PAY/PAYOUT that passed the checks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Draw {
    /// Answer `2001` and record nothing.
    pub not_processed: bool,
    /// Final outcome `1001` instead of success.
    pub decline: bool,
    /// Answer PROCESSING now, final later.
    pub asynchronous: bool,
}

/// What a PAY/PAYOUT produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayResult {
    /// Recorded in the ledger (final or processing): answer from the entry.
    Recorded(LedgerEntry),
    /// The same order reference arrived before: counted, not executed (`3001`).
    Duplicate,
    /// Nothing done, nothing recorded (class NOT_PROCESSED).
    NotProcessed(Code),
}

impl PayResult {
    /// The PAY/PAYOUT answer: (code, class, serial, finished_at_ms), and the order
    /// reference still processing, whose result the channel notifies later.
    pub fn answer(
        &self,
    ) -> (
        (
            crate::channel::message::RspCode,
            crate::channel::message::RspClass,
            crate::channel::message::Serial,
            u64,
        ),
        Option<crate::channel::OrderRef>,
    ) {
        use crate::wire::field::Ascii;
        match self {
            PayResult::Duplicate => {
                let (c, k) = Code::DUPLICATE_ORDER_REF.pair();
                ((c, k, Ascii::empty(), 0), None)
            }
            PayResult::NotProcessed(c) => {
                let (c, k) = c.pair();
                ((c, k, Ascii::empty(), 0), None)
            }
            PayResult::Recorded(e) => {
                let (c, k) = e.reported();
                let processing = matches!(e.state, super::ledger::EntryState::Processing { .. })
                    .then_some(e.order_ref);
                (
                    (
                        c.into(),
                        k,
                        Ascii::new(&e.serial).unwrap_or_default(),
                        e.finished_at_ms(),
                    ),
                    processing,
                )
            }
        }
    }
}

/// The simulated payment company's books.
#[derive(Debug)]
pub struct Bank {
    cfg: BankConfig,
    agreements: HashMap<String, Agreement>,
    by_card: HashMap<(String, String), String>,
    pending: HashMap<String, PendingSign>,
    daily: HashMap<(String, u64), u64>,
    balance_fen: u64,
    next_agreement: u64,
    next_serial: u64,
    /// Every accepted order.
    pub ledger: Ledger,
}

impl Bank {
    /// Empty books.
    pub fn new(cfg: BankConfig) -> Bank {
        Bank {
            balance_fen: cfg.payout_balance_fen,
            cfg,
            agreements: HashMap::new(),
            by_card: HashMap::new(),
            pending: HashMap::new(),
            daily: HashMap::new(),
            next_agreement: 1,
            next_serial: 1,
            ledger: Ledger::default(),
        }
    }

    /// Remaining prefunded payout balance, fen.
    pub fn balance_fen(&self) -> u64 {
        self.balance_fen
    }

    /// The configuration.
    pub fn config(&self) -> &BankConfig {
        &self.cfg
    }

    /// An agreement by number.
    pub fn agreement(&self, no: &str) -> Option<&Agreement> {
        self.agreements.get(no)
    }

    /// Number of agreements ever issued.
    pub fn agreements_issued(&self) -> u64 {
        self.next_agreement - 1
    }

    fn bank_ok(&self, bank: &str) -> bool {
        self.cfg.banks.is_empty() || self.cfg.banks.iter().any(|b| b == bank)
    }

    /// Identity check: SMS sent, already signed, or declined.
    pub fn verify(&mut self, r: &VerifyReq, now_ms: u64, rng: &mut Rng) -> VerifyResult {
        if !self.bank_ok(r.bank_code.as_str()) || !self.cfg.debit_card_types.contains(&r.card_type)
        {
            return VerifyResult::Declined(Code::CARD_NOT_SUPPORTED);
        }
        let key = (r.card_no.expose().to_string(), r.id_no.expose().to_string());
        if let Some(no) = self.by_card.get(&key) {
            if self.agreements.get(no).is_some_and(|a| !a.ended) {
                return VerifyResult::AlreadySigned(no.clone());
            }
        }
        let phone = r.phone.expose().to_string();
        let code = match self.cfg.sms_mode {
            SmsMode::Deterministic => phone[phone.len().saturating_sub(6)..].to_string(),
            SmsMode::Random => format!("{:06}", rng.below(1_000_000)),
        };
        self.pending.insert(
            r.sign_ref.as_str().to_string(),
            PendingSign {
                card: key.0,
                id_no: key.1,
                bank: r.bank_code.as_str().to_string(),
                card_type: r.card_type,
                code: code.clone(),
                expires_ms: now_ms + self.cfg.sms_ttl_ms,
                tries_left: 3,
            },
        );
        VerifyResult::SmsSent { code, phone }
    }

    /// Confirm with the SMS code: the agreement number, or `1008`.
    pub fn sign(&mut self, r: &SignReq, now_ms: u64) -> Result<String, Code> {
        let sref = r.sign_ref.as_str();
        let p = self.pending.get_mut(sref).ok_or(Code::BAD_SMS_CODE)?;
        if p.expires_ms < now_ms {
            self.pending.remove(sref);
            return Err(Code::BAD_SMS_CODE);
        }
        if p.code != r.sms_code.as_str() {
            p.tries_left = p.tries_left.saturating_sub(1);
            if p.tries_left == 0 {
                self.pending.remove(sref);
            }
            return Err(Code::BAD_SMS_CODE);
        }
        let p = self.pending.remove(sref).ok_or(Code::BAD_SMS_CODE)?;
        let key = (p.card.clone(), p.id_no.clone());
        if let Some(no) = self.by_card.get(&key) {
            if self.agreements.get(no).is_some_and(|a| !a.ended) {
                return Ok(no.clone());
            }
        }
        let no = format!("AGR{:029}", self.next_agreement);
        self.next_agreement += 1;
        self.agreements.insert(
            no.clone(),
            Agreement {
                no: no.clone(),
                card: p.card,
                bank: p.bank,
                card_type: p.card_type,
                ended: false,
                revoked: false,
            },
        );
        self.by_card.insert(key, no.clone());
        Ok(no)
    }

    /// Record an agreement signed before the simulator started (stock agreements, load
    /// tests): the card and ID are then "already signed" and `no` can be debited. False
    /// when `no` is taken or the card and ID are signed under another number.
    pub fn preload(
        &mut self,
        no: &str,
        card: &str,
        id_no: &str,
        bank: &str,
        card_type: CardType,
    ) -> bool {
        let key = (card.to_string(), id_no.to_string());
        if self.agreements.contains_key(no) || self.by_card.contains_key(&key) {
            return false;
        }
        self.agreements.insert(
            no.to_string(),
            Agreement {
                no: no.to_string(),
                card: card.to_string(),
                bank: bank.to_string(),
                card_type,
                ended: false,
                revoked: false,
            },
        );
        self.by_card.insert(key, no.to_string());
        true
    }

    /// Cancel an agreement at the merchant's request.
    pub fn unsign(&mut self, no: &str) -> Code {
        match self.agreements.get_mut(no) {
            Some(a) if !a.ended => {
                a.ended = true;
                Code::OK
            }
            _ => Code::AGREEMENT_INVALID,
        }
    }

    /// Revoke an agreement at the bank; the card's last four digits when it was active.
    pub fn revoke(&mut self, no: &str) -> Option<String> {
        let a = self.agreements.get_mut(no)?;
        if a.ended {
            return None;
        }
        a.ended = true;
        a.revoked = true;
        Some(a.card[a.card.len().saturating_sub(4)..].to_string())
    }

    /// Revoke a random active agreement: (number, last four digits).
    pub fn revoke_random(&mut self, rng: &mut Rng) -> Option<(String, String)> {
        let active: Vec<&String> = self
            .agreements
            .values()
            .filter(|a| !a.ended)
            .map(|a| &a.no)
            .collect();
        if active.is_empty() {
            return None;
        }
        let no = active[rng.below(active.len() as u64) as usize].clone();
        self.revoke(&no).map(|l4| (no, l4))
    }

    fn limits(&self, card: &str, amount: u64, day: u64) -> Result<(), Code> {
        if amount > self.cfg.per_txn_max_fen {
            return Err(Code::TXN_LIMIT_EXCEEDED);
        }
        let used = self
            .daily
            .get(&(card.to_string(), day))
            .copied()
            .unwrap_or(0);
        if used.saturating_add(amount) > self.cfg.daily_max_fen {
            return Err(Code::DAILY_LIMIT_EXCEEDED);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        order_ref: crate::channel::OrderRef,
        kind: OrderType,
        amount: u64,
        card: String,
        now_ms: u64,
        outcome: Code,
        asynchronous: bool,
    ) -> PayResult {
        let serial = if outcome == Code::OK || asynchronous {
            let s = format!("CH{:016}", self.next_serial);
            self.next_serial += 1;
            s
        } else {
            String::new()
        };
        if outcome == Code::OK {
            *self
                .daily
                .entry((card.clone(), cst_day(now_ms)))
                .or_insert(0) += amount;
            if kind == OrderType::Payout {
                self.balance_fen -= amount;
            }
        }
        let state = if asynchronous {
            EntryState::Processing { outcome }
        } else {
            EntryState::Final {
                code: outcome,
                finished_at_ms: now_ms,
            }
        };
        let e = LedgerEntry {
            order_ref,
            kind,
            amount_fen: amount,
            serial,
            card_key: card,
            received_at_ms: now_ms,
            state,
            duplicates: 0,
        };
        self.ledger.insert(e.clone());
        PayResult::Recorded(e)
    }

    fn declined(
        &mut self,
        order_ref: crate::channel::OrderRef,
        kind: OrderType,
        amount: u64,
        now_ms: u64,
        code: Code,
    ) -> PayResult {
        self.record(order_ref, kind, amount, String::new(), now_ms, code, false)
    }

    /// Debit by agreement number. `maintenance` is true inside a window for debits.
    pub fn pay(&mut self, r: &PayReq, now_ms: u64, maintenance: bool, d: Draw) -> PayResult {
        if self.ledger.note_duplicate(&r.order_ref) {
            return PayResult::Duplicate;
        }
        if maintenance {
            return PayResult::NotProcessed(Code::MAINTENANCE);
        }
        let (kind, amount) = (OrderType::Debit, r.amount.0);
        let card = match self.agreements.get(r.agreement_no.as_str()) {
            None => {
                return self.declined(r.order_ref, kind, amount, now_ms, Code::AGREEMENT_INVALID)
            }
            Some(a) if a.revoked => {
                return self.declined(r.order_ref, kind, amount, now_ms, Code::AGREEMENT_REVOKED)
            }
            Some(a) if a.ended => {
                return self.declined(r.order_ref, kind, amount, now_ms, Code::AGREEMENT_INVALID)
            }
            Some(a) => {
                if !self.bank_ok(&a.bank) || !self.cfg.debit_card_types.contains(&a.card_type) {
                    return self.declined(
                        r.order_ref,
                        kind,
                        amount,
                        now_ms,
                        Code::CARD_NOT_SUPPORTED,
                    );
                }
                a.card.clone()
            }
        };
        if let Err(c) = self.limits(&card, amount, cst_day(now_ms)) {
            return self.declined(r.order_ref, kind, amount, now_ms, c);
        }
        if d.not_processed {
            return PayResult::NotProcessed(Code::BUSY);
        }
        let outcome = if d.decline {
            Code::INSUFFICIENT_FUNDS
        } else {
            Code::OK
        };
        self.record(
            r.order_ref,
            kind,
            amount,
            card,
            now_ms,
            outcome,
            d.asynchronous,
        )
    }

    /// Pay out to a card from the prefunded balance.
    pub fn payout(&mut self, r: &PayoutReq, now_ms: u64, maintenance: bool, d: Draw) -> PayResult {
        if self.ledger.note_duplicate(&r.order_ref) {
            return PayResult::Duplicate;
        }
        if maintenance {
            return PayResult::NotProcessed(Code::MAINTENANCE);
        }
        let (kind, amount) = (OrderType::Payout, r.amount.0);
        if !self.bank_ok(r.bank_code.as_str()) || !self.cfg.payout_card_types.contains(&r.card_type)
        {
            return self.declined(r.order_ref, kind, amount, now_ms, Code::CARD_NOT_SUPPORTED);
        }
        let card = r.card_no.expose().to_string();
        if let Err(c) = self.limits(&card, amount, cst_day(now_ms)) {
            return self.declined(r.order_ref, kind, amount, now_ms, c);
        }
        if d.not_processed {
            return PayResult::NotProcessed(Code::BUSY);
        }
        let outcome = if d.decline {
            Code::CARD_FROZEN
        } else {
            Code::OK
        };
        if outcome == Code::OK && amount > self.balance_fen {
            return PayResult::NotProcessed(Code::FUNDS_POSITION_LOW);
        }
        self.record(
            r.order_ref,
            kind,
            amount,
            card,
            now_ms,
            outcome,
            d.asynchronous,
        )
    }

    /// Make an asynchronous order final (see [`Ledger::finalize`]).
    pub fn finalize(&mut self, r: &crate::channel::OrderRef, now_ms: u64) -> Option<LedgerEntry> {
        self.ledger.finalize(r, now_ms)
    }

    /// The invariant the tests check: the payout balance equals the configured balance
    /// minus every successful payout, and no order's daily usage is negative.
    pub fn check_consistency(&self) -> Result<(), String> {
        let paid = self.ledger.succeeded_fen(OrderType::Payout);
        // Processing payouts with a success outcome have already been deducted.
        let reserved: u64 = self
            .ledger
            .snapshot()
            .iter()
            .filter(|e| {
                e.kind == OrderType::Payout
                    && matches!(e.state, EntryState::Processing { outcome: Code::OK })
            })
            .map(|e| e.amount_fen)
            .sum();
        if self.cfg.payout_balance_fen != self.balance_fen + paid + reserved {
            return Err(format!(
                "balance {} + paid {paid} + reserved {reserved} != initial {}",
                self.balance_fen, self.cfg.payout_balance_fen
            ));
        }
        let used: u64 = self.daily.values().sum();
        let moved = self.ledger.succeeded_fen(OrderType::Debit)
            + paid
            + reserved
            + self
                .ledger
                .snapshot()
                .iter()
                .filter(|e| {
                    e.kind == OrderType::Debit
                        && matches!(e.state, EntryState::Processing { outcome: Code::OK })
                })
                .map(|e| e.amount_fen)
                .sum::<u64>();
        if used != moved {
            return Err(format!("daily usage {used} != amounts moved {moved}"));
        }
        Ok(())
    }
}
