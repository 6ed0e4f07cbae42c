#!/usr/bin/env bash
# The dependency-free Python client (written from protocol/SPEC.md alone) against a real
# `sluice demo`: its vector tests, then every message type end to end. Loopback only;
# the demo stops by itself and is also killed by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m unittest discover -s protocol/clients/python -q
cargo build -q --bin sluice
# README's set-up command is `cargo run --release -- demo`: plain `cargo run` must pick
# the switch among the package's binaries (it once stopped at "could not determine which
# binary to run" after sluice-vopr was added).
cargo run -q -- demo --help >/dev/null
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
# Stock import through the admin port (the import path logs too): good and bad lines,
# with clear card and ID numbers in the body.
admin=$(sed -n 's/^  admin port *\([0-9.:]*\).*/\1/p' "$dir/demo.log")
[ -n "$admin" ] || { echo "the demo printed no admin port" >&2; exit 1; }
printf '%s\n' \
  "merchant,user_id,card_no,id_no,bank_code,card_type,channel,channel_agreement_no" \
  "898100000000001,U9,6222021234091234,110105194912311234,ICBC,debit,CHA,AG9" \
  "898100000000001,U9,6222021234091235,110105194912311234,ICBC,debit,CHA,AG9" > "$dir/import.csv"
python3 - "$admin" "$dir/admin.token" "$dir/import.csv" <<'PY'
import sys, urllib.request, urllib.error
addr, token, csv = sys.argv[1], open(sys.argv[2]).read().strip(), open(sys.argv[3], "rb").read()
req = urllib.request.Request(f"http://{addr}/agreements/import", data=csv, method="POST",
                             headers={"Authorization": f"Bearer {token}"})
try:
    body = urllib.request.urlopen(req, timeout=30).read().decode()
except urllib.error.HTTPError as e:
    body = e.read().decode()
assert "1 agreements imported, 1 bad lines" in body, body
assert "6222021234091235" not in body, body
print("admin import:", body.splitlines()[0])
PY
# The offline import command, at debug level too.
RUST_LOG=debug "$target/debug/sluice" import --check "$dir/import.csv" >> "$dir/demo.log" 2>&1 || true

# Privacy: no clear card, ID or phone number and no clear name may reach the log, at
# debug level, after every flow above (sign, bind confirm, debit, payout, sign-and-pay,
# queries, cancel, notifications, imports). Masked forms (6222********1234,
# 1101**********1234, 138****5678, 王**) are what belongs there.
log="$dir/demo.log"
grep -c . "$log" >/dev/null || { echo "the demo wrote no log" >&2; exit 1; }
leaks=$(grep -nE '6222[0-9]{8,15}|[0-9]{17}[0-9X]|(^|[^0-9])1[3-9][0-9]{9}([^0-9]|$)|王小明|小明' "$log" || true)
if [ -n "$leaks" ]; then
  echo "clear borrower data reached the demo's log:" >&2
  echo "$leaks" | head -5 >&2
  exit 1
fi
# ... and the requests were logged, masked (so the check above looked at real data).
grep -qE 'CardNo\(6222\*+[0-9]{4}\)' "$log" || { echo "no masked card number in the debug log: were requests logged?" >&2; exit 1; }
grep -qE 'IdNo\(1101\*+[0-9X]{4}\)' "$log" || { echo "no masked ID number in the debug log" >&2; exit 1; }
grep -qE 'Phone\(1[3-9][0-9]\*{4}[0-9]{4}\)' "$log" || { echo "no masked phone number in the debug log" >&2; exit 1; }
grep -q 'Name(王\*\*)' "$log" || { echo "no masked name in the debug log" >&2; exit 1; }
echo "no clear card, ID, phone number or name in $(wc -l < "$log") log lines (debug level)"
