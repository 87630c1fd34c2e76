// SPDX-License-Identifier: MIT
// The CUDA test files (test_cuda_all.cu) compiled as C++ for the host-device configuration
// (docs/cuda.md): the device code runs on the CPU through cuda/host's shim and Thrust's
// OpenMP system.
#include "test_cuda_all.cu"
