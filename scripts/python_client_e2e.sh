#!/usr/bin/env bash
# The dependency-free Python client (written from protocol/SPEC.md alone) against a real
# `sluice demo`: its vector tests, then every message type end to end. Loopback only;
# the demo stops by itself and is also killed by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m unittest discover -s protocol/clients/python -q
cargo build -q --bin sluice
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
dir=$(mktemp -d)
target=${CARGO_TARGET_DIR:-target}
RUST_LOG=debug "$target/debug/sluice" demo --listen "127.0.0.1:$port" --admin 127.0.0.1:0 --dir "$dir" --seconds 120 > "$dir/demo.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  grep -q "channels ready  true" "$dir/demo.log" 2>/dev/null && break
  sleep 0.1
done
timeout 60 python3 protocol/clients/python/demo.py --port "$port" --key-file "$dir/merchant.keys"
# Privacy: no clear card or ID number may reach the log, even at debug level.
if grep -E '62220(29[89])[0-9]{11}|11010519491231002X' "$dir/demo.log" >/dev/null; then
  echo "a clear card or ID number reached the demo's log" >&2
  exit 1
fi
echo "no clear card or ID number in $(wc -l < "$dir/demo.log") log lines"
