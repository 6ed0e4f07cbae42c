//! `mem`: how much resident memory N agreements take in the switch's own agreement store
//! (the engine's `AgreementStore`, keyed hashes computed as an import computes them),
//! and how fast they go in. Two channel agreements per card, like `prepare` writes.

use std::time::Instant;

use anyhow::Result;
use sluice::engine::agreement::{
    Agreement, ChannelAgreement, ChannelAgreementState, CHANNELS_PER_AGREEMENT_MAX,
};
use sluice::engine::{ChannelConfig, ChannelTable, Engine, EngineConfig};
use sluice::message::{BankCode, CardType, ChannelId};
use sluice::wire::field::Digits;
use sluice::wire::header::MerchantNo;

use crate::data;

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Fill an engine with `n` agreements on `threads` threads; print and return
/// (RSS growth in bytes, rows per second counting one row per channel agreement).
pub fn run(n: u64, merchants: usize, threads: usize) -> Result<(u64, f64)> {
    let table = ChannelTable {
        channels: vec![ChannelConfig::open("CHA"), ChannelConfig::open("CHB")],
    };
    let engine = Engine::new(EngineConfig::default(), table, &[7u8; 32], 1);
    let before = rss_bytes();
    let merchant_nos: Vec<MerchantNo> = (0..merchants)
        .map(|m| MerchantNo::new(&data::merchant_no(m)).expect("merchant"))
        .collect();
    let (cha, chb) = (ChannelId::new("CHA")?, ChannelId::new("CHB")?);
    let bank = BankCode::new(data::BANK)?;
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..threads as u64 {
            let (engine, merchant_nos, bank) = (&engine, &merchant_nos, &bank);
            s.spawn(move || {
                let mut i = th;
                while i < n {
                    let card = data::card_no(i);
                    let mut channels = [None; CHANNELS_PER_AGREEMENT_MAX];
                    for (slot, ch) in channels.iter_mut().zip([cha, chb]) {
                        *slot = Some(ChannelAgreement {
                            channel: ch,
                            agreement_no: sluice::channel::message::AgreementNo::new(
                                &data::agreement_no(ch.as_str(), i),
                            )
                            .expect("agreement no"),
                            state: ChannelAgreementState::Active,
                        });
                    }
                    engine.agreements().upsert(Agreement {
                        id: engine.new_agreement_id(),
                        merchant: merchant_nos[(i % merchant_nos.len() as u64) as usize],
                        card_hash: engine.hasher().card(&card),
                        id_hash: engine.hasher().id(&data::id_no(i)),
                        card_last4: Digits::new(&card[card.len() - 4..]).expect("last4"),
                        bank: *bank,
                        card_type: CardType::Debit,
                        cancelled: false,
                        channels,
                    });
                    i += threads as u64;
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let after = rss_bytes();
    let grew = after.saturating_sub(before);
    let rows_per_s = (n * 2) as f64 / secs;
    println!(
        "{} agreements ({} channel agreements) in {:.1} s on {threads} threads: {:.0} rows/s; \
         RSS {:.0} MiB -> {:.0} MiB (+{:.0} MiB, {:.0} bytes per agreement)",
        n,
        n * 2,
        secs,
        rows_per_s,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        grew as f64 / 1048576.0,
        grew as f64 / n.max(1) as f64
    );
    println!(
        "{{\"agreements\": {n}, \"rss_before_bytes\": {before}, \"rss_after_bytes\": {after}, \"seconds\": {secs:.3}, \"rows_per_s\": {rows_per_s:.0}}}"
    );
    assert_eq!(engine.agreements().len() as u64, n);
    Ok((grew, rows_per_s))
}
