//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*`), as plain functions.
//!
//! cargo-fuzz needs nightly; keeping the bodies here, without any `cfg`, lets the stable
//! test `tests/fuzz_replay.rs` replay the seed corpus and a few thousand random inputs
//! through exactly the code the fuzzer runs. Each entry point takes arbitrary bytes, must
//! never panic on them, and asserts a property of what it accepts:
//! - [`lender_decoder`], [`channel_decoder`]: every frame whose body decodes re-encodes to
//!   the same signed bytes (decoding is canonical and lossless); a frame whose MAC
//!   verifies re-encodes to exactly the same frame;
//! - [`import_parser`]: every non-blank line is either a row or a bad line, with its own
//!   line number, however the file is split into per-thread chunks; no reason carries a card or ID number;
//! - [`config_loader`]: a text that validates yields every derived table without panic,
//!   and stays valid. [`crate::config::Config::parse`] reads no file (secret files are read
//!   only when the switch starts), so the fuzzer never touches the filesystem.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::channel::message::{self as chan, ChannelCodec, KEY_ID_LOGON, KEY_ID_SESSION};
use crate::crypto::{single_key, KeyStore};
use crate::engine::agreement::PiiHasher;
use crate::message::{self, examples, inbound, LenderCodec};
use crate::wire::header::MAC_LEN;

/// Decode a byte stream as lender frames, like a session does, and check round trips.
pub fn lender_decoder(data: &[u8]) {
    let keys = KeyStore::new(single_key(
        examples::MERCHANT,
        examples::KEY_ID,
        &examples::SECRET,
    ));
    let mut buf = BytesMut::from(data);
    let mut codec = LenderCodec::new();
    // Several frames per input; stop at lost framing like the session does.
    while let Ok(Some(item)) = codec.decode(&mut buf) {
        let raw = match &item {
            Ok(raw) => raw.clone(),
            Err(_) => {
                // A rejected frame must still be refused cleanly by the acceptance step.
                assert!(inbound::accept(item, &keys).is_err());
                continue;
            }
        };
        let env = message::Envelope {
            request_id: raw.header.request_id,
            timestamp_ms: raw.header.timestamp_ms,
            key_id: raw.header.key_id,
            merchant: raw.header.merchant,
            flags: raw.header.flags,
        };
        if let Ok(msg) = message::decode(&raw) {
            let mut out = BytesMut::new();
            message::encode(&env, &msg, None, &mut out);
            assert_eq!(
                &out[..out.len() - MAC_LEN],
                raw.signed(),
                "lender body decodes losslessly: {msg:?}"
            );
        }
        if let Ok(v) = inbound::accept(item, &keys) {
            // Whatever verifies must re-encode to exactly the same bytes.
            let mut out = BytesMut::new();
            message::encode(&env, &v.msg, Some(&v.key), &mut out);
            assert_eq!(out.freeze(), raw.bytes);
        }
    }
}

/// Decode a byte stream as channel frames (either direction) and check round trips.
pub fn channel_decoder(data: &[u8]) {
    use crate::channel::examples::{KEY_CHANNEL_TO_SWITCH, KEY_SWITCH_TO_CHANNEL};
    let keys = [
        chan::SessionKey::new(&KEY_SWITCH_TO_CHANNEL),
        chan::SessionKey::new(&KEY_CHANNEL_TO_SWITCH),
    ];
    let mut buf = BytesMut::from(data);
    let mut codec = ChannelCodec::new();
    let mut seq = 0u64;
    while let Ok(Some(item)) = codec.decode(&mut buf) {
        let Ok(raw) = item else { continue };
        let verified = keys.iter().find(|k| k.verify_frame(seq, &raw).is_ok());
        let Ok(msg) = chan::decode(&raw) else {
            seq += 1;
            continue;
        };
        let env = chan::Envelope {
            request_id: raw.header.request_id,
            timestamp_ms: raw.header.timestamp_ms,
            institution: raw.header.merchant,
            flags: raw.header.flags,
        };
        let mut out = BytesMut::new();
        match raw.header.key_id {
            KEY_ID_SESSION => chan::encode(&env, &msg, &keys[0], seq, &mut out),
            KEY_ID_LOGON => chan::encode_logon(&env, &msg, &mut out),
            // Another key id: the frame is refused by MAC checks; nothing to re-encode.
            _ => {
                seq += 1;
                continue;
            }
        }
        assert_eq!(
            &out[..out.len() - MAC_LEN],
            raw.signed(),
            "channel body decodes losslessly: {msg:?}"
        );
        if let Some(k) = verified {
            out.clear();
            chan::encode(&env, &msg, k, seq, &mut out);
            assert_eq!(
                &out[..],
                &raw.bytes[..],
                "a verified frame re-encodes exactly"
            );
        }
        seq += 1;
    }
}

/// Parse arbitrary text as an agreement import file, on one and on three threads.
pub fn import_parser(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let hasher = PiiHasher::new(&[7u8; 32]);
    let known = |c: &crate::message::ChannelId| matches!(c.as_str(), "CHA" | "CHB");
    // `import::parse` runs these chunks on threads; here they run in turn (spawning
    // threads per input would slow the fuzzer a hundredfold).
    let parse = |threads: usize| {
        let (mut rows, mut bad) = (Vec::new(), Vec::new());
        for (first, chunk) in crate::import::split_chunks(&text, threads) {
            let (r, b) = crate::import::parse_chunk(first, chunk, &hasher, &known, None);
            rows.extend(r);
            bad.extend(b);
        }
        (rows, bad)
    };
    let (rows1, bad1) = parse(1);
    let (rows3, bad3) = parse(3);
    // Chunking on threads must not change any outcome or line number.
    let lines = |rows: &[crate::import::Row]| rows.iter().map(|r| r.line).collect::<Vec<_>>();
    assert_eq!(lines(&rows1), lines(&rows3));
    assert_eq!(bad1, bad3);
    // Every non-blank line (but a header on line 1) is accounted for exactly once.
    let all: Vec<&str> = text.lines().collect();
    let counted: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(i, l)| !(l.trim().is_empty() || (*i == 0 && l.starts_with("merchant"))))
        .map(|(i, _)| i + 1)
        .collect();
    let mut seen: Vec<usize> = lines(&rows1);
    seen.extend(bad1.iter().map(|b| b.line));
    seen.sort_unstable();
    assert_eq!(seen, counted, "each line is a row or a bad line, once");
    for b in &bad1 {
        // No reason carries a card or ID number (privacy): neither the line's card and ID
        // fields, nor any run of 13 or more digits.
        let line = all[b.line - 1];
        for f in line.split(',').skip(2).take(2).map(str::trim) {
            assert!(
                !looks_like_pii(f) || !b.reason.contains(f),
                "line {}: reason echoes a card or ID field",
                b.line
            );
        }
        let longest_digits = b
            .reason
            .split(|c: char| !c.is_ascii_digit())
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(
            longest_digits < 13,
            "line {}: reason has a long number",
            b.line
        );
    }
    for r in &rows1 {
        assert!(r.line >= 1 && r.line <= all.len());
    }
}

/// A field that could be a card or ID number: six or more digits (an ID may end in X).
fn looks_like_pii(f: &str) -> bool {
    f.len() >= 6
        && f.bytes().any(|b| b.is_ascii_digit())
        && f.bytes()
            .all(|b| b.is_ascii_digit() || b == b'X' || b == b'x')
}

/// Parse and validate arbitrary text as a configuration, then build every derived table.
pub fn config_loader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = crate::config::Config::parse(text, "fuzz.toml") else {
        return;
    };
    assert!(cfg.validate().is_ok(), "a parsed config stays valid");
    let _ = cfg.journal_policy();
    let _ = cfg.engine_config("S".into());
    let _ = cfg.routing_policy();
    let _ = cfg.health_config();
    let _ = cfg.channel_deadline();
    let _ = cfg.route_table();
}
