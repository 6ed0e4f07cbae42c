//! Channel-link message layouts, response codes and their classes, and whole-frame
//! encoding with the per-connection session MAC (`protocol/CHANNEL.md`).
//!
//! Layouts are declared once, in the `messages!` invocation below, exactly like the lender
//! protocol; the tables in `protocol/CHANNEL.md` print [`CATALOGUE`].
//!
//! ## Session MAC
//! After logon every frame ends in `HMAC-SHA256(K_dir, seq ‖ header ‖ body)`, where
//! `K_dir` is the key of the frame's direction (see [`super::handshake`]) and `seq` is the
//! number of frames this side has sent on this connection since the LOGON_RSP, as 8 bytes
//! big-endian, starting at 0. TCP delivers frames in order, so both sides count alike; a
//! replayed, dropped-in-transit or reordered frame fails its MAC. A frame that fails is
//! still counted (the sender counted it too), so one bad frame does not desynchronise the
//! link.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use ring::hmac;

use crate::crypto::MacError;
use crate::message::types::{CardNo, CardType, Currency, Fen, IdNo, Name, OrderType, Phone};
use crate::message::{BankCode, Purpose, SmsCode};
use crate::wire::codec::{FrameKind, RawFrame};
use crate::wire::field::{Ascii, Digits, Field, FieldProblem};
use crate::wire::header::{Header, MerchantNo, HEADER_LEN, MAC_LEN};
pub use crate::wire::layout::{FieldSpec, Malformed};

/// Largest channel frame. The biggest message (VERIFY_REQ) is well below it; the same
/// 1 KiB bound as the lender protocol keeps per-connection read buffers small.
pub const MAX_FRAME_LEN: usize = 1024;

/// Header `key_id` of the two logon frames: no session key exists yet, the trailer is zero
/// and the body carries an Ed25519 signature instead.
pub const KEY_ID_LOGON: u16 = 0;
/// Header `key_id` of every frame after logon: MAC'd with the session key.
pub const KEY_ID_SESSION: u16 = 1;

/// The channel link's framing parameters (magic `SC`).
pub struct Channel;

impl FrameKind for Channel {
    const MAGIC: [u8; 2] = *b"SC";
    const MAX_FRAME_LEN: usize = MAX_FRAME_LEN;
    fn frame_len(msg_type: u8) -> Option<usize> {
        frame_len(msg_type)
    }
}

/// The channel frame codec.
pub type ChannelCodec = crate::wire::codec::FrameCodec<Channel>;

/// Raw bytes of a fixed width (keys, nonces, signatures, digests).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blob<const N: usize>(pub [u8; N]);

impl<const N: usize> Default for Blob<N> {
    fn default() -> Self {
        Blob([0u8; N])
    }
}

impl<const N: usize> fmt::Debug for Blob<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

impl<const N: usize> Field for Blob<N> {
    const SIZE: usize = N;
    const KIND: &'static str = "bytes";
    fn put(&self, out: &mut BytesMut) {
        out.put_slice(&self.0);
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        let mut a = [0u8; N];
        a.copy_from_slice(src);
        Ok(Blob(a))
    }
}

macro_rules! nonempty_ascii {
    ($(#[$m:meta])* $name:ident, $n:literal, $kind:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub Ascii<$n>);

        impl $name {
            /// Build from a string (printable ASCII, non-empty, at most the field width).
            pub fn new(s: &str) -> Result<Self, FieldProblem> {
                let a = Ascii::new(s)?;
                if a.is_empty() {
                    return Err(FieldProblem::Empty);
                }
                Ok($name(a))
            }
            /// The text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl Field for $name {
            const SIZE: usize = $n;
            const KIND: &'static str = $kind;
            fn put(&self, out: &mut BytesMut) {
                self.0.put(out)
            }
            fn get(src: &[u8]) -> Result<Self, FieldProblem> {
                let a = Ascii::get(src)?;
                if a.is_empty() {
                    return Err(FieldProblem::Empty);
                }
                Ok($name(a))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0.as_str())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0.as_str())
            }
        }
    };
}

nonempty_ascii!(
    /// Channel order reference: chosen by the switch, unique per *attempt* (never reused,
    /// not even for a retry of the same lender order). The channel's ledger key and the key
    /// of ORDER_QUERY.
    OrderRef, 32, "ASCII, non-empty"
);
nonempty_ascii!(
    /// Reference of one signing attempt (VERIFY → SIGN), chosen by the switch.
    SignRef, 32, "ASCII, non-empty"
);
nonempty_ascii!(
    /// Channel agreement number (协议号) issued by the channel when a card is signed.
    AgreementNo, 32, "ASCII, non-empty"
);

/// Channel serial number (流水号) of an executed order; empty while none was assigned.
pub type Serial = Ascii<32>;

/// What the switch does with a response: the class byte, so the switch never parses the
/// code text to decide. Codes the switch does not know are still classified by this byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RspClass {
    /// Done, final.
    Success = 1,
    /// Definitively refused, final: the money did not move (e.g. insufficient funds).
    Declined = 2,
    /// Not processed at all (busy, maintenance, unsupported): safe to try another channel.
    NotProcessed = 3,
    /// Accepted; the final result comes later (notification, or ORDER_QUERY).
    Processing = 4,
}

impl RspClass {
    /// Parse the wire byte.
    pub fn from_u8(v: u8) -> Option<RspClass> {
        match v {
            1 => Some(RspClass::Success),
            2 => Some(RspClass::Declined),
            3 => Some(RspClass::NotProcessed),
            4 => Some(RspClass::Processing),
            _ => None,
        }
    }

    /// Upper-case name as used in CHANNEL.md.
    pub fn name(self) -> &'static str {
        match self {
            RspClass::Success => "SUCCESS",
            RspClass::Declined => "DECLINED",
            RspClass::NotProcessed => "NOT_PROCESSED",
            RspClass::Processing => "PROCESSING",
        }
    }

    /// True for SUCCESS and DECLINED: the order will not change any more.
    pub fn is_final(self) -> bool {
        matches!(self, RspClass::Success | RspClass::Declined)
    }
}

impl Field for RspClass {
    const SIZE: usize = 1;
    const KIND: &'static str = "u8 class (§6)";
    fn put(&self, out: &mut BytesMut) {
        out.put_u8(*self as u8);
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        RspClass::from_u8(src[0]).ok_or(FieldProblem::OutOfRange)
    }
}

/// A channel response code: exactly four printable ASCII characters (e.g. `0000`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RspCode(pub Ascii<4>);

impl RspCode {
    /// Build from text; exactly four printable ASCII characters.
    pub fn new(s: &str) -> Result<RspCode, FieldProblem> {
        let a = Ascii::new(s)?;
        if a.as_bytes().len() != 4 {
            return Err(FieldProblem::WrongLength);
        }
        Ok(RspCode(a))
    }
    /// The code text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
    /// The known code, if this text is in the table.
    pub fn known(&self) -> Option<Code> {
        Code::parse(self.as_str())
    }
}

impl From<Code> for RspCode {
    fn from(c: Code) -> RspCode {
        // Every table entry is four ASCII digits (checked by a unit test).
        RspCode::new(c.as_str()).unwrap_or(RspCode(Ascii::empty()))
    }
}

impl fmt::Debug for RspCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for RspCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Field for RspCode {
    const SIZE: usize = 4;
    const KIND: &'static str = "ASCII, 4 characters (§6)";
    fn put(&self, out: &mut BytesMut) {
        self.0.put(out)
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        let a = Ascii::<4>::get(src)?;
        if a.as_bytes().len() != 4 {
            return Err(FieldProblem::WrongLength);
        }
        Ok(RspCode(a))
    }
}

macro_rules! codes {
    ($( $(#[$m:meta])* $v:ident = $text:literal, $class:ident, $meaning:literal; )*) => {
        /// The response codes CHANNEL.md §6 defines, each with its class.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum Code {
            $( $(#[$m])* $v, )*
        }

        impl Code {
            /// Every code, in table order.
            pub const ALL: &'static [Code] = &[$(Code::$v),*];

            /// The four-character text.
            pub fn as_str(self) -> &'static str {
                match self { $( Code::$v => $text, )* }
            }
            /// The class the code belongs to.
            pub fn class(self) -> RspClass {
                match self { $( Code::$v => RspClass::$class, )* }
            }
            /// Name (upper snake case), as in the table.
            pub fn name(self) -> &'static str {
                match self { $( Code::$v => stringify!($v), )* }
            }
            /// One-line meaning, as in the table.
            pub fn meaning(self) -> &'static str {
                match self { $( Code::$v => $meaning, )* }
            }
            /// Look up a code text.
            pub fn parse(s: &str) -> Option<Code> {
                match s { $( $text => Some(Code::$v), )* _ => None }
            }
            /// The (code, class) pair a response carries.
            pub fn pair(self) -> (RspCode, RspClass) {
                (self.into(), self.class())
            }
        }
    };
}

codes! {
    /// Success.
    OK = "0000", Success, "Success.";
    /// VERIFY: the card is already signed; the existing agreement number is returned and no SMS is sent.
    ALREADY_SIGNED = "0001", Success, "Already signed: the existing agreement number is returned, no SMS was sent.";
    /// Debit: the card's balance does not cover the amount.
    INSUFFICIENT_FUNDS = "1001", Declined, "Insufficient funds on the card.";
    /// The agreement number is unknown, or was cancelled.
    AGREEMENT_INVALID = "1002", Declined, "Agreement number unknown or cancelled.";
    /// The card holder revoked the agreement at the bank.
    AGREEMENT_REVOKED = "1003", Declined, "Agreement revoked by the card holder at the bank.";
    /// Amount over the per-transaction limit.
    TXN_LIMIT_EXCEEDED = "1004", Declined, "Amount over the per-transaction limit.";
    /// Card's daily total would exceed the per-card daily limit.
    DAILY_LIMIT_EXCEEDED = "1005", Declined, "Per-card daily limit exceeded.";
    /// Bank or card type not supported by this channel.
    CARD_NOT_SUPPORTED = "1006", Declined, "Bank or card type not supported.";
    /// The four elements do not match the bank's record.
    CARD_INFO_MISMATCH = "1007", Declined, "Name, ID number, card number and phone do not match the bank's record.";
    /// SMS code wrong, or the sign reference is unknown or expired.
    BAD_SMS_CODE = "1008", Declined, "SMS code wrong, or sign reference unknown or expired.";
    /// ORDER_QUERY: no order with this reference was ever received.
    ORDER_NOT_FOUND = "1011", Declined, "No order with this order reference (see §8.3 before concluding).";
    /// Card or account frozen or closed at the bank.
    CARD_FROZEN = "1012", Declined, "Card frozen or closed at the bank.";
    /// The channel is overloaded; nothing was done.
    BUSY = "2001", NotProcessed, "Busy: nothing was done; try later or elsewhere.";
    /// Inside a maintenance window for this operation; nothing was done.
    MAINTENANCE = "2002", NotProcessed, "Maintenance window for this operation: nothing was done.";
    /// Payout: the merchant's prefunded balance at the channel is too low; nothing was done.
    FUNDS_POSITION_LOW = "2003", NotProcessed, "Merchant's prefunded balance too low for this payout: nothing was done.";
    /// Operation not supported by this channel.
    UNSUPPORTED = "2004", NotProcessed, "Operation not supported by this channel: nothing was done.";
    /// The bank's system is unavailable; the instruction was not sent to the bank.
    BANK_UNAVAILABLE = "2005", NotProcessed, "The card's bank is unavailable; the instruction was not sent to it.";
    /// The frame could not be processed (malformed body, wrong direction): nothing was done.
    BAD_REQUEST = "2006", NotProcessed, "Malformed or unexpected request: nothing was done.";
    /// Accepted; the final result is notified later.
    ACCEPTED = "3000", Processing, "Accepted and processing: the final result is notified (query if it does not come).";
    /// This order reference was already received: not executed again; query its state.
    DUPLICATE_ORDER_REF = "3001", Processing, "Order reference already received: not executed again; ORDER_QUERY gives the original's state.";
    /// LOGON: signature does not verify with the configured public key.
    AUTH_FAILED = "9001", Declined, "Logon signature does not verify with the configured public key.";
    /// LOGON: the institution id is not configured at the channel.
    UNKNOWN_INSTITUTION = "9002", Declined, "Logon from an institution id the channel does not know.";
    /// LOGON: timestamp outside the replay window.
    STALE_LOGON = "9003", Declined, "Logon timestamp outside the replay window.";
    /// LOGON: ephemeral key rejected (not a valid X25519 public key).
    BAD_KEY_EXCHANGE = "9004", Declined, "Ephemeral X25519 key rejected.";
}

crate::wire::layout::messages! {
    /// Switch → channel: first logon frame (§4). Signed with the switch's Ed25519 key.
    LogonReq = 0x01, "LOGON_REQ" {
        /// Heartbeat interval the switch will use, seconds (0 = channel default).
        heartbeat_s: u16,
        /// Free label of the switch instance, for the channel's logs.
        client_name: Ascii<16>,
        /// The switch's ephemeral X25519 public key for this connection.
        ephemeral_key: Blob<32>,
        /// 32 random bytes, so the transcript differs even if an ephemeral key repeats.
        nonce: Blob<32>,
        /// Ed25519 signature over frame bytes 0..130 (header and the fields above).
        signature: Blob<64>,
    }
    /// Channel → switch: logon result (§4). Signed with the channel's Ed25519 key, also
    /// when it refuses.
    LogonRsp = 0x81, "LOGON_RSP" {
        /// `0000`, or a `9xxx` refusal (then the channel closes the connection).
        code: RspCode,
        /// Class of `code`.
        class: RspClass,
        /// Heartbeat interval the channel will use, seconds.
        heartbeat_s: u16,
        /// Most requests the channel accepts in flight on this connection (0 = no limit).
        inflight_max: u16,
        /// SHA-256 of the whole LOGON_REQ frame this answers: binds the answer to it.
        req_digest: Blob<32>,
        /// The channel's ephemeral X25519 public key (zero when refusing).
        ephemeral_key: Blob<32>,
        /// 32 random bytes (zero when refusing).
        nonce: Blob<32>,
        /// Ed25519 signature over frame bytes 0..153 (header and the fields above).
        signature: Blob<64>,
    }
    /// Either side: heartbeat, sent only after a quiet interval.
    EchoReq = 0x03, "ECHO_REQ" {
        /// Any value; echoed back.
        nonce: u64,
    }
    /// Either side: heartbeat answer. Never answered.
    EchoRsp = 0x83, "ECHO_RSP" {
        /// The request's nonce.
        nonce: u64,
    }
    /// Switch → channel: identity check with the four elements; the bank sends the card
    /// holder an SMS code (pre-bind, 预绑卡).
    VerifyReq = 0x10, "VERIFY_REQ" {
        /// Quote in SIGN_REQ.
        sign_ref: SignRef,
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
    }
    /// Channel → switch: SMS sent (`0000`), or already signed (`0001`, agreement number set).
    VerifyRsp = 0x90, "VERIFY_RSP" {
        /// Result code.
        code: RspCode,
        /// Class of `code`.
        class: RspClass,
        /// Echo of the request.
        sign_ref: SignRef,
        /// 1 when an SMS code was sent, else 0.
        sms_sent: u8,
        /// The existing agreement number when already signed; else empty.
        agreement_no: Ascii<32>,
    }
    /// Switch → channel: the SMS code the card holder typed (bind confirm, 绑卡).
    SignReq = 0x11, "SIGN_REQ" {
        /// From VERIFY_REQ.
        sign_ref: SignRef,
        /// The code.
        sms_code: SmsCode,
    }
    /// Channel → switch: the channel agreement number.
    SignRsp = 0x91, "SIGN_RSP" {
        /// Result code.
        code: RspCode,
        /// Class of `code`.
        class: RspClass,
        /// Echo of the request.
        sign_ref: SignRef,
        /// The agreement number on success; else empty.
        agreement_no: Ascii<32>,
    }
    /// Switch → channel: cancel an agreement (解约).
    UnsignReq = 0x12, "UNSIGN_REQ" {
        /// The agreement.
        agreement_no: AgreementNo,
    }
    /// Channel → switch: cancel result.
    UnsignRsp = 0x92, "UNSIGN_RSP" {
        /// Result code.
        code: RspCode,
        /// Class of `code`.
        class: RspClass,
        /// Echo of the request.
        agreement_no: AgreementNo,
    }
    /// Switch → channel: debit the card of an agreement (协议支付).
    PayReq = 0x20, "PAY_REQ" {
        /// Unique per attempt; the ledger key.
        order_ref: OrderRef,
        /// The channel agreement number.
        agreement_no: AgreementNo,
        /// Amount in fen, > 0.
        amount: Fen,
        /// Always "CNY".
        currency: Currency,
        /// Shown on the card holder's statement.
        purpose: Purpose,
    }
    /// Channel → switch: debit result (final, or PROCESSING).
    PayRsp = 0xA0, "PAY_RSP" {
        /// Result code.
        code: RspCode,
        /// Class of `code`.
        class: RspClass,
        /// Echo of the request.
        order_ref: OrderRef,
        /// Channel serial number; empty when not executed.
        channel_serial: Serial,
        /// Echo of the amount, fen.
        amount: u64,
        /// When the order became final, ms since the Unix epoch; 0 while not final.
        finished_at_ms: u64,
    }
    /// Switch → channel: pay out to a card (代付), drawn from the prefunded balance.
    PayoutReq = 0x21, "PAYOUT_REQ" {
        /// Unique per attempt; the ledger key.
        order_ref: OrderRef,
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
    /// Channel → switch: payout result (final, or PROCESSING).
    PayoutRsp = 0xA1, "PAYOUT_RSP" {
        /// Result code.
        code: RspCode,
        /// Class of `code`.
        class: RspClass,
        /// Echo of the request.
        order_ref: OrderRef,
        /// Channel serial number; empty when not executed.
        channel_serial: Serial,
        /// Echo of the amount, fen.
        amount: u64,
        /// When the order became final, ms since the Unix epoch; 0 while not final.
        finished_at_ms: u64,
    }
    /// Switch → channel: current state of an order.
    QueryReq = 0x22, "QUERY_REQ" {
        /// The order reference of the attempt.
        order_ref: OrderRef,
    }
    /// Channel → switch: the order's state as code and class (`1011` when never received).
    QueryRsp = 0xA2, "QUERY_RSP" {
        /// The order's code (what its own response or notification carries), or a query error.
        code: RspCode,
        /// Class of `code`.
        class: RspClass,
        /// Echo of the request.
        order_ref: OrderRef,
        /// 1 debit, 2 payout; 0 when not found.
        order_type: u8,
        /// Amount in fen; 0 when not found.
        amount: u64,
        /// Channel serial number; empty when none.
        channel_serial: Serial,
        /// When the order became final, ms since the Unix epoch; 0 while not final.
        finished_at_ms: u64,
    }
    /// Channel → switch: final result of an order that was answered PROCESSING. May be
    /// sent several times; the same `notify_id` each time.
    Notify = 0x30, "NOTIFY" {
        /// Unique per notification; quote in NOTIFY_ACK.
        notify_id: u64,
        /// The order.
        order_ref: OrderRef,
        /// Debit or payout.
        order_type: OrderType,
        /// Final code.
        code: RspCode,
        /// SUCCESS or DECLINED.
        class: RspClass,
        /// Amount in fen.
        amount: Fen,
        /// Channel serial number.
        channel_serial: Serial,
        /// When the order became final, ms since the Unix epoch.
        finished_at_ms: u64,
    }
    /// Switch → channel: notification stored; the channel may stop repeating it.
    NotifyAck = 0xB0, "NOTIFY_ACK" {
        /// From the NOTIFY.
        notify_id: u64,
    }
    /// Channel → switch: the card holder revoked an agreement at the bank.
    Revoke = 0x31, "REVOKE" {
        /// Unique per notice; quote in REVOKE_ACK.
        notify_id: u64,
        /// The revoked agreement.
        agreement_no: AgreementNo,
        /// Last four digits of the card (for operators; never the whole number).
        card_last4: Digits<4>,
        /// When the bank revoked it, ms since the Unix epoch.
        revoked_at_ms: u64,
    }
    /// Switch → channel: revocation stored.
    RevokeAck = 0xB1, "REVOKE_ACK" {
        /// From the REVOKE.
        notify_id: u64,
    }
    /// Channel → switch: a request frame that could not be answered with its own response
    /// type (malformed body, unexpected type). Nothing was done.
    Reject = 0x7F, "REJECT" {
        /// Result code (`2006` BAD_REQUEST).
        code: RspCode,
        /// Class of `code` (NOT_PROCESSED).
        class: RspClass,
        /// The rejected frame's message type byte.
        rejected_type: u8,
        /// Detail for logs, never personal data.
        detail: Ascii<64>,
    }
}

impl Message {
    /// True for frames that answer a request of the other side (matched by `request_id`):
    /// every `0x81..` response and REJECT.
    pub fn is_response(&self) -> bool {
        let c = self.code();
        (0x81..=0xAF).contains(&c) || c == Reject::CODE
    }

    /// The (code, class) a response carries; `None` for requests and notices.
    pub fn result(&self) -> Option<(RspCode, RspClass)> {
        match self {
            Message::LogonRsp(m) => Some((m.code, m.class)),
            Message::VerifyRsp(m) => Some((m.code, m.class)),
            Message::SignRsp(m) => Some((m.code, m.class)),
            Message::UnsignRsp(m) => Some((m.code, m.class)),
            Message::PayRsp(m) => Some((m.code, m.class)),
            Message::PayoutRsp(m) => Some((m.code, m.class)),
            Message::QueryRsp(m) => Some((m.code, m.class)),
            Message::Notify(m) => Some((m.code, m.class)),
            Message::Reject(m) => Some((m.code, m.class)),
            _ => None,
        }
    }

    /// The order reference the message is about, if any.
    pub fn order_ref(&self) -> Option<&OrderRef> {
        match self {
            Message::PayReq(m) => Some(&m.order_ref),
            Message::PayRsp(m) => Some(&m.order_ref),
            Message::PayoutReq(m) => Some(&m.order_ref),
            Message::PayoutRsp(m) => Some(&m.order_ref),
            Message::QueryReq(m) => Some(&m.order_ref),
            Message::QueryRsp(m) => Some(&m.order_ref),
            Message::Notify(m) => Some(&m.order_ref),
            _ => None,
        }
    }
}

/// Header values chosen by the sender of a frame (type and length follow from the message;
/// `key_id` from the frame kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// Correlation id: chosen by the sender of a request, echoed in its response.
    pub request_id: u64,
    /// Sender's clock, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The switch's institution id at the channel (both directions).
    pub institution: MerchantNo,
    /// Flag bits (`wire::header::FLAG_*`).
    pub flags: u16,
}

/// One direction's session MAC key (HMAC-SHA256, derived per connection at logon).
#[derive(Clone)]
pub struct SessionKey {
    key: hmac::Key,
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// A key from its 32 secret bytes.
    pub fn new(secret: &[u8; 32]) -> SessionKey {
        SessionKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// `HMAC-SHA256(key, seq_be64 ‖ signed)`.
    #[inline]
    pub fn sign(&self, seq: u64, signed: &[u8]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&seq.to_be_bytes());
        ctx.update(signed);
        let tag = ctx.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Check `mac` in constant time.
    #[inline]
    pub fn verify(&self, seq: u64, signed: &[u8], mac: &[u8]) -> Result<(), MacError> {
        let want = self.sign(seq, signed);
        if mac.len() == MAC_LEN && ct_eq(&want, mac) {
            Ok(())
        } else {
            Err(MacError::BadMac)
        }
    }

    /// Verify a decoded frame: key id must be [`KEY_ID_SESSION`] and the trailer must match.
    #[inline]
    pub fn verify_frame(&self, seq: u64, frame: &RawFrame) -> Result<(), MacError> {
        if frame.header.key_id != KEY_ID_SESSION {
            return Err(MacError::UnknownKey);
        }
        self.verify(seq, frame.signed(), frame.mac())
    }
}

/// Constant-time equality of two equally long byte strings (no early exit).
/// Constant-time equality. `ring::hmac::verify` needs the signed bytes as one slice, but
/// the session MAC covers `seq ‖ frame` without copying the frame, so the comparison is
/// done here with `subtle`, the well-kept crate made for it.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn put_header(env: &Envelope, msg: &Message, key_id: u16, out: &mut BytesMut) -> usize {
    let len = frame_len(msg.code()).unwrap_or(0);
    out.reserve(len);
    Header {
        msg_type: msg.code(),
        length: len as u16,
        flags: env.flags,
        request_id: env.request_id,
        timestamp_ms: env.timestamp_ms,
        key_id,
        merchant: env.institution,
    }
    .put(Channel::MAGIC, out);
    msg.put_body(out);
    len
}

/// Append one session frame: header, body and `HMAC(key, seq ‖ header ‖ body)`.
pub fn encode(env: &Envelope, msg: &Message, key: &SessionKey, seq: u64, out: &mut BytesMut) {
    let start = out.len();
    let len = put_header(env, msg, KEY_ID_SESSION, out);
    let mac = key.sign(seq, &out[start..]);
    out.extend_from_slice(&mac);
    assert_eq!(
        out.len() - start,
        len,
        "encoded frame has its type's length"
    );
}

/// Append one logon frame (key id 0, zero trailer). The signature field must already be
/// filled in; [`super::handshake`] builds these.
pub fn encode_logon(env: &Envelope, msg: &Message, out: &mut BytesMut) {
    let start = out.len();
    let len = put_header(env, msg, KEY_ID_LOGON, out);
    out.put_bytes(0, MAC_LEN);
    assert_eq!(
        out.len() - start,
        len,
        "encoded frame has its type's length"
    );
}

/// Encode one session frame into its own buffer.
pub fn encode_to_bytes(env: &Envelope, msg: &Message, key: &SessionKey, seq: u64) -> Bytes {
    let mut b = BytesMut::new();
    encode(env, msg, key, seq, &mut b);
    b.freeze()
}

/// Decode a frame's body into its typed message (MAC not checked here).
pub fn decode(frame: &RawFrame) -> Result<Message, Malformed> {
    Message::decode_body(frame.header.msg_type, frame.body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_codes_unique_and_fit() {
        let mut seen = std::collections::HashSet::new();
        for (code, name, len, _) in CATALOGUE {
            assert!(seen.insert(*code), "duplicate code {code:#x} ({name})");
            assert!(*len <= MAX_FRAME_LEN, "{name} is {len} bytes");
        }
    }

    #[test]
    fn code_table_is_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for &c in Code::ALL {
            assert!(seen.insert(c.as_str()));
            assert_eq!(c.as_str().len(), 4);
            assert_eq!(RspCode::from(c).as_str(), c.as_str());
            assert_eq!(Code::parse(c.as_str()), Some(c));
        }
        assert_eq!(Code::parse("0000"), Some(Code::OK));
        assert!(!RspClass::NotProcessed.is_final());
        assert_eq!(RspCode::new("12"), Err(FieldProblem::WrongLength));
    }

    #[test]
    fn logon_signature_offsets_match_the_docs() {
        assert_eq!(LogonReq::FRAME_LEN - MAC_LEN - 64, 130);
        assert_eq!(LogonRsp::FRAME_LEN - MAC_LEN - 64, 153);
    }

    #[test]
    fn session_mac_binds_the_sequence_number() {
        let key = SessionKey::new(&[9u8; 32]);
        let env = Envelope {
            request_id: 7,
            timestamp_ms: 1,
            institution: MerchantNo::new("SWITCH01").unwrap(),
            flags: 0,
        };
        let f = encode_to_bytes(&env, &EchoReq { nonce: 5 }.into(), &key, 3);
        let raw = ChannelCodec::decode_slice(&f).unwrap().unwrap().unwrap();
        assert!(key.verify_frame(3, &raw).is_ok());
        assert_eq!(key.verify_frame(4, &raw), Err(MacError::BadMac));
        assert_eq!(
            decode(&raw).unwrap(),
            Message::EchoReq(EchoReq { nonce: 5 })
        );
    }
}
