//! Deterministic simulation testing (in the spirit of TigerBeetle's VOPR): the I/O-free
//! [`Engine`] driven by a seeded world of lenders, channels, a virtual clock, a lossy
//! network, a journal with a durability boundary, and switch crashes recovered from that
//! journal — with DESIGN.md §4 checked against the channels' books after every step.
//!
//! - One `u64` seed decides everything ([`Rng`]), and time is a priority queue of events,
//!   so one seed is one run, exactly (the trace hash proves it).
//! - Each seed draws its own fault mix ("swarm testing"): loss, delay spikes, reordering,
//!   duplicated channel notifications, channel and lender disconnects, switch crashes
//!   with a torn journal tail, channels that decline, answer late or not process.
//! - The oracle is the banks' ledgers ([`crate::sim::ledger`]), not the engine's opinion:
//!   see [`oracle`] for the invariants.
//!
//! Run it with `sluice-vopr` (`src/bin/sluice-vopr.rs`); `tests/vopr.rs` sweeps a few
//! hundred seeds in CI.

pub mod channel;
pub mod journal;
pub mod oracle;
mod world;

use std::fmt;

pub use world::run_seed;

/// Settings of a run (the seed draws the fault mix; these bound its size).
#[derive(Debug, Clone)]
pub struct Options {
    /// Virtual time during which lenders send new requests and faults happen, ms.
    pub traffic_ms: u64,
    /// After the traffic: virtual time allowed for the world to settle, ms.
    pub settle_ms: u64,
    /// Stop a run that takes more steps than this (a livelock is a failure).
    pub steps_max: u64,
    /// Keep and print every step (one line each).
    pub verbose: bool,
    /// Lines of trace printed with a failure.
    pub trace_tail: usize,
    /// Faults on (off: a perfect world, for comparison and debugging).
    pub faults: bool,
    /// A deliberately broken shell, to prove the oracle catches what it claims to
    /// (tests only; `None` in every real run).
    pub sabotage: Option<Sabotage>,
}

/// Deliberate shell bugs for the oracle's own tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// Report a timed-out dispatch as NOT_SENT (it may have reached the bank): the
    /// engine then fails over — a double debit the oracle must see.
    NotSentOnTimeout,
    /// Tell the engine a record is durable as soon as it is written, before the fsync:
    /// lenders hear states the journal may lose.
    TellBeforeDurable,
    /// A crash loses durable records too (a disk that lies about fsync).
    LoseDurableRecords,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            traffic_ms: 20_000,
            settle_ms: 1_800_000,
            steps_max: 2_000_000,
            verbose: false,
            trace_tail: 30,
            faults: true,
            sabotage: None,
        }
    }
}

/// What a successful run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The seed.
    pub seed: u64,
    /// Events processed.
    pub steps: u64,
    /// Virtual time at the end, ms since the start.
    pub virtual_ms: u64,
    /// Hash of the whole event trace (same seed → same hash).
    pub trace_hash: u64,
    /// Lender requests that reached the switch.
    pub requests: u64,
    /// Orders acknowledged to a lender (PENDING or final).
    pub orders_acked: u64,
    /// Orders told SUCCESS.
    pub orders_success: u64,
    /// Orders told FAILED.
    pub orders_failed: u64,
    /// Ledger entries across every bank.
    pub ledger_entries: u64,
    /// Switch crashes (each followed by recovery from the journal).
    pub crashes: u64,
    /// Non-durable journal records that survived a crash anyway.
    pub crash_extra_records: u64,
    /// Torn tails cut off by recovery.
    pub torn_tails: u64,
    /// Snapshots published (recovery then loads the newest and replays the tail).
    pub snapshots: u64,
    /// Final orders moved to their compact settled form.
    pub settled: u64,
    /// Settled orders a restart put back from chunk files (not from the snapshot's copy).
    pub from_chunk_files: u64,
    /// Messages dropped by the network.
    pub lost: u64,
    /// Agreements signed through pre-bind + confirm.
    pub signed: u64,
    /// Agreements revoked at a bank.
    pub revoked: u64,
    /// Dispatches answered NOT_SENT (link down).
    pub not_sent: u64,
    /// Dispatches that ended UNKNOWN (timeout, disconnect).
    pub unknown: u64,
}

/// A broken invariant (or a run that did not settle).
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// Step at which it was found.
    pub step: u64,
    /// Virtual time, ms since the start.
    pub at_ms: u64,
    /// Which invariant.
    pub invariant: &'static str,
    /// What exactly.
    pub detail: String,
    /// The last steps before it.
    pub trace_tail: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "VOPR FAILURE seed={} step={} t={}ms invariant={}",
            self.seed, self.step, self.at_ms, self.invariant
        )?;
        writeln!(f, "  {}", self.detail)?;
        writeln!(f, "  last steps:")?;
        for l in &self.trace_tail {
            writeln!(f, "    {l}")?;
        }
        write!(
            f,
            "  replay: cargo run --bin sluice-vopr -- --seed {} --verbose",
            self.seed
        )
    }
}

impl std::error::Error for Failure {}
