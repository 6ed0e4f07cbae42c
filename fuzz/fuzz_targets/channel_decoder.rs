//! Fuzz the channel frame decoder, body decoding and the session MAC with arbitrary bytes.
//! The body and its assertions live in `sluice::fuzz_entry::channel_decoder` so that the stable test
//! `tests/fuzz_replay.rs` runs the same code. Seeds: `fuzz/seed.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::fuzz_entry::channel_decoder(data));
