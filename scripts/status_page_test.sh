#!/usr/bin/env bash
# The admin port's status page in a real browser: headless Chromium (Debian's `chromium`
# package, installed here when missing) loads /status from a `sluice demo` that the
# Python client has driven, and the rendered DOM must show every channel with its
# health and breaker state, the fund positions, and charts with lines in them. A
# screenshot is kept ($STATUS_PAGE_PNG, default in the temporary directory; set it to
# docs/status-page.png to refresh the README's picture). Loopback only; every wait is
# bounded and the demo is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "status page test: $*" >&2
  exit 1
}

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium package"
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
command -v chromium >/dev/null 2>&1 || fail "chromium is not installed"

cargo build -q --bin sluice
target=${CARGO_TARGET_DIR:-target}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
port=$(free_port)
admin=$(free_port)
dir=$(mktemp -d)
png=${STATUS_PAGE_PNG:-$dir/status-page.png}

"$target/debug/sluice" demo --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
  --dir "$dir" --seconds 180 > "$dir/demo.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir/chrome"' EXIT
for _ in $(seq 1 150); do
  grep -q "channels ready  true" "$dir/demo.log" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || fail "sluice demo exited: $(tail -5 "$dir/demo.log")"
  sleep 0.1
done
grep -q "channels ready  true" "$dir/demo.log" || fail "the demo's channels did not log on in 15 s"

# Traffic for the charts: every message type, $STATUS_PAGE_ROUNDS times (default 2), a
# few seconds apart (the server samples every 2 s).
for _ in $(seq 1 "${STATUS_PAGE_ROUNDS:-2}"); do
  timeout 60 python3 protocol/clients/python/demo.py --port "$port" --key-file "$dir/merchant.keys" \
    > "$dir/client.log" 2>&1 || fail "the Python client failed: $(tail -5 "$dir/client.log")"
  sleep 3
done

# An operator action shows on the page: payouts off on CHB, a top-up on CHA.
ctl() { "$target/debug/sluice" ctl --admin "127.0.0.1:$admin" --token-file "$dir/admin.token" "$@"; }
ctl disable CHB --product payout >/dev/null || fail "sluice ctl disable failed"
ctl topup CHA 2500000 >/dev/null || fail "sluice ctl topup failed"

token=$(cat "$dir/admin.token")
url="http://127.0.0.1:$admin/status?token=$token"
browse() {
  timeout 90 chromium --headless --no-sandbox --disable-gpu --no-first-run \
    --user-data-dir="$dir/chrome" --virtual-time-budget=6000 "$@" 2>>"$dir/chromium.log"
}
browse --dump-dom "$url" > "$dir/dom.html" || fail "chromium --dump-dom failed: $(tail -5 "$dir/chromium.log")"

dom="$dir/dom.html"
for ch in CHA CHB; do
  grep -q "data-channel=\"$ch\"" "$dom" || fail "channel $ch missing from the page ($dom)"
  grep -q "data-fund=\"$ch\"" "$dom" || fail "fund position of $ch missing ($dom)"
done
grep -Eq 'breaker (closed|open|half_open)' "$dom" || fail "no breaker state on the page"
grep -Eq '>UP [0-9]+<|>DOWN<' "$dom" || fail "no link state on the page"
grep -q '>READY<' "$dom" || fail "the page does not say READY: $(grep -o 'id="ready"[^<]*<' "$dom")"
grep -q '¥' "$dom" || fail "no amounts on the page"
grep -q 'operator: payout off' "$dom" || fail "the operator's override of CHB is not shown"
# Charts: every channel has two, each a path with at least two points.
lines=$(grep -o 'data-points="[0-9]*"' "$dom" | tr -dc '0-9\n' | awk '$1 >= 2' | wc -l)
[ "$lines" -ge 4 ] || fail "expected at least 4 charts with lines, found $lines"
grep -q '<path d="M' "$dom" || fail "chart paths are empty"

browse --screenshot="$png" --window-size=1280,900 --hide-scrollbars "$url" >/dev/null \
  || fail "chromium --screenshot failed: $(tail -5 "$dir/chromium.log")"
[ -s "$png" ] || fail "no screenshot written"
[ "$(wc -c < "$png")" -gt 20000 ] || fail "the screenshot is suspiciously small ($png)"
echo "status page ok: 2 channels, $lines charts with lines, fund positions; screenshot $png"
