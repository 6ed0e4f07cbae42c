//! `sim`: the prepared directory's simulated channels in one process, with the prepared
//! agreements already on their books and deterministic SMS codes (the phone's last six
//! digits), so debits succeed at once and signing needs no outbox.

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sluice::crypto::Identity;
use sluice::message::CardType;
use sluice::sim::{SimConfig, SimHandle, Simulator, SmsMode};

use crate::prepare::Prepared;

/// Start every channel of `dir` (each ledger sized for `expect_orders` orders) and serve
/// until the process is stopped.
pub async fn run(dir: &Path, expect_orders: usize) -> Result<()> {
    let handles = start(dir).await?;
    for (id, sim, loaded) in &handles {
        sim.reserve_orders(expect_orders);
        println!(
            "channel {id} simulated on {} ({loaded} agreements preloaded, deterministic SMS)",
            sim.addr(),
        );
    }
    tokio::signal::ctrl_c().await.ok();
    for (_, h, _) in handles {
        h.shutdown().await;
    }
    Ok(())
}

/// Start every channel of `dir` (on the addresses in `prepare.json`) with the prepared
/// agreements on its books; returns (channel id, handle, agreements preloaded), primary first. Used by
/// `sim` and by the chaos runner, which keeps the handles to inject faults and read the
/// ledgers.
pub async fn start(dir: &Path) -> Result<Vec<(String, SimHandle, usize)>> {
    let p = Prepared::load(dir)?;
    let switch_pk = sluice::config::parse_public_key(&p.switch_public_key)
        .context("switch public key in prepare.json")?;
    let mut handles = Vec::new();
    for (i, c) in p.channels.iter().enumerate() {
        let seed: [u8; 32] = hex::decode(&c.seed)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("seed of {} is not 32 bytes", c.id))?;
        let mut sc = SimConfig::new(
            Arc::new(Identity::from_seed(&seed)),
            &p.institution,
            switch_pk,
        );
        sc.listen = c.addr;
        sc.bank.sms_mode = SmsMode::Deterministic;
        // Far above any benchmark's total: limits are not what is measured.
        sc.bank.daily_max_fen = u64::MAX / 4;
        sc.bank.payout_balance_fen = u64::MAX / 4;
        sc.seed = 100 + i as u64;
        let sim = Simulator::start(sc)
            .await
            .with_context(|| format!("simulator {} on {}", c.id, c.addr))?;
        let file = dir.join(format!("sim-{}.csv", c.id));
        let f = std::io::BufReader::new(
            std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?,
        );
        let mut rows = Vec::new();
        for line in f.lines() {
            let line = line?;
            let v: Vec<String> = line.split(',').map(str::to_string).collect();
            anyhow::ensure!(v.len() == 5, "{}: bad row {line:?}", file.display());
            rows.push(v);
        }
        let loaded = sim.preload_agreements(rows.iter().map(|v| {
            let t = if v[4] == "credit" {
                CardType::Credit
            } else {
                CardType::Debit
            };
            (
                v[0].as_str(),
                v[1].as_str(),
                v[2].as_str(),
                v[3].as_str(),
                t,
            )
        }));
        handles.push((c.id.clone(), sim, loaded));
    }
    Ok(handles)
}
