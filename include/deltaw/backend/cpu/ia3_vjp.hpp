// SPDX-License-Identifier: MIT
// VJP of IA³ (ΔW = diag(l − 1)·W or W·diag(l − 1)); one factor, l, whose gradient slot is
// [1, n] or [n, 1] (PEFT's ia3_l is [out, 1] / [1, in]).
//   output:  P = X·Wᵀ,  dl_o = Σ_t dY[t, o]·P[t, o],  dX += (dY·diag(l − 1))·W
//   input:   Q = dY·W,  dl_i = Σ_t Q[t, i]·X[t, i],   dX += Q·diag(l − 1)
// One product with W either way, tokens × out / in scratch; no out × in matrix. Any device
// (the primitives only; dl's sums over tokens are dot_rows into the device slot).
#pragma once

#include <string>

#include "../../expr/ia3.hpp"
#include "ia3.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW, class D>
struct vjp<ia3_update<T, TW, D>> {
  using U = ia3_update<T, TW, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "l"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<ia3>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const auto& g = grads[0];
    const index_t n = u.l().size();
    if (present(g) && (g.size() != n || (g.rows() != 1 && g.cols() != 1)))
      throw shape_error(std::string(op) + ": the gradient of l is " + deltaw::detail::shape_str(g.rows(), g.cols()) +
                        "; expected [1, " + std::to_string(n) + "] or [" + std::to_string(n) + ", 1]");
    const vector_view<C, D> gl = present(g) && n > 0 ? vector_view<C, D>(g.data(), n, g.rows() == 1 ? g.col_stride() : g.row_stride())
                                                     : vector_view<C, D>();
    const auto l1 = ia3_detail::vector_in<C>(ctx, u, 1.0);
    if (u.side() == ia3_side::output) {
      if (present(g) && n > 0) {
        auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
        base_apply<C>(ctx, u.W(), X, P.view());
        dot_rows(ctx, dY.transpose(), P.cview().transpose(), gl, true);
      }
      if (present(dX)) {
        auto Gs = kernels::make_scratch<C>(ctx, dY.rows(), dY.cols());
        copy(ctx, dY, Gs.view());
        scale_cols(ctx, Gs.view(), kernels::as_vector(l1));
        base_apply_transposed<C>(ctx, u.W(), Gs.cview(), dX, C(1));
      }
    } else {
      auto Q = kernels::make_scratch<C>(ctx, dY.rows(), u.cols());
      base_apply_transposed<C>(ctx, u.W(), dY, Q.view());
      if (present(g) && n > 0) dot_rows(ctx, Q.cview().transpose(), X.transpose(), gl, true);
      if (present(dX)) {
        scale_cols(ctx, Q.view(), kernels::as_vector(l1));
        axpy<C>(ctx, C(1), Q.cview(), dX);
      }
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
