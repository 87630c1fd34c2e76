// SPDX-License-Identifier: MIT
// LoDD, local direction dispersion (Peng, Gui, Gui, Wu 2023, "A Robust and Efficient Boundary
// Point Detection Method by Measuring Local Direction Dispersion", arXiv:2312.04065): an
// interior point has neighbours in every direction, a boundary point only on one side.
//
// For point x with k nearest neighbours y_1..y_k: unit directions u_j = (y_j − x)/‖y_j − x‖,
// their mean ū and population covariance Σ = (1/k)·Σ_j (u_j − ū)(u_j − ū)ᵀ. The score
//   L = w·tr(Σ)² + d·(1 − w)/(d − 1)·(tr(Σ)² − tr(Σ²))
// is 1 for directions spread evenly over all d dimensions and falls towards 0 as they
// gather on one side (tr(Σ) = 1 − ‖ū‖²) or in a few dimensions (tr(Σ)² − tr(Σ²) =
// 2·Σ_{a<b} λ_a·λ_b). The lowest scores are the boundary points. tr(Σ²) = ‖C·Cᵀ‖²_F / k²
// with C [k, d] the centred directions, so a point costs O(k²·d), never a d × d matrix.
//
// Choices this header makes where the method leaves room (options or documented here):
//  - k = 20 and w = 0.5 by default (lodd_options);
//  - a neighbour at distance 0 (an exact duplicate) has no direction and is left out: the
//    covariance is over the k' ≤ k remaining directions; a point with none scores 0;
//  - d = 1: tr(Σ)² − tr(Σ²) = 0 and the second term is taken as 0 (the factor d/(d − 1)
//    is undefined), so scores lie in [0, w];
//  - how many points are "boundary" is the caller's: lodd_boundary takes a ratio
//    (0.1 by default, as the authors' toolkit); the paper's adaptive ratio (aLoDD) is not
//    implemented.
// Scores depend on the metric: standardise features first if their scales differ.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "../linalg/kmeans.hpp"

DELTAW_NAMESPACE_BEGIN

struct lodd_options {
  index_t k = 20;   ///< neighbours per point
  double w = 0.5;   ///< weight of tr(Σ)² (the mean-direction term) against the spread term
};

namespace detail {
inline void check_lodd_options(const lodd_options& opt, const char* op) {
  if (!(std::isfinite(opt.w) && opt.w >= 0.0 && opt.w <= 1.0))
    throw argument_error(std::string(op) + ": w must lie in [0, 1]; got " + std::to_string(opt.w));
}

/// The LoDD scores of the points X [n, d] given their neighbours (indices [n, k]).
template <class C>
Eigen::VectorXd lodd_from_neighbours(const dense<C>& X, const knn_result& nb, double w) {
  const index_t n = X.rows(), d = X.cols(), k = nb.indices.cols();
  Eigen::VectorXd score(n);
  Eigen::MatrixXd U(k, d);
  for (index_t i = 0; i < n; ++i) {
    index_t m = 0;
    for (index_t s = 0; s < k; ++s) {
      const double dist = nb.distances(i, s);
      if (!(dist > 0.0)) continue;  // a duplicate: no direction
      U.row(m++) = (X.row(nb.indices(i, s)).template cast<double>() - X.row(i).template cast<double>()) / dist;
    }
    if (m == 0) {
      score(i) = 0.0;
      continue;
    }
    const auto Um = U.topRows(m);
    const Eigen::RowVectorXd mean = Um.colwise().mean();
    const Eigen::MatrixXd Cn = Um.rowwise() - mean;
    const Eigen::MatrixXd G = Cn * Cn.transpose();  // k' × k' Gram of the centred directions
    const double tr = G.trace() / double(m);        // = 1 − ‖ū‖² up to rounding
    const double tr_sq = G.squaredNorm() / (double(m) * double(m));
    const double spread = d > 1 ? double(d) / double(d - 1) * (tr * tr - tr_sq) : 0.0;
    score(i) = w * tr * tr + (1.0 - w) * spread;
  }
  return score;
}
}  // namespace detail

/// The LoDD score of every row of X [n, d] (Eigen matrix or deltaw view): in [0, 1], low on
/// the boundary. Needs n > k. Computed in double.
template <class X>
Eigen::VectorXd lodd_scores(const X& points, const lodd_options& opt = {}) {
  constexpr const char* op = "deltaw::lodd_scores";
  detail::check_lodd_options(opt, op);
  const dense<double> P = detail::points_as<double>(points);
  if (opt.k < 1 || opt.k > P.rows() - 1)
    throw rank_error(std::string(op) + ": k must be in [1, n − 1] = [1, " + std::to_string(P.rows() - 1) +
                     "] for points " + detail::shape_str(P.rows(), P.cols()) + "; got k = " + std::to_string(opt.k));
  const knn_result nb = detail::knn_impl<double>(P, P, opt.k, true, op);
  return detail::lodd_from_neighbours<double>(P, nb, opt.w);
}

/// The ⌈ratio·n⌉ points with the lowest LoDD scores (the boundary), lowest first (ties:
/// lower index first). ratio in [0, 1].
template <class X>
std::vector<index_t> lodd_boundary(const X& points, double ratio = 0.1, const lodd_options& opt = {}) {
  if (!(std::isfinite(ratio) && ratio >= 0.0 && ratio <= 1.0))
    throw argument_error("deltaw::lodd_boundary: the ratio must lie in [0, 1]; got " + std::to_string(ratio));
  const Eigen::VectorXd s = lodd_scores(points, opt);
  const index_t n = s.size();
  const index_t count = std::min<index_t>(n, index_t(std::ceil(ratio * double(n) - 1e-9)));
  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t(0));
  auto less = [&](index_t a, index_t b) { return s(a) < s(b) || (s(a) == s(b) && a < b); };
  std::partial_sort(order.begin(), order.begin() + count, order.end(), less);
  order.resize(std::size_t(count));
  return order;
}

DELTAW_NAMESPACE_END
