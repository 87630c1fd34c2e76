#!/usr/bin/env bash
# Configures, builds and runs deltaw's CUDA tests (every update type on the device, the cuSOLVER
# linear algebra of linalg.cuh, spectral.cuh and init.cuh, and the
# NCCL communicator where MPI and NCCL exist; with --bench, the CUDA benchmarks: LoRA, the
# structured types and heterogeneous batches against the base GEMM) in
# build/cuda-check. Meant for a machine with a GPU; without one the
# CUDA test reports "Skipped" and the benchmark says why it measured nothing.
#
#   tools/cuda_check.sh [--bench] [--arch "80;90"] [--jobs N]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${root}/build/cuda-check"
bench=0
arch=""
jobs=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bench) bench=1 ;;
    --arch) arch="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    *) echo "usage: $0 [--bench] [--arch \"80;90\"] [--jobs N]" >&2; exit 2 ;;
  esac
  shift
done

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  # Build only for the GPU present unless told otherwise (faster; CI builds 80;90).
  if [[ -z "${arch}" ]]; then
    cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.' || true)"
    [[ -n "${cc}" ]] && arch="${cc}"
  fi
else
  echo "cuda_check: nvidia-smi not found; building anyway (tests will be skipped without a GPU)"
fi
args=(-S "${root}" -B "${build}" -DCMAKE_BUILD_TYPE=Release -DDELTAW_CUDA=ON)
[[ -n "${arch}" ]] && args+=("-DCMAKE_CUDA_ARCHITECTURES=${arch}")
nvcc --version | tail -2
cmake "${args[@]}"

targets=(test_cuda_lora)
[[ ${bench} == 1 ]] && targets+=(bench_cuda_lora bench_cuda_updates)
# The NCCL communicator's test (one rank on this GPU), where MPI and NCCL were found.
if cmake --build "${build}" --target help | grep -q "test_dist_nccl_cuda"; then
  targets+=(test_dist_nccl_cuda)
else
  echo "cuda_check: test_dist_nccl_cuda not configured (needs MPI and NCCL); the NCCL communicator is not run"
fi
cmake --build "${build}" -j "${jobs}" --target "${targets[@]}"

ctest --test-dir "${build}" -L cuda --output-on-failure
# The doctest report itself (counts of cases and assertions), whatever ctest printed.
"${build}/tests/cuda/test_cuda_lora" || { rc=$?; [[ ${rc} == 77 ]] || exit ${rc}; }

if [[ ${bench} == 1 ]]; then
  for b in bench_cuda_lora bench_cuda_updates; do
    rc=0
    "${build}/bench/${b}" --benchmark_counters_tabular=true \
      --benchmark_out="${build}/${b}.json" --benchmark_out_format=json || rc=$?
    if [[ ${rc} == 0 ]]; then echo "JSON: ${build}/${b}.json"; elif [[ ${rc} != 77 ]]; then exit ${rc}; fi
  done
fi
