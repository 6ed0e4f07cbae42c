//! Stock import: cost of one CSV row (split, validate, Luhn, two keyed hashes) and of
//! grouping rows into agreements. rows/s on N threads ≈ N × 1e9 / (parse ns) for the
//! parallel part; grouping is single-threaded.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sluice::engine::agreement::PiiHasher;
use sluice::import::{group, parse, parse_line};
use sluice::message::{AgreementId, ChannelId};

fn rows(n: usize) -> String {
    let mut s = String::with_capacity(n * 90);
    for i in 0..n {
        let base = format!("622202{:012}", i);
        let card = (0..10)
            .map(|d| format!("{base}{d}"))
            .find(|c| sluice::message::luhn_ok(c.as_bytes()))
            .expect("check digit");
        s.push_str(&format!(
            "898100000000001,U{i},{card},11010519491231002X,ICBC,debit,CHA,A{i:09}\n"
        ));
    }
    s
}

fn bench(c: &mut Criterion) {
    let h = PiiHasher::new(&[7u8; 32]);
    let known = |_: &ChannelId| true;
    let line =
        "898100000000001,U1,6222021234567890128,11010519491231002X,ICBC,debit,CHA,A000000001";
    let mut g = c.benchmark_group("import");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_line", |b| {
        b.iter(|| black_box(parse_line(1, black_box(line), &h, &known).unwrap()))
    });
    g.bench_function("keyed_hash_card", |b| {
        b.iter(|| black_box(h.card(black_box("6222021234567890128"))))
    });
    let text = rows(100_000);
    g.throughput(Throughput::Elements(100_000));
    g.sample_size(10);
    g.bench_function("parse_100k_rows_2_threads", |b| {
        b.iter(|| black_box(parse(&text, &h, &known, 2, None)))
    });
    let (parsed, _) = parse(&text, &h, &known, 2, None);
    g.bench_function("group_100k_rows", |b| {
        b.iter(|| {
            let mut n = 0;
            black_box(group(parsed.clone(), || {
                n += 1;
                AgreementId(n)
            }))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
