#!/usr/bin/env bash
# Fuzz the coordinator's update validator with libFuzzer (cargo-fuzz) for SECONDS (default 300).
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly-only flags (-Zsanitizer=address,
# sancov passes) to rustc, so a nightly toolchain is used when rustup has one. Otherwise the
# stable toolchain runs with RUSTC_BOOTSTRAP=1, which makes rustc accept them (the
# AddressSanitizer runtime ships with stable's rust-std); it applies to every crate built,
# whose build scripts may then take the compiler for a nightly. A crash leaves its input under
# fuzz/artifacts/update_validator/ and makes this script exit non-zero. New inputs found go to
# fuzz/corpus/update_validator/ (not committed); the committed seeds are fuzz/seeds/.
set -euo pipefail
seconds="${1:-300}"
cd "$(dirname "$0")/../fuzz"
mkdir -p corpus/update_validator
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    toolchain=()
    export RUSTC_BOOTSTRAP=1
fi
exec cargo ${toolchain[@]+"${toolchain[@]}"} fuzz run update_validator corpus/update_validator seeds/update_validator -- \
    -max_total_time="$seconds" -print_final_stats=1
