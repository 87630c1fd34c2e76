// SPDX-License-Identifier: MIT
// Any update as a plain LoRA: ΔW ≈ B·A with B = U_k·diag(σ_k) [out, k] and A = V_kᵀ [k, in],
// the best rank-k approximation in the Frobenius norm (Eckart–Young), scale 1. This is what
// lets engines that take only LoRA (llama.cpp, most servers) run LoHa, LoKr, OFT, HRA, VeRA,
// RandLoRA, MiSS, … adapters; PEFT's counterpart is `peft.tuners.lora.convert_to_lora`.
//
//   auto c = deltaw::to_lora(u, deltaw::lora_rank{16});          // fixed rank
//   auto c = deltaw::to_lora(u, deltaw::energy_fraction{0.99});  // smallest k keeping 99 % of ‖ΔW‖²_F
//   c.update();  c.rank;  c.S;  c.relative_error;                // low_rank<C> (scale 1), …
//
// to_lora never forms ΔW: it sketches the update through apply / apply_transposed
// (randomized_svd, with power iterations), and takes ‖ΔW‖_F from the type's closed form
// (frobenius_norm), so the energy threshold and the reported error are exact quantities of
// ΔW, not of the sketch. The truncation error is exact too: B·A is the orthogonal projection
// of ΔW onto a k-dimensional column space, so ‖ΔW − B·A‖²_F = ‖ΔW‖²_F − Σσᵢ².
// When the update's rank is at most the sketch size (LoHa: ≤ r², LoKr: ≤ rank(w1)·rank(w2),
// MiSS: ≤ r, …) the sketch spans its column space and the result is the exact truncated SVD
// to rounding; for full-rank updates (OFT, IA³, RandLoRA at N·r = min_dim) it is the
// randomized approximation (raise power_iterations to tighten it), or use to_lora_dense.
//
// to_lora_dense materialises ΔW (out × in, as its name says) and takes its full SVD: PEFT's
// algorithm, the reference the tests compare with.
//
// Energy thresholds follow PEFT's rule: the smallest k with Σ_{i<k} σᵢ² ≥ t·‖ΔW‖²_F
// (t in (0, 1]; a shortfall within 1000 ε of the arithmetic type counts as reached, so that
// t = 1 gives the numerical rank, not min(out, in)). to_lora widens its sketch (doubling) until the sketched spectrum holds that
// much energy or spans min(out, in).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../backend/cpu/ops.hpp"
#include "../core/error.hpp"
#include "../expr/low_rank.hpp"
#include "randomized_svd.hpp"

DELTAW_NAMESPACE_BEGIN

/// A fixed target rank k ≥ 1 (at most min(out, in)).
struct lora_rank {
  index_t k = 0;
};
/// An energy threshold t in (0, 1]: the smallest rank whose singular values hold
/// t·‖ΔW‖²_F (PEFT's float `rank` of convert_to_lora).
struct energy_fraction {
  double t = 0;
};

/// Options of to_lora (the sketch; to_lora_dense has none).
struct to_lora_options {
  index_t oversampling = 10;     ///< extra sketch columns beyond the rank
  index_t power_iterations = 2;  ///< each multiplies by ΔW·ΔWᵀ once more
  std::uint64_t seed = 0;        ///< Philox key of the Gaussian test matrix
  index_t initial_sketch = 32;   ///< energy thresholds: the first sketch size, doubled as needed
};

/// A LoRA approximation of an update: ΔW ≈ B·A (scale 1).
template <class C>
struct lora_conversion {
  dense<C> B;  ///< [out, k] = U_k·diag(σ_k)
  dense<C> A;  ///< [k, in] = V_kᵀ
  Eigen::Matrix<C, Eigen::Dynamic, 1> S;  ///< the k singular values kept, non-increasing
  index_t rank = 0;                       ///< k
  double norm = 0;                        ///< ‖ΔW‖_F
  /// ‖ΔW − B·A‖_F / ‖ΔW‖_F (0 for ΔW = 0), as √(1 − Σσᵢ²/‖ΔW‖²): exact in exact
  /// arithmetic, and in floating point to about √ε of the arithmetic type (1e-8 in double,
  /// 3e-4 in float), so a value below that means "exact to rounding".
  double relative_error = 0;
  /// The fraction of ‖ΔW‖²_F the kept singular values hold (1 for ΔW = 0).
  double energy() const { return 1.0 - relative_error * relative_error; }
  /// B·A as a deltaw update (views into this object: it must outlive the update).
  auto update() const { return lora(view(B), view(A), scale(1.0)); }
};

namespace detail {

template <class U>
using to_lora_compute_t = accum_t<typename U::value_type>;

inline void check_energy(double t, const char* op) {
  if (!(t > 0 && t <= 1))
    throw argument_error(std::string(op) + ": the energy fraction must be in (0, 1]; got " + std::to_string(t));
}

/// The energy a cutoff must reach: t·total2, less a slack of 1000 ε of the arithmetic type
/// (the σ and ‖ΔW‖ come from different computations, so at t = 1 the sum of σ² may fall
/// short of ‖ΔW‖² by rounding alone).
template <class C>
double energy_target(double t, double total2) {
  return t * total2 - 1000.0 * double(std::numeric_limits<C>::epsilon()) * total2;
}

/// The smallest k with Σ_{i<k} σᵢ² ≥ want, at least 1, at most S.size() (PEFT's
/// _find_cutoff_index over the cumulative energy).
template <class V>
index_t energy_cutoff(const V& S, double want) {
  double cs = 0;
  for (index_t i = 0; i < index_t(S.size()); ++i) {
    cs += double(S[i]) * double(S[i]);
    if (cs >= want) return i + 1;
  }
  return index_t(S.size());
}

template <class C, class Mat, class Vec>
lora_conversion<C> lora_from_svd(const Mat& U, const Vec& S, const Mat& V, index_t k, double norm) {
  lora_conversion<C> out;
  out.rank = k;
  out.norm = norm;
  out.S = S.head(k).template cast<C>();
  out.B = (U.leftCols(k) * S.head(k).asDiagonal()).template cast<C>();
  out.A = V.leftCols(k).transpose().template cast<C>();
  double kept = 0;
  for (index_t i = 0; i < k; ++i) kept += double(S[i]) * double(S[i]);
  const double n2 = norm * norm;
  out.relative_error = n2 > 0 ? std::sqrt(std::max(0.0, n2 - kept) / n2) : 0.0;
  return out;
}

template <class U>
void check_to_lora_update(const U& u, const char* op) {
  if (u.rows() < 1 || u.cols() < 1)
    throw shape_error(std::string(op) + ": the update is " + shape_str(u.rows(), u.cols()) +
                      "; a LoRA needs at least one row and one column");
}

}  // namespace detail

/// The rank-k LoRA of an update by a randomized SVD through its apply (no dense ΔW).
/// rank_error when k is not in [1, min(out, in)].
template <class C = void, update U>
  requires std::same_as<device_of<U>, device::cpu>
lora_conversion<std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>> to_lora(
    const U& u, lora_rank r, const to_lora_options& opt = {}) {
  using CC = std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>;
  constexpr const char* op = "deltaw::to_lora";
  detail::check_to_lora_update(u, op);
  detail::check_truncation(r.k, u.rows(), u.cols(), op);
  const double norm = frobenius_norm(u);
  const auto s = randomized_svd<CC>(u, r.k, rsvd_options{opt.oversampling, opt.power_iterations, opt.seed});
  return detail::lora_from_svd<CC>(s.U, s.S, s.V, r.k, norm);
}

/// The smallest-rank LoRA holding a fraction t of ‖ΔW‖²_F, by randomized SVDs of growing
/// size through the update's apply (no dense ΔW). argument_error for t outside (0, 1].
template <class C = void, update U>
  requires std::same_as<device_of<U>, device::cpu>
lora_conversion<std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>> to_lora(
    const U& u, energy_fraction e, const to_lora_options& opt = {}) {
  using CC = std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>;
  constexpr const char* op = "deltaw::to_lora";
  detail::check_to_lora_update(u, op);
  detail::check_energy(e.t, op);
  if (opt.initial_sketch < 1)
    throw argument_error(std::string(op) + ": initial_sketch must be at least 1; got " +
                         std::to_string(opt.initial_sketch));
  const index_t full = std::min(u.rows(), u.cols());
  const double norm = frobenius_norm(u);
  const double total2 = norm * norm;
  // Rounding in the sketched σ may leave the threshold a hair short at t = 1: accept a
  // relative shortfall at the arithmetic type's resolution once the sketch spans everything.
  for (index_t l = std::min(opt.initial_sketch, full);; l = std::min(2 * l, full)) {
    const auto s = randomized_svd<CC>(u, l, rsvd_options{opt.oversampling, opt.power_iterations, opt.seed});
    double sketched = 0;
    for (index_t i = 0; i < l; ++i) sketched += double(s.S[i]) * double(s.S[i]);
    const double want = detail::energy_target<CC>(e.t, total2);
    if (sketched >= want || l == full) {
      const index_t k = total2 > 0 ? detail::energy_cutoff(s.S, want) : 1;
      return detail::lora_from_svd<CC>(s.U, s.S, s.V, k, norm);
    }
  }
}

/// PEFT's algorithm: ΔW materialised (out × in) and its full SVD, truncated to rank k.
template <class C = void, update U>
  requires std::same_as<device_of<U>, device::cpu>
lora_conversion<std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>> to_lora_dense(
    const U& u, lora_rank r) {
  using CC = std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>;
  constexpr const char* op = "deltaw::to_lora_dense";
  detail::check_to_lora_update(u, op);
  detail::check_truncation(r.k, u.rows(), u.cols(), op);
  const auto D = materialize(u);
  const auto s = truncated_svd<CC>(D, std::min(u.rows(), u.cols()));
  return detail::lora_from_svd<CC>(s.U, s.S, s.V, r.k, double(D.template cast<double>().norm()));
}

/// PEFT's algorithm with an energy threshold: ΔW materialised (out × in), full SVD.
template <class C = void, update U>
  requires std::same_as<device_of<U>, device::cpu>
lora_conversion<std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>> to_lora_dense(
    const U& u, energy_fraction e) {
  using CC = std::conditional_t<std::is_void_v<C>, detail::to_lora_compute_t<U>, C>;
  constexpr const char* op = "deltaw::to_lora_dense";
  detail::check_to_lora_update(u, op);
  detail::check_energy(e.t, op);
  const auto D = materialize(u);
  const auto s = truncated_svd<CC>(D, std::min(u.rows(), u.cols()));
  const double norm = double(D.template cast<double>().norm());
  const index_t k = norm > 0 ? detail::energy_cutoff(s.S, detail::energy_target<CC>(e.t, norm * norm)) : 1;
  return detail::lora_from_svd<CC>(s.U, s.S, s.V, k, norm);
}

DELTAW_NAMESPACE_END
