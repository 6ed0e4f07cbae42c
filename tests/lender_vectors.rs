//! Golden vectors for every lender message type (`protocol/vectors/lender/*.json`) and the
//! generated layout tables in `protocol/SPEC.md`.
//!
//! The vectors are what a second implementation checks itself against: the key, every
//! header and body field with offset, size and value, the whole frame in hex, and the MAC.

#[path = "common/golden.rs"]
mod golden;

use serde_json::{json, Value};
use sluice::message::{self, examples, FieldSpec, LenderCodec, Message, CATALOGUE};
use sluice::wire::header::{HEADER_LEN, MAC_LEN};

fn render(spec: &FieldSpec, b: &[u8]) -> Value {
    let int = |b: &[u8]| b.iter().fold(0u64, |a, &x| (a << 8) | x as u64);
    if spec.kind.starts_with("result block") {
        return json!({
            "status": b[0],
            "reason": int(&b[2..4]),
            "field": int(&b[4..6]),
            "channel_code": text(&b[8..16]),
        });
    }
    if spec.kind.starts_with('u') && matches!(spec.size, 1 | 2 | 4 | 8) {
        return json!(int(b));
    }
    json!(text(b))
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8(b[..end].to_vec()).expect("utf-8")
}

fn vector(msg: &Message) -> (String, Value) {
    let frame = examples::frame(msg);
    let (code, name, len, layout) = CATALOGUE
        .iter()
        .find(|(c, ..)| *c == msg.code())
        .copied()
        .unwrap();
    assert_eq!(frame.len(), len);
    let mut off = HEADER_LEN;
    let body: Vec<Value> = layout
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let v = json!({
                "field": i + 1,
                "name": f.name,
                "offset": off,
                "size": f.size,
                "value": render(f, &frame[off..off + f.size]),
            });
            off += f.size;
            v
        })
        .collect();
    let v = json!({
        "message": name,
        "type": code,
        "length": len,
        "key": {
            "merchant_no": examples::MERCHANT,
            "key_id": examples::KEY_ID,
            "secret_hex": hex::encode(examples::SECRET),
        },
        "header": {
            "magic": "SL",
            "version": 1,
            "msg_type": code,
            "length": len,
            "flags": 0,
            "request_id": examples::REQUEST_ID,
            "timestamp_ms": examples::TIMESTAMP_MS,
            "key_id": examples::KEY_ID,
            "merchant_no": examples::MERCHANT,
        },
        "body": body,
        "mac_covers": format!("bytes 0..{} (header and body)", len - MAC_LEN),
        "mac_hex": hex::encode(&frame[len - MAC_LEN..]),
        "frame_hex": hex::encode(&frame),
    });
    (name.to_ascii_lowercase(), v)
}

#[test]
fn every_message_type_has_a_golden_vector() {
    let all = examples::all();
    assert_eq!(all.len(), CATALOGUE.len(), "an example per message type");
    for msg in &all {
        let (name, v) = vector(msg);
        let text = serde_json::to_string_pretty(&v).unwrap() + "\n";
        golden::check(&format!("protocol/vectors/lender/{name}.json"), &text);
    }
}

#[test]
fn golden_vectors_decode_and_verify() {
    let keys = sluice::crypto::KeyStore::new(sluice::crypto::single_key(
        examples::MERCHANT,
        examples::KEY_ID,
        &examples::SECRET,
    ));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors/lender");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        let bytes = hex::decode(v["frame_hex"].as_str().unwrap()).unwrap();
        let item = LenderCodec::decode_slice(&bytes).unwrap().unwrap();
        let verified = message::inbound::accept(item, &keys).expect("vector verifies");
        assert_eq!(verified.msg.wire_name(), v["message"].as_str().unwrap());
        n += 1;
    }
    assert_eq!(n, CATALOGUE.len());
}

fn layout_tables() -> String {
    let mut s = String::new();
    s.push_str("| type | name | frame length (bytes) | body length |\n|---|---|---|---|\n");
    for (code, name, len, _) in CATALOGUE {
        s.push_str(&format!(
            "| 0x{code:02X} | {name} | {len} | {} |\n",
            len - HEADER_LEN - MAC_LEN
        ));
    }
    for (code, name, len, layout) in CATALOGUE {
        s.push_str(&format!(
            "\n#### {name} (0x{code:02X}), {len} bytes\n\n| # | offset | size | field | type |\n|---|---|---|---|---|\n"
        ));
        let mut off = HEADER_LEN;
        for (i, f) in layout.iter().enumerate() {
            s.push_str(&format!(
                "| {} | {off} | {} | `{}` | {} |\n",
                i + 1,
                f.size,
                f.name,
                f.kind
            ));
            off += f.size;
        }
        s.push_str(&format!(
            "| – | {off} | {MAC_LEN} | `mac` | HMAC-SHA256 over bytes 0..{off} |\n"
        ));
    }
    s
}

fn reason_table() -> String {
    let mut s = String::from("| code | name | meaning |\n|---|---|---|\n");
    for r in message::Reason::ALL {
        s.push_str(&format!(
            "| {} | `{}` | {} |\n",
            *r as u16,
            r.name(),
            r.describe()
        ));
    }
    s
}

#[test]
fn spec_tables_match_the_code() {
    let path = "protocol/SPEC.md";
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let doc = std::fs::read_to_string(&full).unwrap();
    let doc2 = golden::splice(&doc, "layouts", &layout_tables());
    let doc2 = golden::splice(&doc2, "reasons", &reason_table());
    golden::check(path, &doc2);
}
