// SPDX-License-Identifier: MIT
// VJP of GraLoRA (expr/gralora.hpp); four factors: A [in, r] (gralora_A), B [k·r, out/k]
// (gralora_B), A_h [hr, in] and B_h [out, hr] (the hybrid LoRA; empty slots when hr = 0).
// With Z[:, n·r …] = X_n·A_n, U_j its gather for output block j (as in apply) and
// V[:, j·r …] = s·dY_j·B_jᵀ, W_n its gather for input block n (as in apply_transposed):
//   ∂B_j += s·U_jᵀ·dY_j,   ∂A_n += X_nᵀ·W_n,   dX_n += W_n·A_nᵀ
//   hybrid (H = X·A_hᵀ):   ∂B_h += s·dYᵀ·H,   ∂A_h += s·(dY·B_h)ᵀ·X,   dX += s·(dY·B_h)·A_h
// Scratch tokens × (k·r + r + hr); no out × in matrix.
#pragma once

#include "../../expr/gralora.hpp"
#include "gralora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<gralora_update<T, D>> {
  using U = gralora_update<T, D>;
  static constexpr int factor_count = 4;
  static const char* factor_name(int i) {
    return i == 0 ? "A" : i == 1 ? "B" : i == 2 ? "hybrid_A" : "hybrid_B";
  }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<gralora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.A(), op, "A");
    detail::check_grad_shape(grads[1], u.B(), op, "B");
    detail::check_grad_shape(grads[2], u.hybrid_A(), op, "hybrid_A");
    detail::check_grad_shape(grads[3], u.hybrid_B(), op, "hybrid_B");
    using enum kernels::op;
    const index_t k = u.k(), r = u.rank(), q = u.block_rank(), ib = u.cols() / k, ob = u.rows() / k, T_ = X.rows();
    if (T_ == 0) return;
    const C s = C(u.scale());
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
    if (present(grads[1])) {  // ∂B_j = s·U_jᵀ·dY_j
      auto Z = kernels::make_scratch<C>(ctx, T_, k * r);
      for (index_t n = 0; n < k; ++n)
        gemm<C>(ctx, C(1), X.middle_cols(n * ib, ib), none, A.view().middle_rows(n * ib, ib), none, C(0),
                Z.view().middle_cols(n * r, r));
      auto Uj = kernels::make_scratch<C>(ctx, T_, r);
      for (index_t j = 0; j < k; ++j) {
        gralora_detail::gather_blocks<C>(ctx, Z.cview(), k, r, j * q, q, Uj.view());
        gemm<C>(ctx, s, Uj.cview(), trans, dY.middle_cols(j * ob, ob), none, C(1), grads[1].middle_rows(j * r, r));
      }
    }
    if (present(grads[0]) || present(dX)) {
      auto V = kernels::make_scratch<C>(ctx, T_, k * r);
      for (index_t j = 0; j < k; ++j)
        gemm<C>(ctx, s, dY.middle_cols(j * ob, ob), none, B.view().middle_rows(j * r, r), trans, C(0),
                V.view().middle_cols(j * r, r));
      auto Wn = kernels::make_scratch<C>(ctx, T_, r);
      for (index_t n = 0; n < k; ++n) {
        gralora_detail::gather_blocks<C>(ctx, V.cview(), k, r, n * q, q, Wn.view());
        if (present(grads[0]))
          gemm<C>(ctx, C(1), X.middle_cols(n * ib, ib), trans, Wn.cview(), none, C(1), grads[0].middle_rows(n * ib, ib));
        if (present(dX))
          gemm<C>(ctx, C(1), Wn.cview(), none, A.view().middle_rows(n * ib, ib), trans, C(1), dX.middle_cols(n * ib, ib));
      }
    }
    if (u.hybrid_rank() == 0) return;
    const index_t hr = u.hybrid_rank();
    const kernels::operand<C, D> Ah(ctx, u.hybrid_A()), Bh(ctx, u.hybrid_B());
    if (present(grads[3])) {
      auto H = kernels::make_scratch<C>(ctx, T_, hr);
      gemm<C>(ctx, C(1), X, none, Ah.view(), trans, C(0), H.view());
      gemm<C>(ctx, s, dY, trans, H.cview(), none, C(1), grads[3]);
    }
    if (present(grads[2]) || present(dX)) {
      auto dH = kernels::make_scratch<C>(ctx, T_, hr);
      gemm<C>(ctx, s, dY, none, Bh.view(), none, C(0), dH.view());
      if (present(grads[2])) gemm<C>(ctx, C(1), dH.cview(), trans, X, none, C(1), grads[2]);
      if (present(dX)) gemm<C>(ctx, C(1), dH.cview(), none, Ah.view(), none, C(1), dX);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
