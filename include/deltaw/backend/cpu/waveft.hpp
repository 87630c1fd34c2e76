// SPDX-License-Identifier: MIT
// Evaluator of WaveFT (expr/waveft.hpp; Haar): every coefficient is one 2 × 2 atom of ΔW
// (or one entry without use_idwt), so apply, the transposed apply and rows of ΔW are sparse
// scatter-adds, at most 4 per coefficient and token; nothing of size out × in is formed.
// Needs no FFT.
#pragma once

#include <cmath>
#include <vector>

#include "../../expr/waveft.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace waveft_detail {
/// Calls f(r, q, w) for each entry (r, q) of ΔW that coefficient k touches, w its weight
/// per unit of s·c_k (±1/2 with use_idwt, 1 without), cropped to [out, in].
template <class U, class F>
void for_each_entry(const U& u, std::size_t k, F&& f) {
  if (!u.use_idwt()) {
    f(u.indices().rows[k], u.indices().cols[k], 1.0);
    return;
  }
  const auto a = u.atom_of(k);
  for (int du = 0; du < 2; ++du)
    for (int dw = 0; dw < 2; ++dw) {
      const index_t r = a.r0 + du, q = a.q0 + dw;
      if (r < u.rows() && q < u.cols()) f(r, q, 0.5 * (du ? a.row_sign : 1) * (dw ? a.col_sign : 1));
    }
}
}  // namespace waveft_detail

template <class T>
struct evaluator<waveft_update<T, device::cpu>>
    : additive_rows<evaluator<waveft_update<T, device::cpu>>, waveft_update<T, device::cpu>> {
  using U = waveft_update<T, device::cpu>;

  /// The entries of ΔW as (row, column, value) triplets, in type C (≤ 4n).
  template <class C>
  struct triplets {
    std::vector<index_t> r, q;
    std::vector<C> v;
    explicit triplets(const U& u) {
      for (index_t k = 0; k < u.size(); ++k) {
        const double c = u.scale() * convert<double>(u.spectrum()[k]);
        waveft_detail::for_each_entry(u, std::size_t(k), [&](index_t rr, index_t qq, double w) {
          r.push_back(rr);
          q.push_back(qq);
          v.push_back(C(c * w));
        });
      }
    }
  };

  /// Y += X·ΔWᵀ: y[r] += v·x[q] per entry.
  template <class C, class Ctx>
  static void apply_add(const Ctx&, const U& u, const cview<C>& X, const mview<C>& Y) {
    const triplets<C> e(u);
    for (index_t t = 0; t < X.rows(); ++t)
      for (std::size_t k = 0; k < e.v.size(); ++k) Y(t, e.r[k]) += e.v[k] * X(t, e.q[k]);
  }
  /// O += G·ΔW: o[q] += v·g[r] per entry.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx&, const U& u, const cview<C>& G, const mview<C>& O) {
    const triplets<C> e(u);
    for (index_t t = 0; t < G.rows(); ++t)
      for (std::size_t k = 0; k < e.v.size(); ++k) O(t, e.q[k]) += e.v[k] * G(t, e.r[k]);
  }
  /// P += factor·ΔW[r0 : r0 + P.rows()].
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx&, const U& u, index_t r0, const mview<C>& P, C factor) {
    const triplets<C> e(u);
    for (std::size_t k = 0; k < e.v.size(); ++k)
      if (e.r[k] >= r0 && e.r[k] < r0 + P.rows()) P(e.r[k] - r0, e.q[k]) += factor * e.v[k];
  }
  /// ‖ΔW‖_F from the (distinct-position) entries, summed per position.
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
