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
// Any device: ∂L/∂s is a dot_rows of columns; each factor's nb products Z_{i,k}ᵀ·dH_{i,k}
// are one strided batch read on the host at once (nb·b² values, one download per factor),
// the parameters are downloaded once, and ∂L/∂P is added through one upload and an axpy.
#pragma once

#include <string>
#include <vector>

#include "../../expr/boft.hpp"
#include "boft.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW, class D>
struct vjp<boft_update<T, TW, D>> {
  using U = boft_update<T, TW, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "R" : "s"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
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
        if (T_ > 0) boft_detail::block_products<C>(ctx, u, Bk, i, z.cview(), none, h.view());
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
      // g[o] += Σ_t dY(t, o)·Ys(t, o): inner products of the columns.
      const auto& g = grads[1];
      const vector_view<C, D> gv(g.data(), u.rows(), g.cols() == 1 ? g.row_stride() : g.col_stride());
      dot_rows(ctx, dY.transpose(), Ys.cview().transpose(), gv, true);
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
    auto Gk = kernels::make_scratch<C>(ctx, nb * b, b);
    // The parameters on the host (for S) and ∂L/∂P accumulated there, row-major like P.
    const std::vector<double> Ph = oft_detail::to_host_matrix(ctx, u.R());
    const matrix_view<const double> Pv(Ph.data(), u.R().rows(), b, b, 1);
    std::vector<C> dP(std::size_t(u.R().rows() * b), C(0));
    for (index_t i = 0; i < m; ++i) {
      const auto& p = u.permutation(i);
      if (!p.empty() && T_ > 0) boft_detail::gather_cols<C>(ctx, V.cview(), u.inverse_permutation(i), dH.view());
      else copy(ctx, V.cview(), dH.view());
      // Ḡ_{i,k} = Z_{i,k}ᵀ·dH_{i,k} for every block k: one strided batch, read on the host.
      const auto& Zi = Z[std::size_t(m - 1 - i)];
      gemm_strided_batched<C>(ctx, C(1), Zi.cview().middle_cols(0, b), b * Zi.cview().col_stride(), trans,
                              dH.cview().middle_cols(0, b), b * dH.cview().col_stride(), none, C(0),
                              Gk.view().middle_rows(0, b), b * b, nb);
      const std::vector<double> gk = to_host_vector<double>(ctx, vector_view<const C, D>(Gk.cview().data(), nb * b * b));
      for (index_t k = 0; k < nb; ++k) {
        const dense<double> Gbar = Eigen::Map<const dense<double>>(gk.data() + k * b * b, b, b);
        const index_t blk = i * nb + k;
        const dense<double> S = boft_detail::skew(Pv, blk, b);
        const Eigen::Map<const dense<double>> Rb(u.rotation(i, k), b, b);
        const dense<double> dS = oft_detail::pullback(S, dense<double>(Rb), Gbar, u.options());
        for (index_t r = 0; r < b; ++r)
          for (index_t c = 0; c < b; ++c) dP[std::size_t((blk * b + r) * b + c)] = C(0.5 * (dS(r, c) - dS(c, r)));
      }
      // dZ_{i,k} = dH_{i,k}·R_{i,k}ᵀ.
      if (T_ > 0) boft_detail::block_products<C>(ctx, u, Bk, i, dH.cview(), trans, dZ.view());
      if (!p.empty() && T_ > 0) boft_detail::gather_cols<C>(ctx, dZ.cview(), p, V.view());
      else copy(ctx, dZ.cview(), V.view());
    }
    detail::add_from_host(ctx, dP, grads[0]);
    if (present(dX)) {
      axpy<C>(ctx, C(1), V.cview(), dX);
      base_apply_transposed<C>(ctx, u.W(), dY, dH.view());
      axpy<C>(ctx, C(-1), dH.cview(), dX);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
