// SPDX-License-Identifier: MIT
// test_cuda_kron.cu compiled as C++ for the host-device configuration (docs/cuda.md): the
// Kronecker evaluator written once, run with a cuda::context over cuda/host's shim.
#include "test_cuda_kron.cu"
