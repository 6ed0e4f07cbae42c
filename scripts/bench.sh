#!/usr/bin/env bash
# The benchmark run behind BENCHMARKS.md: one machine, one run, everything in sequence.
#
#   bash scripts/bench.sh            # ~10 minutes after the release build
#   bash scripts/bench.sh --long     # adds the 10-minute memory-flatness run
#   bash scripts/bench.sh --report   # rewrites the BENCHMARKS.md block from the last run's
#                                    # raw results (no run; e.g. after changing this report)
#
# What it does (all on 127.0.0.1; every process it starts is stopped by its PID):
#  1. builds the workspace in release once (CARGO_TARGET_DIR, default target/);
#  2. installs HAProxy from the OS packages when missing;
#  3. `sluice-load prepare`: keys, configs, import CSV, simulator books;
#  4. the same generator, frames and connections against: an echo server directly, the
#     echo server through HAProxy (TCP mode), and sluice with simulated channels
#     (journal policy none and fsync): closed loop (saturation) and open loop at
#     10k, 50k, 100k requests/s;
#  5. stock import rate (`sluice import --check`), agreement memory (`sluice-load mem`);
#  6. criterion: benches/engine.rs;
#  7. a profile of sluice under load: perf (cycles where the VM has counters, cpu-clock
#     samples otherwise — both include the kernel), callgrind when perf cannot record;
#  8. writes the figures and the target ratios between the bench.sh markers of
#     BENCHMARKS.md (the rest of the file is left alone).
# Raw output: $OUT (default target/bench): JSON reports, .hlog, .svg, logs, profile.
set -euo pipefail

LONG=0
REPORT=0
for a in "$@"; do
    case "$a" in
    --long) LONG=1 ;;
    --report) REPORT=1 ;;
    -h | --help)
        sed -n '2,23p' "$0"
        exit 0
        ;;
    *)
        echo "unknown argument $a" >&2
        exit 2
        ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$TARGET/bench}"
DUR="${BENCH_DURATION:-12}"    # seconds per load run (2 s ramp included)
CONNS="${BENCH_CONNECTIONS:-16}"
WINDOW="${BENCH_WINDOW:-64}"
AGREEMENTS="${BENCH_AGREEMENTS:-100000}"
MERCHANTS=8
RATES="10000 50000 100000"
EXPECT_ORDERS=3000000 # per channel, for one switch series (saturation + the three rates)
SLUICE_PORT=7400 ECHO_PORT=7600 PROXY_PORT=7610 SIM_PORT=7501
B="$TARGET/release"
if [ "$REPORT" = 1 ]; then
    [ -f "$OUT/bench.log" ] || { echo "no earlier run in $OUT" >&2; exit 1; }
else
rm -rf "$OUT"
mkdir -p "$OUT"
LOG="$OUT/bench.log"
exec > >(tee "$LOG") 2>&1
fi

PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
# start NAME CMD...: run in the background, remember the PID in $LAST.
start() {
    local name=$1
    shift
    "$@" >"$OUT/$name.log" 2>&1 &
    LAST=$!
    PIDS+=("$LAST")
}
stop() { # stop PID: SIGTERM, wait for it to exit
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
wait_port() {
    for _ in $(seq 1 100); do
        (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}
section() { printf '\n=== %s ===\n' "$*"; }

if [ "$REPORT" = 0 ]; then
section "machine"
echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')"
echo "cpus: $(nproc)  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
rustc --version

section "build (release, once)"
cargo build --release --workspace --bins

section "tools"
if ! command -v haproxy >/dev/null; then
    apt-get update -qq && apt-get install -y -qq haproxy >/dev/null
fi
haproxy -v | head -1
PROFILER=callgrind
if command -v perf >/dev/null && perf stat -e instructions true 2>&1 | grep -q '[0-9] *instructions'; then
    PROFILER=perf
elif ! command -v perf >/dev/null; then
    apt-get install -y -qq linux-perf >/dev/null 2>&1 || true
    if command -v perf >/dev/null && perf stat -e instructions true 2>&1 | grep -q '[0-9] *instructions'; then
        PROFILER=perf
    fi
fi
# Without instruction counters (VMs), perf can still sample the CPU clock, kernel
# included (callgrind sees only user space).
PERF_EVENT=cycles
if [ "$PROFILER" = callgrind ] && command -v perf >/dev/null &&
    perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
    PROFILER=perf
    PERF_EVENT=cpu-clock
fi
echo "profiler: $PROFILER ($PERF_EVENT)"

section "prepare ($AGREEMENTS agreements, $MERCHANTS merchants)"
D="$OUT/prep"
"$B/sluice-load" prepare --dir "$D" --agreements "$AGREEMENTS" --merchants "$MERCHANTS" \
    --listen "127.0.0.1:$SLUICE_PORT" --sim "127.0.0.1:$SIM_PORT"

# load LABEL TARGET ADDR MODE [RATE]
load() {
    local label=$1 target=$2 addr=$3 mode=$4 rate=${5:-0}
    local args=(run --target "$target" --addr "$addr" --dir "$D" --connections "$CONNS"
        --merchants "$MERCHANTS" --duration "$DUR" --ramp 2 --label "$label"
        --out "$OUT/runs/$label" --quiet)
    if [ "$mode" = closed ]; then
        args+=(--mode closed --window "$WINDOW")
    else
        args+=(--mode open --rate "$rate")
    fi
    "$B/sluice-load" "${args[@]}"
}

# series PREFIX TARGET ADDR: saturation then the fixed rates.
series() {
    local prefix=$1 target=$2 addr=$3
    load "$prefix-sat" "$target" "$addr" closed
    for r in $RATES; do
        load "$prefix-$((r / 1000))k" "$target" "$addr" open "$r"
    done
}

section "echo direct"
start echo-server "$B/sluice-load" --threads 1 echo-server --listen "127.0.0.1:$ECHO_PORT"
ECHO_PID=$LAST
wait_port $ECHO_PORT
series echo-direct echo "127.0.0.1:$ECHO_PORT"

section "echo through HAProxy (TCP mode)"
cat >"$OUT/haproxy.cfg" <<EOF
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend lenders
    bind 127.0.0.1:$PROXY_PORT
    default_backend echo
backend echo
    server echo1 127.0.0.1:$ECHO_PORT
EOF
start haproxy haproxy -db -f "$OUT/haproxy.cfg"
HAPROXY_PID=$LAST
wait_port $PROXY_PORT
series echo-haproxy echo "127.0.0.1:$PROXY_PORT"
stop "$HAPROXY_PID"
stop "$ECHO_PID"

# start_switch POLICY: simulators, then sluice with that journal policy ($SIM_PID,
# $SLUICE_PID). Config paths are relative to the config file.
start_switch() {
    local policy=$1
    # Ledgers sized for the whole series: a simulator ledger that doubles mid-run stalls
    # its channel for seconds at millions of orders, which the generator would charge to
    # the switch.
    start "sim-$policy" "$B/sluice-load" --threads 1 sim --dir "$D" --expect-orders "$EXPECT_ORDERS"
    SIM_PID=$LAST
    wait_port $SIM_PORT
    wait_port $((SIM_PORT + 1))
    rm -rf "$D/data-$policy"
    start "sluice-$policy" "$B/sluice" run --config "$D/sluice-$policy.toml"
    SLUICE_PID=$LAST
    wait_port $SLUICE_PORT
    sleep 1
}
stop_switch() {
    stop "$SLUICE_PID"
    stop "$SIM_PID"
}

for policy in none fsync; do
    section "sluice, simulated channels, journal $policy"
    start_switch "$policy"
    if grep -q "not wired" "$OUT/sluice-$policy.log"; then
        echo "NOTE: this build does not write the journal (policy $policy is not in effect)" |
            tee "$OUT/journal-$policy.note"
    fi
    series "sluice-$policy" sluice "127.0.0.1:$SLUICE_PORT"
    grep VmRSS "/proc/$SLUICE_PID/status" | tee "$OUT/rss-$policy.txt"
    stop_switch
done

section "profile of sluice under load ($PROFILER)"
start sim-profile "$B/sluice-load" --threads 1 sim --dir "$D"
SIM_PID=$LAST
wait_port $SIM_PORT
wait_port $((SIM_PORT + 1))
# An empty data directory, as for the load runs: on the series' directory sluice would
# first replay and settle millions of orders, and the profile would show that instead of
# the steady state (it did, up to the eleventh session).
rm -rf "$D/data-none"
if [ "$PROFILER" = perf ]; then
    start sluice-profile "$B/sluice" run --config "$D/sluice-none.toml"
    SLUICE_PID=$LAST
    wait_port $SLUICE_PORT
    sleep 1
    perf record -e "$PERF_EVENT" -o "$OUT/perf.data" -F 499 -g -p "$SLUICE_PID" -- sleep 8 &
    PERF=$!
    load profile-load sluice "127.0.0.1:$SLUICE_PORT" closed || true
    wait "$PERF" || true
    stop "$SLUICE_PID"
    # Flat (call graphs stay in perf.data): by thread, library and symbol, then by library.
    perf report -i "$OUT/perf.data" --stdio --no-children -g none --percent-limit 0.7 \
        --sort comm,dso,sym >"$OUT/profile.txt" 2>/dev/null || true
    perf report -i "$OUT/perf.data" --stdio --no-children -g none --sort dso >"$OUT/profile-dso.txt" 2>/dev/null || true
else
    # Callgrind slows the switch ~50x: a short, low-rate open-loop run of debits.
    start sluice-profile valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
        "$B/sluice" run --config "$D/sluice-none.toml"
    SLUICE_PID=$LAST
    for _ in $(seq 1 300); do
        (echo >/dev/tcp/127.0.0.1/$SLUICE_PORT) 2>/dev/null && break
        sleep 0.1
    done
    sleep 3
    "$B/sluice-load" run --target sluice --addr "127.0.0.1:$SLUICE_PORT" --dir "$D" \
        --connections 4 --merchants 4 --mode open --rate 1000 --ramp 1 --duration 8 \
        --timeout 30 --setup-window 16 --label profile-load --out "$OUT/runs/profile-load" --quiet || true
    stop "$SLUICE_PID"
    callgrind_annotate --inclusive=no "$OUT/callgrind.out" 2>/dev/null | head -70 >"$OUT/profile.txt" || true
    callgrind_annotate --inclusive=yes "$OUT/callgrind.out" 2>/dev/null | head -90 >"$OUT/profile-inclusive.txt" || true
fi
stop "$SIM_PID"
head -40 "$OUT/profile.txt" || true

section "stock import (sluice import --check, 1M cards = 2M rows)"
"$B/sluice-load" prepare --dir "$OUT/prep-import" --agreements 1000000 --merchants "$MERCHANTS" >/dev/null
"$B/sluice" import --check --config "$OUT/prep-import/sluice-none.toml" \
    "$OUT/prep-import/agreements.csv" 2>/dev/null | tail -1 | tee "$OUT/import.txt"
rm -rf "$OUT/prep-import"

section "10M agreements in the engine's store (RSS)"
"$B/sluice-load" mem --agreements 10000000 --merchants "$MERCHANTS" | tee "$OUT/mem.txt"

if [ "$LONG" = 1 ]; then
    section "memory over 10 minutes at half of saturation (journal none)"
    SAT=$(jq -r '.throughput_per_s' "$OUT/runs/sluice-fsync-sat.json")
    HALF=$(python3 -c "print(int($SAT/2))")
    EXPECT_ORDERS=$((HALF * 610))
    # Its own journal directory (the none series' journal would be recovered otherwise).
    sed -e 's/^dir = "data-none"$/dir = "data-long"/' "$D/sluice-none.toml" >"$D/sluice-long.toml"
    grep -q '^dir = "data-long"' "$D/sluice-long.toml"
    start_switch long
    (
        while kill -0 "$SLUICE_PID" 2>/dev/null; do
            echo "$(date +%s) $(awk '/VmRSS/{print $2}' /proc/$SLUICE_PID/status)"
            sleep 10
        done
    ) >"$OUT/long-rss.txt" &
    SAMPLER=$!
    PIDS+=("$SAMPLER")
    "$B/sluice-load" run --target sluice --addr "127.0.0.1:$SLUICE_PORT" --dir "$D" \
        --connections "$CONNS" --merchants "$MERCHANTS" --mode open --rate "$HALF" \
        --ramp 5 --duration 600 --label "long-half-sat" --out "$OUT/runs/long-half-sat" --quiet
    stop_switch
    kill "$SAMPLER" 2>/dev/null || true
fi

section "criterion: benches/engine.rs"
cargo bench --bench engine -- --noplot 2>&1 | grep -E 'time:|thrpt:|^[a-z]' | tee "$OUT/criterion.txt"
fi # REPORT = 0

section "summary"
RES="$ROOT/loadtest/results"
mkdir -p "$RES"
"$B/sluice-load" report --title "latency by percentile, open loop 50k/s" \
    --svg "$RES/latency-50k.svg" "$OUT"/runs/{echo-direct,echo-haproxy,sluice-none,sluice-fsync}-50k.json >/dev/null
"$B/sluice-load" report --title "latency by percentile, closed loop (saturation)" \
    --svg "$RES/latency-saturation.svg" "$OUT"/runs/{echo-direct,echo-haproxy,sluice-none,sluice-fsync}-sat.json >/dev/null
"$B/sluice-load" report "$OUT"/runs/{echo-direct,echo-haproxy,sluice-none,sluice-fsync}-*.json >"$OUT/table.md"
cp "$OUT"/runs/*.json "$RES/" 2>/dev/null || true
OUT="$OUT" TARGET="$TARGET" MD="$ROOT/BENCHMARKS.md" python3 - <<'PY'
import glob, json, os, re
out, target, md = os.environ["OUT"], os.environ["TARGET"], os.environ["MD"]
def rep(name):
    try:
        return json.load(open(f"{out}/runs/{name}.json"))
    except FileNotFoundError:
        return None
def crit(group, bench):
    try:
        e = json.load(open(f"{target}/criterion/{group}/{bench}/new/estimates.json"))
        return e["median"]["point_estimate"]
    except FileNotFoundError:
        return None
def read(name):
    try:
        return open(f"{out}/{name}").read().strip()
    except FileNotFoundError:
        return ""
rows = []
def target_row(what, value, limit, ok, detail):
    verdict = "met" if ok else "**missed**"
    rows.append(f"| {what} | {value} | {limit} | {verdict} | {detail} |")
sat_s, sat_h = rep("sluice-fsync-sat"), rep("echo-haproxy-sat")
if sat_s and sat_h:
    r = sat_s["throughput_per_s"] / sat_h["throughput_per_s"]
    target_row("saturation: sluice debits (fsync) / echo via HAProxy", f"{r:.3f}", ">= 0.25", r >= 0.25,
               f"{sat_s['throughput_per_s']:,.0f}/s vs {sat_h['throughput_per_s']:,.0f}/s" +
               ("" if r >= 0.25 else f"; missed by {(0.25 - r) / 0.25:.0%}"))
n50, h50, f50 = rep("sluice-none-50k"), rep("echo-haproxy-50k"), rep("sluice-fsync-50k")
if n50 and h50:
    for q, lim in (("p50", 1.2), ("p99", 1.5)):
        r = n50["latency_us"][q] / h50["latency_us"][q]
        target_row(f"50k/s open loop, journal none: sluice {q} / HAProxy {q}", f"{r:.2f}", f"<= {lim}", r <= lim,
                   f"{n50['latency_us'][q]:,.0f} µs vs {h50['latency_us'][q]:,.0f} µs" +
                   ("" if r <= lim else f"; missed by {r / lim - 1:.0%}"))
if f50:
    p = f50["latency_us"]["p99"]
    note = " (journal not written by this build)" if read("journal-fsync.note") else ""
    target_row("50k/s open loop, journal fsync: sluice p99", f"{p / 1000:.2f} ms", "<= 3 ms", p <= 3000,
               f"{f50['throughput_per_s']:,.0f}/s answered{note}")
m = re.search(r'"rss_before_bytes": (\d+), "rss_after_bytes": (\d+)', read("mem.txt"))
if m:
    grew = int(m.group(2)) - int(m.group(1))
    target_row("10M agreements resident (engine store, RSS growth)", f"{grew / 2**30:.2f} GiB", "<= 2 GiB",
               grew <= 2 * 2**30, f"{grew / 1e7:.0f} bytes per agreement")
full = crit("agreement_lookup_1M", "dashmap_store_get")
for what, g, b, note in (("agreement lookup (compact store, 1M: `record`, the record's consistent copy)",
                          "agreement_lookup_1M", "store_record",
                          f"with every field decoded (`get`): {full:.0f} ns" if full is not None else ""),
                         ("routing decision (route_debit)", "routing_decision", "route_debit_2_channels", ""),
                         ("routing decision (route_card)", "routing_decision", "route_card_payout_2_channels", "")):
    v = crit(g, b)
    if v is not None:
        target_row(f"{what}, criterion median", f"{v:.0f} ns", "<= 200 ns", v <= 200, note)
mi = re.search(r"\(([\d.]+) rows/s\)", read("import.txt"))
if mi:
    v = float(mi.group(1))
    target_row("stock import (`sluice import --check`, 2M rows)", f"{v:,.0f} rows/s", ">= 1M rows/s", v >= 1e6,
               "parse + hash + group; not inserted into a running switch")
long = read("long-rss.txt")
if long:
    kb = [int(l.split()[1]) for l in long.splitlines() if len(l.split()) == 2]
    if len(kb) > 6:
        base = kb[3]
        lo, hi = min(kb[3:]), max(kb[3:])
        dev = max(hi / base - 1, 1 - lo / base)
        ts = [int(l.split()[0]) for l in long.splitlines() if len(l.split()) == 2]
        lr = rep("long-half-sat")
        per_order = ""
        if lr and ts[-1] > ts[3]:
            grown = (kb[-1] - kb[3]) * 1024
            per_order = f"; {grown / (lr['throughput_per_s'] * (ts[-1] - ts[3])):.0f} B per order accepted"
        # Beside the verdict: how flat it is once the live orders' detail window (60 s by
        # default) has filled a few times over, from the 240 s sample on.
        after = ""
        late = [k for t, k in zip(ts, kb) if t - ts[0] >= 240]
        if len(late) > 1:
            late_dev = max(max(late) / late[0] - 1, 1 - min(late) / late[0])
            after = f"; from 240 s on: {late[0] / 1024:.0f} -> {late[-1] / 1024:.0f} MiB, max deviation {late_dev:.1%}"
        target_row("memory over 10 min at half saturation", f"{kb[3] / 1024:.0f} -> {kb[-1] / 1024:.0f} MiB",
                   "flat ±5 %", dev <= 0.05, f"max deviation {dev:.1%} from the 30 s sample{per_order}{after}")
else:
    rows.append("| memory over 10 min at half saturation | not run | flat ±5 % | — | `scripts/bench.sh --long` |")
def profile():
    # perf: share of samples by library, then the hottest symbols; callgrind: its head.
    lines = lambda n: [l.rstrip() for l in read(n).splitlines() if l.strip() and not l.startswith("#")]
    if read("profile-dso.txt"):
        return "\n".join(lines("profile-dso.txt")[:8] + [""] + lines("profile.txt")[:40])
    return "\n".join(read("profile.txt").splitlines()[:45])
crit_rows = []
# Only what this run measured (target/criterion keeps results of benches since removed).
ran = set(re.findall(r"^([A-Za-z_0-9]+/\S+)", read("criterion.txt"), re.M))
for f in sorted(glob.glob(f"{target}/criterion/**/new/estimates.json", recursive=True)):
    name = f[len(f"{target}/criterion/"):-len("/new/estimates.json")]
    if name in ran and name.split("/")[0] in ("agreement_lookup_1M", "routing_decision", "engine", "settled_1M", "replay_guard"):
        e = json.load(open(f))
        crit_rows.append(f"| {name} | {e['median']['point_estimate']:.1f} ns |")
notes = [read(n) for n in ("journal-none.note", "journal-fsync.note") if read(n)]
machine = "\n".join(l for l in read("bench.log").splitlines()[:6] if l.startswith(("date", "cpus", "load", "rustc")))
gen = ["<!-- bench.sh:begin (generated by scripts/bench.sh; edit outside these markers) -->",
       "## Latest run", "", "```", machine, "```", "",
       "Command: `bash scripts/bench.sh` (raw results: `target/bench/`, JSON reports copied to `loadtest/results/`).", ""]
if notes:
    gen += ["> " + n for n in sorted(set(notes))] + [""]
gen += ["### Targets (ratios from this run)", "", "| target | measured | limit | verdict | detail |", "|---|---|---|---|---|"] + rows
gen += ["", "### Load runs", "", read("table.md"), "",
        "![latency by percentile at 50k/s](loadtest/results/latency-50k.svg)", "",
        "![latency by percentile at saturation](loadtest/results/latency-saturation.svg)", "",
        "### Criterion (benches/engine.rs, median)", "", "| bench | median |", "|---|---|"] + crit_rows
gen += ["", "### Stock import and memory", "", "```", read("import.txt"), read("mem.txt"), "```", "",
        "### Profile", "", "```", profile(), "```",
        "<!-- bench.sh:end -->"]
block = "\n".join(gen) + "\n"
text = open(md).read() if os.path.exists(md) else "# Benchmarks\n\n"
b, e = text.find("<!-- bench.sh:begin"), text.find("<!-- bench.sh:end -->")
if b >= 0 and e > b:
    text = text[:b] + block + text[e + len("<!-- bench.sh:end -->\n"):]
else:
    text = text.rstrip("\n") + "\n\n" + block
open(md, "w").write(text)
print("\n".join(rows))
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "raw results in $OUT; BENCHMARKS.md updated"
