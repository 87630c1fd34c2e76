// SPDX-License-Identifier: MIT
// VJP of HiRA (ΔW = W ⊙ (B·A)); two factors, B [out, r] and A [r, in]. With the (never whole)
// gradient of ΔW, G_Δ = dYᵀ·X, and H = W ⊙ G_Δ:
//   ∂B = H·Aᵀ,   ∂A = Bᵀ·H,   dX += dY·(W ⊙ B·A)
// computed panel_rows rows of W at a time: per panel, dY[:, rows]ᵀ·X, its product with
// W[rows], and B[rows]·A — scratch three panels (panel_rows × in), never out × in.
#pragma once

#include <algorithm>
#include <string>

#include "../../expr/hira.hpp"
#include "hira.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW, class D>
struct vjp<hira_update<T, TW, D>> {
  using U = hira_update<T, TW, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "B" : "A"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<hira>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[1], u.A(), op, "A");
    using enum kernels::op;
    const bool gB = present(grads[0]), gA = present(grads[1]), gX = present(dX);
    if (!gB && !gA && !gX) return;
    const kernels::operand<C, D> A(ctx, u.A());
    const index_t rows = std::min(panel_rows, u.rows());
    auto Wp = kernels::make_scratch<C>(ctx, rows, u.cols()), M = kernels::make_scratch<C>(ctx, rows, u.cols());
    for (index_t r0 = 0; r0 < u.rows(); r0 += panel_rows) {
      const index_t n = std::min(panel_rows, u.rows() - r0);
      const auto Wv = Wp.view().middle_rows(0, n), Mv = M.view().middle_rows(0, n);
      const kernels::operand<C, D> B(ctx, u.B().middle_rows(r0, n));
      const auto dYp = dY.middle_cols(r0, n);
      copy(ctx, u.W().middle_rows(r0, n), Wv);
      if (gX) {  // dX += dY[:, rows]·(W[rows] ⊙ B[rows]·A)
        gemm<C>(ctx, C(1), B.view(), none, A.view(), none, C(0), Mv);
        transform(ctx, cview<C, D>(Wv), Mv, hira_detail::times{});
        gemm<C>(ctx, C(1), dYp, none, cview<C, D>(Mv), none, C(1), dX);
      }
      if (!gB && !gA) continue;
      // H = W[rows] ⊙ (dY[:, rows]ᵀ·X)
      gemm<C>(ctx, C(1), dYp, trans, X, none, C(0), Mv);
      transform(ctx, cview<C, D>(Wv), Mv, hira_detail::times{});
      if (gB) gemm<C>(ctx, C(1), cview<C, D>(Mv), none, A.view(), trans, C(1), grads[0].middle_rows(r0, n));
      if (gA) gemm<C>(ctx, C(1), B.view(), trans, cview<C, D>(Mv), none, C(1), grads[1]);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
