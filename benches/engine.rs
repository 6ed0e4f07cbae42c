//! Engine hot path, each beside its naive alternative:
//! - agreement lookup by id in the engine's `AgreementStore` (chunked arena) versus a
//!   `Mutex<HashMap>` holding the same agreements, single-threaded and with two threads
//!   reading at once;
//! - the routing decision (`route_debit`, `route_card`) over a two-channel table;
//! - `Engine::debit`: everything a DEBIT_REQ costs before I/O (duplicate check, agreement
//!   lookup, routing, order creation, the journal record and the dispatch action);
//! - an order lookup with 1M settled orders held: a new id (what every new order's
//!   duplicate check adds), and a settled order's record with its chunk on disk (one
//!   `pread`) or in memory.

use std::collections::HashMap;
use std::hint;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice::channel::message::AgreementNo;
use sluice::engine::agreement::{
    Agreement, AgreementStore, ChannelAgreement, ChannelAgreementState, PiiHasher,
    CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::route::{route_card, route_debit, Product};
use sluice::engine::{ChannelConfig, ChannelTable, Engine, EngineConfig};
use sluice::message::{self as lm, AgreementId, BankCode, CardType, ChannelId};
use sluice::server::replay::ReplayGuard;
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

#[path = "../tests/common/succeed.rs"]
mod succeed;

const AGREEMENTS: u64 = 1_000_000;

fn merchant() -> MerchantNo {
    MerchantNo::new("898100000000001").unwrap()
}

fn agreement(h: &PiiHasher, i: u64) -> Agreement {
    let mut channels = [None; CHANNELS_PER_AGREEMENT_MAX];
    for (slot, ch) in channels.iter_mut().zip(["CHA", "CHB"]) {
        *slot = Some(ChannelAgreement {
            channel: ChannelId::new(ch).unwrap(),
            agreement_no: AgreementNo::new(&format!("P{ch}{i:012}")).unwrap(),
            state: ChannelAgreementState::Active,
        });
    }
    Agreement {
        id: AgreementId(i + 1),
        merchant: merchant(),
        card_hash: h.card(&format!("6222{i:015}")),
        id_hash: h.id(&format!("110105{i:011}X")),
        card_last4: Digits::new(&format!("{:04}", i % 10_000)).unwrap(),
        bank: BankCode::new("ICBC").unwrap(),
        card_type: CardType::Debit,
        cancelled: false,
        channels,
    }
}

fn table() -> ChannelTable {
    ChannelTable {
        channels: vec![ChannelConfig::open("CHA"), ChannelConfig::open("CHB")],
    }
}

/// A well-mixed index, so lookups do not walk memory in order.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

fn lookup(c: &mut Criterion) {
    let h = PiiHasher::new(&[7u8; 32]);
    let store = Arc::new(AgreementStore::new());
    let mut naive: HashMap<AgreementId, Agreement> = HashMap::new();
    for i in 0..AGREEMENTS {
        let a = agreement(&h, i);
        naive.insert(a.id, a.clone());
        store.upsert(a);
    }
    let naive = Arc::new(Mutex::new(naive));
    let mut g = c.benchmark_group("agreement_lookup_1M");
    g.throughput(Throughput::Elements(1));
    // The copies go through `std::hint::black_box`, and the closures return nothing:
    // `criterion::black_box` (without its nightly-only `real_blackbox` feature) is a
    // `read_volatile` of the whole value, which for a ~200-byte `Option<Agreement>` is
    // some 200 one-byte loads and stores, and `Bencher::iter` applies it again to what
    // the closure returns: ~1,000 instructions a lookup that measured the harness, and
    // kept the CPU from overlapping one lookup's cache miss with the next.
    let mut i = 0u64;
    // The lookup as the switch does it: find the record and take a consistent copy of
    // its 128 bytes (`AgreementStore::record`); fields are decoded when read.
    g.bench_function("store_record", |b| {
        b.iter(|| {
            i += 1;
            hint::black_box(store.record(AgreementId(mix(i) % AGREEMENTS + 1)));
        })
    });
    // The lookup plus a decode of every field into an owned `Agreement` (what routing a
    // debit reads once; `get` is `record` then `decode`).
    g.bench_function("dashmap_store_get", |b| {
        b.iter(|| {
            i += 1;
            hint::black_box(store.get(AgreementId(mix(i) % AGREEMENTS + 1)));
        })
    });
    g.bench_function("mutex_hashmap_get", |b| {
        b.iter(|| {
            i += 1;
            let m = naive.lock().unwrap();
            hint::black_box(m.get(&AgreementId(mix(i) % AGREEMENTS + 1)).cloned());
        })
    });
    // Two threads reading at once (the switch's two workers): time per lookup.
    for (name, dash) in [
        ("dashmap_store_get_2_threads", true),
        ("mutex_hashmap_get_2_threads", false),
    ] {
        let (store, naive) = (store.clone(), naive.clone());
        g.bench_function(name, move |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                std::thread::scope(|s| {
                    for th in 0..2u64 {
                        let (store, naive) = (&store, &naive);
                        s.spawn(move || {
                            for k in 0..iters / 2 {
                                let id = AgreementId(mix(k * 2 + th) % AGREEMENTS + 1);
                                if dash {
                                    hint::black_box(store.get(id));
                                } else {
                                    hint::black_box(naive.lock().unwrap().get(&id).cloned());
                                }
                            }
                        });
                    }
                });
                t.elapsed()
            })
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    let h = PiiHasher::new(&[7u8; 32]);
    let a = agreement(&h, 42);
    let t = table();
    let bank = BankCode::new("ICBC").unwrap();
    let mut g = c.benchmark_group("routing_decision");
    g.throughput(Throughput::Elements(1));
    g.bench_function("route_debit_2_channels", |b| {
        b.iter(|| black_box(route_debit(black_box(&t), black_box(&a), |_| true)))
    });
    g.bench_function("route_card_payout_2_channels", |b| {
        b.iter(|| {
            black_box(route_card(
                black_box(&t),
                Product::Payout,
                black_box(&bank),
                CardType::Debit,
                |_| true,
            ))
        })
    });
    g.finish();
}

fn debit(c: &mut Criterion) {
    let fresh = || {
        let e = Engine::new(EngineConfig::default(), table(), &[7u8; 32], 10_000_000_000);
        for i in 0..100_000 {
            e.agreements().upsert(agreement(e.hasher(), i));
        }
        e
    };
    let mut engine = fresh();
    let mut orders = 0u64;
    let purpose = lm::Purpose::new("repayment").unwrap();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("debit_actions", "new_order"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                // Keep the order map from growing without bound across samples.
                if orders > 1_000_000 {
                    engine = fresh();
                    orders = 0;
                }
                let n = left.min(100_000);
                let reqs: Vec<lm::DebitReq> = (0..n)
                    .map(|k| lm::DebitReq {
                        order_id: lm::OrderId::new(&format!("B{:x}", orders + k)).unwrap(),
                        agreement_id: AgreementId(mix(orders + k) % 100_000 + 1),
                        amount: lm::Fen(100),
                        currency: lm::Currency,
                        purpose,
                    })
                    .collect();
                let t = Instant::now();
                for r in &reqs {
                    black_box(engine.debit(merchant(), r, 1_700_000_000_000));
                }
                spent += t.elapsed();
                orders += n;
                left -= n;
            }
            spent
        })
    });
    g.finish();
}

/// An engine holding `n` settled orders `S{i}` (full chunks in files under `dir` when
/// given), each debited, answered SUCCESS and acknowledged as the switch would.
fn with_settled(n: u64, dir: Option<&std::path::Path>) -> Engine {
    let e = Engine::new(EngineConfig::default(), table(), &[7u8; 32], 10_000_000_000);
    if let Some(d) = dir {
        e.keep_settled_in(d);
    }
    e.agreements().upsert(agreement(e.hasher(), 0));
    let purpose = lm::Purpose::new("repayment").unwrap();
    for i in 0..n {
        let req = lm::DebitReq {
            order_id: lm::OrderId::new(&format!("S{i}")).unwrap(),
            agreement_id: AgreementId(1),
            amount: lm::Fen(100),
            currency: lm::Currency,
            purpose,
        };
        succeed::debit_to_success(&e, merchant(), &req, i);
        if i % 10_000 == 9_999 {
            e.settle_final_orders_before(u64::MAX);
        }
    }
    e.settle_final_orders_before(u64::MAX);
    assert_eq!(e.settled_count() as u64, n);
    e
}

fn settled(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let on_disk = with_settled(N, Some(dir.path()));
    let in_memory = with_settled(N, None);
    // Keys made beforehand, so that the loop measures the lookup alone.
    let keys = |f: &dyn Fn(u64) -> String| -> Vec<_> {
        (0..65_536u64)
            .map(|i| (merchant(), lm::OrderId::new(&f(i)).unwrap()))
            .collect()
    };
    let new_ids = keys(&|i| format!("N{}", mix(i)));
    let held = keys(&|i| format!("S{}", mix(i) % N));
    // Among the newest 200k settled orders: ~49 chunk files, fewer than the store keeps
    // open (repeats and queries mostly concern recent orders).
    let recent = keys(&|i| format!("S{}", N - 1 - mix(i) % 200_000));
    let mut g = c.benchmark_group("settled_1M");
    let mut i = 0usize;
    g.bench_function("order_new_id", |b| {
        b.iter(|| {
            i = (i + 1) % new_ids.len();
            hint::black_box(on_disk.order(&new_ids[i]))
        })
    });
    for (name, e, ids) in [
        ("order_on_disk", &on_disk, &held),
        ("order_on_disk_recent", &on_disk, &recent),
        ("order_in_memory", &in_memory, &held),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % ids.len();
                hint::black_box(e.order(&ids[i]))
            })
        });
    }
    g.finish();
}

/// The replay guard every lender request passes (`src/server/replay.rs`), in its steady
/// state at 50k requests/s over 8 merchants with the benchmarks' 30 s window: ids are
/// remembered for 60 s, so each merchant holds ~375k ids and forgets one per new one.
fn replay(c: &mut Criterion) {
    const MERCHANTS: u64 = 8;
    const PER_MS: u64 = 50;
    let guard = ReplayGuard::new(30_000, 2_000_000);
    let merchants: Vec<MerchantNo> = (0..MERCHANTS)
        .map(|m| MerchantNo::new(&format!("M{m}")).unwrap())
        .collect();
    let mut n = 0u64;
    let check = |n: &mut u64| {
        *n += 1;
        let now = 1_000_000 + *n / PER_MS;
        let r = guard.check(&merchants[(*n % MERCHANTS) as usize], mix(*n), now, now);
        debug_assert!(r.is_ok());
        r
    };
    // 70 s of requests: past the first expiries, so every check also forgets one id.
    for _ in 0..70_000 * PER_MS {
        check(&mut n).expect("new id");
    }
    let mut g = c.benchmark_group("replay_guard");
    g.throughput(Throughput::Elements(1));
    g.bench_function("check_new_id_8_merchants", |b| {
        b.iter(|| hint::black_box(check(&mut n)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = lookup, routing, debit, settled, replay
}
criterion_main!(benches);
