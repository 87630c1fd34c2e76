// SPDX-License-Identifier: MIT
// VJP of RoAd (ΔW = (R − I)·W); two factors, θ and α (PEFT's road_theta, road_alpha), each
// with a gradient slot [1, n] or [n, 1]. With P = X·Wᵀ (tokens × out) and σ = −1 for the first
// feature of a pair, +1 for the second:
//   ∂f[o] = Σ_t dY[t, o]·P[t, o],   ∂s[o] = σ_o·Σ_t dY[t, o]·P[t, partner(o)]
//   ∂θ += −∂f·α·sin θ (at f's index) + ∂s·α·cos θ (at s's index),  ∂α += ∂f·cos θ + ∂s·sin θ
//   dX += (dY·R − dY)·W
// One product with W each way; scratch tokens × out; no out × in matrix.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../../expr/road.hpp"
#include "road.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW>
struct vjp<road_update<T, TW, device::cpu>> {
  using D = device::cpu;
  using U = road_update<T, TW, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "theta" : "alpha"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY,
                       std::span<const mview<C>> grads, const mview<C>& dX) {
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
    auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    base_apply<C>(ctx, u.W(), X, P.view());
    const auto Pv = P.cview();
    const index_t g = u.group_size(), h = g / 2;
    std::vector<double> dth(std::size_t(n), 0.0), dal(std::size_t(n), 0.0);
    for (index_t o = 0; o < u.rows(); ++o) {
      const index_t p = o % g, q = p < h ? o + h : o - h;
      double df = 0, ds = 0;
      for (index_t t = 0; t < X.rows(); ++t) {
        df += double(dY(t, o)) * double(Pv(t, o));
        ds += double(dY(t, o)) * double(Pv(t, q));
      }
      if (p < h) ds = -ds;
      index_t ic, is;
      road_detail::road_index(u.variant(), g, o, ic, is);
      const double tc = convert<double>(u.theta()[ic]), ac = convert<double>(u.alpha()[ic]);
      const double ts = convert<double>(u.theta()[is]), as = convert<double>(u.alpha()[is]);
      dth[std::size_t(ic)] += -df * ac * std::sin(tc);
      dal[std::size_t(ic)] += df * std::cos(tc);
      dth[std::size_t(is)] += ds * as * std::cos(ts);
      dal[std::size_t(is)] += ds * std::sin(ts);
    }
    for (int i = 0; i < 2; ++i) {
      const auto& gr = grads[std::size_t(i)];
      if (!present(gr)) continue;
      const index_t st = gr.rows() == 1 ? gr.col_stride() : gr.row_stride();
      const auto& src = i == 0 ? dth : dal;
      for (index_t k = 0; k < n; ++k) gr.data()[k * st] += C(src[std::size_t(k)]);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
