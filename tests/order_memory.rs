//! Resident memory per retained final order in the engine alone (no sessions, no I/O).
//! Run: `cargo test --release --test order_memory -- --ignored --nocapture --exact NAME`, one
//! test per process (memory freed by one is reused by the next); `SLUICE_ORDERS=N` sets
//! the number of orders (default 300000).

use sluice::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::{ChannelConfig, ChannelTable, Engine, EngineConfig};
use sluice::message::{self as lm, AgreementId, BankCode, CardType, ChannelId};
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

#[path = "common/succeed.rs"]
mod succeed;

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

#[test]
#[ignore]
fn resident_bytes_per_final_order() {
    bytes_per_final_order(false, None);
}

/// The same orders, settled to their compact form as they go (the live set stays at
/// about 10k orders, as with a short detail window).
#[test]
#[ignore]
fn resident_bytes_per_settled_order() {
    bytes_per_final_order(true, None);
}

/// The same, with full chunks of settled orders written to files (as the switch does
/// with a journal): what stays in memory per order is its index entry.
#[test]
#[ignore]
fn resident_bytes_per_settled_order_with_chunks_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    bytes_per_final_order(true, Some(dir.path()));
}

/// Snapshot and restore time with settled orders in chunk files: the snapshot refers to
/// them, the restore reads them back.
#[test]
#[ignore]
fn snapshot_and_restore_of_settled_orders_with_chunks_on_disk() {
    snapshot_round_trip(true);
}

/// Snapshot and restore time with settled orders (`SLUICE_ORDERS`, default 300000): a
/// restart with days of retained orders.
#[test]
#[ignore]
fn snapshot_and_restore_of_settled_orders() {
    snapshot_round_trip(false);
}

/// Settle `SLUICE_ORDERS` orders (their full chunks in files when `chunks_on_disk`),
/// snapshot them, restore them into a fresh engine; prints sizes and times.
fn snapshot_round_trip(chunks_on_disk: bool) {
    let dir = tempfile::tempdir().unwrap();
    let e = bytes_per_final_order(true, chunks_on_disk.then_some(dir.path()));
    e.settle_final_orders_before(u64::MAX);
    let n = e.order_count();
    let t = std::time::Instant::now();
    let (tmp, info) = sluice::journal::snapshot::write(dir.path(), &e, 1, 0, 0).unwrap();
    let path = sluice::journal::snapshot::publish(dir.path(), &tmp, 1).unwrap();
    let wrote = t.elapsed();
    drop(e);
    let fresh = engine();
    if chunks_on_disk {
        fresh.keep_settled_in(dir.path());
    }
    let t = std::time::Instant::now();
    // Restored at a time when all of them are past the detail window.
    let (_, loaded) = sluice::journal::snapshot::load(&path, &fresh, u64::MAX / 2, 0).unwrap();
    let took = t.elapsed();
    assert_eq!((loaded.orders as usize, fresh.order_count()), (n, n));
    assert_eq!(fresh.settled_count(), n);
    if !chunks_on_disk {
        assert_eq!((info.orders as usize, info.chunks), (n, 0));
    }
    eprintln!(
        "{n} settled orders, {} chunk files: snapshot {} KB written in {:.3} s, restored in {:.2} s ({:.0} orders/s)",
        info.chunks,
        info.bytes / 1000,
        wrote.as_secs_f64(),
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
}

fn engine() -> Engine {
    Engine::new(
        EngineConfig::default(),
        ChannelTable {
            channels: vec![ChannelConfig::open("CHA"), ChannelConfig::open("CHB")],
        },
        &[9u8; 32],
        1,
    )
}

fn bytes_per_final_order(settle: bool, chunk_dir: Option<&std::path::Path>) -> Engine {
    let e = engine();
    if let Some(d) = chunk_dir {
        e.keep_settled_in(d);
    }
    let merchant = MerchantNo::new("898100000000001").unwrap();
    let mut a = Agreement {
        id: e.new_agreement_id(),
        merchant,
        card_hash: [1; 16],
        id_hash: [2; 16],
        card_last4: Digits::new("0128").unwrap(),
        bank: BankCode::new("ICBC").unwrap(),
        card_type: CardType::Debit,
        cancelled: false,
        channels: [None; CHANNELS_PER_AGREEMENT_MAX],
    };
    a.add_channel(ChannelAgreement {
        channel: ChannelId::new("CHA").unwrap(),
        agreement_no: sluice::channel::message::AgreementNo::new("AGR-1").unwrap(),
        state: ChannelAgreementState::Active,
    });
    let id: AgreementId = e.agreements().upsert(a);
    let n: u64 = std::env::var("SLUICE_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let before = rss();
    for i in 0..n {
        let req = lm::DebitReq {
            order_id: lm::OrderId::new(&format!("MEM-{i:012}")).unwrap(),
            agreement_id: id,
            amount: lm::Fen(100),
            currency: lm::Currency,
            purpose: lm::Purpose::new("x").unwrap(),
        };
        succeed::debit_to_success(&e, merchant, &req, i);
        if settle && i % 10_000 == 9_999 {
            e.settle_final_orders_before(i.saturating_sub(10_000));
        }
    }
    let grown = rss().saturating_sub(before);
    eprintln!(
        "{n} final orders ({}): RSS +{} MiB, {} bytes per order (engine only)",
        match (settle, chunk_dir) {
            (false, _) => "live",
            (true, None) => "settled as they go",
            (true, Some(_)) => "settled as they go, full chunks in files",
        },
        grown >> 20,
        grown / n
    );
    assert_eq!(e.order_count() as u64, n);
    if settle {
        assert!(e.settled_count() as u64 >= n - 20_000);
    }
    e
}
