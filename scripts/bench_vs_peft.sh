#!/usr/bin/env bash
# fedlora vs PyTorch + PEFT on the same LoRA training step, run back to back:
#   scripts/bench_vs_peft.sh [reference|smollm2] [python]
# Needs torch, transformers and peft importable by the given python (default python3); without
# them only fedlora's side runs. Prints both lines and fedlora's speed as a multiple of PEFT's.
set -euo pipefail
preset="${1:-reference}"
python="${2:-python3}"
cd "$(dirname "$0")/.."
cargo build --release --quiet
ours=$(./target/release/fedlora bench-train --preset "$preset")
echo "$ours"
if ! "$python" -c "import torch, transformers, peft" 2>/dev/null; then
  echo "torch/transformers/peft not importable by $python: PEFT side skipped"
  exit 0
fi
theirs=$(OMP_WAIT_POLICY=PASSIVE "$python" scripts/bench_peft.py --preset "$preset" --threads 2 2>/dev/null)
echo "$theirs"
rate() { sed -E 's/^[^:]*: ([0-9.]+) tokens\/s.*/\1/' <<<"$1"; }
awk -v a="$(rate "$ours")" -v b="$(rate "$theirs")" 'BEGIN { printf "fedlora / peft: %.2fx\n", a / b }'
