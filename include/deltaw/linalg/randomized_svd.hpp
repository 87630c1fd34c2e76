// SPDX-License-Identifier: MIT
// Truncated SVD: the exact one (dense, Eigen's BDCSVD) and the randomized one of Halko,
// Martinsson and Tropp ("Finding structure with randomness", SIAM Review 2011, Alg. 4.4
// with the re-orthonormalised power iteration of Alg. 4.4/5.1).
//
// The randomized SVD touches its matrix M [m, n] only through M·X and Mᵀ·Y, which deltaw's
// apply / apply_transposed give for any CPU expression: a dense weight view, an update
// alone, or a lazy sum `view(W) + lora(...)`. So the spectrum of W + ΔW is sketched
// without forming the dense ΔW. In deltaw's layout apply(e, Xᵀ) = Xᵀ·Mᵀ = (M·X)ᵀ, so the
// sketches are kept transposed ([l, m] and [l, n] row-major), which is the layout apply
// wants for its input and gives as its output.
//
// The test matrix Ω is standard normal from the counter-based Philox stream
// (core/random.hpp), keyed by the caller's seed: the result is a pure function of
// (matrix, k, options).
#pragma once

#include <Eigen/Core>
#include <deltaw/core/eigen_dense.hpp>
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "../backend/cpu/ops.hpp"
#include "../core/error.hpp"
#include "../core/random.hpp"

DELTAW_NAMESPACE_BEGIN

/// A truncated SVD M ≈ U·diag(S)·Vᵀ: U [m, k] and V [n, k] with orthonormal columns, S
/// non-increasing and non-negative. Column-major, as the factorisations produce them.
template <class C>
struct svd_result {
  using matrix = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic>;
  using vector = Eigen::Matrix<C, Eigen::Dynamic, 1>;
  matrix U;
  vector S;
  matrix V;
};

/// Options of randomized_svd.
struct rsvd_options {
  index_t oversampling = 10;    ///< p: the sketch has k + p columns (capped at min(m, n))
  index_t power_iterations = 2; ///< q: each one multiplies by M·Mᵀ, re-orthonormalising between
  std::uint64_t seed = 0;       ///< Philox key of the Gaussian test matrix
};

namespace detail {
/// The orthonormal basis Q [rows, cols] (cols ≤ rows) of the column space of Y, by thin
/// Householder QR; Y is given transposed (Yt [cols, rows] row-major, as apply returns it).
template <class C>
Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic> orthonormal_columns_of_transpose(const dense<C>& Yt) {
  using M = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic>;
  const M Y = Yt.transpose();
  Eigen::HouseholderQR<M> qr(Y);
  return qr.householderQ() * M::Identity(Y.rows(), Y.cols());
}

inline void check_truncation(index_t k, index_t m, index_t n, const char* op) {
  if (k < 1 || k > std::min(m, n))
    throw rank_error(std::string(op) + ": the rank k must be in [1, min(m, n)] = [1, " +
                     std::to_string(std::min(m, n)) + "] for a matrix " + shape_str(m, n) + "; got k = " +
                     std::to_string(k));
}
}  // namespace detail

/// The top-k SVD of a dense matrix by Eigen's BDCSVD (the exact reference; O(m·n·min(m, n))).
/// D: any Eigen dense matrix or expression; computed in C (double by default).
template <class C = double, class D>
  requires eigen_dense<D>
svd_result<C> truncated_svd(const D& M, index_t k) {
  using Mat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic>;
  detail::check_truncation(k, M.rows(), M.cols(), "deltaw::truncated_svd");
  const Mat Mc = M.template cast<C>();
  Eigen::BDCSVD<Mat> svd(Mc, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {svd.matrixU().leftCols(k), svd.singularValues().head(k), svd.matrixV().leftCols(k)};
}

/// The top-k SVD of a CPU expression (a weight view, an update, or `view(W) + Δ…`) by the
/// randomized range finder with q power iterations; the expression is only applied, never
/// materialised. Arithmetic in C (by default the expression's own: double if any operand is
/// double, else float). Cost: (2q + 2) applications to k + p vectors, plus O((m + n)·(k + p)²).
namespace detail {
template <class C, class E>
using rsvd_compute_t = std::conditional_t<std::is_void_v<C>, expression_compute_t<E>, C>;
}  // namespace detail

// The return types are written out (not auto): a call that does not depend on the caller's
// template parameters would otherwise compile the whole SVD just to learn its type, in
// every file that includes the caller's header.
template <class C = void, class E>
  requires cpu_expression<E>
svd_result<detail::rsvd_compute_t<C, E>> randomized_svd(const E& e, index_t k, const rsvd_options& opt = {}) {
  using CC = detail::rsvd_compute_t<C, E>;
  static_assert(std::is_same_v<CC, float> || std::is_same_v<CC, double>,
                "deltaw::randomized_svd: the arithmetic type must be float or double");
  using Mat = Eigen::Matrix<CC, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr const char* op = "deltaw::randomized_svd";
  const index_t m = e.rows(), n = e.cols();
  detail::check_truncation(k, m, n, op);
  if (opt.oversampling < 0 || opt.power_iterations < 0)
    throw argument_error(std::string(op) + ": oversampling and power_iterations must be non-negative; got p = " +
                         std::to_string(opt.oversampling) + ", q = " + std::to_string(opt.power_iterations));
  const index_t l = std::min<index_t>(k + opt.oversampling, std::min(m, n));

  // Ωᵀ [l, n], standard normal; element (i, j) is entry i·n + j of the stream.
  const random_stream rng{opt.seed, 0x72737664u /* "rsvd" */};
  dense<CC> Ot(l, n);
  for (index_t i = 0; i < l; ++i)
    for (index_t j = 0; j < n; ++j) Ot(i, j) = CC(rng.normal(std::uint64_t(i) * std::uint64_t(n) + std::uint64_t(j)));

  dense<CC> Yt(l, m), Zt(l, n);
  apply(e, Ot, Yt);  // (M·Ω)ᵀ
  Mat Q = detail::orthonormal_columns_of_transpose(Yt);
  for (index_t it = 0; it < opt.power_iterations; ++it) {
    // Re-orthonormalise after each product so the small singular directions are not lost
    // to rounding (HMT Alg. 4.4).
    const dense<CC> Qt = Q.transpose();
    apply_transposed(e, Qt, Zt);  // (Mᵀ·Q)ᵀ
    const Mat Z = detail::orthonormal_columns_of_transpose(Zt);
    const dense<CC> Ztt = Z.transpose();
    apply(e, Ztt, Yt);  // (M·Z)ᵀ
    Q = detail::orthonormal_columns_of_transpose(Yt);
  }
  // B = Qᵀ·M [l, n]; its SVD B = Ũ·Σ·Vᵀ gives M ≈ (Q·Ũ)·Σ·Vᵀ.
  const dense<CC> Qt = Q.transpose();
  apply_transposed(e, Qt, Zt);
  const Mat Bm = Zt;
  Eigen::BDCSVD<Mat> svd(Bm, Eigen::ComputeThinU | Eigen::ComputeThinV);
  svd_result<CC> out;
  out.U = Q * svd.matrixU().leftCols(k);
  out.S = svd.singularValues().head(k);
  out.V = svd.matrixV().leftCols(k);
  return out;
}

/// The same on a dense Eigen matrix (viewed, not copied).
template <class C = void, class D>
  requires eigen_direct<D>
svd_result<detail::rsvd_compute_t<C, decltype(view(std::declval<const D&>()))>> randomized_svd(
    const D& M, index_t k, const rsvd_options& opt = {}) {
  return randomized_svd<C>(view(M), k, opt);
}

DELTAW_NAMESPACE_END
