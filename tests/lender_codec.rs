//! Codec properties and every malformed-input class of the lender protocol.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use sluice::crypto::{single_key, KeyStore};
use sluice::message::inbound::{accept, Refusal};
use sluice::message::{self, examples, LenderCodec, Message, Reason, Status, CATALOGUE};
use sluice::wire::codec::{FramingError, RejectKind};
use sluice::wire::header::{HEADER_LEN, MAC_LEN};
use tokio_util::codec::Decoder;

fn keys() -> KeyStore {
    KeyStore::new(single_key(
        examples::MERCHANT,
        examples::KEY_ID,
        &examples::SECRET,
    ))
}

/// Re-sign a (possibly tampered) frame with the example key.
fn resign(frame: &mut [u8]) {
    let n = frame.len();
    let mac = examples::key().sign(&frame[..n - MAC_LEN]);
    frame[n - MAC_LEN..].copy_from_slice(&mac);
}

fn example(code: u8) -> Vec<u8> {
    let msg = examples::all()
        .into_iter()
        .find(|m| m.code() == code)
        .unwrap();
    examples::frame(&msg).to_vec()
}

fn refuse(bytes: &[u8]) -> Refusal {
    let item = LenderCodec::decode_slice(bytes)
        .expect("framing sound")
        .expect("whole frame");
    accept(item, &keys()).expect_err("refused")
}

fn printable(max: usize, min: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(0x20u8..=0x7e, min..=max)
}

fn digits(min: usize, max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(b'0'..=b'9', min..=max)
}

fn luhn_card() -> impl Strategy<Value = Vec<u8>> {
    digits(11, 18).prop_map(|mut d| {
        for check in b'0'..=b'9' {
            d.push(check);
            if message::luhn_ok(&d) {
                return d;
            }
            d.pop();
        }
        unreachable!("one check digit always fits")
    })
}

fn utf8(max_bytes: usize, min_chars: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            Just('张'),
            Just('欧'),
            Just('阳'),
            Just('a'),
            Just('Z'),
            Just('·'),
            Just(' ')
        ],
        min_chars..=max_bytes,
    )
    .prop_map(move |cs| {
        let mut s = String::new();
        for c in cs {
            if s.len() + c.len_utf8() > max_bytes {
                break;
            }
            s.push(c);
        }
        s.into_bytes()
    })
}

fn pad(v: Vec<u8>, size: usize) -> Vec<u8> {
    let mut v = v;
    v.resize(size, 0);
    v
}

/// Valid bytes for one field, from the type named in the layout table: this is the spec's
/// description of each type, written independently of the Rust field types.
fn field_bytes(kind: &'static str, size: usize) -> BoxedStrategy<Vec<u8>> {
    let int = move |lo: u64, hi: u64| {
        (lo..=hi)
            .prop_map(move |v| v.to_be_bytes()[8 - size..].to_vec())
            .boxed()
    };
    match kind {
        "u8" | "u16 BE" | "u32 BE" | "u64 BE" => int(0, u64::MAX >> (64 - 8 * size as u32)),
        "u64 BE fen, > 0" | "u64 BE, non-zero" => int(1, u64::MAX),
        "u8 status" => int(0, 4),
        "u8 card type" => int(1, 2),
        "u8 notify kind" => int(1, 2),
        "u8 bind mode" => int(0, 1),
        "ASCII \"CNY\"" => Just(b"CNY".to_vec()).boxed(),
        "ASCII" => printable(size, 0).prop_map(move |v| pad(v, size)).boxed(),
        "ASCII, non-empty" => printable(size, 1).prop_map(move |v| pad(v, size)).boxed(),
        "ASCII digits" => digits(0, size).prop_map(move |v| pad(v, size)).boxed(),
        "ASCII digits, 4–8" => digits(4, 8).prop_map(move |v| pad(v, size)).boxed(),
        "ASCII digits, Luhn" => luhn_card().prop_map(move |v| pad(v, size)).boxed(),
        "ASCII digits, 11, leading 1" => digits(10, 10)
            .prop_map(move |mut v| {
                v.insert(0, b'1');
                pad(v, size)
            })
            .boxed(),
        "ASCII, 17 digits + digit or X" => (digits(17, 17), prop_oneof![Just(b'X'), b'0'..=b'9'])
            .prop_map(|(mut v, last)| {
                v.push(last);
                v
            })
            .boxed(),
        "UTF-8 text" => utf8(size, 0).prop_map(move |v| pad(v, size)).boxed(),
        "UTF-8 text, non-empty" => utf8(size, 1)
            .prop_filter("non-empty", |v| !v.is_empty())
            .prop_map(move |v| pad(v, size))
            .boxed(),
        k if k.starts_with("result block") => (
            0u8..=4,
            proptest::sample::select(Reason::ALL.to_vec()),
            any::<u16>(),
            printable(8, 0),
        )
            .prop_map(|(s, r, f, code)| {
                let mut b = vec![s, 0];
                b.extend_from_slice(&(r as u16).to_be_bytes());
                b.extend_from_slice(&f.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend(pad(code, 8));
                b
            })
            .boxed(),
        other => panic!("no generator for field type {other:?}: the spec table names a type the test does not know"),
    }
}

fn any_valid_body() -> impl Strategy<Value = (u8, Vec<u8>)> {
    proptest::sample::select(CATALOGUE.to_vec()).prop_flat_map(|(code, _, _, layout)| {
        let parts: Vec<_> = layout.iter().map(|f| field_bytes(f.kind, f.size)).collect();
        parts.prop_map(move |ps| (code, ps.concat()))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any body that follows the spec's type rules decodes, and re-encodes to the same bytes.
    #[test]
    fn every_message_type_round_trips((code, body) in any_valid_body(), request_id: u64, ts: u64) {
        let msg = Message::decode_body(code, &body).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(msg.code(), code);
        let env = message::Envelope { request_id, timestamp_ms: ts, ..examples::envelope() };
        let mut out = BytesMut::new();
        message::encode(&env, &msg, Some(&examples::key()), &mut out);
        prop_assert_eq!(&out[HEADER_LEN..out.len() - MAC_LEN], &body[..]);
        let v = accept(LenderCodec::decode_slice(&out).unwrap().unwrap(), &keys()).unwrap();
        prop_assert_eq!(v.msg, msg);
        prop_assert_eq!(v.header.request_id, request_id);
    }

    /// Arbitrary bytes never panic the decoder or the acceptance checks.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = LenderCodec::new();
        while let Ok(Some(item)) = codec.decode(&mut buf) {
            let _ = accept(item, &keys());
        }
    }

    /// A valid frame with one byte flipped never verifies.
    #[test]
    fn any_flipped_bit_is_refused(idx in 0usize..195, bit in 0u8..8) {
        let mut f = example(0x20);
        f[idx] ^= 1 << bit;
        match LenderCodec::decode_slice(&f) {
            Err(_) => {}
            Ok(None) => {}
            Ok(Some(item)) => prop_assert!(accept(item, &keys()).is_err()),
        }
    }
}

#[test]
fn frames_split_across_reads_and_batched_in_one_read() {
    let a = example(0x20);
    let b = example(0x03);
    let mut codec = LenderCodec::new();
    let mut buf = BytesMut::new();
    for (i, byte) in a.iter().enumerate() {
        assert!(codec.decode(&mut buf).unwrap().is_none(), "at {i}");
        buf.put_u8(*byte);
    }
    buf.extend_from_slice(&b);
    let first = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    let second = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    assert_eq!(first.header.msg_type, 0x20);
    assert_eq!(second.header.msg_type, 0x03);
    assert!(buf.is_empty());
}

#[test]
fn short_frame_waits_for_more() {
    let f = example(0x20);
    for n in 0..f.len() {
        assert!(
            LenderCodec::decode_slice(&f[..n]).unwrap().is_none(),
            "{n} bytes"
        );
    }
}

#[test]
fn truncated_frame_at_end_of_stream_is_lost_framing() {
    let f = example(0x20);
    let mut buf = BytesMut::from(&f[..100]);
    let mut codec = LenderCodec::new();
    assert!(codec.decode_eof(&mut buf).is_err());
}

#[test]
fn wrong_magic_loses_framing() {
    let mut f = example(0x20);
    f[0] = b'X';
    let e = LenderCodec::decode_slice(&f).unwrap_err();
    assert!(matches!(e, FramingError::BadMagic(_)));
    assert_eq!(
        message::inbound::framing_outcome(&e).reason,
        Reason::FRAMING_LOST
    );
}

#[test]
fn oversize_and_undersize_lengths_lose_framing() {
    for len in [0u16, 79, 1025, u16::MAX] {
        let mut f = example(0x20);
        f[4..6].copy_from_slice(&len.to_be_bytes());
        assert!(
            matches!(
                LenderCodec::decode_slice(&f),
                Err(FramingError::BadLength(_))
            ),
            "length {len}"
        );
    }
}

#[test]
fn wrong_length_for_type_is_rejected_and_skipped() {
    // A DEBIT_REQ header declaring the ECHO_REQ length: the 88 bytes are consumed and
    // the next frame decodes normally.
    let mut f = example(0x03);
    f[3] = 0x20;
    resign(&mut f);
    let mut buf = BytesMut::from(&f[..]);
    buf.extend_from_slice(&example(0x03));
    let mut codec = LenderCodec::new();
    let r = codec.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(r.kind, RejectKind::BadLength);
    assert_eq!(r.envelope.request_id, examples::REQUEST_ID);
    assert_eq!(refuse(&f).outcome.reason, Reason::BAD_LENGTH);
    assert!(codec.decode(&mut buf).unwrap().unwrap().is_ok());
}

#[test]
fn unknown_type_and_version_and_header_fields() {
    let mut f = example(0x03);
    f[3] = 0x55;
    assert_eq!(refuse(&f).outcome.reason, Reason::UNKNOWN_MESSAGE_TYPE);
    let mut f = example(0x03);
    f[2] = 2;
    assert_eq!(refuse(&f).outcome.reason, Reason::BAD_VERSION);
    let mut f = example(0x03);
    f[7] = 0x02; // unknown flag bit
    let r = refuse(&f);
    assert_eq!(
        (r.outcome.reason, r.outcome.field),
        (Reason::MALFORMED_FIELD, 105)
    );
    let mut f = example(0x03);
    f[30] = 1; // reserved
    assert_eq!(refuse(&f).outcome.field, 109);
    let mut f = example(0x03);
    f[32..48].fill(0); // empty merchant number
    assert_eq!(refuse(&f).outcome.field, 110);
}

#[test]
fn bad_mac_and_unknown_key() {
    let mut f = example(0x20);
    let n = f.len();
    f[n - 1] ^= 1;
    let r = refuse(&f);
    assert_eq!(
        (r.outcome.status, r.outcome.reason),
        (Status::Rejected, Reason::BAD_MAC)
    );
    assert!(!r.authenticated);
    let mut f = example(0x20);
    f[24..26].copy_from_slice(&9u16.to_be_bytes());
    assert_eq!(refuse(&f).outcome.reason, Reason::UNKNOWN_KEY);
    let mut f = example(0x20);
    f[32] = b'7'; // another merchant: no key
    assert_eq!(refuse(&f).outcome.reason, Reason::UNKNOWN_KEY);
}

/// Tamper with a body field at `off`, re-sign, and expect MALFORMED_FIELD naming `field`.
fn expect_malformed(code: u8, off: usize, bytes: &[u8], field: u16) {
    let mut f = example(code);
    f[off..off + bytes.len()].copy_from_slice(bytes);
    resign(&mut f);
    let r = refuse(&f);
    assert!(r.authenticated);
    assert_eq!(
        (r.outcome.status, r.outcome.reason, r.outcome.field),
        (Status::Rejected, Reason::MALFORMED_FIELD, field),
        "type {code:#x} offset {off}"
    );
}

#[test]
fn malformed_body_fields_name_the_field() {
    // PREBIND_REQ: user_id 48..80, card_type 80, bank_code 81..89, card_no 89..108,
    // id_no 108..126, name 126..190, phone 190..201.
    expect_malformed(0x10, 80, &[9], 2); // card type out of range
    expect_malformed(0x10, 89, b"62220212345678901A", 4); // non-digit card
    expect_malformed(0x10, 89, b"6222021234567890127", 4); // Luhn
    expect_malformed(0x10, 108, b"1101051949123\0\0\0\0\0", 5); // ID too short
    expect_malformed(0x10, 108, b"A1010519", 5); // ID not digits
    expect_malformed(0x10, 126, &[0xff, 0xfe], 6); // bad UTF-8 name
    expect_malformed(0x10, 126, &[0], 6); // empty name
    expect_malformed(0x10, 190, b"2", 7); // phone not starting with 1

    // DEBIT_REQ: order_id 48..80, agreement_id 80..88, amount 88..96, currency 96..99.
    expect_malformed(0x20, 48, &[0], 1); // empty order id
    expect_malformed(0x20, 80, &[0; 8], 2); // agreement id 0
    expect_malformed(0x20, 88, &[0; 8], 3); // amount 0
    expect_malformed(0x20, 96, b"USD", 4); // currency
    expect_malformed(0x20, 99, b"a\0b", 5); // interior zero in purpose

    // BIND_CONFIRM_REQ: sms code 56..64 with 3 digits only.
    expect_malformed(0x11, 56, b"123\0\0\0\0\0", 2);
}

#[test]
fn example_frames_carry_the_documented_lengths() {
    for msg in examples::all() {
        let f = examples::frame(&msg);
        assert_eq!(Some(f.len()), message::frame_len(msg.code()));
        assert_eq!(u16::from_be_bytes([f[4], f[5]]) as usize, f.len());
    }
}
