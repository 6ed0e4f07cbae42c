//! The channels of the simulated world: a [`Bank`] (the pure books of `sim::bank`) behind
//! each, and the mapping from channel requests to bank calls — the same decisions as the
//! TCP simulator's `handle` (`sim/mod.rs`), without sockets or a clock.

use crate::channel::message::{
    self as ch, PayRsp, PayoutRsp, QueryRsp, Reject, SignRsp, UnsignRsp, VerifyRsp,
};
use crate::channel::{Code, OrderRef};
use crate::message::types::OrderType;
use crate::sim::bank::{Bank, BankConfig, Draw, PayResult, SmsMode, VerifyResult};
use crate::sim::ledger::{EntryState, LedgerEntry};
use crate::sim::rng::Rng;
use crate::wire::field::Ascii;

/// How a channel behaves for one seed (drawn by the world).
#[derive(Debug, Clone, Copy)]
pub struct ChannelProfile {
    /// Share of PAY/PAYOUT answered NOT_PROCESSED (failover allowed).
    pub not_processed: f64,
    /// Share declined (final FAILED).
    pub decline: f64,
    /// Share answered PROCESSING and finalised later (notification, query).
    pub asynchronous: f64,
}

/// One simulated channel's books.
#[derive(Debug)]
pub struct SimChannel {
    /// The books: the oracle.
    pub bank: Bank,
    /// Behaviour.
    pub profile: ChannelProfile,
}

/// What a request did at the bank.
pub struct Handled {
    /// The answer to send back (None: nothing to answer).
    pub answer: Option<ch::Message>,
    /// An asynchronous order to finalise later.
    pub finalize: Option<OrderRef>,
}

impl SimChannel {
    /// A channel with default limits and SMS codes derived from the phone number.
    pub fn new(profile: ChannelProfile) -> SimChannel {
        SimChannel {
            bank: Bank::new(BankConfig {
                sms_mode: SmsMode::Deterministic,
                ..BankConfig::default()
            }),
            profile,
        }
    }

    /// Decide the answer to one request, as the TCP simulator does.
    pub fn handle(&mut self, msg: &ch::Message, now_ms: u64, rng: &mut Rng) -> Handled {
        let p = self.profile;
        let mut finalize = None;
        let answer = match msg {
            ch::Message::VerifyReq(r) => {
                let (code, sms_sent, agreement_no) = match self.bank.verify(r, now_ms, rng) {
                    VerifyResult::SmsSent { .. } => (Code::OK, 1, Ascii::empty()),
                    VerifyResult::AlreadySigned(no) => {
                        (Code::ALREADY_SIGNED, 0, Ascii::new(&no).unwrap_or_default())
                    }
                    VerifyResult::Declined(c) => (c, 0, Ascii::empty()),
                };
                let (code, class) = code.pair();
                VerifyRsp {
                    code,
                    class,
                    sign_ref: r.sign_ref,
                    sms_sent,
                    agreement_no,
                }
                .into()
            }
            ch::Message::SignReq(r) => {
                let (c, no) = match self.bank.sign(r, now_ms) {
                    Ok(no) => (Code::OK, Ascii::new(&no).unwrap_or_default()),
                    Err(c) => (c, Ascii::empty()),
                };
                let (code, class) = c.pair();
                SignRsp {
                    code,
                    class,
                    sign_ref: r.sign_ref,
                    agreement_no: no,
                }
                .into()
            }
            ch::Message::UnsignReq(r) => {
                let (code, class) = self.bank.unsign(r.agreement_no.as_str()).pair();
                UnsignRsp {
                    code,
                    class,
                    agreement_no: r.agreement_no,
                }
                .into()
            }
            ch::Message::PayReq(r) => {
                let d = draw(&p, rng);
                let res = self.bank.pay(r, now_ms, false, d);
                let (code, class, serial, fin) = answer_of(&res, &mut finalize);
                PayRsp {
                    code,
                    class,
                    order_ref: r.order_ref,
                    channel_serial: serial,
                    amount: r.amount.0,
                    finished_at_ms: fin,
                }
                .into()
            }
            ch::Message::PayoutReq(r) => {
                let d = draw(&p, rng);
                let res = self.bank.payout(r, now_ms, false, d);
                let (code, class, serial, fin) = answer_of(&res, &mut finalize);
                PayoutRsp {
                    code,
                    class,
                    order_ref: r.order_ref,
                    channel_serial: serial,
                    amount: r.amount.0,
                    finished_at_ms: fin,
                }
                .into()
            }
            ch::Message::QueryReq(r) => {
                query_answer(self.bank.ledger.get(&r.order_ref), r.order_ref)
            }
            ch::Message::NotifyAck(_) | ch::Message::RevokeAck(_) | ch::Message::EchoRsp(_) => {
                return Handled {
                    answer: None,
                    finalize: None,
                }
            }
            other => {
                let (code, class) = Code::BAD_REQUEST.pair();
                Reject {
                    code,
                    class,
                    rejected_type: other.code(),
                    detail: Ascii::new("unexpected message type").unwrap_or_default(),
                }
                .into()
            }
        };
        Handled {
            answer: Some(answer),
            finalize,
        }
    }

    /// Make an asynchronous order final; the notification to send, if it was processing.
    pub fn finalize(&mut self, r: &OrderRef, now_ms: u64, notify_id: u64) -> Option<ch::Message> {
        let e = self.bank.finalize(r, now_ms)?;
        let (code, class) = e.reported();
        Some(
            ch::Notify {
                notify_id,
                order_ref: *r,
                order_type: e.kind,
                code: code.into(),
                class,
                amount: crate::message::types::Fen(e.amount_fen),
                channel_serial: Ascii::new(&e.serial).unwrap_or_default(),
                finished_at_ms: e.finished_at_ms(),
            }
            .into(),
        )
    }
}

fn draw(p: &ChannelProfile, rng: &mut Rng) -> Draw {
    Draw {
        not_processed: rng.chance(p.not_processed),
        decline: rng.chance(p.decline),
        asynchronous: rng.chance(p.asynchronous),
    }
}

fn answer_of(
    res: &PayResult,
    finalize: &mut Option<OrderRef>,
) -> (ch::RspCode, ch::RspClass, ch::Serial, u64) {
    let (answer, processing) = res.answer();
    if processing.is_some() {
        *finalize = processing;
    }
    answer
}

fn query_answer(e: Option<&LedgerEntry>, order_ref: OrderRef) -> ch::Message {
    match e {
        Some(e) => {
            let (c, class) = e.reported();
            QueryRsp {
                code: c.into(),
                class,
                order_ref,
                order_type: e.kind as u8,
                amount: e.amount_fen,
                channel_serial: Ascii::new(&e.serial).unwrap_or_default(),
                finished_at_ms: e.finished_at_ms(),
            }
            .into()
        }
        None => {
            let (code, class) = Code::ORDER_NOT_FOUND.pair();
            QueryRsp {
                code,
                class,
                order_ref,
                order_type: 0,
                amount: 0,
                channel_serial: Ascii::empty(),
                finished_at_ms: 0,
            }
            .into()
        }
    }
}

/// True when a ledger entry moved (or will move) money.
pub fn executed(e: &LedgerEntry) -> bool {
    matches!(
        e.state,
        EntryState::Final { code: Code::OK, .. } | EntryState::Processing { outcome: Code::OK }
    )
}

/// Order type check used by traces.
pub fn kind_str(k: OrderType) -> &'static str {
    match k {
        OrderType::Debit => "debit",
        OrderType::Payout => "payout",
    }
}
