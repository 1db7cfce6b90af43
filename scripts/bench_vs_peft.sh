#!/usr/bin/env bash
# fedlora vs PyTorch + PEFT on the same LoRA training step, run back to back, in both precisions:
#   scripts/bench_vs_peft.sh [reference|smollm2] [python]
# f32: fedlora's f32 base against PyTorch in float32. bf16: fedlora's --bf16-base (bf16 products,
# f32 accumulation) against PyTorch with the base model in bfloat16 (PEFT keeps the LoRA factors
# float32). Needs torch, transformers and peft importable by the given python (default python3);
# without them only fedlora's side runs. Prints each line and fedlora's speed as a multiple of PEFT's.
# On CPUs without AVX-512 BF16 the bf16 comparison is skipped: fedlora's bf16 base falls back to a
# portable loop there (see README, "Training speed").
# ROUNDS=N (default 1) alternates the two sides N times per precision and ends with the median of
# the N ratios: a shared virtual machine's speed drifts by tens of percent within minutes, so the
# two sides of a single pair can land in different phases of it.
set -euo pipefail
rounds="${ROUNDS:-1}"
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
  echo "ROUNDS must be a positive integer, not '$rounds'" >&2
  exit 2
fi
preset="${1:-reference}"
python="${2:-python3}"
cd "$(dirname "$0")/.."
cargo build --release --quiet
have_torch=true
if ! "$python" -c "import torch, transformers, peft" 2>/dev/null; then
  echo "torch/transformers/peft not importable by $python: PEFT side skipped"
  have_torch=false
fi
rate() { sed -E 's/^[^:]*: ([0-9.]+) tokens\/s.*/\1/' <<<"$1"; }
precisions=(f32 bf16)
if ! grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then
  echo "this CPU lacks AVX-512 BF16: bf16 comparison skipped"
  precisions=(f32)
fi
for precision in "${precisions[@]}"; do
  flag=()
  [ "$precision" = bf16 ] && flag=(--bf16-base)
  ratios=()
  for ((round = 1; round <= rounds; round++)); do
    ours=$(./target/release/fedlora bench-train --preset "$preset" "${flag[@]}")
    echo "$ours"
    $have_torch || continue
    theirs=$(OMP_WAIT_POLICY=PASSIVE "$python" scripts/bench_peft.py --preset "$preset" --threads 2 \
      --dtype "$precision" 2>/dev/null)
    echo "$theirs"
    ratio=$(awk -v a="$(rate "$ours")" -v b="$(rate "$theirs")" 'BEGIN { printf "%.2f", a / b }')
    echo "fedlora / peft ($precision): ${ratio}x"
    ratios+=("$ratio")
  done
  if [ "${#ratios[@]}" -gt 1 ]; then
    printf '%s\n' "${ratios[@]}" | sort -n | awk -v p="$precision" '
      { r[NR] = $1; all = all sprintf(" %.2fx", $1) }
      END {
        median = NR % 2 ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
        printf "fedlora / peft (%s): median %.2fx over %d rounds (sorted:%s)\n", p, median, NR, all
      }'
  fi
done
