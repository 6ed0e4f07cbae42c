//! Fuzz the configuration parser and validator (TOML text, no file access) with arbitrary bytes.
//! The body and its assertions live in `sluice::fuzz_entry::config_loader` so that the stable test
//! `tests/fuzz_replay.rs` runs the same code. Seeds: `fuzz/seed.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::fuzz_entry::config_loader(data));
