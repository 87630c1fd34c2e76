// SPDX-License-Identifier: MIT
// Evaluator of RoAd (expr/road.hpp): W' = R·W with R block-diagonal in 2 × 2 rotations
// (times scales) of output-feature pairs (o, o + h). With f, s the per-feature coefficients:
//   apply over its own W (the apply_with_base hook of ops.hpp):  Y = R(X·Wᵀ)
//   transposed:                                                   O = (G·R)·W
//   alone:  Y += R(P) − P with P = X·Wᵀ;  O += (G·R − G)·W
//   merge:  row pairs of W ← R·(row pairs); unmerge: the 2 × 2 inverses
// No out × in matrix: scratch is tokens × out (apply), or whole groups of rows of W of about
// 32 K entries (merge, the rows of ΔW). A merge of a weight converted panel by panel (bf16 / fp16) needs
// group_size to divide the panel height (256), so that no pair straddles two panels:
// argument_error otherwise.
// Written against the primitive layer, for any device: f and s are formed on the device
// from θ and α by a functor, and each pass over the features is one transform whose
// functor reads the pair's two values from a source view (P, G, or a copy of W's rows), so
// that no element is read after it was rewritten. Only unmerge's singularity check reads
// f and s on the host (a download on a device).
#pragma once

#include <algorithm>
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
DELTAW_HOST_DEVICE void road_index(road_variant v, I g, I o, I& ic, I& is) {
  const I grp = o / g, p = o % g, h = g / 2;
  if (v == road_variant::road_1) ic = is = grp * h + p % h;
  else if (v == road_variant::road_2) ic = is = o;
  else {
    ic = grp * 2 * g + p;
    is = ic + g;
  }
}

/// Row 0: f[o] = α·cos θ, row 1: s[o] = α·sin θ, computed in double, rounded to C.
template <class T, class D>
struct coeff_fn {
  vector_view<const T, D> theta, alpha;
  road_variant v;
  index_t g;
  template <class C>
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t o, C) const {
    index_t ic = 0, is = 0;
    road_index(v, g, o, ic, is);
    return i == 0 ? C(convert<double>(alpha[ic]) * std::cos(convert<double>(theta[ic])))
                  : C(convert<double>(alpha[is]) * std::sin(convert<double>(theta[is])));
  }
};

/// f and s per output feature in type C on ctx's device: a [2, out] scratch (f, then s).
template <class C, class Ctx, class U>
auto coefficients(const Ctx& ctx, const U& u) {
  using D = typename U::device_type;
  auto c = kernels::make_scratch<C>(ctx, 2, u.rows());
  transform(ctx, c.view(), coeff_fn<typename U::value_type, D>{u.theta(), u.alpha(), u.variant(), u.group_size()});
  return c;
}

enum class mode : unsigned char { forward, transposed, inverse };
/// What a pass writes into Y from the new value v of a feature, its old value y_o (read from
/// the source) and Y's current value y: set (v), minus_old (v − y_o), add_minus_old
/// (y + (v − y_o)), add_delta (y + (f_o − 1)·y_o ∓ s_o·y_partner: a row of (R − I)·W).
enum class out_kind : unsigned char { set, minus_old, add_minus_old, add_delta };

/// One feature of the pairwise rotation: Y(t, j) for feature o = o0 + j from the source
/// S (features along its columns, column 0 being feature s0), which must not alias Y.
///   forward    (R·y):  y_o ← f_o·y_o − s_o·y_q,  y_q ← f_q·y_q + s_q·y_o
///   transposed (g·R):  g_o ← f_o·g_o + s_q·g_q,  g_q ← f_q·g_q − s_o·g_o
///   inverse    (R⁻¹·y), det = f_o·f_q + s_o·s_q
/// (o the first feature of a pair, q = o + h the second).
template <class C, class D>
struct mix_fn {
  matrix_view<const C, D> S;
  const C* f;
  const C* s;
  index_t g, o0, s0;
  mode m;
  out_kind w;
  DELTAW_HOST_DEVICE C operator()(index_t t, index_t j, C y) const {
    const index_t o = o0 + j, h = g / 2;
    const bool first = o % g < h;
    const index_t q = first ? o + h : o - h;  // the partner
    const C yo = S(t, o - s0), yq = S(t, q - s0);
    if (w == out_kind::add_delta) {
      const C a = f[o] - C(1), b = first ? -s[o] : s[o];
      return y + (a * yo + b * yq);
    }
    C v;
    if (m == mode::forward) {
      v = first ? f[o] * yo - s[o] * yq : f[o] * yo + s[o] * yq;
    } else if (m == mode::transposed) {
      v = first ? f[o] * yo + s[q] * yq : f[o] * yo - s[q] * yq;
    } else {
      const C det = first ? f[o] * f[q] + s[o] * s[q] : f[q] * f[o] + s[q] * s[o];
      v = first ? (f[q] * yo + s[o] * yq) / det : (f[q] * yo - s[o] * yq) / det;
    }
    if (w == out_kind::set) return v;
    if (w == out_kind::minus_old) return v - yo;
    return y + (v - yo);
  }
};

/// Y(t, partner(o)) for every feature o: the partner values of the VJP's ∂s.
template <class C, class D>
struct partner_fn {
  matrix_view<const C, D> P;
  index_t g;
  DELTAW_HOST_DEVICE C operator()(index_t t, index_t o, C) const {
    const index_t h = g / 2;
    return P(t, o % g < h ? o + h : o - h);
  }
};

/// Rows of W (or of ΔW) handled per pass of a merge: whole groups, about 32 K entries (at
/// most panel_rows rows; one group when a group is larger).
inline index_t group_rows(index_t g, index_t cols) {
  const index_t rows = std::min<index_t>(panel_rows, (index_t(1) << 15) / std::max<index_t>(cols, 1));
  return std::max<index_t>(g, rows / g * g);
}

/// Rows of the panel P (rows r0 … of W, whole groups) ← R·rows (or R⁻¹·rows), a few
/// groups at a time through a copy of those rows.
template <class C, class Ctx, class D>
void mix_rows(const Ctx& ctx, const kernels::scratch<C, D>& c, index_t g, index_t r0, const mview<C, D>& P, mode m) {
  if (P.rows() == 0 || P.cols() == 0) return;
  const index_t step = group_rows(g, P.cols()), out = c.cols();
  auto tmp = kernels::make_scratch<C>(ctx, std::min(step, P.rows()), P.cols());
  for (index_t a = 0; a < P.rows(); a += step) {
    const index_t n = std::min(step, P.rows() - a);
    const auto rows = P.middle_rows(a, n);
    const auto t = tmp.view().middle_rows(0, n);
    copy(ctx, cview<C, D>(rows), t);
    transform(ctx, rows.transpose(),
              mix_fn<C, D>{cview<C, D>(t).transpose(), c.cview().data(), c.cview().data() + out, g, r0 + a, r0 + a, m,
                           out_kind::set});
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

template <class T, class TW, class D>
struct evaluator<road_update<T, TW, D>> {
  using U = road_update<T, TW, D>;
  using mode = road_detail::mode;
  using out_kind = road_detail::out_kind;

  /// The pass over the features of Y (column 0 = feature o0) from the source S (column 0 =
  /// feature s0), with the coefficients c of coefficients().
  template <class C>
  static road_detail::mix_fn<C, D> mix(const U& u, const kernels::scratch<C, D>& c, const cview<C, D>& S, mode m,
                                       out_kind w, index_t o0 = 0, index_t s0 = 0) {
    return {S, c.cview().data(), c.cview().data() + u.rows(), u.group_size(), o0, s0, m, w};
  }

  /// Y = R(X·Wᵀ): replaces the base product in a lazy sum over u's own W.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    base_apply<C>(ctx, u.W(), X, P.view());
    const auto c = road_detail::coefficients<C>(ctx, u);
    transform(ctx, Y, mix<C>(u, c, P.cview(), mode::forward, out_kind::set));
  }
  /// O = (G·R)·W.
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
    const auto c = road_detail::coefficients<C>(ctx, u);
    transform(ctx, Gs.view(), mix<C>(u, c, G, mode::transposed, out_kind::set));
    base_apply_transposed<C>(ctx, u.W(), Gs.cview(), O);
  }
  /// Y += R(P) − P, P = X·Wᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    base_apply<C>(ctx, u.W(), X, P.view());
    const auto c = road_detail::coefficients<C>(ctx, u);
    transform(ctx, Y, mix<C>(u, c, P.cview(), mode::forward, out_kind::add_minus_old));
  }
  /// O += (G·R − G)·W.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
    const auto c = road_detail::coefficients<C>(ctx, u);
    transform(ctx, Gs.view(), mix<C>(u, c, G, mode::transposed, out_kind::minus_old));
    base_apply_transposed<C>(ctx, u.W(), Gs.cview(), O, C(1));
  }

  /// P += ΔW[r0 : r0 + P.rows()] = ((R − I)·W)[rows], reading the partner rows from W: the
  /// whole groups covering the panel, a few hundred rows of W at a time.
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    const index_t g = u.group_size(), n = panel.rows();
    if (n == 0 || u.cols() == 0) return;
    const auto c = road_detail::coefficients<C>(ctx, u);
    const index_t a0 = r0 / g * g, a1 = (r0 + n + g - 1) / g * g, step = road_detail::group_rows(g, u.cols());
    auto w = kernels::make_scratch<C>(ctx, std::min(step, a1 - a0), u.cols());
    for (index_t c0 = a0; c0 < a1; c0 += step) {
      const index_t c1 = std::min(c0 + step, a1), p0 = std::max(r0, c0), p1 = std::min(r0 + n, c1);
      const auto wv = w.view().middle_rows(0, c1 - c0);
      copy(ctx, u.W().middle_rows(c0, c1 - c0), wv);
      transform(ctx, panel.middle_rows(p0 - r0, p1 - p0).transpose(),
                mix<C>(u, c, cview<C, D>(wv).transpose(), mode::forward, out_kind::add_delta, p0, c0));
    }
  }
  /// Row pairs of W ← R·(row pairs) (W must be u's own weight: checked by merge).
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    road_detail::check_panel(u, r0, panel.rows(), "deltaw::merge");
    road_detail::mix_rows<C>(ctx, road_detail::coefficients<C>(ctx, u), u.group_size(), r0, panel, mode::forward);
  }
  /// Row pairs of W' ← R⁻¹·(row pairs); argument_error (before anything is written) when a
  /// pair's determinant f_o·f_q + s_o·s_q is 0 (checked on the host).
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    road_detail::check_panel(u, r0, panel.rows(), "deltaw::unmerge");
    const auto c = road_detail::coefficients<C>(ctx, u);
    const index_t g = u.group_size(), h = g / 2, out = u.rows();
    const std::vector<C> fs = to_host_vector<C>(ctx, vector_view<const C, D>(c.cview().data(), 2 * out));
    for (index_t o = r0; o < r0 + panel.rows(); o += (o % g == h - 1 ? h + 1 : 1)) {
      const std::size_t a = std::size_t(o), b = std::size_t(o + h), n = std::size_t(out);
      if (fs[a] * fs[b] + fs[n + a] * fs[n + b] == C(0))
        throw argument_error("deltaw::unmerge (RoAd): the rotation of features " + std::to_string(o) + " and " +
                             std::to_string(o + h) + " is singular (f_o·f_q + s_o·s_q = 0), so it cannot be unmerged");
    }
    road_detail::mix_rows<C>(ctx, c, g, r0, panel, mode::inverse);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
