// SPDX-License-Identifier: MIT
// The CUDA test files as one translation unit: CMake 3.25 has no unity build for CUDA,
// and nvcc's host pass over Eigen and doctest is most of each file's compile time, so
// test_cuda_lora (nvcc) and test_cuda_host (g++, host-device configuration) compile the
// files once together; so helper names must differ across the files (a namespace per file).
#include "test_cuda_lora.cu"
#include "test_cuda_primitives.cu"
#include "test_cuda_kron.cu"
#include "test_cuda_updates.cu"
#include "test_cuda_vjp.cu"
#include "test_cuda_linalg.cu"
#include "test_cuda_serve.cu"
#include "test_cuda_masked.cu"
#include "test_cuda_sums.cu"
#include "test_cuda_pool.cu"
#include "test_cuda_lowrank.cu"
#include "test_cuda_spectral.cu"
#include "test_cuda_structured.cu"
#include "test_cuda_orth.cu"
