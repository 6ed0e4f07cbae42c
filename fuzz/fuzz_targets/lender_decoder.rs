//! Fuzz the lender frame decoder and the acceptance checks (MAC, typed decode) with arbitrary bytes.
//! The body and its assertions live in `sluice::fuzz_entry::lender_decoder` so that the stable test
//! `tests/fuzz_replay.rs` runs the same code. Seeds: `fuzz/seed.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::fuzz_entry::lender_decoder(data));
