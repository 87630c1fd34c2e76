// SPDX-License-Identifier: MIT
// deltaw configuration: version, the host/device macro and the inline ABI namespace.
#pragma once

#define DELTAW_VERSION_MAJOR 0
#define DELTAW_VERSION_MINOR 1
#define DELTAW_VERSION_PATCH 0
#define DELTAW_VERSION_STRING "0.1.0"

// One macro for functions callable from both host and CUDA device code.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define DELTAW_HOST_DEVICE __host__ __device__
#else
#define DELTAW_HOST_DEVICE
#endif

// Everything lives in deltaw::v0 (inline), so that a future ABI break can move to v1
// while user code keeps spelling deltaw::.
#define DELTAW_NAMESPACE_BEGIN \
  namespace deltaw {           \
  inline namespace v0 {
#define DELTAW_NAMESPACE_END \
  }                          \
  }

#include <cstddef>
#include <cstdint>

DELTAW_NAMESPACE_BEGIN
/// Signed index type for shapes and strides (as Eigen::Index and PyTorch's int64).
using index_t = std::ptrdiff_t;
DELTAW_NAMESPACE_END
