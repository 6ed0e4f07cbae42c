#!/usr/bin/env bash
# Seed the fuzz corpora from the golden vectors (binary frames).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/lender_decoder
for f in ../protocol/vectors/lender/*.json; do
  python3 -c 'import json,sys; sys.stdout.buffer.write(bytes.fromhex(json.load(open(sys.argv[1]))["frame_hex"]))' "$f" \
    > "corpus/lender_decoder/$(basename "$f" .json)"
done
echo "seeded $(ls corpus/lender_decoder | wc -l) inputs"
