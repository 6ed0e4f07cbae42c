#!/usr/bin/env bash
# Run the cargo-fuzz targets (fuzz/fuzz_targets/*) from the seeded corpora.
#   bash scripts/fuzz.sh                 # each target for 10,000,000 executions
#   bash scripts/fuzz.sh --short         # each target for 10 s (CI, when nightly and
#                                        # cargo-fuzz are installed; skipped otherwise)
#   bash scripts/fuzz.sh TARGET [-- LIBFUZZER_ARGS]
# Needs `cargo install cargo-fuzz` and the nightly toolchain. Builds into
# $FUZZ_TARGET_DIR (default fuzz/target), never the workspace's target directory.
# Findings land in fuzz/artifacts/TARGET/; replay one with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
targets=(lender_decoder channel_decoder import_parser config_loader)
args=(-runs=10000000)
if [[ "${1:-}" == "--short" ]]; then
  args=(-max_total_time=10)
  shift
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz or nightly not installed; skipped (tests/fuzz_replay.rs ran the targets on stable)"
    exit 0
  fi
fi
if [[ $# -gt 0 && "$1" != "--" ]]; then
  targets=("$1")
  shift
fi
[[ "${1:-}" == "--" ]] && shift && args=("$@")
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/target}"
bash seed.sh
for t in "${targets[@]}"; do
  echo "== fuzz $t ${args[*]}"
  cargo +nightly fuzz run -O "$t" -- "${args[@]}" -print_final_stats=1
done
