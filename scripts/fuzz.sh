#!/usr/bin/env bash
# Fuzz the coordinator's update validator with libFuzzer (cargo-fuzz) for SECONDS (default 300).
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly-only flags (-Zsanitizer=address,
# sancov passes) to rustc; on a stable toolchain RUSTC_BOOTSTRAP=1 lets rustc accept them (the
# AddressSanitizer runtime ships with stable's rust-std). A crash leaves its input under
# fuzz/artifacts/update_validator/ and makes this script exit non-zero. New inputs found go to
# fuzz/corpus/update_validator/ (not committed); the committed seeds are fuzz/seeds/.
set -euo pipefail
seconds="${1:-300}"
cd "$(dirname "$0")/../fuzz"
mkdir -p corpus/update_validator
export RUSTC_BOOTSTRAP=1
exec cargo fuzz run update_validator corpus/update_validator seeds/update_validator -- \
    -max_total_time="$seconds" -print_final_stats=1
