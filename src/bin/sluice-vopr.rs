//! `sluice-vopr`: run the deterministic simulation (`sluice::dst`) over many seeds, or
//! replay one seed step by step.
//!
//! A separate small binary rather than a `sluice` subcommand: it is a test tool, and the
//! switch binary stays exactly what runs in production.
//!
//! ```text
//! sluice-vopr --seeds 0..5000            sweep; stops at the first failing seed
//! sluice-vopr --seed 1234 --verbose      replay one seed, printing every step
//! ```

use std::ops::Range;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use sluice::dst::{run_seed, Options};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-vopr",
    about = "Deterministic simulation of the sluice engine"
)]
struct Args {
    /// Seeds to run, `A..B` (B excluded).
    #[arg(long, default_value = "0..1000", value_parser = parse_range)]
    seeds: Range<u64>,
    /// Run only this seed (overrides --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every step of the run.
    #[arg(long)]
    verbose: bool,
    /// Virtual milliseconds of lender traffic and faults per seed.
    #[arg(long, default_value_t = Options::default().traffic_ms)]
    traffic_ms: u64,
    /// No faults at all (a perfect world).
    #[arg(long)]
    no_faults: bool,
    /// Keep going after a failing seed (report every failure at the end).
    #[arg(long)]
    keep_going: bool,
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected A..B, got {s:?}"))?;
    let a: u64 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if b <= a {
        return Err(format!("empty range {s}"));
    }
    Ok(a..b)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = Options {
        traffic_ms: args.traffic_ms,
        verbose: args.verbose,
        faults: !args.no_faults,
        ..Options::default()
    };
    let seeds = match args.seed {
        Some(s) => s..s + 1,
        None => args.seeds,
    };
    let started = Instant::now();
    let (mut ran, mut failed) = (0u64, Vec::new());
    let mut tot = sluice::dst::Summary::default();
    for seed in seeds.clone() {
        match run_seed(seed, &opts) {
            Ok(s) => {
                if args.seed.is_some() {
                    println!("{s:#?}");
                }
                tot.steps += s.steps;
                tot.requests += s.requests;
                tot.orders_acked += s.orders_acked;
                tot.orders_success += s.orders_success;
                tot.orders_failed += s.orders_failed;
                tot.ledger_entries += s.ledger_entries;
                tot.crashes += s.crashes;
                tot.crash_extra_records += s.crash_extra_records;
                tot.torn_tails += s.torn_tails;
                tot.snapshots += s.snapshots;
                tot.settled += s.settled;
                tot.from_chunk_files += s.from_chunk_files;
                tot.lost += s.lost;
                tot.signed += s.signed;
                tot.revoked += s.revoked;
                tot.not_sent += s.not_sent;
                tot.unknown += s.unknown;
            }
            Err(f) => {
                eprintln!("{f}");
                failed.push(seed);
                if !args.keep_going {
                    ran += 1;
                    break;
                }
            }
        }
        ran += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sluice-vopr: {ran} seeds ({}..{}) in {secs:.1} s = {:.0} seeds/min ({} build); {} failed",
        seeds.start,
        seeds.end,
        ran as f64 * 60.0 / secs.max(1e-9),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        failed.len()
    );
    println!(
        "  steps {} requests {} acked {} success {} failed {} ledger {} signed {} revoked {}",
        tot.steps,
        tot.requests,
        tot.orders_acked,
        tot.orders_success,
        tot.orders_failed,
        tot.ledger_entries,
        tot.signed,
        tot.revoked
    );
    println!(
        "  crashes {} (non-durable records surviving {}, torn tails {}) snapshots {} settled {} (from chunk files at restarts {}) lost msgs {} not-sent {} unknown {}",
        tot.crashes,
        tot.crash_extra_records,
        tot.torn_tails,
        tot.snapshots,
        tot.settled,
        tot.from_chunk_files,
        tot.lost,
        tot.not_sent,
        tot.unknown
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failing seeds: {failed:?}");
        ExitCode::FAILURE
    }
}
