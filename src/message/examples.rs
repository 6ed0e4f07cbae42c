//! One realistic example of every lender message, with fixed values.
//!
//! Used by the golden vectors in `protocol/vectors/lender/`, the criterion benches, the
//! fuzz seed corpus and the tests. The personal data here is synthetic: the card number
//! passes Luhn and the ID number has the right shape, but neither belongs to anyone.

use super::*;

/// Merchant number used by every example.
pub const MERCHANT: &str = "898100000000001";
/// Key id used by every example.
pub const KEY_ID: u16 = 1;
/// The example merchant key: bytes 0x00, 0x01, … 0x1f.
pub const SECRET: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = i as u8;
        i += 1;
    }
    k
};
/// Request id used by every example.
pub const REQUEST_ID: u64 = 0x0102_0304_0506_0708;
/// Timestamp used by every example: 2026-11-23T02:00:00Z.
pub const TIMESTAMP_MS: u64 = 1_795_399_200_000;

/// The example envelope.
pub fn envelope() -> Envelope {
    Envelope {
        request_id: REQUEST_ID,
        timestamp_ms: TIMESTAMP_MS,
        key_id: KEY_ID,
        merchant: MerchantNo::new(MERCHANT).expect("valid"),
        flags: 0,
    }
}

fn card() -> CardNo {
    CardNo::new("6222021234567890128").expect("valid")
}
fn id_no() -> IdNo {
    IdNo::new("11010519491231002X").expect("valid")
}
fn name() -> Name {
    Name::new("张三").expect("valid")
}
fn phone() -> Phone {
    Phone::new("13812345678").expect("valid")
}
fn order() -> OrderId {
    OrderId::new("ORD20261123000001").expect("valid")
}
fn bank() -> BankCode {
    BankCode::new("ICBC").expect("valid")
}
fn purpose() -> Purpose {
    Purpose::new("贷款还款 第3期").expect("valid")
}
fn chan() -> ChannelId {
    ChannelId::new("CHA").expect("valid")
}
fn ok() -> Outcome {
    Outcome::ok()
}

/// One example of every message type, in catalogue order.
pub fn all() -> Vec<Message> {
    vec![
        LogonReq {
            heartbeat_s: 30,
            client_name: Ascii::new("loan-core-01").expect("valid"),
        }
        .into(),
        LogonRsp {
            result: ok(),
            session_id: 42,
            heartbeat_s: 30,
            idle_timeout_s: 90,
            replay_window_s: 120,
            inflight_max: 1024,
        }
        .into(),
        LogoffReq {}.into(),
        LogoffRsp { result: ok() }.into(),
        EchoReq { nonce: 7 }.into(),
        EchoRsp { nonce: 7 }.into(),
        PreBindReq {
            user_id: UserId::new("U000123").expect("valid"),
            card_type: CardType::Debit,
            bank_code: bank(),
            card_no: card(),
            id_no: id_no(),
            name: name(),
            phone: phone(),
            mode: BindMode::Sign,
        }
        .into(),
        PreBindRsp {
            result: ok(),
            bind_ref: 9001,
            agreement_id: 0,
        }
        .into(),
        BindConfirmReq {
            bind_ref: BindRef(9001),
            sms_code: SmsCode::new("123456").expect("valid"),
        }
        .into(),
        BindConfirmRsp {
            result: ok(),
            agreement_id: 100_000_001,
            channel: chan(),
        }
        .into(),
        SignAndPayReq {
            user_id: UserId::new("U000123").expect("valid"),
            card_type: CardType::Debit,
            bank_code: bank(),
            card_no: card(),
            id_no: id_no(),
            name: name(),
            phone: phone(),
            order_id: order(),
            amount: Fen(150_000),
            currency: Currency,
            purpose: purpose(),
        }
        .into(),
        SignAndPayRsp {
            result: Outcome::new(Status::Pending, Reason::OK),
            bind_ref: 9002,
            agreement_id: 0,
        }
        .into(),
        AgreementQueryReq {
            agreement_id: AgreementId(100_000_001),
        }
        .into(),
        AgreementQueryRsp {
            result: ok(),
            agreement_id: 100_000_001,
            state: AgreementState::Active as u8,
            card_type: CardType::Debit as u8,
            bank_code: bank(),
            card_last4: Digits::new("0128").expect("valid"),
            primary_channel: chan(),
            backup_channel: ChannelId::new("CHB").expect("valid"),
        }
        .into(),
        AgreementCancelReq {
            agreement_id: AgreementId(100_000_001),
        }
        .into(),
        AgreementCancelRsp {
            result: ok(),
            agreement_id: 100_000_001,
        }
        .into(),
        DebitReq {
            order_id: order(),
            agreement_id: AgreementId(100_000_001),
            amount: Fen(150_000),
            currency: Currency,
            purpose: purpose(),
        }
        .into(),
        DebitRsp {
            result: Outcome::new(Status::Pending, Reason::OK),
            order_id: order().0,
            channel: chan(),
        }
        .into(),
        PayoutReq {
            order_id: OrderId::new("PAY20261123000001").expect("valid"),
            amount: Fen(5_000_000),
            currency: Currency,
            card_type: CardType::Debit,
            bank_code: bank(),
            card_no: card(),
            name: name(),
            purpose: Purpose::new("借款发放").expect("valid"),
        }
        .into(),
        PayoutRsp {
            result: ok(),
            order_id: Ascii::new("PAY20261123000001").expect("valid"),
            channel: chan(),
        }
        .into(),
        OrderQueryReq { order_id: order() }.into(),
        OrderQueryRsp {
            result: Outcome {
                status: Status::Failed,
                reason: Reason::CHANNEL_DECLINED,
                field: 0,
                channel_code: Ascii::new("1001").expect("valid"),
            },
            order_id: order().0,
            order_type: OrderType::Debit as u8,
            amount: 150_000,
            channel: chan(),
            attempts: 1,
            accepted_at_ms: TIMESTAMP_MS,
            finished_at_ms: TIMESTAMP_MS + 850,
        }
        .into(),
        Notify {
            notify_id: 77,
            kind: NotifyKind::OrderFinal,
            result: ok(),
            order_id: order().0,
            order_type: OrderType::Debit as u8,
            amount: 150_000,
            agreement_id: 100_000_001,
            channel: chan(),
            finished_at_ms: TIMESTAMP_MS + 850,
        }
        .into(),
        NotifyAck { notify_id: 77 }.into(),
        Reject {
            result: Outcome::new(Status::Rejected, Reason::UNKNOWN_MESSAGE_TYPE),
            rejected_type: 0x55,
            detail: Ascii::new("unknown message type 0x55").expect("valid"),
        }
        .into(),
    ]
}

/// The example key.
pub fn key() -> MacKey {
    MacKey::new(&SECRET)
}

/// A whole signed example frame for `msg`.
pub fn frame(msg: &Message) -> bytes::Bytes {
    let mut out = BytesMut::new();
    encode(&envelope(), msg, Some(&key()), &mut out);
    out.freeze()
}
