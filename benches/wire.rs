//! Hot-path costs of the lender protocol: decode, encode, MAC sign and verify, and the
//! Ed25519 operations a channel logon needs (for comparison: why frames use a session MAC).

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::crypto::{ed25519_verify, single_key, Identity, KeyStore};
use sluice::message::{self, examples, inbound, LenderCodec, Message};
use tokio_util::codec::Decoder;

fn debit() -> Message {
    examples::all()
        .into_iter()
        .find(|m| m.code() == 0x20)
        .expect("debit example")
}

fn bench(c: &mut Criterion) {
    let msg = debit();
    let frame = examples::frame(&msg);
    let keys = KeyStore::new(single_key(
        examples::MERCHANT,
        examples::KEY_ID,
        &examples::SECRET,
    ));
    let key = examples::key();
    let env = examples::envelope();

    let mut g = c.benchmark_group("lender_debit_frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_frame", |b| {
        let mut codec = LenderCodec::new();
        b.iter(|| {
            let mut buf = BytesMut::from(&frame[..]);
            black_box(codec.decode(&mut buf).unwrap())
        })
    });
    g.bench_function("decode_body", |b| {
        let raw = LenderCodec::decode_slice(&frame).unwrap().unwrap().unwrap();
        b.iter(|| black_box(message::decode(black_box(&raw)).unwrap()))
    });
    g.bench_function("mac_sign", |b| {
        let signed = &frame[..frame.len() - 32];
        b.iter(|| black_box(key.sign(black_box(signed))))
    });
    g.bench_function("mac_verify", |b| {
        let raw = LenderCodec::decode_slice(&frame).unwrap().unwrap().unwrap();
        b.iter(|| black_box(keys.verify_frame(black_box(&raw)).unwrap()))
    });
    g.bench_function("decode_verify_typed", |b| {
        // What a session does per inbound debit: frame split, key lookup, MAC verify,
        // typed decode with validation.
        let mut codec = LenderCodec::new();
        let mut buf = BytesMut::with_capacity(4096);
        b.iter(|| {
            buf.extend_from_slice(&frame);
            let item = codec.decode(&mut buf).unwrap().unwrap();
            black_box(inbound::accept(item, &keys).unwrap())
        })
    });
    g.bench_function("encode_signed", |b| {
        let mut out = BytesMut::with_capacity(4096);
        b.iter(|| {
            out.clear();
            message::encode(&env, black_box(&msg), Some(&key), &mut out);
            black_box(out.len())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ed25519");
    let id = Identity::from_seed(&[7u8; 32]);
    let pk = id.public_key();
    let sig = id.sign(&frame);
    g.bench_function("sign_debit_frame", |b| {
        b.iter(|| black_box(id.sign(black_box(&frame))))
    });
    g.bench_function("verify_debit_frame", |b| {
        b.iter(|| black_box(ed25519_verify(&pk, black_box(&frame), &sig)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
