// SPDX-License-Identifier: MIT
// Element-wise work on the device through Thrust: for_each_index(ctx, n, f, what) calls
// f(k) for k in [0, n) on ctx's stream. f is a functor whose operator() is
// DELTAW_HOST_DEVICE (__host__ __device__ under nvcc), so the same functor runs in a CUDA
// kernel that Thrust generates and, in the host-device configuration (DELTAW_CUDA_HOST,
// docs/cuda.md), on the CPU through Thrust's OpenMP or C++ device system.
#pragma once

#include <thrust/execution_policy.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/system_error.h>

#include <string>

#include <deltaw/core/view.hpp>

#include "context.cuh"
#include "error.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda::detail {

/// The Thrust execution policy of ctx: its stream, without a synchronisation at the end
/// (GPU); Thrust's device system, which is the CPU in the host-device configuration.
inline auto execution_policy([[maybe_unused]] const context& ctx) {
#if defined(DELTAW_CUDA_HOST)
  return thrust::device;
#else
  return thrust::cuda::par_nosync.on(ctx.stream());
#endif
}

/// f(k) for k = 0 … n − 1, in no particular order, on ctx's stream. A failed launch
/// throws cuda_error naming `what`.
template <class F>
void for_each_index(const context& ctx, index_t n, const F& f, const char* what) {
  if (n <= 0) return;
  try {
    thrust::for_each_n(execution_policy(ctx), thrust::counting_iterator<index_t>(0), n, f);
  } catch (const thrust::system_error& e) {
    throw cuda_error(std::string("deltaw::cuda: ") + what + " failed: " + e.what(), e.code().value());
  }
}

}  // namespace cuda::detail
DELTAW_NAMESPACE_END
