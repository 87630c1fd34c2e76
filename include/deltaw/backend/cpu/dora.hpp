// SPDX-License-Identifier: MIT
// Evaluator of DoRA and its constructors. The row norms of W + s·B·A come from
//   ‖w_o + s·b_o·A‖² = ‖w_o‖² + 2s·b_o·(A·w_oᵀ) + s²·b_o·(A·Aᵀ)·b_oᵀ,
// one r × out product A·Wᵀ (panel by panel) and an r × r Gram matrix: no dense ΔW.
// Written against the primitive layer, for any device; the gains g = m/n are computed on
// the host (the magnitude read through to_host_vector) and passed to scale_rows/scale_cols.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "../../expr/dora.hpp"
#include "low_rank.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

/// Row norms ‖W + s·B·A‖ per output row, accumulated in double.
template <class C, class TW, class T>
std::vector<double> dora_row_norms(const matrix_view<const TW>& W, const low_rank<T, device::cpu>& l) {
  using enum kernels::op;
  const kernels::cpu_context ctx;
  const index_t r = l.rank();
  const kernels::operand<C> B(ctx, l.B()), A(ctx, l.A());
  const kernels::operand<double> Ad(ctx, l.A());
  auto gram = kernels::make_scratch<double>(ctx, r, r);
  gemm<double>(ctx, 1.0, Ad, none, Ad, trans, 0.0, gram.view());
  const auto G = gram.cview();
  const auto Bv = B.view();
  const double s = l.scale();
  std::vector<double> norms(std::size_t(W.rows()));
  auto AW = kernels::make_scratch<C>(ctx, r, std::min(panel_rows, W.rows()));
  std::vector<double> b(std::size_t(r), 0.0);
  for_row_panels<C>(ctx, W, [&](index_t r0, const cview<C>& P) {
    if (AW.cols() < P.rows()) AW.resize(r, P.rows());
    const auto aw = AW.view().middle_cols(0, P.rows());
    gemm<C>(ctx, C(1), A, none, P, trans, C(0), aw);  // r × panel rows
    for (index_t i = 0; i < P.rows(); ++i) {
      const index_t o = r0 + i;
      double wsq = 0.0;
      for (index_t j = 0; j < P.cols(); ++j) wsq += double(P(i, j)) * double(P(i, j));
      for (index_t k = 0; k < r; ++k) b[std::size_t(k)] = double(Bv(o, k));
      double cross = 0.0, quad = 0.0;
      for (index_t k = 0; k < r; ++k) {
        cross += b[std::size_t(k)] * double(aw(k, i));
        double gb = 0.0;
        for (index_t q = 0; q < r; ++q) gb += G(k, q) * b[std::size_t(q)];
        quad += b[std::size_t(k)] * gb;
      }
      norms[std::size_t(o)] = std::sqrt(std::max(wsq + 2.0 * s * cross + s * s * quad, 0.0));
    }
  });
  return norms;
}

template <class T, class TW, class D>
struct evaluator<dora_update<T, TW, D>> {
  using U = dora_update<T, TW, D>;
  using L = evaluator<low_rank<T, D>>;

  /// g = m/n (offset by `shift`: g − 1 for the update alone), in type C, on the host; rows
  /// [r0, r0 + n) only when n ≥ 0 (a merge panel's window).
  template <class C>
  static std::vector<C> gains(const U& u, double shift = 0.0, index_t r0 = 0, index_t n = -1) {
    if (n < 0) n = u.rows() - r0;
    std::vector<C> g(static_cast<std::size_t>(n));
    for (index_t o = 0; o < n; ++o) g[std::size_t(o)] = C(u.gain(r0 + o)) - C(shift);
    return g;
  }
  /// The same through ctx: the magnitude read on the host (downloaded from a device).
  template <class C, class Ctx>
  static std::vector<C> gains(const Ctx& ctx, const U& u, double shift = 0.0, index_t r0 = 0, index_t n = -1) {
    if (n < 0) n = u.rows() - r0;
    const std::vector<double> m = to_host_vector<double>(ctx, u.magnitude());
    std::vector<C> g(static_cast<std::size_t>(n));
    for (index_t o = 0; o < n; ++o)
      g[std::size_t(o)] = C(m[std::size_t(r0 + o)] / u.norms()[std::size_t(r0 + o)]) - C(shift);
    return g;
  }
  template <class C>
  static vector_view<const C> as_view(const std::vector<C>& g) {
    return vector_view<const C>(g.data(), index_t(g.size()));
  }

  /// Y = X·Wᵀ on entry (W the DoRA's own weight); Y = X·W'ᵀ on exit.
  template <class C, class Ctx>
  static void apply_on_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    L::template apply_add<C>(ctx, u.lora(), X, Y);
    scale_cols(ctx, Y, as_view(gains<C>(ctx, u)));
  }

  /// Y += X·(W' − W)ᵀ = (X·Wᵀ)·diag(g − 1) + (s·(X·Aᵀ)·Bᵀ)·diag(g).
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    auto base = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    base_apply<C>(ctx, u.W(), X, base.view());
    auto low = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    fill(ctx, low.view(), C(0));
    L::template apply_add<C>(ctx, u.lora(), X, low.view());
    scale_cols(ctx, base.view(), as_view(gains<C>(ctx, u, 1.0)));
    scale_cols(ctx, low.view(), as_view(gains<C>(ctx, u)));
    axpy<C>(ctx, C(1), base.cview(), Y);
    axpy<C>(ctx, C(1), low.cview(), Y);
  }

  /// G·diag(g): the input that makes O = (G·diag(g))·W + s·((G·diag(g))·B)·A equal G·W'.
  template <class C, class Ctx>
  static auto transposed_input(const Ctx& ctx, const U& u, const cview<C, D>& G) {
    auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
    copy(ctx, G, Gs.view());
    scale_cols(ctx, Gs.view(), as_view(gains<C>(ctx, u)));
    return Gs;
  }

  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    auto Gm = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
    copy(ctx, G, Gm.view());
    scale_cols(ctx, Gm.view(), as_view(gains<C>(ctx, u, 1.0)));
    base_apply_transposed<C>(ctx, u.W(), Gm.cview(), O, C(1));
    const auto Gs = transposed_input<C>(ctx, u, G);
    L::template apply_transposed_add<C>(ctx, u.lora(), Gs.cview(), O);
  }

  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    const index_t n = panel.rows();
    auto Wr = kernels::make_scratch<C>(ctx, n, u.cols());
    copy(ctx, u.W().middle_rows(r0, n), Wr.view());
    auto merged = kernels::make_scratch<C>(ctx, n, u.cols());
    copy(ctx, Wr.cview(), merged.view());
    merge_rows<C>(ctx, u, r0, merged.view());
    axpy<C>(ctx, C(1), merged.cview(), panel);
    axpy<C>(ctx, C(-1), Wr.cview(), panel);
  }

  /// Rows of W ← diag(g)·(rows of W + s·B·A).
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    L::template merge_rows<C>(ctx, u.lora(), r0, panel);
    scale_rows(ctx, panel, as_view(gains<C>(ctx, u, 0.0, r0, panel.rows())));
  }
  /// Rows of W' ← diag(1/g)·rows of W' − s·B·A, with the cached norms.
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    divide_rows(ctx, panel, as_view(gains<C>(ctx, u, 0.0, r0, panel.rows())));
    L::template unmerge_rows<C>(ctx, u.lora(), r0, panel);
  }

  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu

/// DoRA's initial magnitude: the row norms of W + s·B·A (size out), in the factors' type.
template <class WL, class T>
auto dora_magnitude(const WL& W, const low_rank<T, device::cpu>& l) {
  const auto Wv = matrix_view<const std::remove_const_t<typename decltype(view(W))::element_type>>(view(W));
  detail::check_same_shape(Wv.rows(), Wv.cols(), l, "deltaw::dora_magnitude");
  using C = compute_t<T, typename decltype(Wv)::value_type>;
  const auto n = cpu::dora_row_norms<C>(Wv, l);
  Eigen::Matrix<C, Eigen::Dynamic, 1> m(Wv.rows());
  for (index_t o = 0; o < Wv.rows(); ++o) m(o) = C(n[std::size_t(o)]);
  return m;
}

/// DoRA over W with LoRA factors and magnitude m [out]. Computes and caches the row norms.
template <class WL, class T, class ML>
auto dora(const WL& W, const low_rank<T, device::cpu>& l, ML&& m) {
  auto hw = hold(W);
  auto hm = hold_vector(std::forward<ML>(m));
  using TW = std::remove_const_t<typename decltype(hw.view)::element_type>;
  static_assert(std::is_same_v<decltype(hm), held_vector<T>>,
                "deltaw::dora: the magnitude vector must have the LoRA factors' element type");
  detail::check_same_shape(hw.view.rows(), hw.view.cols(), l, "deltaw::dora");
  using C = compute_t<T, TW>;
  auto norms = std::make_shared<const std::vector<double>>(cpu::dora_row_norms<C>(hw.view, l));
  return dora_update<T, TW, device::cpu>(std::move(hw), l, std::move(hm), std::move(norms));
}

DELTAW_NAMESPACE_END
