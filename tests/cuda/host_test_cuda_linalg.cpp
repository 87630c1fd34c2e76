// SPDX-License-Identifier: MIT
// test_cuda_linalg.cu compiled as C++ for the host-device configuration (docs/cuda.md):
// randomized SVD, factored SVD, PiSSA/OLoRA and intruder dimensions of device-resident data,
// run with a cuda::context over cuda/host's cuBLAS and cuSOLVER shim.
#include "test_cuda_linalg.cu"
