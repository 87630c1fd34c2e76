// SPDX-License-Identifier: MIT
// test_cuda_primitives.cu compiled as C++ for the host-device configuration (docs/cuda.md).
#include "test_cuda_primitives.cu"
