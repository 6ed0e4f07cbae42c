//! Value types carried in lender messages: statuses, reason codes, the result block, and
//! the personal data fields (card, ID, phone, name) whose `Debug` output is masked.

use std::fmt;

use bytes::{BufMut, BytesMut};

use crate::wire::field::{Ascii, Digits, Field, FieldProblem, Reserved, Text};

/// Outcome class of a response or of an order (`status` byte of the result block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Done, and final.
    Success = 0,
    /// Definitively not done, and final (the money did not move).
    Failed = 1,
    /// Accepted; the final result is not known yet and will be notified.
    Pending = 2,
    /// The request was not accepted at all (bad input, security); nothing was done.
    Rejected = 3,
    /// The switch is overloaded; nothing was done; retry later with the same order id.
    Busy = 4,
}

impl Status {
    /// Every status, in code order.
    pub const ALL: [Status; 5] = [
        Status::Success,
        Status::Failed,
        Status::Pending,
        Status::Rejected,
        Status::Busy,
    ];

    /// Parse the wire byte.
    pub fn from_u8(v: u8) -> Option<Status> {
        Status::ALL.get(v as usize).copied()
    }

    /// True for SUCCESS and FAILED: the order will not change any more.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Success | Status::Failed)
    }

    /// Upper-case name as used in the spec.
    pub fn name(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Failed => "FAILED",
            Status::Pending => "PENDING",
            Status::Rejected => "REJECTED",
            Status::Busy => "BUSY",
        }
    }
}

macro_rules! reasons {
    ($( $(#[$m:meta])* $name:ident = $code:literal, $text:literal; )*) => {
        /// Reason code (`reason` field of the result block). The catalogue with meanings is
        /// `protocol/SPEC.md` §7; [`Reason::describe`] gives the same text.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        #[allow(non_camel_case_types)]
        pub enum Reason {
            $( $(#[$m])* $name = $code, )*
        }

        impl Reason {
            /// Every reason, in code order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name),*];

            /// Parse the wire value.
            pub fn from_u16(v: u16) -> Option<Reason> {
                match v {
                    $( $code => Some(Reason::$name), )*
                    _ => None,
                }
            }

            /// Name as used in the spec (upper snake case).
            pub fn name(self) -> &'static str {
                match self { $( Reason::$name => stringify!($name), )* }
            }

            /// One-line meaning, as in the spec's catalogue.
            pub fn describe(self) -> &'static str {
                match self { $( Reason::$name => $text, )* }
            }
        }
    };
}

reasons! {
    /// Success; nothing to add.
    OK = 0, "No error.";
    /// The MAC trailer did not verify.
    BAD_MAC = 101, "The MAC trailer does not verify with the key named by merchant number and key id.";
    /// No key with that id for that merchant.
    UNKNOWN_KEY = 102, "No active key with this key id for this merchant number.";
    /// A request other than LOGON or ECHO before any logon.
    NOT_LOGGED_ON = 103, "The connection has not logged on for this merchant number yet.";
    /// The merchant number is not one this session logged on with.
    MERCHANT_NOT_ALLOWED = 104, "This connection did not log on with this merchant number.";
    /// Timestamp outside the replay window.
    STALE_TIMESTAMP = 105, "Header timestamp differs from the switch clock by more than the replay window.";
    /// Request id already used by this merchant within the replay window.
    DUPLICATE_REQUEST_ID = 106, "Request id already seen for this merchant within the replay window.";
    /// A field failed validation; `field` names it.
    MALFORMED_FIELD = 107, "A field is malformed; the `field` number names it (body fields from 1, header fields from 101).";
    /// Message type not known to this protocol version.
    UNKNOWN_MESSAGE_TYPE = 108, "Unknown message type (the frame was skipped using its length).";
    /// Length field does not match the message type's fixed length.
    BAD_LENGTH = 109, "Length field does not equal the fixed length of this message type.";
    /// Protocol version not supported.
    BAD_VERSION = 110, "Unsupported protocol version.";
    /// Framing lost: magic wrong or length outside the allowed range; connection closes.
    FRAMING_LOST = 111, "Magic wrong or length outside 80..=1024: framing is lost, the connection is closed.";
    /// A message that the receiver never accepts in this direction (e.g. a response type sent as a request).
    UNEXPECTED_MESSAGE = 112, "Message type not accepted in this direction or state.";
    /// Agreement id not known for this merchant.
    UNKNOWN_AGREEMENT = 201, "No such agreement id for this merchant number.";
    /// The agreement was cancelled or revoked by the card holder's bank.
    AGREEMENT_REVOKED = 202, "The agreement was cancelled by the merchant or revoked at the bank.";
    /// Amount or count over a per-transaction or per-card daily limit on every channel.
    LIMIT_EXCEEDED = 203, "Over a per-transaction or per-card daily limit on every eligible channel.";
    /// No channel can take this instruction now (none eligible or all down).
    NO_CHANNEL = 204, "No channel can take this instruction now (unsupported bank or card type, all channels closed or down).";
    /// Same order id, same content: the original order's current state is returned.
    DUPLICATE_ORDER = 205, "This order id was already accepted with the same content; the result block carries the original order's current status.";
    /// Same order id with different content (amount, agreement, card).
    ORDER_CONFLICT = 206, "This order id was already used with different content (amount, agreement, card, type); nothing was done.";
    /// The channel declined; its own code is in `channel_code`.
    CHANNEL_DECLINED = 207, "The channel declined (insufficient funds, card not supported …); its code is in `channel_code`.";
    /// Timeout or lost connection: outcome unknown, being queried.
    OUTCOME_UNKNOWN = 208, "The channel did not answer in time or the line dropped: the outcome is unknown, the order is PENDING and is queried until final.";
    /// Card already signed for this merchant: the existing agreement id is returned.
    ALREADY_SIGNED = 209, "The card is already signed for this merchant; the existing agreement id is returned and no SMS is sent.";
    /// SMS code wrong or bind reference expired.
    BAD_SMS_CODE = 210, "The SMS code is wrong, or the bind reference is unknown or expired.";
    /// Order id not known for this merchant.
    UNKNOWN_ORDER = 211, "No order with this order id for this merchant number.";
    /// The switch is overloaded (BUSY).
    OVERLOADED = 301, "Overloaded: too many requests in flight; nothing was done; retry later.";
    /// Internal error; nothing was done.
    INTERNAL_ERROR = 302, "Internal error; the request was not accepted.";
    /// The switch is shutting down and accepts no new work.
    SHUTTING_DOWN = 303, "The switch is draining for shutdown; reconnect later.";
}

impl Field for Status {
    const SIZE: usize = 1;
    const KIND: &'static str = "u8 status";
    fn put(&self, out: &mut BytesMut) {
        out.put_u8(*self as u8);
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        Status::from_u8(src[0]).ok_or(FieldProblem::OutOfRange)
    }
}

/// The 16-byte result block that starts every response body and every notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Outcome class.
    pub status: Status,
    /// Why (0 = OK).
    pub reason: Reason,
    /// For `MALFORMED_FIELD`: the field number (body fields from 1, header fields from
    /// 101); otherwise 0.
    pub field: u16,
    /// The channel's own response code when a channel answered (e.g. a decline code),
    /// carried through unchanged; empty otherwise.
    pub channel_code: Ascii<8>,
}

impl Outcome {
    /// Plain success.
    pub const fn ok() -> Outcome {
        Outcome {
            status: Status::Success,
            reason: Reason::OK,
            field: 0,
            channel_code: Ascii::empty(),
        }
    }

    /// A status with a reason and no field or channel code.
    pub const fn new(status: Status, reason: Reason) -> Outcome {
        Outcome {
            status,
            reason,
            field: 0,
            channel_code: Ascii::empty(),
        }
    }

    /// A rejection for a malformed field.
    pub const fn malformed(field: u16) -> Outcome {
        Outcome {
            status: Status::Rejected,
            reason: Reason::MALFORMED_FIELD,
            field,
            channel_code: Ascii::empty(),
        }
    }
}

impl Field for Outcome {
    const SIZE: usize = 16;
    const KIND: &'static str = "result block (§3.3)";
    fn put(&self, out: &mut BytesMut) {
        out.put_u8(self.status as u8);
        out.put_u8(0);
        out.put_u16(self.reason as u16);
        out.put_u16(self.field);
        out.put_u16(0);
        self.channel_code.put(out);
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        let status = Status::get(&src[0..1])?;
        Reserved::<1>::get(&src[1..2])?;
        let reason = Reason::from_u16(u16::from_be_bytes([src[2], src[3]]))
            .ok_or(FieldProblem::OutOfRange)?;
        let field = u16::from_be_bytes([src[4], src[5]]);
        Reserved::<2>::get(&src[6..8])?;
        let channel_code = Ascii::<8>::get(&src[8..16])?;
        Ok(Outcome {
            status,
            reason,
            field,
            channel_code,
        })
    }
}

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident, $kind:literal { $( $(#[$vm:meta])* $v:ident = $code:literal ),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $( $(#[$vm])* $v = $code ),* }

        impl $name {
            /// Parse the wire byte.
            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $( $code => Some($name::$v), )* _ => None }
            }
        }

        impl Field for $name {
            const SIZE: usize = 1;
            const KIND: &'static str = $kind;
            fn put(&self, out: &mut BytesMut) {
                out.put_u8(*self as u8);
            }
            fn get(src: &[u8]) -> Result<Self, FieldProblem> {
                $name::from_u8(src[0]).ok_or(FieldProblem::OutOfRange)
            }
        }
    };
}

code_enum!(
    /// Kind of bank card.
    CardType, "u8 card type" {
        /// Debit card (借记卡).
        Debit = 1,
        /// Credit card (贷记卡).
        Credit = 2,
    }
);

code_enum!(
    /// What a PREBIND_REQ asks for.
    BindMode, "u8 bind mode" {
        /// Sign the card (idempotent: an already signed card answers ALREADY_SIGNED).
        Sign = 0,
        /// Sign the card's existing agreement on one more channel (backup channel), so
        /// routing has an alternative; the agreement id stays the same.
        Backup = 1,
    }
);

code_enum!(
    /// Kind of order.
    OrderType, "u8 order type" {
        /// Debit of the card by agreement (collection, repayment).
        Debit = 1,
        /// Payout to a card (disbursement).
        Payout = 2,
    }
);

code_enum!(
    /// State of an agreement as the lender sees it.
    AgreementState, "u8 agreement state" {
        /// Signed and usable on at least one channel.
        Active = 1,
        /// Cancelled by the merchant.
        Cancelled = 2,
        /// Revoked by the card holder at the bank on every signed channel.
        Revoked = 3,
    }
);

code_enum!(
    /// What a notification is about.
    NotifyKind, "u8 notify kind" {
        /// An order reached its final state.
        OrderFinal = 1,
        /// An agreement was revoked at the bank.
        AgreementRevoked = 2,
    }
);

/// Currency code: ISO 4217 alphabetic, only `CNY` is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Currency;

impl Field for Currency {
    const SIZE: usize = 3;
    const KIND: &'static str = "ASCII \"CNY\"";
    fn put(&self, out: &mut BytesMut) {
        out.put_slice(b"CNY");
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        if src == b"CNY" {
            Ok(Currency)
        } else {
            Err(FieldProblem::OutOfRange)
        }
    }
}

/// An amount in fen (1/100 yuan); never zero on an order. No floating point, ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fen(pub u64);

impl Field for Fen {
    const SIZE: usize = 8;
    const KIND: &'static str = "u64 BE fen, > 0";
    fn put(&self, out: &mut BytesMut) {
        out.put_u64(self.0);
    }
    fn get(src: &[u8]) -> Result<Self, FieldProblem> {
        match u64::get(src)? {
            0 => Err(FieldProblem::OutOfRange),
            v => Ok(Fen(v)),
        }
    }
}

/// True when the digits pass the Luhn (mod 10) check used by bank card numbers.
pub fn luhn_ok(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &c) in digits.iter().rev().enumerate() {
        let mut d = (c - b'0') as u32;
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

/// Mask all but the first `head` and last `tail` characters with `*`.
pub fn mask(s: &str, head: usize, tail: usize) -> String {
    let n = s.chars().count();
    if n <= head + tail {
        return "*".repeat(n);
    }
    s.chars()
        .enumerate()
        .map(|(i, c)| if i < head || i >= n - tail { c } else { '*' })
        .collect()
}

macro_rules! pii_field {
    ($(#[$m:meta])* $name:ident($inner:ty), $kind:literal, $check:expr, $mask:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $inner);

        impl $name {
            /// Build from a string, with the same checks as decoding.
            pub fn new(s: &str) -> Result<Self, FieldProblem> {
                let v = <$inner>::new(s)?;
                let check: fn(&$inner) -> Result<(), FieldProblem> = $check;
                check(&v)?;
                Ok($name(v))
            }

            /// The clear value. Never log it; hash it before storing it.
            pub fn expose(&self) -> &str {
                self.0.as_str()
            }

            /// The masked form used in logs and `Debug`.
            pub fn masked(&self) -> String {
                let m: fn(&str) -> String = $mask;
                m(self.0.as_str())
            }
        }

        impl Field for $name {
            const SIZE: usize = <$inner as Field>::SIZE;
            const KIND: &'static str = $kind;
            fn put(&self, out: &mut BytesMut) {
                self.0.put(out)
            }
            fn get(src: &[u8]) -> Result<Self, FieldProblem> {
                let v = <$inner>::get(src)?;
                let check: fn(&$inner) -> Result<(), FieldProblem> = $check;
                check(&v)?;
                Ok($name(v))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.masked())
            }
        }

        /// Masked too: `%value` in a `tracing` field or `{}` in a message can never
        /// print the clear value (that takes [`Self::expose`], by name).
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.masked())
            }
        }
    };
}

pii_field!(
    /// Bank card number: 12–19 digits with a valid Luhn check digit. Masked `6222********1234`.
    CardNo(Digits<19>),
    "ASCII digits, Luhn",
    |d| {
        let b = d.as_bytes();
        if b.is_empty() {
            Err(FieldProblem::Empty)
        } else if b.len() < 12 {
            Err(FieldProblem::WrongLength)
        } else if !luhn_ok(b) {
            Err(FieldProblem::Luhn)
        } else {
            Ok(())
        }
    },
    |s| mask(s, 4, 4)
);

pii_field!(
    /// Resident ID number: 18 characters, 17 digits then a digit or `X`. Masked
    /// `1101**********1234`.
    IdNo(Ascii<18>),
    "ASCII, 17 digits + digit or X",
    |d| {
        let b = d.as_bytes();
        if b.is_empty() {
            Err(FieldProblem::Empty)
        } else if b.len() != 18 {
            Err(FieldProblem::WrongLength)
        } else if !b[..17].iter().all(u8::is_ascii_digit)
            || !(b[17].is_ascii_digit() || b[17] == b'X')
        {
            Err(FieldProblem::NotDigits)
        } else {
            Ok(())
        }
    },
    |s| mask(s, 4, 4)
);

pii_field!(
    /// Bank-reserved mobile phone: 11 digits starting with 1. Masked `138****5678`.
    Phone(Digits<11>),
    "ASCII digits, 11, leading 1",
    |d| {
        let b = d.as_bytes();
        if b.is_empty() {
            Err(FieldProblem::Empty)
        } else if b.len() != 11 || b[0] != b'1' {
            Err(FieldProblem::WrongLength)
        } else {
            Ok(())
        }
    },
    |s| mask(s, 3, 4)
);

pii_field!(
    /// Card holder's name, UTF-8, 64 bytes (21 Chinese characters). Masked `张*`.
    Name(Text<64>),
    "UTF-8 text, non-empty",
    |d| {
        if d.is_empty() {
            Err(FieldProblem::Empty)
        } else {
            Ok(())
        }
    },
    |s| {
        let mut it = s.chars();
        match it.next() {
            Some(c) => std::iter::once(c).chain(it.map(|_| '*')).collect(),
            None => String::new(),
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(luhn_ok(b"6222021234567890128"));
        assert!(!luhn_ok(b"6222021234567890127"));
        assert!(luhn_ok(b"4111111111111111"));
    }

    #[test]
    fn masks_match_the_operations_brief() {
        assert_eq!(
            CardNo::new("6222021234567891234").unwrap_err(),
            FieldProblem::Luhn
        );
        let card = CardNo::new("6222021234567890128").unwrap();
        assert_eq!(card.masked(), "6222***********0128");
        assert_eq!(format!("{card:?}"), "CardNo(6222***********0128)");
        let id = IdNo::new("11010519491231002X").unwrap();
        assert_eq!(id.masked(), "1101**********002X");
        assert_eq!(Phone::new("13812345678").unwrap().masked(), "138****5678");
        assert_eq!(Name::new("张三").unwrap().masked(), "张*");
        assert_eq!(
            IdNo::new("1101051949123100"),
            Err(FieldProblem::WrongLength)
        );
        assert_eq!(
            IdNo::new("11010519491231002Y"),
            Err(FieldProblem::NotDigits)
        );
    }

    #[test]
    fn every_pii_type_masks_in_display_debug_and_log_fields() {
        let card = CardNo::new("6222021234091234").unwrap();
        let id = IdNo::new("110105194912311234").unwrap();
        let name = Name::new("张三").unwrap();
        let phone = Phone::new("13812345678").unwrap();
        // The brief's forms, by type.
        assert_eq!(card.to_string(), "6222********1234");
        assert_eq!(id.to_string(), "1101**********1234");
        assert_eq!(name.to_string(), "张*");
        assert_eq!(phone.to_string(), "138****5678");
        assert_eq!(Name::new("欧阳小明").unwrap().to_string(), "欧***");
        assert_eq!(format!("{card:?}"), "CardNo(6222********1234)");
        assert_eq!(format!("{id:?}"), "IdNo(1101**********1234)");
        assert_eq!(format!("{name:?}"), "Name(张*)");
        assert_eq!(format!("{phone:?}"), "Phone(138****5678)");
        // Inside a message's Debug (what `?msg` in a log line would print).
        let req = crate::message::PreBindReq {
            user_id: crate::message::UserId::new("U1").unwrap(),
            card_type: CardType::Debit,
            bank_code: crate::message::BankCode::new("ICBC").unwrap(),
            card_no: card,
            id_no: id,
            name,
            phone,
            mode: BindMode::Sign,
        };
        let dbg = format!("{req:?}");
        for clear in [
            "6222021234091234",
            "110105194912311234",
            "张三",
            "13812345678",
        ] {
            assert!(!dbg.contains(clear), "{clear} in {dbg}");
        }
        assert!(
            dbg.contains("6222********1234") && dbg.contains("138****5678"),
            "{dbg}"
        );
    }

    #[test]
    fn reason_codes_round_trip() {
        for &r in Reason::ALL {
            assert_eq!(Reason::from_u16(r as u16), Some(r));
            assert!(!r.describe().is_empty());
        }
        assert_eq!(Reason::from_u16(9999), None);
    }
}
