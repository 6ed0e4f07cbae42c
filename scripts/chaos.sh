#!/usr/bin/env bash
# The chaos scenarios in their short form (a few seconds each, ~2-3 minutes in all in a
# debug build): `sluice-load chaos all --short` against the `sluice` binary of the same
# target directory. Exits non-zero on any violated invariant. The full runs and their
# figures: RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
target="${CARGO_TARGET_DIR:-target}"
"$target/debug/sluice-load" chaos all --short --sluice-bin "$target/debug/sluice" "$@"
