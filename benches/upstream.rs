//! Upstream pool round trip against an in-process simulator (127.0.0.1, zero injected
//! latency), sequential and 64 in flight; and the per-request bookkeeping the pool adds
//! (two monotonic clock reads, a histogram record, counters), to show it is a small
//! fraction of the round trip.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use hdrhistogram::Histogram;
use sluice::channel::message::{Message, OrderRef, QueryReq};
use sluice::crypto::Identity;
use sluice::sim::{SimConfig, Simulator};
use sluice::upstream::{ChannelPool, PoolConfig};
use tokio::sync::mpsc;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let switch = Arc::new(Identity::from_seed(&[1; 32]));
    let (sim, pool) = rt.block_on(async {
        let cfg = SimConfig::new(
            Arc::new(Identity::from_seed(&[2; 32])),
            "BENCH",
            switch.public_key(),
        );
        let sim = Simulator::start(cfg).await.unwrap();
        let mut pc = PoolConfig::new(vec![sim.addr()], "BENCH");
        pc.connections = 2;
        let (tx, rx) = mpsc::channel(1024);
        std::mem::forget(rx);
        let pool = ChannelPool::start(pc, switch.clone(), sim.public_key(), tx);
        pool.wait_ready(2).await;
        (sim, pool)
    });
    let q: Message = QueryReq {
        order_ref: OrderRef::new("BENCH-QUERY-0001").unwrap(),
    }
    .into();
    let dl = Duration::from_secs(5);

    let mut g = c.benchmark_group("upstream");
    g.throughput(Throughput::Elements(1));
    g.bench_function("round_trip_query_sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(pool.call(q.clone(), dl).await.unwrap());
                }
                t.elapsed()
            })
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("round_trip_query_64_in_flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let calls = (0..64).map(|_| pool.call(q.clone(), dl));
                    for r in futures::future::join_all(calls).await {
                        black_box(r.unwrap());
                    }
                }
                t.elapsed()
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    let hist = Mutex::new(Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap());
    let (completed, inflight) = (AtomicU64::new(0), AtomicU64::new(0));
    g.bench_function("per_request_bookkeeping", |b| {
        b.iter(|| {
            let started = tokio::time::Instant::now();
            inflight.fetch_add(1, Relaxed);
            let us = started.elapsed().as_micros() as u64;
            let _ = hist.lock().unwrap().record(black_box(us).max(1));
            completed.fetch_add(1, Relaxed);
            inflight.fetch_sub(1, Relaxed);
        })
    });
    g.finish();
    let st = pool.stats();
    eprintln!(
        "pool stats: completed {} p50 {} us p99 {} us p99.9 {} us",
        st.completed, st.latency_us_p50, st.latency_us_p99, st.latency_us_p999
    );
    rt.block_on(async {
        pool.shutdown().await;
        sim.shutdown().await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
