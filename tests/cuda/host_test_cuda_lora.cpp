// SPDX-License-Identifier: MIT
// test_cuda_lora.cu compiled as C++ for the host-device configuration (docs/cuda.md): the
// CUDA backend's headers over cuda/host's runtime/cuBLAS shim and Thrust's OpenMP system.
#include "test_cuda_lora.cu"
