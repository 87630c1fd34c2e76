// SPDX-License-Identifier: MIT
// VJP of BOFT, ΔW = diag(s)·W·Rᵀ − W, factors R [m·nb·b, b] (the free parameters) and s [out].
// Forward through the factors m−1 … 0, keeping each factor's gathered input Z_i = U_i·P_i:
//   U_m = X,  H_i = Z_i·BD_i,  U_i = H_i·P_iᵀ,  X·R = U_0.
// With Ys = (X·R)·Wᵀ and Gs = dY·diag(s):
//   ∂L/∂s_o = Σ_t dY(t, o)·Ys(t, o),   V = Gs·W  (= ∂L/∂(X·R))
//   back through factors 0 … m−1:  dH_i = dU_i·P_i,  ∂L/∂R_{i,k} = Z_{i,k}ᵀ·dH_{i,k},
//                                  dU_{i+1} = (dH_i·BD_iᵀ)·P_iᵀ
//   dX (update part) = dU_m − dY·W
// then each ∂L/∂R_{i,k} through the Cayley (or Cayley–Neumann) map on the host, in double
// (oft.hpp's pullback gives ∂L/∂S), and S = (P − Pᵀ)/2 gives ∂L/∂P = (∂L/∂S − ∂L/∂Sᵀ)/2.
#pragma once

#include <string>
#include <vector>

#include "../../expr/boft.hpp"
#include "boft.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW>
struct vjp<boft_update<T, TW, device::cpu>> {
  using D = device::cpu;
  using U = boft_update<T, TW, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "R" : "s"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY,
                       std::span<const mview<C>> grads, const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<boft>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.R(), op, "R");
    if (present(grads[1]) && !(grads[1].rows() == u.rows() && grads[1].cols() == 1) &&
        !(grads[1].rows() == 1 && grads[1].cols() == u.rows()))
      throw shape_error(std::string(op) + ": the gradient of s must be [out, 1] or [1, out] with out = " +
                        std::to_string(u.rows()) + "; got " + deltaw::detail::shape_str(grads[1].rows(), grads[1].cols()));
    using enum kernels::op;
    const index_t m = u.factors(), nb = u.blocks(), b = u.block(), T_ = X.rows(), in = u.cols();
    const auto Bk = boft_detail::blocks_in<C>(ctx, u, false);
    const auto sv = kernels::vector_scratch<C>(ctx, u.s());
    const auto s = kernels::as_vector(sv);
    const bool need_R = present(grads[0]);
    // Forward, keeping Z_i for ∂L/∂R (factor i's gathered input; X·R lands in Xr).
    std::vector<decltype(kernels::make_scratch<C>(ctx, 0, 0))> Z;
    auto Xr = kernels::make_scratch<C>(ctx, T_, in);
    if (need_R) {
      auto cur = kernels::make_scratch<C>(ctx, T_, in);
      copy(ctx, X, cur.view());
      Z.reserve(std::size_t(m));
      for (index_t i = m - 1; i >= 0; --i) {
        auto z = kernels::make_scratch<C>(ctx, T_, in);
        const auto& p = u.permutation(i);
        if (!p.empty() && T_ > 0) boft_detail::gather_cols<C>(ctx, cur.cview(), u.inverse_permutation(i), z.view());
        else copy(ctx, cur.cview(), z.view());
        auto h = kernels::make_scratch<C>(ctx, T_, in);
        for (index_t k = 0; k < nb && T_ > 0; ++k)
          gemm<C>(ctx, C(1), z.cview().middle_cols(k * b, b), none, Bk.cview().middle_rows((i * nb + k) * b, b), none, C(0),
                  h.view().middle_cols(k * b, b));
        if (!p.empty() && T_ > 0) boft_detail::gather_cols<C>(ctx, h.cview(), p, cur.view());
        else copy(ctx, h.cview(), cur.view());
        Z.push_back(std::move(z));  // Z[m − 1 − i] is factor i's
      }
      copy(ctx, cur.cview(), Xr.view());
    } else {
      boft_detail::butterfly<C>(ctx, u, Bk, X, Xr.view(), true, none);
    }
    if (present(grads[1])) {
      auto Ys = kernels::make_scratch<C>(ctx, T_, u.rows());
      base_apply<C>(ctx, u.W(), Xr.cview(), Ys.view());
      const auto& g = grads[1];
      for (index_t o = 0; o < u.rows(); ++o) {
        C acc = C(0);
        for (index_t t = 0; t < T_; ++t) acc += dY(t, o) * Ys.cview()(t, o);
        if (g.cols() == 1) g(o, 0) += acc;
        else g(0, o) += acc;
      }
    }
    if ((!need_R || T_ == 0) && !present(dX)) return;
    auto Gs = kernels::make_scratch<C>(ctx, T_, u.rows());
    copy(ctx, dY, Gs.view());
    scale_cols(ctx, Gs.view(), s);
    auto V = kernels::make_scratch<C>(ctx, T_, in);
    base_apply_transposed<C>(ctx, u.W(), Gs.cview(), V.view());
    if (!need_R || T_ == 0) {
      // dX = V·Rᵀ − dY·W.
      auto O = kernels::make_scratch<C>(ctx, T_, in);
      boft_detail::butterfly<C>(ctx, u, Bk, V.cview(), O.view(), false, trans);
      axpy<C>(ctx, C(1), O.cview(), dX);
      base_apply_transposed<C>(ctx, u.W(), dY, O.view());
      axpy<C>(ctx, C(-1), O.cview(), dX);
      return;
    }
    // Backward through factors 0 … m−1 (V holds dU_i).
    auto dH = kernels::make_scratch<C>(ctx, T_, in);
    auto dZ = kernels::make_scratch<C>(ctx, T_, in);
    auto Gk = kernels::make_scratch<C>(ctx, b, b);
    const auto& g = grads[0];
    for (index_t i = 0; i < m; ++i) {
      const auto& p = u.permutation(i);
      if (!p.empty() && T_ > 0) boft_detail::gather_cols<C>(ctx, V.cview(), u.inverse_permutation(i), dH.view());
      else copy(ctx, V.cview(), dH.view());
      for (index_t k = 0; k < nb; ++k) {
        gemm<C>(ctx, C(1), Z[std::size_t(m - 1 - i)].cview().middle_cols(k * b, b), trans, dH.cview().middle_cols(k * b, b), none,
                C(0), Gk.view());
        dense<double> Gbar(b, b);
        for (index_t r = 0; r < b; ++r)
          for (index_t c = 0; c < b; ++c) Gbar(r, c) = double(Gk.cview()(r, c));
        const index_t blk = i * nb + k;
        const dense<double> S = boft_detail::skew(u.R(), blk, b);
        const Eigen::Map<const dense<double>> Rb(u.rotation(i, k), b, b);
        const dense<double> dS = oft_detail::pullback(S, dense<double>(Rb), Gbar, u.options());
        for (index_t r = 0; r < b; ++r)
          for (index_t c = 0; c < b; ++c) g(blk * b + r, c) += C(0.5 * (dS(r, c) - dS(c, r)));
        if (T_ > 0)
          gemm<C>(ctx, C(1), dH.cview().middle_cols(k * b, b), none, Bk.cview().middle_rows(blk * b, b), trans, C(0),
                  dZ.view().middle_cols(k * b, b));
      }
      if (!p.empty() && T_ > 0) boft_detail::gather_cols<C>(ctx, dZ.cview(), p, V.view());
      else copy(ctx, dZ.cview(), V.view());
    }
    if (present(dX)) {
      axpy<C>(ctx, C(1), V.cview(), dX);
      base_apply_transposed<C>(ctx, u.W(), dY, dH.view());
      axpy<C>(ctx, C(-1), dH.cview(), dX);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
