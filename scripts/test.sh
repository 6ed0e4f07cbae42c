#!/usr/bin/env bash
# The test command (README "Run the tests"): format check, clippy with warnings as
# errors, every test of the workspace, the Python client against `sluice demo`, the
# status page in headless Chromium (installed by the script when missing), the chaos
# scenarios in their short form, and 10 s per fuzz target when nightly and cargo-fuzz
# are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
bash scripts/python_client_e2e.sh
bash scripts/status_page_test.sh
bash scripts/chaos.sh
bash scripts/fuzz.sh --short
