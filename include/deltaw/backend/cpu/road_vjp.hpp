// SPDX-License-Identifier: MIT
// VJP of RoAd (ΔW = (R − I)·W); two factors, θ and α (PEFT's road_theta, road_alpha), each
// with a gradient slot [1, n] or [n, 1]. With P = X·Wᵀ (tokens × out) and σ = −1 for the first
// feature of a pair, +1 for the second:
//   ∂f[o] = Σ_t dY[t, o]·P[t, o],   ∂s[o] = σ_o·Σ_t dY[t, o]·P[t, partner(o)]
//   ∂θ += −∂f·α·sin θ (at f's index) + ∂s·α·cos θ (at s's index),  ∂α += ∂f·cos θ + ∂s·sin θ
//   dX += (dY·R − dY)·W
// One product with W each way; scratch tokens × out; no out × in matrix.
// Any device: the two column sums are dot_rows of columns (with the partner columns gathered
// by a functor) in double, read on the host at once with θ and α; the chain rule runs there
// (2·out values) and the gradients are added through one upload and an axpy each.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../../expr/road.hpp"
#include "road.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW, class D>
struct vjp<road_update<T, TW, D>> {
  using U = road_update<T, TW, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "theta" : "alpha"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<road>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const index_t n = u.theta().size();
    for (int i = 0; i < 2; ++i) {
      const auto& g = grads[std::size_t(i)];
      if (present(g) && (g.size() != n || (g.rows() != 1 && g.cols() != 1)))
        throw shape_error(std::string(op) + ": the gradient of " + factor_name(i) + " is " +
                          deltaw::detail::shape_str(g.rows(), g.cols()) + "; expected [1, " + std::to_string(n) + "] or [" +
                          std::to_string(n) + ", 1]");
    }
    if (present(dX)) evaluator<U>::template apply_transposed_add<C>(ctx, u, dY, dX);
    if (!present(grads[0]) && !present(grads[1])) return;
    const index_t out = u.rows(), g = u.group_size(), h = g / 2;
    auto P = kernels::make_scratch<C>(ctx, X.rows(), out);
    base_apply<C>(ctx, u.W(), X, P.view());
    auto Pq = kernels::make_scratch<C>(ctx, X.rows(), out);  // Pq(t, o) = P(t, partner(o))
    transform(ctx, Pq.view(), road_detail::partner_fn<C, D>{P.cview(), g});
    // Row 0: Σ_t dY(t, o)·P(t, o); row 1: Σ_t dY(t, o)·P(t, partner(o)); in double.
    auto sums = kernels::make_scratch<double>(ctx, 2, out);
    double* sp = sums.view().data();
    dot_rows(ctx, dY.transpose(), P.cview().transpose(), vector_view<double, D>(sp, out));
    dot_rows(ctx, dY.transpose(), Pq.cview().transpose(), vector_view<double, D>(sp + out, out));
    const std::vector<double> dfs = to_host_vector<double>(ctx, vector_view<const double, D>(sp, 2 * out));
    const std::vector<double> th = to_host_vector<double>(ctx, u.theta()), al = to_host_vector<double>(ctx, u.alpha());
    std::vector<double> dth(std::size_t(n), 0.0), dal(std::size_t(n), 0.0);
    for (index_t o = 0; o < out; ++o) {
      const index_t p = o % g;
      const double df = dfs[std::size_t(o)];
      double ds = dfs[std::size_t(out + o)];
      if (p < h) ds = -ds;
      index_t ic, is;
      road_detail::road_index(u.variant(), g, o, ic, is);
      const double tc = th[std::size_t(ic)], ac = al[std::size_t(ic)];
      const double ts = th[std::size_t(is)], as = al[std::size_t(is)];
      dth[std::size_t(ic)] += -df * ac * std::sin(tc);
      dal[std::size_t(ic)] += df * std::cos(tc);
      dth[std::size_t(is)] += ds * as * std::cos(ts);
      dal[std::size_t(is)] += ds * std::sin(ts);
    }
    for (int i = 0; i < 2; ++i) {
      const auto& gr = grads[std::size_t(i)];
      if (!present(gr)) continue;
      const auto& src = i == 0 ? dth : dal;
      std::vector<C> v(src.size());
      for (std::size_t k = 0; k < src.size(); ++k) v[k] = C(src[k]);
      detail::add_from_host(ctx, v, gr);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
