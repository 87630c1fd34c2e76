// SPDX-License-Identifier: MIT
// CUDA evaluation of Kronecker updates (LoKr, DiffuseKronA; dense and low-rank factors):
// the evaluator of deltaw/backend/cpu/kron.hpp, written once against the primitive layer,
// run with a cuda::context (shared_evaluator.cuh). Apply is two products on reshaped
// activations (one GEMM and one strided batch), never w1 ⊗ w2; merge and materialize add
// rank-1 tiles from the factors made dense at their own sizes.
#pragma once

#include <deltaw/backend/cpu/kron.hpp>

#include "shared_evaluator.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class F1, class F2>
struct evaluator<kron_update<F1, F2>> : shared_evaluator<kron_update<F1, F2>> {
  static_assert(std::is_same_v<typename F1::device_type, device::cuda>,
                "deltaw::cuda::evaluator: this Kronecker update's factors are not CUDA views");
};

}  // namespace cuda
DELTAW_NAMESPACE_END
