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
//  - how many points are "boundary": lodd_boundary takes a ratio (0.1 by default, as the
//    authors' toolkit); lodd_boundary_adaptive (aLoDD, below) chooses it from the data.
//
// aLoDD, the adaptive ratio. The paper sets the ratio by a "grid-structure assumption of
// data distribution" together with the intrinsic dimension; its equation was not available
// to us, so the rule below is the authors' toolkit's (ZPGuiGroupWhu/lodd, GetRatio; learnt
// from, not copied), UNVERIFIED against the paper's text. Under the assumption, the n points
// of one cluster lie on a regular grid in d_I dimensions, n^(1/d_I) nodes a side, whose
// boundary nodes are all but the (n^(1/d_I) − 2)^(d_I) inner ones; c equal clusters give
// (n^(1/d_I) − 2·c^(1/d_I))^(d_I) inner nodes in all. So
//   ratio = min(0.5, 1 − (n^(1/d_I) − 2·c^(1/d_I))^(d_I) / n).
// The intrinsic dimension d_I comes from PCA: with λ the covariance eigenvalues, descending,
// m = the number of leading components whose cumulative share Σ_{j≤i} λ_j / Σ λ is still
// below `contribution` (0.8), and d_I = ⌊max(2, min(m, log₂ n))⌋ (the toolkit's). Note that
// m counts the components strictly below the share, so isotropic data in D dimensions gets
// d_I = D − 1 for D ≥ 3 (a 3-D cube: 2); `intrinsic_dim` overrides the estimate. Choices here:
//  - the count is round(ratio·n) (the toolkit's `round`), the lowest-scoring points;
//  - m = 0 (the first component alone reaches the share: the toolkit's expression is then
//    empty) gives d_I = 2; a non-positive grid side n^(1/d_I) − 2·c^(1/d_I) gives the cap;
//  - for d ≥ n the toolkit takes the eigenvalues of the uncentred X·Xᵀ/n; here the centred
//    covariance's non-zero spectrum is used in both cases (from the smaller Gram matrix),
//    `uncentred_when_wide` restores the toolkit's choice (UNVERIFIED which one is meant);
//  - the cap (0.5) and c (1) are options.
// Two alternative rules that read the sorted score curve instead (not in the paper, ours,
// UNVERIFIED as aLoDD; alodd_rule): `largest_gap`, the count c maximising the jump
// s_(c+1) − s_(c) between consecutive sorted scores, and `knee`, the c maximising
// y_c − x_c on the curve normalised to the unit square (point c, ranks from 0, the first
// interior one: x_c = c/(n − 1), y_c = (s_(c+1) − s_min)/(s_max − s_min); the elbow
// where the low boundary scores meet the plateau of interior ones, Kneedle-style); both search c in [max(1, ⌈min_ratio·n⌉), min(n − 1, ⌊max_ratio·n⌋)],
// ties to the smaller c.
// Scores depend on the metric: standardise features first if their scales differ.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
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

/// aLoDD's rules for the number of boundary points (see the header comment).
enum class alodd_rule {
  grid,         ///< the paper's grid-structure ratio from n, the intrinsic dimension and c
  largest_gap,  ///< the largest jump of the sorted scores (ours, UNVERIFIED as aLoDD)
  knee,         ///< the elbow of the normalised sorted-score curve (ours, UNVERIFIED as aLoDD)
};

struct alodd_options {
  lodd_options lodd{};                 ///< k, w of the scores
  alodd_rule rule = alodd_rule::grid;  ///< how the count is chosen
  index_t clusters = 1;                ///< grid: c, the number of clusters (equal-sized grids)
  double contribution = 0.8;           ///< grid: PCA share that bounds the intrinsic dimension
  index_t intrinsic_dim = 0;           ///< grid: d_I; 0 estimates it by PCA
  bool uncentred_when_wide = false;    ///< grid, d ≥ n: the toolkit's uncentred X·Xᵀ/n spectrum
  double max_ratio = 0.5;              ///< grid: the cap; gap/knee: the largest admissible ratio
  double min_ratio = 0.0;              ///< gap/knee: the smallest admissible ratio
};

struct alodd_result {
  std::vector<index_t> boundary;  ///< the boundary points, lowest score first (ties: lower index)
  double ratio = 0;               ///< grid: the rule's ratio before rounding; gap/knee: count / n
  double threshold = 0;           ///< a score cut between the last boundary and first interior point
  index_t intrinsic_dim = 0;      ///< grid: the d_I used; 0 for the other rules
  Eigen::VectorXd scores;         ///< the LoDD score of every point
};

/// aLoDD's grid ratio min(max_ratio, 1 − (n^(1/d) − 2·c^(1/d))^d / n); the cap when the
/// grid side n^(1/d) − 2·c^(1/d) is not positive (every node on a boundary).
inline double alodd_grid_ratio(index_t n, index_t d, index_t clusters = 1, double max_ratio = 0.5) {
  constexpr const char* op = "deltaw::alodd_grid_ratio";
  if (n < 1 || d < 1 || clusters < 1 || clusters > n)
    throw argument_error(std::string(op) + ": needs n ≥ 1, d ≥ 1 and 1 ≤ clusters ≤ n; got n = " + std::to_string(n) +
                         ", d = " + std::to_string(d) + ", clusters = " + std::to_string(clusters));
  if (!(std::isfinite(max_ratio) && max_ratio > 0.0 && max_ratio <= 1.0))
    throw argument_error(std::string(op) + ": max_ratio must lie in (0, 1]; got " + std::to_string(max_ratio));
  const double side = std::pow(double(n), 1.0 / double(d)) - 2.0 * std::pow(double(clusters), 1.0 / double(d));
  if (!(side > 0.0)) return max_ratio;
  return std::min(max_ratio, 1.0 - std::pow(side, double(d)) / double(n));
}

/// aLoDD's intrinsic dimension ⌊max(2, min(m, log₂ n))⌋, m = the number of leading
/// principal components whose cumulative variance share is below `contribution` (0, 1].
template <class X>
index_t alodd_intrinsic_dim(const X& points, double contribution = 0.8, bool uncentred_when_wide = false) {
  constexpr const char* op = "deltaw::alodd_intrinsic_dim";
  if (!(std::isfinite(contribution) && contribution > 0.0 && contribution <= 1.0))
    throw argument_error(std::string(op) + ": contribution must lie in (0, 1]; got " + std::to_string(contribution));
  const dense<double> P = detail::points_as<double>(points);
  const index_t n = P.rows(), d = P.cols();
  if (n < 2 || d < 1)
    throw shape_error(std::string(op) + ": needs at least 2 points of at least 1 feature; got points " +
                      detail::shape_str(n, d));
  if (!P.allFinite()) throw non_finite_error(std::string(op) + ": the points contain NaN or Inf");
  Eigen::MatrixXd G;
  if (d < n) {
    const Eigen::MatrixXd C = P.rowwise() - P.colwise().mean();
    G = C.transpose() * C / double(n - 1);  // d × d covariance
  } else if (uncentred_when_wide) {
    G = P * P.transpose() / double(n);  // n × n, the toolkit's choice
  } else {
    const Eigen::MatrixXd C = P.rowwise() - P.colwise().mean();
    G = C * C.transpose() / double(n - 1);  // n × n: the same non-zero spectrum as the covariance
  }
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(G, Eigen::EigenvaluesOnly);
  Eigen::VectorXd lambda = es.eigenvalues().cwiseMax(0.0);  // ascending
  std::sort(lambda.data(), lambda.data() + lambda.size(), std::greater<double>());
  const double total = lambda.sum();
  index_t m = 0;
  if (total > 0.0) {
    double cum = 0.0;
    for (index_t i = 0; i < lambda.size(); ++i) {
      cum += lambda(i);
      if (cum / total < contribution) m = i + 1;  // the last component still below the share
    }
  }
  const double dim = std::max(2.0, std::min(double(m), std::log2(double(n))));
  return index_t(std::floor(dim));
}

namespace detail {
/// The indices of s in ascending order of (score, index).
template <class V>
std::vector<index_t> lodd_order(const V& s) {
  std::vector<index_t> order(static_cast<std::size_t>(s.size()));
  std::iota(order.begin(), order.end(), index_t(0));
  std::sort(order.begin(), order.end(), [&](index_t a, index_t b) { return s(a) < s(b) || (s(a) == s(b) && a < b); });
  return order;
}
}  // namespace detail

/// aLoDD: the LoDD boundary points, their number chosen from the data by `opt.rule` (the
/// paper's grid ratio by default). Needs n > k. See the header comment for the rules.
template <class X>
alodd_result lodd_boundary_adaptive(const X& points, const alodd_options& opt = {}) {
  constexpr const char* op = "deltaw::lodd_boundary_adaptive";
  detail::check_lodd_options(opt.lodd, op);
  if (!(std::isfinite(opt.max_ratio) && opt.max_ratio > 0.0 && opt.max_ratio <= 1.0))
    throw argument_error(std::string(op) + ": max_ratio must lie in (0, 1]; got " + std::to_string(opt.max_ratio));
  if (!(std::isfinite(opt.min_ratio) && opt.min_ratio >= 0.0 && opt.min_ratio <= opt.max_ratio))
    throw argument_error(std::string(op) + ": min_ratio must lie in [0, max_ratio = " + std::to_string(opt.max_ratio) +
                         "]; got " + std::to_string(opt.min_ratio));
  if (!(std::isfinite(opt.contribution) && opt.contribution > 0.0 && opt.contribution <= 1.0))
    throw argument_error(std::string(op) + ": contribution must lie in (0, 1]; got " + std::to_string(opt.contribution));
  if (opt.intrinsic_dim < 0)
    throw argument_error(std::string(op) + ": intrinsic_dim must be ≥ 0 (0 estimates it); got " +
                         std::to_string(opt.intrinsic_dim));
  const dense<double> P = detail::points_as<double>(points);
  const index_t n = P.rows();
  if (opt.clusters < 1 || opt.clusters > n)
    throw argument_error(std::string(op) + ": clusters must be in [1, n] = [1, " + std::to_string(n) + "]; got " +
                         std::to_string(opt.clusters));
  if (opt.lodd.k < 1 || opt.lodd.k > n - 1)
    throw rank_error(std::string(op) + ": k must be in [1, n − 1] = [1, " + std::to_string(n - 1) + "] for points " +
                     detail::shape_str(n, P.cols()) + "; got k = " + std::to_string(opt.lodd.k));

  alodd_result r;
  const knn_result nb = detail::knn_impl<double>(P, P, opt.lodd.k, true, op);
  r.scores = detail::lodd_from_neighbours<double>(P, nb, opt.lodd.w);
  const std::vector<index_t> order = detail::lodd_order(r.scores);
  auto sorted = [&](index_t i) { return r.scores(order[std::size_t(i)]); };

  index_t count = 0;
  if (opt.rule == alodd_rule::grid) {
    r.intrinsic_dim = opt.intrinsic_dim > 0 ? opt.intrinsic_dim
                                            : alodd_intrinsic_dim(P, opt.contribution, opt.uncentred_when_wide);
    r.ratio = alodd_grid_ratio(n, r.intrinsic_dim, opt.clusters, opt.max_ratio);
    count = std::min<index_t>(n, index_t(std::llround(r.ratio * double(n))));
  } else {
    const index_t lo = std::max<index_t>(1, index_t(std::ceil(opt.min_ratio * double(n) - 1e-9)));
    const index_t hi = std::min<index_t>(n - 1, index_t(std::floor(opt.max_ratio * double(n) + 1e-9)));
    if (lo > hi)
      throw argument_error(std::string(op) + ": no admissible count: [max(1, ⌈min_ratio·n⌉), min(n − 1, ⌊max_ratio·n⌋)] = [" +
                           std::to_string(lo) + ", " + std::to_string(hi) + "] is empty for n = " + std::to_string(n));
    const double smin = sorted(0), range = sorted(n - 1) - smin;
    double best = -std::numeric_limits<double>::infinity();
    count = lo;
    for (index_t c = lo; c <= hi; ++c) {
      // c boundary points: sorted(0..c-1); the first interior one is sorted(c)
      const double v = opt.rule == alodd_rule::largest_gap
                           ? sorted(c) - sorted(c - 1)
                           : (range > 0.0 ? (sorted(c) - smin) / range : 0.0) - double(c) / double(n - 1);
      if (v > best) {
        best = v;
        count = c;
      }
    }
    r.ratio = double(count) / double(n);
  }
  if (count == 0)
    r.threshold = sorted(0);
  else if (count == n)
    r.threshold = std::numeric_limits<double>::infinity();
  else
    r.threshold = 0.5 * (sorted(count - 1) + sorted(count));
  r.boundary.assign(order.begin(), order.begin() + count);
  return r;
}

DELTAW_NAMESPACE_END
