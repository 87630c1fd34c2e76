// CPU evaluator of DoRA and its constructors. The row norms of W + s·B·A come from
//   ‖w_o + s·b_o·A‖² = ‖w_o‖² + 2s·b_o·(A·w_oᵀ) + s²·b_o·(A·Aᵀ)·b_oᵀ,
// one r × out product A·Wᵀ (panel by panel) and an r × r Gram matrix: no dense ΔW.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "../../expr/dora.hpp"
#include "low_rank.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

/// Row norms ‖W + s·B·A‖ per output row, accumulated in double.
template <class C, class TW, class T>
std::vector<double> dora_row_norms(const matrix_view<const TW>& W, const low_rank<T, device::cpu>& l) {
  dense<C> sb, sa;
  const auto B = row_major_operand<C>(l.B(), sb);
  const auto A = row_major_operand<C>(l.A(), sa);
  const dense<double> gram = (A.template cast<double>() * A.template cast<double>().transpose());
  const double s = l.scale();
  std::vector<double> norms(std::size_t(W.rows()));
  for_row_panels<C>(W, [&](index_t r0, const auto& P) {
    const dense<C> AW = A * P.transpose();  // r × panel rows
    for (index_t i = 0; i < P.rows(); ++i) {
      const index_t o = r0 + i;
      const double wsq = P.row(i).template cast<double>().squaredNorm();
      const auto b = B.row(o).template cast<double>();
      const double cross = b.dot(AW.col(i).template cast<double>());
      const double quad = b * gram * b.transpose();
      norms[std::size_t(o)] = std::sqrt(std::max(wsq + 2.0 * s * cross + s * s * quad, 0.0));
    }
  });
  return norms;
}

template <class T, class TW>
struct evaluator<dora_update<T, TW, device::cpu>> {
  using U = dora_update<T, TW, device::cpu>;
  using L = evaluator<low_rank<T, device::cpu>>;

  template <class C>
  static Eigen::Array<C, Eigen::Dynamic, 1> gains(const U& u) {
    Eigen::Array<C, Eigen::Dynamic, 1> g(u.rows());
    for (index_t o = 0; o < u.rows(); ++o) g(o) = C(u.gain(o));
    return g;
  }

  /// Y = X·Wᵀ on entry (W the DoRA's own weight); Y = X·W'ᵀ on exit.
  template <class C, class XM, class YM>
  static void apply_on_base(const U& u, const XM& X, YM& Y) {
    L::template apply_add<C>(u.lora(), X, Y);
    Y.array().rowwise() *= gains<C>(u).transpose();
  }

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    dense<C> base(X.rows(), u.rows());
    for_row_panels<C>(u.W(), [&](index_t r0, const auto& P) {
      base.middleCols(r0, P.rows()).noalias() = X * P.transpose();
    });
    dense<C> low = dense<C>::Zero(X.rows(), u.rows());
    L::template apply_add<C>(u.lora(), X, low);
    const auto g = gains<C>(u);
    Y.array() += base.array().rowwise() * (g - C(1)).transpose() + low.array().rowwise() * g.transpose();
  }

  /// G·diag(g): the input that makes O = (G·diag(g))·W + s·((G·diag(g))·B)·A equal G·W'.
  template <class C, class GM>
  static dense<C> transposed_input(const U& u, const GM& G) {
    dense<C> Gs = G;
    Gs.array().rowwise() *= gains<C>(u).transpose();
    return Gs;
  }

  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    const auto g = gains<C>(u);
    dense<C> Gm = G;
    Gm.array().rowwise() *= (g - C(1)).transpose();
    for_row_panels<C>(u.W(), [&](index_t r0, const auto& P) {
      O.noalias() += Gm.middleCols(r0, P.rows()) * P;
    });
    const dense<C> Gs = transposed_input<C>(u, G);
    L::template apply_transposed_add<C>(u.lora(), Gs, O);
  }

  template <class C, class P>
  static void add_delta_rows(const U& u, index_t r0, P& panel) {
    const index_t n = panel.rows();
    const dense<C> Wr = to_dense<C>(u.W().middle_rows(r0, n));
    dense<C> merged = Wr;
    L::template merge_rows<C>(u.lora(), r0, merged);
    merged.array().colwise() *= gains<C>(u).segment(r0, n);
    panel += merged - Wr;
  }

  /// Rows of W ← diag(g)·(rows of W + s·B·A).
  template <class C, class P>
  static void merge_rows(const U& u, index_t r0, P& panel) {
    L::template merge_rows<C>(u.lora(), r0, panel);
    panel.array().colwise() *= gains<C>(u).segment(r0, panel.rows());
  }
  /// Rows of W' ← diag(1/g)·rows of W' − s·B·A, with the cached norms.
  template <class C, class P>
  static void unmerge_rows(const U& u, index_t r0, P& panel) {
    panel.array().colwise() /= gains<C>(u).segment(r0, panel.rows());
    L::template unmerge_rows<C>(u.lora(), r0, panel);
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
