//! sluice: a transaction switch for consumer lenders.
//!
//! Lender systems keep persistent TCP connections and send fixed-length, MAC-signed binary
//! frames (`protocol/SPEC.md`): sign a card for agreement payment, debit by agreement,
//! pay out to a card, query, and receive results.
//!
//! # Layout
//! Dependencies point down this list only; nothing below `server`/`upstream` does I/O.
//! - [`wire`]: fixed-width fields, the frame header, the tokio-util codec.
//! - [`message`]: typed lender messages, their layouts, status and reason codes.
//! - [`crypto`]: HMAC-SHA256 merchant keys (key store, rotation), Ed25519 identities.
//! - [`limits`]: every bound, with its reason.
//! - [`channel`]: the upstream channel link: layouts, response classes, session MAC, logon.
//! - [`sim`]: the bundled channel simulator (agreements, ledger, injected faults), in-process.
//! - [`health`]: per-channel sliding-window health, circuit breaker, operator override,
//!   routing metrics (I/O-free; the engine's router reads it).
//! - [`upstream`]: per-channel pools of persistent, pipelined, authenticated connections.
//! - [`journal`]: the durable, group-committed log of engine records, snapshots, recovery.
//! - [`dst`]: deterministic simulation of the engine (VOPR): seeded world, faults,
//!   crashes with journal recovery, money-safety invariants checked every step.
//! - [`fuzz_entry`]: the fuzz targets' bodies, callable from stable tests.
//! - [`recon`]: daily reconciliation of a channel's statement against sluice's own record.
//! - [`admin`]: the operator's HTTP port and status page over a running switch (reads
//!   engine, health, pools and journal; acts through the engine's operator calls).
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod channel;
pub mod client;
mod coalesce;
pub mod config;
pub mod crypto;
pub mod dst;
pub mod engine;
pub mod fuzz_entry;
pub mod health;
pub mod import;
pub mod journal;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod recon;
pub mod run;
pub mod server;
pub mod sim;
pub mod upstream;
pub mod wire;
