//! Fuzz the lender frame decoder and the acceptance checks (MAC, typed decode) with
//! arbitrary byte streams. Seeds: `fuzz/seed.sh` copies the golden vectors in.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sluice::crypto::{single_key, KeyStore};
use sluice::message::{examples, inbound, LenderCodec};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let keys = KeyStore::new(single_key(
        examples::MERCHANT,
        examples::KEY_ID,
        &examples::SECRET,
    ));
    let mut buf = BytesMut::from(data);
    let mut codec = LenderCodec::new();
    // Several frames per input; stop at lost framing like the session does.
    while let Ok(Some(item)) = codec.decode(&mut buf) {
        let original = item.as_ref().ok().map(|raw| raw.bytes.clone());
        if let Ok(v) = inbound::accept(item, &keys) {
            // Whatever verifies must re-encode to exactly the same bytes.
            let mut out = BytesMut::new();
            sluice::message::encode(
                &sluice::message::Envelope {
                    request_id: v.header.request_id,
                    timestamp_ms: v.header.timestamp_ms,
                    key_id: v.header.key_id,
                    merchant: v.header.merchant,
                    flags: v.header.flags,
                },
                &v.msg,
                Some(&v.key),
                &mut out,
            );
            assert_eq!(Some(out.freeze()), original);
        }
    }
});
