#!/usr/bin/env bash
# cuda-check.sh -- check that paft compiles with `--features cuda`, on a machine with no GPU
# and no CUDA install.
#
# nvcc, the CUDA headers and CCCL (thrust/cub/libcu++) come from NVIDIA's PyPI wheels,
# installed into a throwaway venv. This is `cargo check`, not a build: candle-kernels'
# build script really compiles all its .cu files with nvcc (PTX and libmoe.a), and
# cudarc/candle/paft are type-checked, but nothing is linked (a link needs libcuda, cuBLAS,
# cuRAND and NVRTC, none of which the wheels below ship).
#
# Usage:
#   scripts/cuda-check.sh [CACHE_DIR]
#     CACHE_DIR (or $PAFT_CUDA_CACHE) holds the venv and the cargo target dir and is kept,
#     so a second run takes seconds; without it both go to a temp dir removed at exit.
#
# Environment:
#   CUDA_COMPUTE_CAP    GPU arch the kernels are compiled for (default 80; 80+ also compiles
#                       candle's bf16 WMMA kernels)
#   NVCC_APPEND_FLAGS   default "-Xcicc -O1 -Xptxas -O0": little device-code optimisation,
#                       ~3x faster kernel compiles (-Xcicc -O0 fails on candle's quantized.cu);
#                       set it to "" to compile the kernels as a real build does
#   CUDAFORGE_THREADS   parallel nvcc jobs (default: all cores)
set -euo pipefail
start=$SECONDS
cd "$(dirname "$0")/.."

# CUDA 13.4 exactly: the CUDA 12 nvcc wheels (nvidia-cuda-nvcc-cu12) ship only ptxas, not the
# nvcc driver, and the locked cudarc (0.19.10) knows CUDA <= 13.4 (it panics on 13.5).
# Versions as in the cuda-toolkit==13.4.3 meta-package. ~127 MB of downloads.
WHEELS=(
  nvidia-cuda-nvcc==13.4.92
  nvidia-cuda-crt==13.4.92
  nvidia-nvvm==13.4.92
  nvidia-cuda-runtime==13.4.92
  nvidia-cuda-cccl==13.3.4.3.1
)

cache=${1:-${PAFT_CUDA_CACHE:-}}
if [ -z "$cache" ]; then
  cache=$(mktemp -d "${TMPDIR:-/tmp}/paft-cuda-check.XXXXXX")
  trap 'rm -rf "$cache"' EXIT
fi
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
venv=$cache/venv

# nvcc needs a host C++ compiler.
if ! command -v g++ >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends g++
fi

stamp=$venv/.paft-wheels
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${WHEELS[*]}" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "${WHEELS[@]}"
  echo "${WHEELS[*]}" >"$stamp"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda=$site/nvidia/cu13 # one toolkit tree: bin/nvcc, nvvm/, include/ (+ include/cccl), lib/

export PATH=$cuda/bin:$PATH # cudaforge (candle-kernels) and cudarc both run `nvcc` from PATH
export CUDA_HOME=$cuda CUDA_PATH=$cuda CUDA_ROOT=$cuda
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS--Xcicc -O1 -Xptxas -O0}
export CARGO_TARGET_DIR=$cache/target
nvcc --version | tail -2

status=0
cargo check --locked --features cuda --all-targets || status=$?
echo "cuda-check: $([ $status = 0 ] && echo ok || echo FAILED) in $(( SECONDS - start )) s (CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p'), sm_$CUDA_COMPUTE_CAP)"
exit $status
