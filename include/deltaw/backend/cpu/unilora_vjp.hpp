// SPDX-License-Identifier: MIT
// VJP of UniLoRA (ΔW = B·A, A = θ[idx_A] ⊙ σ_A, B = θ[idx_B] ⊙ σ_B); one factor, θ [d]
// (its gradient slot holds d values: [d, 1] or [1, d]). With H = X·Aᵀ and dH = dY·B:
//   ∂B = dYᵀ·H [out, r],   ∂A = dHᵀ·X [r, in],   dX += dH·A
//   ∂θ[idx_A[i, j]] += ∂A[i, j]·σ_A[i, j],   ∂θ[idx_B[o, i]] += ∂B[o, i]·σ_B[o, i]
// (the scatter-add through the gather). Scratch r·(in + out) twice and tokens × r.
#pragma once

#include <string>

#include "../../expr/unilora.hpp"
#include "unilora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<unilora_update<T, device::cpu>> {
  using D = device::cpu;
  using U = unilora_update<T, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "theta"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY,
                       std::span<const mview<C>> grads, const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<unilora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const auto& g = grads[0];
    const auto& p = *u.pattern();
    if (present(g) && !((g.rows() == p.d && g.cols() == 1) || (g.rows() == 1 && g.cols() == p.d)))
      throw shape_error(std::string(op) + ": the gradient of theta is " + deltaw::detail::shape_str(g.rows(), g.cols()) +
                        "; expected [" + std::to_string(p.d) + ", 1] or [1, " + std::to_string(p.d) + "]");
    using enum kernels::op;
    const index_t r = u.rank(), T_ = X.rows();
    if (T_ == 0 || (!present(g) && !present(dX))) return;
    const auto A = unilora_detail::gather<C>(ctx, u, 0), B = unilora_detail::gather<C>(ctx, u, 1);
    auto dH = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), dY, none, B.cview(), none, C(0), dH.view());
    if (present(dX)) gemm<C>(ctx, C(1), dH.cview(), none, A.cview(), none, C(1), dX);
    if (!present(g)) return;
    const auto at = [&](index_t i) -> C& { return g.cols() == 1 ? g(i, 0) : g(0, i); };
    auto dA = kernels::make_scratch<C>(ctx, r, u.cols());
    gemm<C>(ctx, C(1), dH.cview(), trans, X, none, C(0), dA.view());
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < u.cols(); ++j) {
        const std::size_t k = std::size_t(i * u.cols() + j);
        at(p.idx_A[k]) += dA.cview()(i, j) * C(p.scale_A[k]);
      }
    auto H = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), X, none, A.cview(), trans, C(0), H.view());
    auto dB = kernels::make_scratch<C>(ctx, u.rows(), r);
    gemm<C>(ctx, C(1), dY, trans, H.cview(), none, C(0), dB.view());
    for (index_t o = 0; o < u.rows(); ++o)
      for (index_t i = 0; i < r; ++i) {
        const std::size_t k = std::size_t(o * r + i);
        at(p.idx_B[k]) += dB.cview()(o, i) * C(p.scale_B[k]);
      }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
