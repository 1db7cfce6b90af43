#!/usr/bin/env bash
# Builds `fedlora` with the `cuda` feature on a machine with no CUDA toolkit installed, into
# target/cuda-VERSION/release/fedlora. NVIDIA's CUDA 13 compiler (nvcc, NVVM's cicc), headers and
# libraries (cudart, nvrtc, cuRAND, cuBLAS) come from their PyPI wheels, unpacked once into
# FEDLORA_CUDA_TOOLKIT (default ~/.cache/fedlora/cuda-VERSION). The driver's libcuda is linked
# against a stub made from cudarc's declarations; at run time the real one, from the GPU's
# driver, is loaded. No GPU is needed to build; running needs one, its driver, and the libraries
# above on LD_LIBRARY_PATH.
#
#   scripts/build_cuda.sh [CARGO ARGS...]      e.g. --release
#
# FEDLORA_CUDA_VERSION (default 13.0.88) must not be newer than what the GPU's driver runs: its
# PTX is compiled by the driver (driver 580 runs CUDA 13.0), and cudarc 0.19 (candle 0.11's) knows
# CUDA up to 13.4. CUDA_COMPUTE_CAP picks the GPU generation (default 90: H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
version="${FEDLORA_CUDA_VERSION:-13.0.88}"
toolkit="${FEDLORA_CUDA_TOOLKIT:-$HOME/.cache/fedlora/cuda-$version}"
cuda_home="$toolkit/nvidia/cu13"
lib="$cuda_home/lib"
if [ ! -x "$cuda_home/bin/nvcc" ] || [ ! -x "$cuda_home/nvvm/bin/cicc" ]; then
    wheels="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps -d "$wheels" \
        "nvidia-cuda-nvcc==$version" "nvidia-nvvm==$version" "nvidia-cuda-runtime==$version" \
        "nvidia-cuda-crt==$version" "nvidia-cuda-nvrtc==$version" nvidia-cuda-cccl \
        nvidia-curand nvidia-cublas
    mkdir -p "$toolkit"
    for wheel in "$wheels"/*.whl; do
        python3 -m zipfile -e "$wheel" "$toolkit"
    done
    # zipfile drops the executable bits.
    chmod +x "$cuda_home"/bin/* "$cuda_home"/nvvm/bin/*
    rm -rf "$wheels"
fi
# The linker wants unversioned names.
for versioned in "$lib"/libcudart.so.* "$lib"/libnvrtc.so.* "$lib"/libcurand.so.* \
    "$lib"/libcublas.so.* "$lib"/libcublasLt.so.*; do
    ln -sf "$(basename "$versioned")" "${versioned%%.so.*}.so"
done
if [ ! -e "$lib/libcuda.so" ]; then
    cargo fetch --quiet
    cudarc="$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)"
    declarations="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc"/src/driver/sys/mod.rs | head -1)"
    stub="$(mktemp -d)"
    grep -oE '^[[:space:]]+fn cu[A-Z][A-Za-z0-9_]*\(' "$declarations" \
        | sed -E 's/^[[:space:]]+fn (.*)\($/void \1(void) {}/' | sort -u > "$stub/cuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$stub/cuda.c"
    rm -rf "$stub"
fi
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home"
export PATH="$cuda_home/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -1
# One target directory per CUDA version: the kernels' PTX is built once and not rebuilt when nvcc changes.
exec cargo build -p fedlora --features cuda --target-dir "target/cuda-$version" "$@"
