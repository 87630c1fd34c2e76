// SPDX-License-Identifier: MIT
// test_cuda_vjp.cu compiled as C++ for the host-device configuration (docs/cuda.md): the
// VJPs (factor gradients) of every update type through the backward passes written once,
// run with a cuda::context over cuda/host's shim.
#include "test_cuda_vjp.cu"
