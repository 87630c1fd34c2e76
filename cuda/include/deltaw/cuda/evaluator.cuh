// SPDX-License-Identifier: MIT
// The CUDA evaluator protocol. Each update type U specialises cuda::evaluator<U> with:
//
//   template <class C, class TX>
//   static void apply(context&, const U&, device_view<const TX> X, device_view<C> Y, double beta);
//       // Y = β·Y + X·ΔWᵀ, β ∈ {0, 1}; C is float or double
//   template <class TW>
//   static void merge(context&, const U&, device_view<TW> W, double sign);
//       // W ← W + sign·ΔW in place (sign = +1 merge, −1 unmerge)
//
// Everything is issued on the context's stream; scratch comes from its arena.
#pragma once

#include "context.cuh"
#include "gemm.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class U>
struct evaluator {
  static_assert(sizeof(U) == 0,
                "deltaw::cuda::evaluator: this update type has no CUDA evaluator yet "
                "(the CUDA backend evaluates LoRA/rsLoRA, deltaw::low_rank<T, deltaw::device::cuda>)");
};

}  // namespace cuda
DELTAW_NAMESPACE_END
