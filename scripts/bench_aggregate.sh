#!/usr/bin/env bash
# fedlora's aggregation against numpy on the same shapes, back to back:
#   scripts/bench_aggregate.sh [clients] [python]
# fedlora: `bench-aggregate` (fedavg, updates as bf16 safetensors bytes, f64 sums). numpy: Flower's
# aggregate_inplace and a preallocated in-place loop over float32 arrays already in memory
# (scripts/bench_aggregate_numpy.py; needs numpy importable by the given python, default python3).
# Prints each line and fedlora's speed as a multiple of the faster numpy variant.
set -euo pipefail
clients="${1:-1000}"
python="${2:-python3}"
cd "$(dirname "$0")/.."
cargo build --release --quiet
ours=$(./target/release/fedlora bench-aggregate --clients "$clients")
echo "$ours"
if ! "$python" -c "import numpy" 2>/dev/null; then
  echo "numpy not importable by $python: numpy side skipped"
  exit 0
fi
theirs=$("$python" scripts/bench_aggregate_numpy.py --clients "$clients")
echo "$theirs"
seconds() { sed -E 's/^[^:]*: [^:]*: ([0-9.]+) s,.*/\1/' <<<"$1"; }
best=$(while read -r line; do seconds "$line"; done <<<"$theirs" | sort -g | head -n 1)
awk -v a="$(seconds "$ours")" -v b="$best" \
  'BEGIN { printf "fedlora / numpy (faster variant): %.2fx\n", b / a }'
