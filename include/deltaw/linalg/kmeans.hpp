// SPDX-License-Identifier: MIT
// k-means (Lloyd's iterations from k-means++ seeding, Arthur & Vassilvitskii 2007) and exact
// k-nearest neighbours, over a set of points X [n, d] (one point per row, like the
// activations [tokens, features] they are meant for: EVA's batches, LoDD's neighbours).
//
// Both compute squared distances as ‖x‖² + ‖c‖² − 2·x·c so that the bulk of the work is one
// GEMM per block of rows; the neighbours' distances are then recomputed directly as ‖x − y‖
// so the reported values carry no cancellation error. Arithmetic in C (double by default).
// The seeding draws from the counter-based Philox stream (core/random.hpp), so a result is
// a pure function of (points, k, options).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backend/cpu/eigen_bridge.hpp"
#include "../core/eigen.hpp"
#include "../core/error.hpp"
#include "../core/random.hpp"

DELTAW_NAMESPACE_BEGIN

namespace detail {
/// The points as a dense row-major matrix of C: an Eigen object (any expression) or a deltaw
/// view (any storage type, any strides). Always a copy: k-means and k-NN read the points
/// many times and want contiguous rows of the arithmetic type.
template <class C, class X>
dense<C> points_as(const X& x) {
  if constexpr (eigen_dense<X>) {
    return x.template cast<C>();
  } else if constexpr (is_matrix_view_v<X>) {
    return cpu::to_dense<C>(x);
  } else {
    static_assert(eigen_dense<X> || is_matrix_view_v<X>,
                  "deltaw: points must be an Eigen matrix or a deltaw matrix_view [n, d], one point per row");
    return {};
  }
}

template <class C>
void check_finite_points(const dense<C>& X, const char* op) {
  if (!X.allFinite()) throw non_finite_error(std::string(op) + ": the points contain a NaN or an infinity");
}

/// Squared distances D(i, j) = ‖q_i − p_j‖² for a block of queries Q [b, d] against P [n, d]
/// (‖p_j‖² given), clamped at 0 where rounding made them negative.
template <class C>
void squared_distances(const dense<C>& Q, const dense<C>& P, const Eigen::Matrix<C, 1, Eigen::Dynamic>& p_sq,
                       dense<C>& D) {
  D.resize(Q.rows(), P.rows());
  D.noalias() = C(-2) * Q * P.transpose();
  const Eigen::Matrix<C, Eigen::Dynamic, 1> q_sq = Q.rowwise().squaredNorm();
  D.colwise() += q_sq;
  D.rowwise() += p_sq;
  D = D.cwiseMax(C(0));
}

/// 53-bit uniform on [0, 1) from two 32-bit words of the stream (k-means++ picks a point
/// with probability ∝ D², which needs more resolution than one float draw for large n).
inline double uniform53(const random_stream& rng, std::uint64_t i) {
  const std::uint64_t hi = rng.bits(2 * i) >> 5, lo = rng.bits(2 * i + 1) >> 6;  // 27 + 26 bits
  return double((hi << 26) | lo) * (1.0 / 9007199254740992.0);
}
}  // namespace detail

// ---------------------------------------------------------------------------------------
// k-nearest neighbours
// ---------------------------------------------------------------------------------------

/// The k nearest neighbours of each query: indices into the points and Euclidean distances,
/// both [queries, k] row-major, nearest first (ties: lower index first).
struct knn_result {
  Eigen::Matrix<index_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> indices;
  dense<double> distances;
};

namespace detail {
/// exclude_self: query i is point i and is not its own neighbour (the same-set search).
template <class C>
knn_result knn_impl(const dense<C>& Q, const dense<C>& P, index_t k, bool exclude_self, const char* op) {
  const index_t nq = Q.rows(), np = P.rows();
  if (Q.cols() != P.cols())
    throw shape_error(std::string(op) + ": queries " + shape_str(Q.rows(), Q.cols()) + " and points " +
                      shape_str(P.rows(), P.cols()) + " must have the same number of columns (features)");
  const index_t available = exclude_self ? np - 1 : np;
  if (k < 1 || k > available)
    throw rank_error(std::string(op) + ": k must be in [1, " + std::to_string(available) + "] for " + std::to_string(np) +
                     " points" + (exclude_self ? " (a point is not its own neighbour)" : "") + "; got k = " +
                     std::to_string(k));
  check_finite_points(Q, op);
  check_finite_points(P, op);
  knn_result out;
  out.indices.resize(nq, k);
  out.distances.resize(nq, k);
  const Eigen::Matrix<C, 1, Eigen::Dynamic> p_sq = P.rowwise().squaredNorm().transpose();
  // Blocks of queries keep the distance block at about 32 MiB at most.
  const index_t block = std::clamp<index_t>(index_t(4u << 20) / std::max<index_t>(np, 1), 1, 1024);
  dense<C> D;
  std::vector<index_t> cand(static_cast<std::size_t>(np));
  for (index_t q0 = 0; q0 < nq; q0 += block) {
    const index_t b = std::min(block, nq - q0);
    squared_distances<C>(dense<C>(Q.middleRows(q0, b)), P, p_sq, D);
    for (index_t i = 0; i < b; ++i) {
      const index_t qi = q0 + i;
      auto dist = [&](index_t j) { return D(i, j); };
      // Select k + 1 by the GEMM distances (one spare, in case a rounding tie at the edge
      // flips), then order the survivors by exact distances.
      cand.resize(std::size_t(np));
      std::iota(cand.begin(), cand.end(), index_t(0));
      if (exclude_self) cand.erase(cand.begin() + qi);
      const std::size_t keep = std::min<std::size_t>(std::size_t(k) + 1, cand.size());
      auto less = [&](index_t a, index_t c) { return dist(a) < dist(c) || (dist(a) == dist(c) && a < c); };
      std::nth_element(cand.begin(), cand.begin() + std::ptrdiff_t(keep) - 1, cand.end(), less);
      std::vector<std::pair<double, index_t>> exact(keep);
      for (std::size_t s = 0; s < keep; ++s) {
        const index_t j = cand[s];
        exact[s] = {(Q.row(qi).template cast<double>() - P.row(j).template cast<double>()).norm(), j};
      }
      std::sort(exact.begin(), exact.end());
      for (index_t s = 0; s < k; ++s) {
        out.indices(qi, s) = exact[std::size_t(s)].second;
        out.distances(qi, s) = exact[std::size_t(s)].first;
      }
    }
  }
  return out;
}
}  // namespace detail

/// The k nearest neighbours of every point among the other points of the same set
/// (a point is never its own neighbour; an exact duplicate of it is, at distance 0).
/// X [n, d]: Eigen matrix or deltaw view; k in [1, n − 1].
template <class C = double, class X>
knn_result knn(const X& points, index_t k) {
  const dense<C> P = detail::points_as<C>(points);
  return detail::knn_impl<C>(P, P, k, true, "deltaw::knn");
}

/// The k nearest points of each query row. queries [m, d], points [n, d]; k in [1, n].
template <class C = double, class XQ, class XP>
knn_result knn(const XQ& queries, const XP& points, index_t k) {
  return detail::knn_impl<C>(detail::points_as<C>(queries), detail::points_as<C>(points), k, false, "deltaw::knn");
}

// ---------------------------------------------------------------------------------------
// k-means
// ---------------------------------------------------------------------------------------

struct kmeans_options {
  index_t max_iterations = 100;  ///< Lloyd iterations per restart
  /// Stop when an iteration lowers the inertia by less than this fraction of it (or when no
  /// assignment changes).
  double tolerance = 1e-6;
  index_t restarts = 1;    ///< independent seedings; the lowest inertia wins
  std::uint64_t seed = 0;  ///< Philox key of the k-means++ draws
};

template <class C>
struct kmeans_result {
  dense<C> centroids;           ///< [k, d]
  std::vector<index_t> labels;  ///< [n]: the centroid of each point
  double inertia = 0;           ///< Σ ‖x_i − c_{label i}‖²
  index_t iterations = 0;       ///< Lloyd iterations of the returned run
  bool converged = false;       ///< stopped by the tolerance rather than max_iterations
};

namespace detail {
/// k-means++ seeding: the first centre uniformly, each next one with probability ∝ the
/// squared distance to the nearest centre chosen so far. Draw t of restart `run` is
/// element t of Philox stream (seed, "kmpp" + run).
template <class C>
dense<C> kmeans_pp(const dense<C>& X, index_t k, std::uint64_t seed, index_t run) {
  const index_t n = X.rows();
  const random_stream rng{seed, 0x6b6d7070'00000000ull + std::uint64_t(run)};
  dense<C> centres(k, X.cols());
  index_t first = std::min<index_t>(index_t(detail::uniform53(rng, 0) * double(n)), n - 1);
  centres.row(0) = X.row(first);
  Eigen::Matrix<double, Eigen::Dynamic, 1> d2 = (X.rowwise() - X.row(first)).rowwise().squaredNorm().template cast<double>();
  for (index_t c = 1; c < k; ++c) {
    const double total = d2.sum();
    index_t pick = 0;
    if (total > 0) {
      const double u = detail::uniform53(rng, std::uint64_t(c)) * total;
      double acc = 0;
      pick = -1;
      for (index_t i = 0; i < n; ++i) {
        acc += d2(i);
        if (d2(i) > 0 && acc > u) {
          pick = i;
          break;
        }
      }
      if (pick < 0)  // u landed past the rounded sum: the last point with mass
        for (index_t i = n - 1; i >= 0; --i)
          if (d2(i) > 0) {
            pick = i;
            break;
          }
    } else {
      // Fewer distinct points than k: every point coincides with a centre; repeat one.
      pick = std::min<index_t>(index_t(detail::uniform53(rng, std::uint64_t(c)) * double(n)), n - 1);
    }
    centres.row(c) = X.row(pick);
    d2 = d2.cwiseMin((X.rowwise() - X.row(pick)).rowwise().squaredNorm().template cast<double>());
  }
  return centres;
}

/// Assigns each point to its nearest centre; returns the inertia.
template <class C>
double kmeans_assign(const dense<C>& X, const dense<C>& centres, std::vector<index_t>& labels,
                     Eigen::Matrix<double, Eigen::Dynamic, 1>& d2) {
  const index_t n = X.rows();
  const Eigen::Matrix<C, 1, Eigen::Dynamic> c_sq = centres.rowwise().squaredNorm().transpose();
  const index_t block = std::clamp<index_t>(index_t(4u << 20) / std::max<index_t>(centres.rows(), 1), 1, 4096);
  dense<C> D;
  double inertia = 0;
  for (index_t r0 = 0; r0 < n; r0 += block) {
    const index_t b = std::min(block, n - r0);
    squared_distances<C>(dense<C>(X.middleRows(r0, b)), centres, c_sq, D);
    for (index_t i = 0; i < b; ++i) {
      Eigen::Index j = 0;
      D.row(i).minCoeff(&j);
      labels[std::size_t(r0 + i)] = index_t(j);
      d2(r0 + i) = (X.row(r0 + i) - centres.row(j)).template cast<double>().squaredNorm();
      inertia += d2(r0 + i);
    }
  }
  return inertia;
}
}  // namespace detail

/// k-means of the rows of X [n, d] into k clusters, 1 ≤ k ≤ n. An empty cluster is
/// re-seeded with the point farthest from its centre (so k clusters stay in use while at
/// least k distinct points exist).
template <class C = double, class X>
kmeans_result<C> kmeans(const X& points, index_t k, const kmeans_options& opt = {}) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "deltaw::kmeans: C must be float or double");
  constexpr const char* op = "deltaw::kmeans";
  const dense<C> P = detail::points_as<C>(points);
  const index_t n = P.rows(), d = P.cols();
  if (k < 1 || k > n)
    throw rank_error(std::string(op) + ": k must be in [1, n] = [1, " + std::to_string(n) + "] for points " +
                     detail::shape_str(n, d) + "; got k = " + std::to_string(k));
  if (opt.max_iterations < 1 || opt.restarts < 1 || !std::isfinite(opt.tolerance) || opt.tolerance < 0)
    throw argument_error(std::string(op) + ": need max_iterations ≥ 1, restarts ≥ 1 and a finite tolerance ≥ 0; got " +
                         std::to_string(opt.max_iterations) + ", " + std::to_string(opt.restarts) + ", " +
                         std::to_string(opt.tolerance));
  detail::check_finite_points(P, op);

  kmeans_result<C> best;
  best.inertia = std::numeric_limits<double>::infinity();
  std::vector<index_t> labels(static_cast<std::size_t>(n)), previous;
  Eigen::Matrix<double, Eigen::Dynamic, 1> d2(n);
  for (index_t run = 0; run < opt.restarts; ++run) {
    dense<C> centres = detail::kmeans_pp<C>(P, k, opt.seed, run);
    double inertia = detail::kmeans_assign<C>(P, centres, labels, d2);
    index_t it = 0;
    bool converged = false;
    while (it < opt.max_iterations) {
      ++it;
      // Update: each centre to the mean of its points (sums in double).
      Eigen::MatrixXd sums = Eigen::MatrixXd::Zero(k, d);
      std::vector<index_t> counts(std::size_t(k), 0);
      for (index_t i = 0; i < n; ++i) {
        sums.row(labels[std::size_t(i)]) += P.row(i).template cast<double>();
        ++counts[std::size_t(labels[std::size_t(i)])];
      }
      for (index_t c = 0; c < k; ++c) {
        if (counts[std::size_t(c)] > 0) {
          centres.row(c) = (sums.row(c) / double(counts[std::size_t(c)])).template cast<C>();
        } else {
          Eigen::Index far = 0;
          d2.maxCoeff(&far);
          centres.row(c) = P.row(far);
          d2(far) = 0;  // not chosen twice in this pass
        }
      }
      previous = labels;
      const double next = detail::kmeans_assign<C>(P, centres, labels, d2);
      const bool same = labels == previous;
      const bool small = inertia - next <= opt.tolerance * std::max(next, std::numeric_limits<double>::min());
      inertia = next;
      if (same || small) {
        converged = true;
        break;
      }
    }
    if (inertia < best.inertia) {
      best.centroids = centres;
      best.labels = labels;
      best.inertia = inertia;
      best.iterations = it;
      best.converged = converged;
    }
  }
  return best;
}

DELTAW_NAMESPACE_END
