//! Channel link: golden vectors (`protocol/vectors/channel/`), the deterministic logon
//! handshake vector, and frame-level checks. Regenerate vectors with
//! `SLUICE_REGEN_VECTORS=1 cargo test --test channel_link`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use sluice::channel::examples;
use sluice::channel::handshake::{
    self, derive_key_bytes, transcript_hash, ClientHandshake, LogonParams, Responded,
    ResponderParams,
};
use sluice::channel::message::{self, ChannelCodec, Message, SessionKey};
use sluice::crypto::Identity;
use sluice::wire::codec::RawFrame;
use sluice::wire::field::Ascii;
use sluice::wire::header::MerchantNo;

fn vector_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("protocol/vectors/channel")
}

fn regen() -> bool {
    std::env::var_os("SLUICE_REGEN_VECTORS").is_some()
}

/// Write the file when regenerating, else compare with it.
fn golden(file: &str, text: &str) {
    let path = vector_dir().join(file);
    if regen() {
        std::fs::create_dir_all(vector_dir()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with SLUICE_REGEN_VECTORS=1)",
            path.display()
        )
    });
    assert_eq!(on_disk, text, "{} differs from the code", path.display());
}

fn parse_kv(text: &str) -> (HashMap<String, String>, Vec<String>) {
    let mut kv = HashMap::new();
    let mut fields = Vec::new();
    for l in text.lines() {
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        if let Some(f) = l.strip_prefix("field ") {
            fields.push(f.to_string());
        } else if let Some((k, v)) = l.split_once(": ") {
            kv.insert(k.to_string(), v.to_string());
        }
    }
    (kv, fields)
}

fn raw(b: &[u8]) -> RawFrame {
    ChannelCodec::decode_slice(b).unwrap().unwrap().unwrap()
}

#[test]
fn message_vectors_match_and_check_independently() {
    let all = examples::all();
    assert_eq!(
        all.len() + 2,
        message::CATALOGUE.len(),
        "one example per type"
    );
    for msg in &all {
        let file = format!("{}.txt", msg.wire_name().to_ascii_lowercase());
        golden(&file, &examples::vector_text(msg));
        // Independent check from the file alone: MAC, decoding, field offsets.
        let text = std::fs::read_to_string(vector_dir().join(&file)).unwrap();
        let (kv, fields) = parse_kv(&text);
        let key: [u8; 32] = hex::decode(&kv["key"]).unwrap().try_into().unwrap();
        let seq: u64 = kv["seq"].parse().unwrap();
        let bytes = hex::decode(&kv["frame"]).unwrap();
        assert_eq!(bytes.len(), kv["length"].parse::<usize>().unwrap());
        let f = raw(&bytes);
        let k = SessionKey::new(&key);
        k.verify_frame(seq, &f).expect("vector MAC verifies");
        assert!(k.verify_frame(seq + 1, &f).is_err());
        assert_eq!(&message::decode(&f).unwrap(), msg);
        for line in fields {
            let part = |p: &str| {
                line.split(' ')
                    .find_map(|w| w.strip_prefix(p))
                    .unwrap()
                    .to_string()
            };
            let off: usize = part("off=").parse().unwrap();
            let len: usize = part("len=").parse().unwrap();
            assert_eq!(
                hex::encode(&bytes[off..off + len]),
                part("hex="),
                "{file}: {line}"
            );
        }
    }
}

#[allow(deprecated)]
fn fixed_rng<'a>(parts: &'a [&'a [u8]]) -> ring::test::rand::FixedSliceSequenceRandom<'a> {
    ring::test::rand::FixedSliceSequenceRandom {
        bytes: parts,
        current: std::cell::UnsafeCell::new(0),
    }
}

fn x25519_shared(my_private: &[u8; 32], peer_public: &[u8]) -> Vec<u8> {
    use ring::agreement::*;
    let parts: [&[u8]; 1] = [my_private];
    let rng = fixed_rng(&parts);
    let k = EphemeralPrivateKey::generate(&X25519, &rng).unwrap();
    agree_ephemeral(k, &UnparsedPublicKey::new(&X25519, peer_public), |s| {
        s.to_vec()
    })
    .unwrap()
}

#[test]
fn logon_handshake_vector() {
    let switch_seed = [0x11u8; 32];
    let channel_seed = [0x22u8; 32];
    let sw = Identity::from_seed(&switch_seed);
    let ch = Identity::from_seed(&channel_seed);
    let sw_eph = [0x33u8; 32];
    let sw_nonce = [0x44u8; 32];
    let ch_eph = [0x55u8; 32];
    let ch_nonce = [0x66u8; 32];
    let lp = LogonParams {
        institution: MerchantNo::new(examples::INSTITUTION).unwrap(),
        request_id: 1,
        timestamp_ms: examples::TIMESTAMP_MS,
        heartbeat_s: 10,
        client_name: Ascii::new("sluice-a").unwrap(),
    };
    let rp = ResponderParams {
        now_ms: examples::TIMESTAMP_MS + 7,
        replay_window_ms: 120_000,
        heartbeat_s: 15,
        inflight_max: 4096,
    };
    let sw_parts: [&[u8]; 2] = [&sw_eph, &sw_nonce];
    let (hs, req) = ClientHandshake::start(&sw, &lp, &fixed_rng(&sw_parts)).unwrap();
    let ch_parts: [&[u8]; 2] = [&ch_eph, &ch_nonce];
    let Responded::Accepted {
        frame: rsp, keys, ..
    } = handshake::respond(
        &ch,
        |_| Some(sw.public_key()),
        &raw(&req),
        rp,
        &fixed_rng(&ch_parts),
    )
    else {
        panic!("refused")
    };
    let est = hs.finish(&raw(&rsp), &ch.public_key()).unwrap();
    let Message::LogonReq(m) = message::decode(&raw(&req)).unwrap() else {
        panic!()
    };
    let Message::LogonRsp(r) = message::decode(&raw(&rsp)).unwrap() else {
        panic!()
    };
    let shared = x25519_shared(&sw_eph, &r.ephemeral_key.0);
    assert_eq!(shared, x25519_shared(&ch_eph, &m.ephemeral_key.0));
    let th = transcript_hash(&req, &rsp);
    let (k_sc, k_cs) = derive_key_bytes(&shared, &th);

    // The derived bytes are the keys both sides use.
    let env = examples::envelope(2);
    let ping: Message = message::EchoReq { nonce: 1 }.into();
    let f = message::encode_to_bytes(&env, &ping, &est.keys.send, 0);
    SessionKey::new(&k_sc).verify_frame(0, &raw(&f)).unwrap();
    keys.recv.verify_frame(0, &raw(&f)).unwrap();
    let g = message::encode_to_bytes(&env, &ping, &keys.send, 0);
    SessionKey::new(&k_cs).verify_frame(0, &raw(&g)).unwrap();

    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "# Channel logon (protocol/CHANNEL.md §4), fully deterministic."
    );
    let _ = writeln!(
        w,
        "# Ed25519 identities from 32-byte seeds (RFC 8032 private keys);"
    );
    let _ = writeln!(
        w,
        "# X25519 ephemeral private keys as given (RFC 7748 clamping applies)."
    );
    let _ = writeln!(
        w,
        "# signature of each logon frame: Ed25519 over frame[0..len-96]."
    );
    let _ = writeln!(
        w,
        "# th = SHA-256(logon_req || logon_rsp); PRK = HKDF-Extract(salt=th, ikm=shared)"
    );
    let _ = writeln!(
        w,
        "# k_sc = HKDF-Expand(PRK, \"sluice channel v1 switch->channel mac\", 32)"
    );
    let _ = writeln!(
        w,
        "# k_cs = HKDF-Expand(PRK, \"sluice channel v1 channel->switch mac\", 32)"
    );
    let _ = writeln!(w, "switch_seed: {}", hex::encode(switch_seed));
    let _ = writeln!(w, "switch_public_key: {}", hex::encode(sw.public_key()));
    let _ = writeln!(w, "channel_seed: {}", hex::encode(channel_seed));
    let _ = writeln!(w, "channel_public_key: {}", hex::encode(ch.public_key()));
    let _ = writeln!(w, "switch_ephemeral_private: {}", hex::encode(sw_eph));
    let _ = writeln!(
        w,
        "switch_ephemeral_public: {}",
        hex::encode(m.ephemeral_key.0)
    );
    let _ = writeln!(w, "switch_nonce: {}", hex::encode(sw_nonce));
    let _ = writeln!(w, "channel_ephemeral_private: {}", hex::encode(ch_eph));
    let _ = writeln!(
        w,
        "channel_ephemeral_public: {}",
        hex::encode(r.ephemeral_key.0)
    );
    let _ = writeln!(w, "channel_nonce: {}", hex::encode(ch_nonce));
    let _ = writeln!(w, "logon_req: {}", hex::encode(&req));
    let _ = writeln!(w, "logon_rsp: {}", hex::encode(&rsp));
    let _ = writeln!(w, "shared_secret: {}", hex::encode(&shared));
    let _ = writeln!(w, "transcript_hash: {}", hex::encode(th));
    let _ = writeln!(w, "k_sc: {}", hex::encode(k_sc));
    let _ = writeln!(w, "k_cs: {}", hex::encode(k_cs));
    let _ = writeln!(w, "# LOGON_REQ fields");
    s.push_str(&examples::describe_fields(0x01, &req));
    let _ = writeln!(s, "# LOGON_RSP fields");
    s.push_str(&examples::describe_fields(0x81, &rsp));
    golden("logon_handshake.txt", &s);

    // Independent check of the signatures from the file's bytes.
    let (kv, _) =
        parse_kv(&std::fs::read_to_string(vector_dir().join("logon_handshake.txt")).unwrap());
    for (frame, pk) in [
        ("logon_req", "switch_public_key"),
        ("logon_rsp", "channel_public_key"),
    ] {
        let b = hex::decode(&kv[frame]).unwrap();
        let n = b.len();
        sluice::crypto::ed25519_verify(
            &hex::decode(&kv[pk]).unwrap(),
            &b[..n - 96],
            &b[n - 96..n - 32],
        )
        .unwrap_or_else(|_| panic!("{frame} signature"));
        assert!(b[n - 32..].iter().all(|&x| x == 0), "logon trailer is zero");
    }
}

#[test]
fn corrupted_frames_fail_the_mac_or_the_framing() {
    let msg = examples::all()
        .into_iter()
        .find(|m| m.code() == 0x20)
        .unwrap();
    let f = examples::frame(&msg);
    let key = SessionKey::new(&examples::KEY_SWITCH_TO_CHANNEL);
    for i in [0usize, 10, 60, f.len() - 1] {
        let mut b = f.clone();
        b[i] ^= 0x01;
        match ChannelCodec::decode_slice(&b) {
            Ok(Some(Ok(raw))) => assert!(key.verify_frame(0, &raw).is_err(), "byte {i}"),
            Ok(Some(Err(_))) | Err(_) => {} // rejected by framing: also fine
            Ok(None) => panic!("byte {i}: incomplete"),
        }
    }
    // A lender frame (magic SL) is lost framing on the channel link.
    let mut b = f.clone();
    b[1] = b'L';
    assert!(ChannelCodec::decode_slice(&b).is_err());
}

#[test]
fn channel_md_tables_are_generated_from_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("protocol/CHANNEL.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let begin = "<!-- BEGIN GENERATED (tests/channel_link.rs, SLUICE_REGEN_VECTORS=1) -->\n";
    let end = "<!-- END GENERATED -->";
    let b = text.find(begin).expect("begin marker") + begin.len();
    let e = text.find(end).expect("end marker");
    let want = examples::spec_tables();
    if regen() {
        let new = format!("{}{}{}", &text[..b], want, &text[e..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    assert_eq!(
        &text[b..e],
        want,
        "CHANNEL.md §9 is stale: SLUICE_REGEN_VECTORS=1"
    );
    let req_len = message::CATALOGUE.iter().find(|c| c.0 == 0x01).unwrap().2;
    assert!(text.contains(&format!("(all {req_len} bytes)")));
}
