// SPDX-License-Identifier: MIT
// test_cuda_updates.cu compiled as C++ for the host-device configuration (docs/cuda.md):
// every other update type through the evaluators written once, run with a cuda::context
// over cuda/host's shim.
#include "test_cuda_updates.cu"
