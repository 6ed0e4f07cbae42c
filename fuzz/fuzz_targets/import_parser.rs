//! Fuzz the stock agreement import parser (src/import.rs) with arbitrary bytes.
//! The body and its assertions live in `sluice::fuzz_entry::import_parser` so that the stable test
//! `tests/fuzz_replay.rs` runs the same code. Seeds: `fuzz/seed.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::fuzz_entry::import_parser(data));
