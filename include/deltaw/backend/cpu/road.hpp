// SPDX-License-Identifier: MIT
// Evaluator of RoAd (expr/road.hpp): W' = R·W with R block-diagonal in 2 × 2 rotations
// (times scales) of output-feature pairs (o, o + h). With f, s the per-feature coefficients:
//   apply over its own W (the apply_with_base hook of ops.hpp):  Y = R(X·Wᵀ), one pass over Y
//   transposed:                                                   O = (G·R)·W
//   alone:  Y += R(P) − P with P = X·Wᵀ;  O += (G·R − G)·W
//   merge:  row pairs of W ← R·(row pairs); unmerge: the 2 × 2 inverses
// No out × in matrix: scratch is tokens × out (alone) or one row panel (bf16 weights). A
// merge of a weight converted panel by panel (bf16 / fp16) needs group_size to divide the
// panel height (256), so that no pair straddles two panels: argument_error otherwise.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../../expr/road.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace road_detail {

/// Where feature o reads its angle and scale: f from (θ, α)[ic], s from (θ, α)[is].
template <class I>
void road_index(road_variant v, I g, I o, I& ic, I& is) {
  const I grp = o / g, p = o % g, h = g / 2;
  if (v == road_variant::road_1) ic = is = grp * h + p % h;
  else if (v == road_variant::road_2) ic = is = o;
  else {
    ic = grp * 2 * g + p;
    is = ic + g;
  }
}

/// f = α·cos θ and s = α·sin θ per output feature, in type C (computed in double).
template <class C>
struct coeffs {
  std::vector<C> f, s;
  index_t g = 0;
  template <class U>
  explicit coeffs(const U& u) : f(std::size_t(u.rows())), s(std::size_t(u.rows())), g(u.group_size()) {
    for (index_t o = 0; o < u.rows(); ++o) {
      index_t ic, is;
      road_index(u.variant(), g, o, ic, is);
      f[std::size_t(o)] = C(convert<double>(u.alpha()[ic]) * std::cos(convert<double>(u.theta()[ic])));
      s[std::size_t(o)] = C(convert<double>(u.alpha()[is]) * std::sin(convert<double>(u.theta()[is])));
    }
  }
};

enum class mode { forward, transposed, inverse };

/// Rewrites the features (columns of Y, offset o0 into the layer's features) pair by pair:
/// forward   (R·y):  y_o ← f_o·y_o − s_o·y_q,  y_q ← f_q·y_q + s_q·y_o
/// transposed (g·R): g_o ← f_o·g_o + s_q·g_q,  g_q ← f_q·g_q − s_o·g_o
/// inverse   (R⁻¹·y)
/// minus_old subtracts the old values (the ΔW = R − I forms). Y's columns must hold whole groups.
template <class C>
void mix(const coeffs<C>& c, const mview<C>& Y, index_t o0, mode m, bool minus_old = false) {
  const index_t g = c.g, h = g / 2;
  for (index_t t = 0; t < Y.rows(); ++t)
    for (index_t b = 0; b < Y.cols(); b += g)
      for (index_t k = 0; k < h; ++k) {
        const index_t jo = b + k, jq = jo + h;
        const std::size_t o = std::size_t(o0 + jo), q = std::size_t(o0 + jq);
        const C yo = Y(t, jo), yq = Y(t, jq);
        C no, nq;
        if (m == mode::forward) {
          no = c.f[o] * yo - c.s[o] * yq;
          nq = c.f[q] * yq + c.s[q] * yo;
        } else if (m == mode::transposed) {
          no = c.f[o] * yo + c.s[q] * yq;
          nq = c.f[q] * yq - c.s[o] * yo;
        } else {
          const C det = c.f[o] * c.f[q] + c.s[o] * c.s[q];
          no = (c.f[q] * yo + c.s[o] * yq) / det;
          nq = (c.f[o] * yq - c.s[q] * yo) / det;
        }
        Y(t, jo) = minus_old ? no - yo : no;
        Y(t, jq) = minus_old ? nq - yq : nq;
      }
}

template <class U>
void check_panel(const U& u, index_t r0, index_t n, const char* op) {
  if (r0 % u.group_size() != 0 || n % u.group_size() != 0)
    throw argument_error(std::string(op) + " (RoAd): rows " + std::to_string(r0) + " … " + std::to_string(r0 + n) +
                         " of W are processed together (a weight stored as bf16 / fp16 or strided is converted " +
                         std::to_string(panel_rows) + " rows at a time), which splits a pair of group_size " +
                         std::to_string(u.group_size()) + "; use a group_size dividing " + std::to_string(panel_rows) +
                         " or a float weight");
}

}  // namespace road_detail

template <class T, class TW>
struct evaluator<road_update<T, TW, device::cpu>> {
  using D = device::cpu;
  using U = road_update<T, TW, D>;
  using mode = road_detail::mode;

  /// Y = R(X·Wᵀ): replaces the base product in a lazy sum over u's own W.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y) {
    base_apply<C>(ctx, u.W(), X, Y);
    road_detail::mix<C>(road_detail::coeffs<C>(u), Y, 0, mode::forward);
  }
  /// O = (G·R)·W.
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C>& G, const mview<C>& O) {
    auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
    copy(ctx, G, Gs.view());
    road_detail::mix<C>(road_detail::coeffs<C>(u), Gs.view(), 0, mode::transposed);
    base_apply_transposed<C>(ctx, u.W(), Gs.cview(), O);
  }
  /// Y += R(P) − P, P = X·Wᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y) {
    auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    base_apply<C>(ctx, u.W(), X, P.view());
    road_detail::mix<C>(road_detail::coeffs<C>(u), P.view(), 0, mode::forward, true);
    axpy<C>(ctx, C(1), P.cview(), Y);
  }
  /// O += (G·R − G)·W.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C>& G, const mview<C>& O) {
    auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
    copy(ctx, G, Gs.view());
    road_detail::mix<C>(road_detail::coeffs<C>(u), Gs.view(), 0, mode::transposed, true);
    base_apply_transposed<C>(ctx, u.W(), Gs.cview(), O, C(1));
  }

  /// P += ΔW[r0 : r0 + P.rows()] = ((R − I)·W)[rows], reading the partner rows from W.
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C>& panel) {
    const road_detail::coeffs<C> c(u);
    const index_t h = u.group_size() / 2;
    auto w = kernels::make_scratch<C>(ctx, 2, u.cols());
    for (index_t i = 0; i < panel.rows(); ++i) {
      const index_t o = r0 + i, p = o % u.group_size(), q = p < h ? o + h : o - h;
      copy(ctx, u.W().middle_rows(o, 1), w.view().middle_rows(0, 1));
      copy(ctx, u.W().middle_rows(q, 1), w.view().middle_rows(1, 1));
      const C a = c.f[std::size_t(o)] - C(1), b = p < h ? -c.s[std::size_t(o)] : c.s[std::size_t(o)];
      for (index_t j = 0; j < u.cols(); ++j) panel(i, j) += a * w.cview()(0, j) + b * w.cview()(1, j);
    }
  }
  /// Row pairs of W ← R·(row pairs) (W must be u's own weight: checked by merge).
  template <class C, class Ctx>
  static void merge_rows(const Ctx&, const U& u, index_t r0, const mview<C>& panel) {
    road_detail::check_panel(u, r0, panel.rows(), "deltaw::merge");
    road_detail::mix<C>(road_detail::coeffs<C>(u), panel.transpose(), r0, mode::forward);
  }
  /// Row pairs of W' ← R⁻¹·(row pairs); argument_error (before anything is written) when a
  /// pair's determinant f_o·f_q + s_o·s_q is 0.
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx&, const U& u, index_t r0, const mview<C>& panel) {
    road_detail::check_panel(u, r0, panel.rows(), "deltaw::unmerge");
    const road_detail::coeffs<C> c(u);
    const index_t g = u.group_size(), h = g / 2;
    for (index_t o = r0; o < r0 + panel.rows(); o += (o % g == h - 1 ? h + 1 : 1)) {
      const std::size_t a = std::size_t(o), b = std::size_t(o + h);
      if (c.f[a] * c.f[b] + c.s[a] * c.s[b] == C(0))
        throw argument_error("deltaw::unmerge (RoAd): the rotation of features " + std::to_string(o) + " and " +
                             std::to_string(o + h) + " is singular (f_o·f_q + s_o·s_q = 0), so it cannot be unmerged");
    }
    road_detail::mix<C>(c, panel.transpose(), r0, mode::inverse);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
