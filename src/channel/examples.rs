//! One example of every channel message, and the text form of the golden vectors in
//! `protocol/vectors/channel/` (checked by `tests/channel_link.rs`, regenerated with
//! `SLUICE_REGEN_VECTORS=1`). Test data only: the card, ID and phone numbers are made up.

use std::fmt::Write as _;

use bytes::BytesMut;

use super::message::*;
use crate::message::types::{CardNo, CardType, Currency, Fen, IdNo, Name, OrderType, Phone};
use crate::message::SmsCode;
use crate::wire::field::{Ascii, Digits, Text};
use crate::wire::header::{MerchantNo, HEADER_LEN};

/// Institution id of the switch at the channel in every example.
pub const INSTITUTION: &str = "SLUICE0001";
/// Timestamp of every example frame (2024-01-02T03:04:05.678Z).
pub const TIMESTAMP_MS: u64 = 1_704_164_645_678;
/// Session key switch → channel of the message vectors (bytes 0x01..=0x20).
pub const KEY_SWITCH_TO_CHANNEL: [u8; 32] = seq_bytes(1);
/// Session key channel → switch of the message vectors (bytes 0x21..=0x40).
pub const KEY_CHANNEL_TO_SWITCH: [u8; 32] = seq_bytes(0x21);

const fn seq_bytes(start: u8) -> [u8; 32] {
    let mut a = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        a[i] = start + i as u8;
        i += 1;
    }
    a
}

/// A test card number (Luhn-valid).
pub fn card() -> CardNo {
    CardNo::new("6222021234567890128").expect("valid example card")
}
/// A test ID number.
pub fn id_no() -> IdNo {
    IdNo::new("11010519491231002X").expect("valid example ID")
}
/// A test phone number.
pub fn phone() -> Phone {
    Phone::new("13812345678").expect("valid example phone")
}
/// A test name.
pub fn name() -> Name {
    Name::new("张三").expect("valid example name")
}

fn a<const N: usize>(s: &str) -> Ascii<N> {
    Ascii::new(s).expect("valid example text")
}

/// Example order reference.
pub fn order_ref() -> OrderRef {
    OrderRef::new("S2024010200000000000000000000001").unwrap_or_default()
}

/// True when the message type is sent by the switch (else by the channel). ECHO_REQ is
/// sent by both; its vector is the switch's.
pub fn from_switch(code: u8) -> bool {
    matches!(code, 0x01 | 0x03 | 0x10..=0x2F | 0xB0..=0xBF)
}

/// The envelope of every example frame.
pub fn envelope(request_id: u64) -> Envelope {
    Envelope {
        request_id,
        timestamp_ms: TIMESTAMP_MS,
        institution: MerchantNo::new(INSTITUTION).unwrap_or_default(),
        flags: 0,
    }
}

/// One example of every message type except the two logon frames (whose vectors are the
/// handshake vector), in catalogue order.
pub fn all() -> Vec<Message> {
    let oref = order_ref();
    let sref = SignRef::new("B2024010200000000000000000000001").unwrap_or_default();
    let agr = AgreementNo::new("AGR00000000000000000000000000042").unwrap_or_default();
    let serial: Serial = a("CH2024010200000001");
    let purpose: Text<64> = Text::new("贷款还款").expect("valid purpose");
    let (ok, ok_class) = Code::OK.pair();
    vec![
        EchoReq { nonce: 42 }.into(),
        EchoRsp { nonce: 42 }.into(),
        VerifyReq {
            sign_ref: sref,
            card_type: CardType::Debit,
            bank_code: a("ICBC"),
            card_no: card(),
            id_no: id_no(),
            name: name(),
            phone: phone(),
        }
        .into(),
        VerifyRsp {
            code: ok,
            class: ok_class,
            sign_ref: sref,
            sms_sent: 1,
            agreement_no: Ascii::empty(),
        }
        .into(),
        SignReq {
            sign_ref: sref,
            sms_code: SmsCode::new("123456").unwrap_or_default(),
        }
        .into(),
        SignRsp {
            code: ok,
            class: ok_class,
            sign_ref: sref,
            agreement_no: agr.0,
        }
        .into(),
        UnsignReq { agreement_no: agr }.into(),
        UnsignRsp {
            code: ok,
            class: ok_class,
            agreement_no: agr,
        }
        .into(),
        PayReq {
            order_ref: oref,
            agreement_no: agr,
            amount: Fen(12_345),
            currency: Currency,
            purpose,
        }
        .into(),
        PayRsp {
            code: Code::ACCEPTED.into(),
            class: RspClass::Processing,
            order_ref: oref,
            channel_serial: serial,
            amount: 12_345,
            finished_at_ms: 0,
        }
        .into(),
        PayoutReq {
            order_ref: oref,
            amount: Fen(500_000),
            currency: Currency,
            card_type: CardType::Debit,
            bank_code: a("CMB"),
            card_no: card(),
            name: name(),
            purpose: Text::new("贷款发放").expect("valid purpose"),
        }
        .into(),
        PayoutRsp {
            code: Code::FUNDS_POSITION_LOW.into(),
            class: RspClass::NotProcessed,
            order_ref: oref,
            channel_serial: Ascii::empty(),
            amount: 500_000,
            finished_at_ms: 0,
        }
        .into(),
        QueryReq { order_ref: oref }.into(),
        QueryRsp {
            code: Code::INSUFFICIENT_FUNDS.into(),
            class: RspClass::Declined,
            order_ref: oref,
            order_type: 1,
            amount: 12_345,
            channel_serial: serial,
            finished_at_ms: TIMESTAMP_MS + 1_500,
        }
        .into(),
        Notify {
            notify_id: 9001,
            order_ref: oref,
            order_type: OrderType::Debit,
            code: ok,
            class: ok_class,
            amount: Fen(12_345),
            channel_serial: serial,
            finished_at_ms: TIMESTAMP_MS + 2_000,
        }
        .into(),
        NotifyAck { notify_id: 9001 }.into(),
        Revoke {
            notify_id: 9002,
            agreement_no: agr,
            card_last4: Digits::new("0128").unwrap_or_default(),
            revoked_at_ms: TIMESTAMP_MS + 3_000,
        }
        .into(),
        RevokeAck { notify_id: 9002 }.into(),
        Reject {
            code: Code::BAD_REQUEST.into(),
            class: RspClass::NotProcessed,
            rejected_type: 0x20,
            detail: a("field 3 (amount): value out of range"),
        }
        .into(),
    ]
}

/// The session key an example of `code` is MAC'd with (by its direction).
pub fn key_for(code: u8) -> [u8; 32] {
    if from_switch(code) {
        KEY_SWITCH_TO_CHANNEL
    } else {
        KEY_CHANNEL_TO_SWITCH
    }
}

/// The bytes of `msg`'s example frame (request id = its type code, sequence number 0).
pub fn frame(msg: &Message) -> BytesMut {
    let mut b = BytesMut::new();
    let key = SessionKey::new(&key_for(msg.code()));
    encode(&envelope(msg.code() as u64), msg, &key, 0, &mut b);
    b
}

/// Render the fields of a frame body by the layout table: offset, size, hex, and a
/// readable value for text and integer fields.
pub fn describe_fields(code: u8, frame: &[u8]) -> String {
    let mut out = String::new();
    let Some((_, _, _, layout)) = CATALOGUE.iter().find(|c| c.0 == code) else {
        return out;
    };
    let mut off = HEADER_LEN;
    for f in layout.iter() {
        let b = &frame[off..off + f.size];
        let _ = write!(
            out,
            "field {} off={} len={} hex={}",
            f.name,
            off,
            f.size,
            hex::encode(b)
        );
        if f.kind.starts_with("u8")
            || f.kind.starts_with("u16")
            || f.kind.starts_with("u32")
            || f.kind.starts_with("u64")
        {
            let v = b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64);
            let _ = write!(out, " value={v}");
        } else if f.kind.contains("ASCII") || f.kind.contains("UTF-8") {
            let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
            let _ = write!(out, " text={:?}", String::from_utf8_lossy(&b[..end]));
        }
        out.push('\n');
        off += f.size;
    }
    out
}

/// The vector file text of one example message.
pub fn vector_text(msg: &Message) -> String {
    let f = frame(msg);
    let dir = if from_switch(msg.code()) {
        "switch->channel"
    } else {
        "channel->switch"
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# {} (type 0x{:02X}), {dir}; session frame, sequence number 0.",
        msg.wire_name(),
        msg.code()
    );
    let _ = writeln!(
        s,
        "# mac = HMAC-SHA256(key, seq as u64 BE || frame[0..len-32]); see protocol/CHANNEL.md §5."
    );
    let _ = writeln!(s, "name: {}", msg.wire_name());
    let _ = writeln!(s, "direction: {dir}");
    let _ = writeln!(s, "key: {}", hex::encode(key_for(msg.code())));
    let _ = writeln!(s, "seq: 0");
    let _ = writeln!(s, "frame: {}", hex::encode(&f));
    let _ = writeln!(s, "length: {}", f.len());
    let _ = writeln!(s, "request_id: {}", msg.code());
    let _ = writeln!(s, "timestamp_ms: {TIMESTAMP_MS}");
    let _ = writeln!(s, "key_id: {KEY_ID_SESSION}");
    let _ = writeln!(s, "institution: {INSTITUTION}");
    s.push_str(&describe_fields(msg.code(), &f));
    s
}

/// The message and code tables of `protocol/CHANNEL.md` (between its `BEGIN GENERATED` and
/// `END GENERATED` markers), generated from [`CATALOGUE`] and [`Code::ALL`].
pub fn spec_tables() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### Message types\n");
    let _ = writeln!(s, "| type | name | frame length |");
    let _ = writeln!(s, "|------|------|-------------:|");
    for (code, name, len, _) in CATALOGUE {
        let _ = writeln!(s, "| 0x{code:02X} | {name} | {len} |");
    }
    for (code, name, len, layout) in CATALOGUE {
        let _ = writeln!(s, "\n#### {name} (0x{code:02X}, {len} bytes)\n");
        let _ = writeln!(s, "| # | offset | size | field | type |");
        let _ = writeln!(s, "|--:|-------:|-----:|-------|------|");
        let mut off = HEADER_LEN;
        for (i, f) in layout.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {off} | {} | {} | {} |",
                i + 1,
                f.size,
                f.name,
                f.kind
            );
            off += f.size;
        }
        let _ = writeln!(
            s,
            "| | {off} | 32 | mac | session MAC (zero in logon frames) |"
        );
    }
    let _ = writeln!(s, "\n### Response codes\n");
    let _ = writeln!(s, "| code | class | name | meaning |");
    let _ = writeln!(s, "|------|-------|------|---------|");
    for &c in Code::ALL {
        let _ = writeln!(
            s,
            "| `{}` | {} {} | {} | {} |",
            c.as_str(),
            c.class() as u8,
            c.class().name(),
            c.name(),
            c.meaning()
        );
    }
    s
}
