//! Journal costs: append throughput by policy and by concurrency (how well group commit
//! shares an fsync — concurrency 1 under `fsync` is the naive fsync-per-record baseline),
//! recovery speed (journal records replayed per second) and snapshot load speed
//! (agreements per second).
//!
//! `cargo bench --bench journal`; figures in BENCHMARKS.md / docs/durability.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::app::JournalSink;
use sluice::channel::message::{AgreementNo, OrderRef};
use sluice::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::order::OrderKind;
use sluice::engine::{ChannelTable, Engine, EngineConfig, Record};
use sluice::journal::{self, JournalConfig, Policy};
use sluice::message::{
    AgreementId, BankCode, CardType, ChannelId, OrderId, Outcome, Purpose, Status,
};
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

fn engine() -> Engine {
    Engine::new(
        EngineConfig::default(),
        ChannelTable::default(),
        &[9u8; 32],
        1,
    )
}

fn agreement(id: u64) -> Record {
    let mut a = Agreement {
        id: AgreementId(id),
        merchant: MerchantNo::new("898100000000001").unwrap(),
        card_hash: (id as u128).to_le_bytes(),
        id_hash: [7; 16],
        card_last4: Digits::new("0128").unwrap(),
        bank: BankCode::new("ICBC").unwrap(),
        card_type: CardType::Debit,
        cancelled: false,
        channels: [None; CHANNELS_PER_AGREEMENT_MAX],
    };
    a.add_channel(ChannelAgreement {
        channel: ChannelId::new("CHA").unwrap(),
        agreement_no: AgreementNo::new(&format!("AGR-{id:012}")).unwrap(),
        state: ChannelAgreementState::Active,
    });
    Record::Agreement(Box::new(a))
}

/// The three records of one order's life (accepted, attempt, final).
fn order_records(i: u64) -> [Record; 3] {
    let key = (
        MerchantNo::new("898100000000001").unwrap(),
        OrderId::new(&format!("ORD-{i:016}")).unwrap(),
    );
    let r = OrderRef::new(&format!("S1O{i:x}")).unwrap();
    [
        Record::OrderAccepted {
            key,
            kind: OrderKind::Debit {
                agreement: AgreementId(1 + i % 1000),
            },
            amount: 10_000 + i,
            purpose: Purpose::new("还款").unwrap(),
            at_ms: 1_700_000_000_000 + i,
        },
        Record::AttemptStarted {
            key,
            channel: ChannelId::new("CHA").unwrap(),
            order_ref: r,
            at_ms: 1_700_000_000_000 + i,
        },
        Record::OrderFinal {
            key,
            outcome: Outcome::new(Status::Success, sluice::message::Reason::OK),
            order_ref: Some(r),
            notify_id: 10_000_000 + i,
            at_ms: 1_700_000_000_001 + i,
        },
    ]
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("journal_append");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for (policy, name) in [(Policy::None, "none"), (Policy::Fsync, "fsync")] {
        for concurrency in [1usize, 16, 256] {
            if policy == Policy::None && concurrency == 16 {
                continue;
            }
            let per_task = if policy == Policy::Fsync && concurrency == 1 {
                50
            } else {
                2000 / concurrency.min(16)
            };
            let total = (per_task * concurrency) as u64;
            g.throughput(Throughput::Elements(total));
            g.bench_function(format!("{name}/concurrency={concurrency}"), |b| {
                b.iter_custom(|iters| {
                    let dir = tempfile::tempdir().unwrap();
                    let mut cfg = JournalConfig::new(dir.path());
                    cfg.policy = policy;
                    let (j, r) = journal::open(cfg).unwrap();
                    r.apply(&engine(), 0).unwrap();
                    let j = Arc::new(j);
                    let started = Instant::now();
                    rt.block_on(async {
                        for _ in 0..iters {
                            let mut tasks = Vec::with_capacity(concurrency);
                            for t in 0..concurrency {
                                let j = j.clone();
                                tasks.push(tokio::spawn(async move {
                                    for i in 0..per_task {
                                        j.append(agreement((t * per_task + i) as u64 + 1)).await.unwrap();
                                    }
                                }));
                            }
                            for t in tasks {
                                t.await.unwrap();
                            }
                        }
                    });
                    let took = started.elapsed();
                    let st = j.stats();
                    eprintln!(
                        "  {name}/concurrency={concurrency}: {:.0} records/s, {} records in {} batches (avg {:.1}, max {}), {} fsyncs, avg fsync {} us",
                        st.records as f64 / took.as_secs_f64(),
                        st.records,
                        st.batches,
                        st.records as f64 / st.batches.max(1) as f64,
                        st.batch_records_max,
                        st.fsyncs,
                        st.fsync_us_total / st.fsyncs.max(1)
                    );
                    took
                })
            });
        }
    }
    g.finish();
}

fn recovery(c: &mut Criterion) {
    // 1M journal records (333,334 orders' lives) replayed into a fresh engine.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut cfg = JournalConfig::new(dir.path());
        cfg.policy = Policy::None;
        let (j, r) = journal::open(cfg).unwrap();
        r.apply(&engine(), 0).unwrap();
        let recs: Vec<Record> = (0..333_334u64).flat_map(order_records).collect();
        j.append_all_blocking(&recs).unwrap();
        j.close().unwrap();
    }
    let records = 1_000_000u64 + 2;
    let mut g = c.benchmark_group("journal_recovery");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(records));
    g.bench_function("replay_1M_records", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut cfg = JournalConfig::new(dir.path());
                cfg.policy = Policy::None;
                let e = engine();
                let t = Instant::now();
                let (_j, r) = journal::open(cfg).unwrap();
                let rep = r.apply(&e, 1_700_000_000_000).unwrap();
                total += t.elapsed();
                assert!(rep.records_replayed >= 1_000_000);
            }
            total
        })
    });
    g.finish();

    // A snapshot of 1M agreements loaded into a fresh engine.
    let sdir = tempfile::tempdir().unwrap();
    {
        let e = engine();
        let mut cfg = JournalConfig::new(sdir.path());
        cfg.policy = Policy::None;
        let (j, r) = journal::open(cfg).unwrap();
        r.apply(&e, 0).unwrap();
        for id in 1..=1_000_000u64 {
            if let Record::Agreement(a) = agreement(id) {
                e.agreements().upsert(*a);
            }
        }
        let t = Instant::now();
        let info = j.snapshot(&e, 0).unwrap();
        eprintln!(
            "  snapshot of 1M agreements: {} bytes in {} ms (write {:.0} agreements/s)",
            info.bytes,
            info.took_ms,
            1e6 / t.elapsed().as_secs_f64()
        );
        j.close().unwrap();
    }
    let mut g = c.benchmark_group("journal_snapshot");
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    g.throughput(Throughput::Elements(1_000_000));
    g.bench_function("load_1M_agreements", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let e = engine();
                let t = Instant::now();
                let (_j, r) = journal::open(JournalConfig::new(sdir.path())).unwrap();
                let rep = r.apply(&e, 0).unwrap();
                total += t.elapsed();
                assert_eq!(rep.snapshot_agreements, 1_000_000);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, append, recovery);
criterion_main!(benches);
