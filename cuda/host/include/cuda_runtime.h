// SPDX-License-Identifier: MIT
// deltaw's host-device configuration: a host implementation ("shim") of the CUDA runtime
// entry points that deltaw's CUDA backend calls, so that the backend compiles with a plain
// C++ compiler and runs on the CPU (see docs/cuda.md, "The host-device configuration").
//
// This directory (cuda/host/include) is on the include path of the CMake target
// deltaw_cuda_host only, never of deltaw::cuda and never installed: in that configuration
// `#include <cuda_runtime.h>` finds this file instead of the CUDA toolkit's. Only the
// names deltaw uses are declared; enumerator values are those of the CUDA runtime, so a
// status code reads the same in both configurations.
//
// "Device" memory is host memory from cudaMalloc, registered so that copies, memsets and
// cuBLAS calls can check that their device operands lie inside a live allocation (a GPU
// would fault later; the shim fails the call at once). New allocations are filled with
// 0xFF bytes, a NaN in every floating-point format, so that reading memory nobody wrote
// shows in results. Every call completes before it returns: streams and events only keep
// the bookkeeping (handles, flags, timestamps) that their API promises.
#pragma once

#if defined(__CUDACC__)
#error "cuda/host/include holds deltaw's host shim of the CUDA runtime; it must not be on nvcc's include path"
#endif

#include "cuda_runtime_api.h"

// Execution-space specifiers mean nothing on the host.
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

/// The runtime's typed convenience overload, as in cuda_runtime.h.
template <class T>
inline cudaError_t cudaMalloc(T** devPtr, std::size_t size) {
  return ::cudaMalloc(reinterpret_cast<void**>(devPtr), size);
}

namespace deltaw_cuda_host {
/// True when [p, p + bytes) lies inside one live cudaMalloc allocation (bytes = 0: any p).
/// The shim's own check, exported for tests.
bool is_device_range(const void* p, std::size_t bytes) noexcept;
/// Bytes held by live cudaMalloc allocations (for tests of leaks).
std::size_t device_bytes_in_use() noexcept;
}  // namespace deltaw_cuda_host
