//! The deterministic simulation (`sluice::dst`) in CI: a short sweep of seeds with every
//! fault on, the proof that one seed is one run, and the proof that the oracle catches
//! the bugs it is there for (a deliberately broken shell must fail).
//!
//! Longer sweeps: `cargo run --release --bin sluice-vopr -- --seeds 0..100000`.

use sluice::dst::{run_seed, Options, Sabotage, Summary};

/// Seeds in the CI sweep (10-40 s in a debug build on a loaded 2-core machine).
const SWEEP: u64 = 300;

#[test]
fn sweep_keeps_every_money_safety_invariant() {
    let opts = Options::default();
    let mut tot = Summary::default();
    for seed in 0..SWEEP {
        let s = match run_seed(seed, &opts) {
            Ok(s) => s,
            Err(f) => panic!("{f}"),
        };
        tot.requests += s.requests;
        tot.orders_acked += s.orders_acked;
        tot.orders_success += s.orders_success;
        tot.orders_failed += s.orders_failed;
        tot.crashes += s.crashes;
        tot.torn_tails += s.torn_tails;
        tot.crash_extra_records += s.crash_extra_records;
        tot.not_sent += s.not_sent;
        tot.unknown += s.unknown;
        tot.lost += s.lost;
        tot.signed += s.signed;
        tot.revoked += s.revoked;
        tot.snapshots += s.snapshots;
        tot.settled += s.settled;
        tot.from_chunk_files += s.from_chunk_files;
    }
    // The sweep is only worth something if the faults it claims really happened.
    println!("{tot:#?}");
    assert!(
        tot.orders_success > 1_000 && tot.orders_failed > 100,
        "{tot:?}"
    );
    assert!(tot.crashes > 100, "switch crashes: {tot:?}");
    assert!(
        tot.settled > 1_000,
        "orders settled to the compact form: {tot:?}"
    );
    assert!(
        tot.from_chunk_files > 100,
        "settled orders restored from chunk files: {tot:?}"
    );
    assert!(tot.torn_tails > 50, "torn journal tails: {tot:?}");
    assert!(
        tot.crash_extra_records > 10,
        "unsynced records kept: {tot:?}"
    );
    assert!(
        tot.not_sent > 100 && tot.unknown > 100,
        "NOT_SENT/UNKNOWN: {tot:?}"
    );
    assert!(tot.lost > 100, "lost messages: {tot:?}");
    assert!(
        tot.signed > 100,
        "cards signed by pre-bind + confirm: {tot:?}"
    );
}

#[test]
fn one_seed_is_one_run() {
    let opts = Options::default();
    for seed in [7, 1234, 987_654_321] {
        let a = run_seed(seed, &opts).unwrap_or_else(|f| panic!("{f}"));
        let b = run_seed(seed, &opts).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(a, b, "seed {seed} ran differently twice");
        assert!(a.steps > 200, "seed {seed} did little: {a:?}");
    }
    let a = run_seed(1, &opts).unwrap_or_else(|f| panic!("{f}"));
    let b = run_seed(2, &opts).unwrap_or_else(|f| panic!("{f}"));
    assert_ne!(a.trace_hash, b.trace_hash, "different seeds, same trace");
}

/// The first failing seed under a sabotaged shell, and its invariant.
fn first_failure(sabotage: Sabotage) -> (u64, &'static str) {
    let opts = Options {
        sabotage: Some(sabotage),
        ..Options::default()
    };
    for seed in 0..200 {
        if let Err(f) = run_seed(seed, &opts) {
            // The failure names itself and how to replay it.
            let text = f.to_string();
            assert!(text.contains(&format!("seed={seed}")), "{text}");
            assert!(text.contains("--seed"), "{text}");
            return (seed, f.invariant);
        }
    }
    panic!("{sabotage:?}: 200 seeds and the oracle saw nothing");
}

#[test]
fn oracle_catches_failover_after_an_unknown_outcome() {
    let (seed, inv) = first_failure(Sabotage::NotSentOnTimeout);
    assert!(
        inv == "executed-once" || inv == "told-equals-ledger",
        "seed {seed}: {inv}"
    );
}

#[test]
fn oracle_catches_states_told_before_they_are_durable() {
    let (seed, inv) = first_failure(Sabotage::TellBeforeDurable);
    assert_eq!(inv, "durable-first", "seed {seed}");
}

#[test]
fn oracle_catches_acknowledged_orders_lost_by_a_crash() {
    let (seed, inv) = first_failure(Sabotage::LoseDurableRecords);
    assert!(
        inv == "never-lost" || inv == "one-final-state",
        "seed {seed}: {inv}"
    );
}
