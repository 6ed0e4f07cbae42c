//! Typed lender messages: one struct per message type with a fixed body layout, the
//! [`Message`] enum over all of them, and encoding/decoding of whole signed frames.
//!
//! Layouts are declared once, in the `messages!` invocation below; the body
//! structs, their encoders and decoders, the fixed frame lengths and the layout tables
//! that `protocol/SPEC.md` prints (checked by `tests/spec_tables.rs`) all come from it.

pub mod examples;
pub mod inbound;
pub mod types;

use bytes::BytesMut;

use crate::crypto::MacKey;
use crate::wire::codec::{EncodeFrame, FrameKind, RawFrame};
use crate::wire::field::{Ascii, Digits, Field, FieldProblem, Text};
use crate::wire::header::{Header, MerchantNo, HEADER_LEN, MAC_LEN};
pub use crate::wire::layout::{FieldSpec, Malformed};

pub use types::*;

/// Largest lender frame. The biggest message (SIGN_AND_PAY_REQ) is well below it; the
/// headroom lets a later version grow a message without changing framing limits.
pub const MAX_FRAME_LEN: usize = 1024;

/// The lender protocol's framing parameters.
pub struct Lender;

impl FrameKind for Lender {
    const MAGIC: [u8; 2] = *b"SL";
    const MAX_FRAME_LEN: usize = MAX_FRAME_LEN;
    fn frame_len(msg_type: u8) -> Option<usize> {
        frame_len(msg_type)
    }
}

/// The lender frame codec.
pub type LenderCodec = crate::wire::codec::FrameCodec<Lender>;

/// Order id chosen by the merchant: 1–32 printable ASCII characters, unique per merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct OrderId(pub Ascii<32>);

impl OrderId {
    /// Build from a string.
    pub fn new(s: &str) -> Result<OrderId, FieldProblem> {
        let a = Ascii::new(s)?;
        if a.is_empty() {
            return Err(FieldProblem::Empty);
        }
        Ok(OrderId(a))
    }
    /// The id text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl Field for OrderId {
    const SIZE: usize = 32;
    const KIND: &'static str = "ASCII, non-empty";
    fn put(&self, out: &mut BytesMut) {
        self.0.put(out)
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        let a = Ascii::get(src)?;
        if a.is_empty() {
            return Err(FieldProblem::Empty);
        }
        Ok(OrderId(a))
    }
}

macro_rules! nonzero_u64 {
    ($(#[$m:meta])* $name:ident, $kind:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl Field for $name {
            const SIZE: usize = 8;
            const KIND: &'static str = $kind;
            fn put(&self, out: &mut BytesMut) {
                self.0.put(out)
            }
            fn get(src: &[u8]) -> Result<Self, FieldProblem> {
                match u64::get(src)? {
                    0 => Err(FieldProblem::OutOfRange),
                    v => Ok($name(v)),
                }
            }
        }
    };
}

nonzero_u64!(
    /// Agreement id issued by sluice; stable for the agreement's life; never 0.
    AgreementId,
    "u64 BE, non-zero"
);
nonzero_u64!(
    /// Reference of a pending bind (pre-bind → bind confirm); never 0.
    BindRef,
    "u64 BE, non-zero"
);

/// SMS verification code: 4–8 digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmsCode(pub Digits<8>);

impl SmsCode {
    /// Build from a string.
    pub fn new(s: &str) -> Result<SmsCode, FieldProblem> {
        let d = Digits::new(s)?;
        Self::check(&d)?;
        Ok(SmsCode(d))
    }
    fn check(d: &Digits<8>) -> Result<(), FieldProblem> {
        if d.as_bytes().len() < 4 {
            return Err(FieldProblem::WrongLength);
        }
        Ok(())
    }
    /// The code text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl Field for SmsCode {
    const SIZE: usize = 8;
    const KIND: &'static str = "ASCII digits, 4–8";
    fn put(&self, out: &mut BytesMut) {
        self.0.put(out)
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        let d = Digits::get(src)?;
        Self::check(&d)?;
        Ok(SmsCode(d))
    }
}

/// Channel id as configured in sluice (e.g. `CHA`); empty when no channel was used.
pub type ChannelId = Ascii<8>;
/// Bank code (e.g. `ICBC`, `CMB`): printable ASCII, up to 8 bytes.
pub type BankCode = Ascii<8>;
/// Merchant's own user id for the card holder.
pub type UserId = Ascii<32>;
/// Text shown on the card holder's statement, or an operator-readable detail.
pub type Purpose = Text<64>;

crate::wire::layout::messages! {
    /// Lender → switch: bind this connection to the header's merchant number. Send one
    /// LOGON per merchant number the connection will act for.
    LogonReq = 0x01, "LOGON_REQ" {
        /// Heartbeat interval the lender proposes, seconds (0 = switch default).
        heartbeat_s: u16,
        /// Free label of the lender system, for the operator's logs.
        client_name: Ascii<16>,
    }
    /// Switch → lender: logon result and the session's limits.
    LogonRsp = 0x81, "LOGON_RSP" {
        /// Result.
        result: Outcome,
        /// Session id for logs on both sides.
        session_id: u64,
        /// Heartbeat interval the switch will use, seconds.
        heartbeat_s: u16,
        /// The connection is closed after this many seconds without any frame.
        idle_timeout_s: u16,
        /// Accepted clock difference for request timestamps, seconds (± this value).
        replay_window_s: u16,
        /// Most requests this connection may have in flight.
        inflight_max: u16,
    }
    /// Lender → switch: unbind the header's merchant number; the connection closes after
    /// the response when no merchant number is left.
    LogoffReq = 0x02, "LOGOFF_REQ" {}
    /// Switch → lender: logoff result.
    LogoffRsp = 0x82, "LOGOFF_RSP" {
        /// Result.
        result: Outcome,
    }
    /// Either side: heartbeat request.
    EchoReq = 0x03, "ECHO_REQ" {
        /// Any value; echoed back.
        nonce: u64,
    }
    /// Either side: heartbeat response (never answered).
    EchoRsp = 0x83, "ECHO_RSP" {
        /// The request's nonce.
        nonce: u64,
    }
    /// Lender → switch: first signing step; the bank sends the card holder an SMS code.
    PreBindReq = 0x10, "PREBIND_REQ" {
        /// Merchant's own id for the card holder.
        user_id: UserId,
        /// Debit or credit card.
        card_type: CardType,
        /// Card's bank.
        bank_code: BankCode,
        /// Card number.
        card_no: CardNo,
        /// Resident ID number.
        id_no: IdNo,
        /// Card holder's name.
        name: Name,
        /// Bank-reserved mobile phone.
        phone: Phone,
        /// 0 sign, 1 backup (sign the existing agreement on one more channel).
        mode: BindMode,
    }
    /// Switch → lender: SMS sent (bind_ref set), or already signed (agreement_id set).
    PreBindRsp = 0x90, "PREBIND_RSP" {
        /// Result.
        result: Outcome,
        /// Quote in BIND_CONFIRM_REQ; 0 when no SMS was sent.
        bind_ref: u64,
        /// Existing agreement when the card is already signed (reason ALREADY_SIGNED); else 0.
        agreement_id: u64,
    }
    /// Lender → switch: second signing step with the SMS code the user typed.
    BindConfirmReq = 0x11, "BIND_CONFIRM_REQ" {
        /// From PREBIND_RSP or SIGN_AND_PAY_RSP.
        bind_ref: BindRef,
        /// The SMS code.
        sms_code: SmsCode,
    }
    /// Switch → lender: the agreement id.
    BindConfirmRsp = 0x91, "BIND_CONFIRM_RSP" {
        /// Result.
        result: Outcome,
        /// The new (or existing) agreement id; 0 on failure.
        agreement_id: u64,
        /// Channel the agreement was signed on.
        channel: ChannelId,
    }
    /// Lender → switch: sign the card and debit it once signed. A card already signed
    /// answers ALREADY_SIGNED with the agreement id and debits nothing.
    SignAndPayReq = 0x12, "SIGN_AND_PAY_REQ" {
        /// Merchant's own id for the card holder.
        user_id: UserId,
        /// Debit or credit card.
        card_type: CardType,
        /// Card's bank.
        bank_code: BankCode,
        /// Card number.
        card_no: CardNo,
        /// Resident ID number.
        id_no: IdNo,
        /// Card holder's name.
        name: Name,
        /// Bank-reserved mobile phone.
        phone: Phone,
        /// Order id of the debit made after signing.
        order_id: OrderId,
        /// Amount in fen, > 0.
        amount: Fen,
        /// Always "CNY".
        currency: Currency,
        /// Shown on the card holder's statement.
        purpose: Purpose,
    }
    /// Switch → lender: SMS sent (PENDING, bind_ref set) or already signed.
    SignAndPayRsp = 0x92, "SIGN_AND_PAY_RSP" {
        /// Result.
        result: Outcome,
        /// Quote in BIND_CONFIRM_REQ; 0 when no SMS was sent.
        bind_ref: u64,
        /// Existing agreement when already signed; else 0.
        agreement_id: u64,
    }
    /// Lender → switch: state of an agreement.
    AgreementQueryReq = 0x13, "AGREEMENT_QUERY_REQ" {
        /// Agreement to look up.
        agreement_id: AgreementId,
    }
    /// Switch → lender: agreement state.
    AgreementQueryRsp = 0x93, "AGREEMENT_QUERY_RSP" {
        /// Result.
        result: Outcome,
        /// Echo of the request.
        agreement_id: u64,
        /// 1 active, 2 cancelled, 3 revoked; 0 when unknown.
        state: u8,
        /// Card type (0 when unknown).
        card_type: u8,
        /// Card's bank.
        bank_code: BankCode,
        /// Last four digits of the card.
        card_last4: Digits<4>,
        /// Channels with an active channel agreement (primary first), up to two shown.
        primary_channel: ChannelId,
        /// Backup channel, if signed.
        backup_channel: ChannelId,
    }
    /// Lender → switch: cancel an agreement (unsigned on every channel).
    AgreementCancelReq = 0x14, "AGREEMENT_CANCEL_REQ" {
        /// Agreement to cancel.
        agreement_id: AgreementId,
    }
    /// Switch → lender: cancel result.
    AgreementCancelRsp = 0x94, "AGREEMENT_CANCEL_RSP" {
        /// Result.
        result: Outcome,
        /// Echo of the request.
        agreement_id: u64,
    }
    /// Lender → switch: debit the card of an agreement.
    DebitReq = 0x20, "DEBIT_REQ" {
        /// Merchant's order id (idempotency key with the merchant number).
        order_id: OrderId,
        /// Agreement to debit.
        agreement_id: AgreementId,
        /// Amount in fen, > 0.
        amount: Fen,
        /// Always "CNY".
        currency: Currency,
        /// Shown on the card holder's statement.
        purpose: Purpose,
    }
    /// Switch → lender: order state after the request.
    DebitRsp = 0xA0, "DEBIT_RSP" {
        /// Result: SUCCESS / FAILED final, PENDING (notification follows), REJECTED, BUSY.
        result: Outcome,
        /// Echo of the order id.
        order_id: Ascii<32>,
        /// Channel used (empty if none).
        channel: ChannelId,
    }
    /// Lender → switch: pay out to a card.
    PayoutReq = 0x21, "PAYOUT_REQ" {
        /// Merchant's order id.
        order_id: OrderId,
        /// Amount in fen, > 0.
        amount: Fen,
        /// Always "CNY".
        currency: Currency,
        /// Debit or credit card.
        card_type: CardType,
        /// Card's bank.
        bank_code: BankCode,
        /// Card number.
        card_no: CardNo,
        /// Card holder's name.
        name: Name,
        /// Shown on the card holder's statement.
        purpose: Purpose,
    }
    /// Switch → lender: order state after the request.
    PayoutRsp = 0xA1, "PAYOUT_RSP" {
        /// Result.
        result: Outcome,
        /// Echo of the order id.
        order_id: Ascii<32>,
        /// Channel used (empty if none).
        channel: ChannelId,
    }
    /// Lender → switch: current state of an order.
    OrderQueryReq = 0x22, "ORDER_QUERY_REQ" {
        /// Order to look up.
        order_id: OrderId,
    }
    /// Switch → lender: current state of an order.
    OrderQueryRsp = 0xA2, "ORDER_QUERY_RSP" {
        /// The order's status and reason (REJECTED + UNKNOWN_ORDER when unknown).
        result: Outcome,
        /// Echo of the order id.
        order_id: Ascii<32>,
        /// 1 debit, 2 payout; 0 when unknown.
        order_type: u8,
        /// Amount in fen; 0 when unknown.
        amount: u64,
        /// Channel of the last attempt (empty if none).
        channel: ChannelId,
        /// Channel attempts made so far.
        attempts: u8,
        /// When the order was accepted, ms since the Unix epoch.
        accepted_at_ms: u64,
        /// When it became final, ms since the Unix epoch; 0 while not final.
        finished_at_ms: u64,
    }
    /// Switch → lender: an order became final, or an agreement was revoked at the bank.
    /// Repeated until acknowledged; the same `notify_id` each time.
    Notify = 0x30, "NOTIFY" {
        /// Unique per notification; quote in NOTIFY_ACK.
        notify_id: u64,
        /// 1 order final, 2 agreement revoked.
        kind: NotifyKind,
        /// Final status of the order (kind 1), or SUCCESS (kind 2).
        result: Outcome,
        /// The order (kind 1); empty for kind 2.
        order_id: Ascii<32>,
        /// 1 debit, 2 payout (kind 1); 0 for kind 2.
        order_type: u8,
        /// Amount in fen (kind 1); 0 for kind 2.
        amount: u64,
        /// The agreement (debits and kind 2); 0 otherwise.
        agreement_id: u64,
        /// The channel that executed the order or revoked the agreement.
        channel: ChannelId,
        /// When the state became final, ms since the Unix epoch.
        finished_at_ms: u64,
    }
    /// Lender → switch: notification received and stored; not sent again.
    NotifyAck = 0xB0, "NOTIFY_ACK" {
        /// From the NOTIFY.
        notify_id: u64,
    }
    /// Switch → lender: a frame that cannot be answered with its own response type.
    Reject = 0x7F, "REJECT" {
        /// Status REJECTED and the reason.
        result: Outcome,
        /// The rejected frame's message type byte.
        rejected_type: u8,
        /// Human-readable detail for the lender's logs (never contains personal data).
        detail: Ascii<64>,
    }
}

/// Header values chosen by the sender of a frame (the length and type follow from the
/// message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// Correlation id.
    pub request_id: u64,
    /// Sender's clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Key id of the MAC key.
    pub key_id: u16,
    /// Merchant number.
    pub merchant: MerchantNo,
    /// Flag bits.
    pub flags: u16,
}

/// Append one whole signed frame for `msg` to `out`. With `key = None` the MAC trailer is
/// 32 zero bytes (only for REJECTs that cannot name a known key).
pub fn encode(env: &Envelope, msg: &Message, key: Option<&MacKey>, out: &mut BytesMut) {
    let start = out.len();
    let len = frame_len(msg.code()).expect("every message has a length");
    out.reserve(len);
    Header {
        msg_type: msg.code(),
        length: len as u16,
        flags: env.flags,
        request_id: env.request_id,
        timestamp_ms: env.timestamp_ms,
        key_id: env.key_id,
        merchant: env.merchant,
    }
    .put(Lender::MAGIC, out);
    msg.put_body(out);
    let mac = match key {
        Some(k) => k.sign(&out[start..]),
        None => [0u8; MAC_LEN],
    };
    out.extend_from_slice(&mac);
    assert_eq!(
        out.len() - start,
        len,
        "encoded frame has its type's length"
    );
}

/// Decode a frame's body into its typed message (MAC not checked here).
pub fn decode(frame: &RawFrame) -> Result<Message, Malformed> {
    Message::decode_body(frame.header.msg_type, frame.body())
}

/// A message ready to be written: the codec's `Encoder` signs and writes it in one go.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Header values.
    pub env: Envelope,
    /// The message.
    pub msg: Message,
    /// MAC key (`None` only for unauthenticated REJECTs).
    pub key: Option<std::sync::Arc<MacKey>>,
}

impl EncodeFrame for Outgoing {
    fn encode_frame(&self, dst: &mut BytesMut) {
        encode(&self.env, &self.msg, self.key.as_deref(), dst)
    }
}

/// The response type's body for a request that is refused before it is processed
/// (malformed field, session rules, BUSY): the result block says why, every other field
/// is zero or empty. `None` for message types that have no response (ECHO_RSP,
/// NOTIFY_ACK, responses, REJECT): those are answered with a REJECT.
pub fn refusal(request_code: u8, result: Outcome) -> Option<Message> {
    let a8 = Ascii::<8>::empty;
    Some(match request_code {
        LogonReq::CODE => LogonRsp {
            result,
            session_id: 0,
            heartbeat_s: 0,
            idle_timeout_s: 0,
            replay_window_s: 0,
            inflight_max: 0,
        }
        .into(),
        LogoffReq::CODE => LogoffRsp { result }.into(),
        PreBindReq::CODE => PreBindRsp {
            result,
            bind_ref: 0,
            agreement_id: 0,
        }
        .into(),
        BindConfirmReq::CODE => BindConfirmRsp {
            result,
            agreement_id: 0,
            channel: a8(),
        }
        .into(),
        SignAndPayReq::CODE => SignAndPayRsp {
            result,
            bind_ref: 0,
            agreement_id: 0,
        }
        .into(),
        AgreementQueryReq::CODE => AgreementQueryRsp {
            result,
            agreement_id: 0,
            state: 0,
            card_type: 0,
            bank_code: a8(),
            card_last4: Digits::empty(),
            primary_channel: a8(),
            backup_channel: a8(),
        }
        .into(),
        AgreementCancelReq::CODE => AgreementCancelRsp {
            result,
            agreement_id: 0,
        }
        .into(),
        DebitReq::CODE => DebitRsp {
            result,
            order_id: Ascii::empty(),
            channel: a8(),
        }
        .into(),
        PayoutReq::CODE => PayoutRsp {
            result,
            order_id: Ascii::empty(),
            channel: a8(),
        }
        .into(),
        OrderQueryReq::CODE => OrderQueryRsp {
            result,
            order_id: Ascii::empty(),
            order_type: 0,
            amount: 0,
            channel: a8(),
            attempts: 0,
            accepted_at_ms: 0,
            finished_at_ms: 0,
        }
        .into(),
        _ => return None,
    })
}

/// A REJECT for a frame of type `rejected_type`.
pub fn reject(rejected_type: u8, result: Outcome, detail: &str) -> Message {
    let mut d = String::new();
    for c in detail.chars().filter(|c| (' '..='~').contains(c)) {
        if d.len() == 64 {
            break;
        }
        d.push(c);
    }
    Reject {
        result,
        rejected_type,
        detail: Ascii::new(&d).unwrap_or_default(),
    }
    .into()
}

/// True for message types a lender may send to the switch.
pub fn is_lender_request(code: u8) -> bool {
    matches!(
        code,
        LogonReq::CODE
            | LogoffReq::CODE
            | EchoReq::CODE
            | EchoRsp::CODE
            | PreBindReq::CODE
            | BindConfirmReq::CODE
            | SignAndPayReq::CODE
            | AgreementQueryReq::CODE
            | AgreementCancelReq::CODE
            | DebitReq::CODE
            | PayoutReq::CODE
            | OrderQueryReq::CODE
            | NotifyAck::CODE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_fits_the_frame_limit_and_has_unique_code() {
        let mut seen = std::collections::HashSet::new();
        for (code, name, len, _) in CATALOGUE {
            assert!(seen.insert(*code), "duplicate code {code:#x} ({name})");
            assert!(*len <= MAX_FRAME_LEN, "{name} is {len} bytes");
        }
    }
}
