//! Byte encoding of [`Record`]s and of the snapshot's order and notification entries.
//!
//! Compact and explicit rather than generic: one tag byte, then the fields in a fixed
//! order. Integers are little-endian and fixed-width (decoding is a bounds check and a
//! load, which is what makes replay run at millions of records per second); text is a
//! one-byte length and the bytes, validated again on the way in through the field type's
//! own constructor, so a decoded record holds only values the wire could have carried.
//! Decoding never panics: every read is bounds-checked and returns [`DecodeError`].
//!
//! No clear card or ID number is ever encoded: [`Record`] carries only keyed hashes and
//! the last four digits (see `engine::record`).

use crate::channel::message::{AgreementNo, OrderRef, RspCode};
use crate::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use crate::engine::order::{Attempt, AttemptOutcome, Order, OrderKey, OrderKind, Phase};
use crate::engine::Record;
use crate::message::{
    AgreementId, CardType, ChannelId, NotifyKind, OrderId, Outcome, Purpose, Reason, Status,
};
use crate::wire::field::{Ascii, Digits, Text};
use crate::wire::header::MerchantNo;

/// Why bytes did not decode into a record. Carried inside
/// [`JournalError::Corrupt`](super::JournalError::Corrupt) with the file and offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record ended before a field did.
    #[error("record truncated at byte {0}")]
    Truncated(usize),
    /// An unknown record or variant tag (written by a newer version, or damage).
    #[error("unknown tag {tag} for {what}")]
    Tag {
        /// Which field.
        what: &'static str,
        /// The byte found.
        tag: u8,
    },
    /// A text field failed its type's check (width, character class).
    #[error("invalid {0}")]
    Field(&'static str),
    /// Bytes left over after the record: the length prefix and the content disagree.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Appends fields to a buffer.
pub(crate) struct Enc<'a>(pub &'a mut Vec<u8>);

impl Enc<'_> {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// Text of at most 255 bytes (every field type here is narrower).
    pub fn str(&mut self, s: &[u8]) {
        debug_assert!(s.len() <= u8::MAX as usize);
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s);
    }
}

/// Reads fields from a slice, bounds-checked.
pub(crate) struct Dec<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Dec<'a> {
    pub fn new(b: &'a [u8]) -> Dec<'a> {
        Dec { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Truncated(self.at))?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or(DecodeError::Truncated(self.at))?;
        self.at = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.take(n)
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn arr16(&mut self) -> Result<[u8; 16], DecodeError> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(a)
    }
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Field(what))
    }
    pub fn done(&self) -> Result<(), DecodeError> {
        match self.b.len() - self.at {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
    fn ascii<const N: usize>(&mut self, what: &'static str) -> Result<Ascii<N>, DecodeError> {
        Ascii::new(self.str(what)?).map_err(|_| DecodeError::Field(what))
    }
    fn merchant(&mut self) -> Result<MerchantNo, DecodeError> {
        self.ascii::<16>("merchant number")
    }
    fn key(&mut self) -> Result<OrderKey, DecodeError> {
        let m = self.merchant()?;
        let o = OrderId::new(self.str("order id")?).map_err(|_| DecodeError::Field("order id"))?;
        Ok((m, o))
    }
    fn channel(&mut self) -> Result<ChannelId, DecodeError> {
        self.ascii::<8>("channel id")
    }
    fn order_ref(&mut self) -> Result<OrderRef, DecodeError> {
        OrderRef::new(self.str("order reference")?)
            .map_err(|_| DecodeError::Field("order reference"))
    }
    fn code(&mut self) -> Result<RspCode, DecodeError> {
        RspCode::new(self.str("response code")?).map_err(|_| DecodeError::Field("response code"))
    }
    fn purpose(&mut self) -> Result<Purpose, DecodeError> {
        Text::<64>::new(self.str("purpose")?).map_err(|_| DecodeError::Field("purpose"))
    }
}

const ORDER_ACCEPTED: u8 = 1;
const ATTEMPT_STARTED: u8 = 2;
const ATTEMPT_OUTCOME: u8 = 3;
const ORDER_FINAL: u8 = 4;
const AGREEMENT: u8 = 5;
const NOTIFY_ACKED: u8 = 6;
const REVOCATION_NOTICE: u8 = 7;

fn put_key(e: &mut Enc, k: &OrderKey) {
    e.str(k.0.as_bytes());
    e.str(k.1 .0.as_bytes());
}

fn put_kind(e: &mut Enc, k: &OrderKind) {
    match k {
        OrderKind::Debit { agreement } => {
            e.u8(1);
            e.u64(agreement.0);
        }
        OrderKind::Payout { card_hash } => {
            e.u8(2);
            e.bytes(card_hash);
        }
    }
}

fn get_kind(d: &mut Dec) -> Result<OrderKind, DecodeError> {
    match d.u8()? {
        1 => Ok(OrderKind::Debit {
            agreement: AgreementId(d.u64()?),
        }),
        2 => Ok(OrderKind::Payout {
            card_hash: d.arr16()?,
        }),
        tag => Err(DecodeError::Tag {
            what: "order kind",
            tag,
        }),
    }
}

fn put_attempt_outcome(e: &mut Enc, o: &AttemptOutcome) {
    let (tag, code) = o.tag();
    e.u8(tag);
    if let Some(c) = code {
        e.str(c.0.as_bytes());
    }
}

fn get_attempt_outcome(d: &mut Dec) -> Result<AttemptOutcome, DecodeError> {
    let tag = d.u8()?;
    let code = if AttemptOutcome::tag_has_code(tag) {
        d.code()?
    } else {
        RspCode(Ascii::empty())
    };
    AttemptOutcome::from_tag(tag, code).ok_or(DecodeError::Tag {
        what: "attempt outcome",
        tag,
    })
}

fn put_outcome(e: &mut Enc, o: &Outcome) {
    e.u8(o.status as u8);
    e.u16(o.reason as u16);
    e.u16(o.field);
    e.str(o.channel_code.as_bytes());
}

fn get_outcome(d: &mut Dec) -> Result<Outcome, DecodeError> {
    let s = d.u8()?;
    let status = Status::from_u8(s).ok_or(DecodeError::Tag {
        what: "status",
        tag: s,
    })?;
    let r = d.u16()?;
    let reason = Reason::from_u16(r).ok_or(DecodeError::Field("reason"))?;
    let field = d.u16()?;
    let channel_code = d.ascii::<8>("channel code")?;
    Ok(Outcome {
        status,
        reason,
        field,
        channel_code,
    })
}

fn put_agreement(e: &mut Enc, a: &Agreement) {
    e.u64(a.id.0);
    e.str(a.merchant.as_bytes());
    e.bytes(&a.card_hash);
    e.bytes(&a.id_hash);
    e.str(a.card_last4.as_bytes());
    e.str(a.bank.as_bytes());
    e.u8(a.card_type as u8);
    e.u8(a.cancelled as u8);
    let n = a.channels.iter().flatten().count();
    e.u8(n as u8);
    for c in a.channels.iter().flatten() {
        e.str(c.channel.as_bytes());
        e.str(c.agreement_no.0.as_bytes());
        e.u8(match c.state {
            ChannelAgreementState::Active => 1,
            ChannelAgreementState::Cancelled => 2,
            ChannelAgreementState::Revoked => 3,
        });
    }
}

pub(crate) fn get_agreement(d: &mut Dec) -> Result<Agreement, DecodeError> {
    let id = AgreementId(d.u64()?);
    let merchant = d.merchant()?;
    let card_hash = d.arr16()?;
    let id_hash = d.arr16()?;
    let card_last4 = Digits::<4>::new(d.str("card last four")?)
        .map_err(|_| DecodeError::Field("card last four"))?;
    let bank = d.ascii::<8>("bank code")?;
    let ct = d.u8()?;
    let card_type = CardType::from_u8(ct).ok_or(DecodeError::Tag {
        what: "card type",
        tag: ct,
    })?;
    let cancelled = d.u8()? != 0;
    let n = d.u8()? as usize;
    if n > CHANNELS_PER_AGREEMENT_MAX {
        return Err(DecodeError::Field("channel agreement count"));
    }
    let mut channels = [None; CHANNELS_PER_AGREEMENT_MAX];
    for slot in channels.iter_mut().take(n) {
        let channel = d.channel()?;
        let agreement_no = AgreementNo::new(d.str("agreement number")?)
            .map_err(|_| DecodeError::Field("agreement number"))?;
        let state = match d.u8()? {
            1 => ChannelAgreementState::Active,
            2 => ChannelAgreementState::Cancelled,
            3 => ChannelAgreementState::Revoked,
            tag => {
                return Err(DecodeError::Tag {
                    what: "channel agreement state",
                    tag,
                })
            }
        };
        *slot = Some(ChannelAgreement {
            channel,
            agreement_no,
            state,
        });
    }
    Ok(Agreement {
        id,
        merchant,
        card_hash,
        id_hash,
        card_last4,
        bank,
        card_type,
        cancelled,
        channels,
    })
}

/// Append the encoding of `r` to `out`.
pub fn encode(r: &Record, out: &mut Vec<u8>) {
    let mut e = Enc(out);
    match r {
        Record::OrderAccepted {
            key,
            kind,
            amount,
            purpose,
            at_ms,
        } => {
            e.u8(ORDER_ACCEPTED);
            put_key(&mut e, key);
            put_kind(&mut e, kind);
            e.u64(*amount);
            e.str(purpose.as_bytes());
            e.u64(*at_ms);
        }
        Record::AttemptStarted {
            key,
            channel,
            order_ref,
            at_ms,
        } => {
            e.u8(ATTEMPT_STARTED);
            put_key(&mut e, key);
            e.str(channel.as_bytes());
            e.str(order_ref.0.as_bytes());
            e.u64(*at_ms);
        }
        Record::AttemptOutcome {
            key,
            order_ref,
            outcome,
        } => {
            e.u8(ATTEMPT_OUTCOME);
            put_key(&mut e, key);
            e.str(order_ref.0.as_bytes());
            put_attempt_outcome(&mut e, outcome);
        }
        Record::OrderFinal {
            key,
            outcome,
            order_ref,
            notify_id,
            at_ms,
        } => {
            e.u8(ORDER_FINAL);
            put_key(&mut e, key);
            put_outcome(&mut e, outcome);
            match order_ref {
                Some(r) => {
                    e.u8(1);
                    e.str(r.0.as_bytes());
                }
                None => e.u8(0),
            }
            e.u64(*notify_id);
            e.u64(*at_ms);
        }
        Record::Agreement(a) => {
            e.u8(AGREEMENT);
            put_agreement(&mut e, a);
        }
        Record::NotifyAcked { notify_id } => {
            e.u8(NOTIFY_ACKED);
            e.u64(*notify_id);
        }
        Record::RevocationNotice {
            agreement,
            channel,
            notify_id,
        } => {
            e.u8(REVOCATION_NOTICE);
            e.u64(agreement.0);
            e.str(channel.as_bytes());
            e.u64(*notify_id);
        }
    }
}

/// Decode one record; the whole slice must be consumed.
pub fn decode(b: &[u8]) -> Result<Record, DecodeError> {
    let mut d = Dec::new(b);
    let r = match d.u8()? {
        ORDER_ACCEPTED => Record::OrderAccepted {
            key: d.key()?,
            kind: get_kind(&mut d)?,
            amount: d.u64()?,
            purpose: d.purpose()?,
            at_ms: d.u64()?,
        },
        ATTEMPT_STARTED => Record::AttemptStarted {
            key: d.key()?,
            channel: d.channel()?,
            order_ref: d.order_ref()?,
            at_ms: d.u64()?,
        },
        ATTEMPT_OUTCOME => Record::AttemptOutcome {
            key: d.key()?,
            order_ref: d.order_ref()?,
            outcome: get_attempt_outcome(&mut d)?,
        },
        ORDER_FINAL => Record::OrderFinal {
            key: d.key()?,
            outcome: get_outcome(&mut d)?,
            order_ref: match d.u8()? {
                0 => None,
                1 => Some(d.order_ref()?),
                tag => {
                    return Err(DecodeError::Tag {
                        what: "optional order reference",
                        tag,
                    })
                }
            },
            notify_id: d.u64()?,
            at_ms: d.u64()?,
        },
        AGREEMENT => Record::Agreement(Box::new(get_agreement(&mut d)?)),
        NOTIFY_ACKED => Record::NotifyAcked {
            notify_id: d.u64()?,
        },
        REVOCATION_NOTICE => Record::RevocationNotice {
            agreement: AgreementId(d.u64()?),
            channel: d.channel()?,
            notify_id: d.u64()?,
        },
        tag => {
            return Err(DecodeError::Tag {
                what: "record",
                tag,
            })
        }
    };
    d.done()?;
    Ok(r)
}

// ----- snapshot entries ------------------------------------------------------------

/// Encode a whole order (snapshot entry).
pub(crate) fn encode_order(o: &Order, out: &mut Vec<u8>) {
    let mut e = Enc(out);
    put_key(&mut e, &o.key);
    put_kind(&mut e, &o.kind);
    e.u64(o.amount);
    e.str(o.purpose.as_bytes());
    e.u8(match o.phase {
        Phase::InFlight => 0,
        Phase::Pending => 1,
        Phase::Final => 2,
    });
    put_outcome(&mut e, &o.outcome);
    e.u8(o.attempts.len() as u8);
    for a in &o.attempts {
        e.str(a.channel.as_bytes());
        e.str(a.order_ref.0.as_bytes());
        e.u64(a.sent_at_ms);
        put_attempt_outcome(&mut e, &a.outcome);
    }
    e.u8(o.remaining.len() as u8);
    for c in &o.remaining {
        e.str(c.as_bytes());
    }
    e.u64(o.accepted_at_ms);
    e.u64(o.finished_at_ms);
}

/// Decode a whole order (snapshot entry).
pub(crate) fn decode_order(d: &mut Dec) -> Result<Order, DecodeError> {
    let key = d.key()?;
    let kind = get_kind(d)?;
    let amount = d.u64()?;
    let purpose = d.purpose()?;
    let phase = match d.u8()? {
        0 => Phase::InFlight,
        1 => Phase::Pending,
        2 => Phase::Final,
        tag => return Err(DecodeError::Tag { what: "phase", tag }),
    };
    let outcome = get_outcome(d)?;
    let n = d.u8()? as usize;
    if n > crate::engine::order::ATTEMPTS_MAX {
        return Err(DecodeError::Field("attempt count"));
    }
    let mut attempts = Vec::with_capacity(n);
    for _ in 0..n {
        attempts.push(Attempt {
            channel: d.channel()?,
            order_ref: d.order_ref()?,
            sent_at_ms: d.u64()?,
            outcome: get_attempt_outcome(d)?,
        });
    }
    let n = d.u8()? as usize;
    let mut remaining = Vec::with_capacity(n);
    for _ in 0..n {
        remaining.push(d.channel()?);
    }
    let accepted_at_ms = d.u64()?;
    let finished_at_ms = d.u64()?;
    Ok(Order {
        key,
        kind,
        amount,
        purpose,
        phase,
        outcome,
        attempts,
        remaining,
        accepted_at_ms,
        finished_at_ms,
        queries: 0,
        // Loaded from disk: durable by definition.
        durable: Some(outcome),
        decision: None,
    })
}

/// Encode an agreement (snapshot entry).
pub(crate) fn encode_agreement(a: &Agreement, out: &mut Vec<u8>) {
    put_agreement(&mut Enc(out), a);
}

/// An unacknowledged notification as the snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutboxEntry {
    pub merchant: MerchantNo,
    pub msg: crate::message::Notify,
}

pub(crate) fn encode_outbox(o: &OutboxEntry, out: &mut Vec<u8>) {
    let mut e = Enc(out);
    let n = &o.msg;
    e.str(o.merchant.as_bytes());
    e.u64(n.notify_id);
    e.u8(n.kind as u8);
    put_outcome(&mut e, &n.result);
    e.str(n.order_id.as_bytes());
    e.u8(n.order_type);
    e.u64(n.amount);
    e.u64(n.agreement_id);
    e.str(n.channel.as_bytes());
    e.u64(n.finished_at_ms);
}

pub(crate) fn decode_outbox(d: &mut Dec) -> Result<OutboxEntry, DecodeError> {
    let merchant = d.merchant()?;
    let notify_id = d.u64()?;
    let k = d.u8()?;
    let kind = NotifyKind::from_u8(k).ok_or(DecodeError::Tag {
        what: "notify kind",
        tag: k,
    })?;
    Ok(OutboxEntry {
        merchant,
        msg: crate::message::Notify {
            notify_id,
            kind,
            result: get_outcome(d)?,
            order_id: d.ascii::<32>("order id")?,
            order_type: d.u8()?,
            amount: d.u64()?,
            agreement_id: d.u64()?,
            channel: d.channel()?,
            finished_at_ms: d.u64()?,
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn key(m: &str, o: &str) -> OrderKey {
        (MerchantNo::new(m).unwrap(), OrderId::new(o).unwrap())
    }

    pub fn sample_records() -> Vec<Record> {
        let k = key("898100000000001", "D-1");
        let r = OrderRef::new("SO1f").unwrap();
        let mut a = Agreement {
            id: AgreementId(77),
            merchant: k.0,
            card_hash: [3; 16],
            id_hash: [4; 16],
            card_last4: Digits::new("0128").unwrap(),
            bank: Ascii::new("ICBC").unwrap(),
            card_type: CardType::Credit,
            cancelled: true,
            channels: [None; CHANNELS_PER_AGREEMENT_MAX],
        };
        a.add_channel(ChannelAgreement {
            channel: Ascii::new("CHA").unwrap(),
            agreement_no: AgreementNo::new("A-1").unwrap(),
            state: ChannelAgreementState::Revoked,
        });
        vec![
            Record::OrderAccepted {
                key: k,
                kind: OrderKind::Debit {
                    agreement: AgreementId(77),
                },
                amount: 12_345,
                purpose: Text::new("还款").unwrap(),
                at_ms: 1_700_000_000_000,
            },
            Record::OrderAccepted {
                key: k,
                kind: OrderKind::Payout { card_hash: [9; 16] },
                amount: 1,
                purpose: Text::empty(),
                at_ms: 0,
            },
            Record::AttemptStarted {
                key: k,
                channel: Ascii::new("CHB").unwrap(),
                order_ref: r,
                at_ms: 5,
            },
            Record::AttemptOutcome {
                key: k,
                order_ref: r,
                outcome: AttemptOutcome::NotProcessed(RspCode::new("2001").unwrap()),
            },
            Record::AttemptOutcome {
                key: k,
                order_ref: r,
                outcome: AttemptOutcome::Unknown,
            },
            Record::OrderFinal {
                key: k,
                outcome: Outcome {
                    status: Status::Failed,
                    reason: Reason::CHANNEL_DECLINED,
                    field: 0,
                    channel_code: Ascii::new("1001").unwrap(),
                },
                order_ref: Some(r),
                notify_id: 99,
                at_ms: 6,
            },
            Record::OrderFinal {
                key: k,
                outcome: Outcome::new(Status::Failed, Reason::NO_CHANNEL),
                order_ref: None,
                notify_id: 100,
                at_ms: 7,
            },
            Record::Agreement(Box::new(a)),
            Record::NotifyAcked { notify_id: 99 },
            Record::RevocationNotice {
                agreement: AgreementId(77),
                channel: Ascii::new("CHA").unwrap(),
                notify_id: 101,
            },
        ]
    }

    #[test]
    fn every_variant_round_trips() {
        for r in sample_records() {
            let mut b = Vec::new();
            encode(&r, &mut b);
            assert_eq!(decode(&b).unwrap(), r);
            // Every strict prefix is an error, never a panic or a different record.
            for n in 0..b.len() {
                assert!(decode(&b[..n]).is_err(), "{r:?} prefix {n}");
            }
        }
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b);
            let _ = decode_order(&mut Dec::new(&b));
            let _ = decode_outbox(&mut Dec::new(&b));
        }
    }
}
