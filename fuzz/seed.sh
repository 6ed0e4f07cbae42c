#!/usr/bin/env bash
# Seed the fuzz corpora: binary frames from the golden vectors (lender and channel), the
# example configuration, and a few import CSV files (good and bad lines) from fuzz/seeds/.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/lender_decoder corpus/channel_decoder corpus/import_parser corpus/config_loader
for f in ../protocol/vectors/lender/*.json; do
  python3 -c 'import json,sys; sys.stdout.buffer.write(bytes.fromhex(json.load(open(sys.argv[1]))["frame_hex"]))' "$f" \
    > "corpus/lender_decoder/$(basename "$f" .json)"
done
# Channel vectors are text: every `frame:`, `logon_req:` or `logon_rsp:` line is one frame.
for f in ../protocol/vectors/channel/*.txt; do
  python3 - "$f" "corpus/channel_decoder/$(basename "$f" .txt)" <<'PY'
import sys
frames = [l.split(":", 1)[1].strip() for l in open(sys.argv[1])
          if l.split(":", 1)[0] in ("frame", "logon_req", "logon_rsp")]
if frames:
    open(sys.argv[2], "wb").write(b"".join(bytes.fromhex(h) for h in frames))
PY
done
cp ../config/sluice.example.toml corpus/config_loader/example.toml
cp seeds/import_parser/*.csv corpus/import_parser/
for t in lender_decoder channel_decoder import_parser config_loader; do
  echo "$t: corpus of $(ls corpus/$t | wc -l) inputs"
done
