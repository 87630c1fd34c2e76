// SPDX-License-Identifier: MIT
// Incremental (batch by batch) PCA of mean-centred data: the sequential Karhunen–Loève
// update of Ross, Lim, Lin and Yang ("Incremental learning for robust visual tracking",
// IJCV 2008), as scikit-learn's IncrementalPCA and PEFT's EVA use it.
//
// After batches X₁ … X_t (rows are samples), the state is the mean μ, the per-feature
// variance, and the top-k right singular vectors (components, [k, features]) and singular
// values S of the centred concatenation [X₁; …; X_t] − μ. A new batch X [b, features] with
// mean x̄ is folded in by the SVD of the stacked matrix
//     M = [ diag(S)·components ;  X − x̄ ;  √(n·b/(n + b))·(μ − x̄) ]      ((k + b + 1) × features)
// whose Gram matrix MᵀM equals the centred scatter of all the data seen when the previous
// state was exact (the last row is the mean-shift correction of the pooled scatter). Only
// the top k of M's spectrum is kept, so the result is exact when the centred data has rank
// ≤ k, and otherwise close to the dense PCA whenever the spectrum has a clear gap after k.
//
// The SVD of M is the randomized one of linalg/randomized_svd.hpp with a sketch of q = 2k
// columns and 4 power iterations (PEFT's defaults), or the dense BDCSVD on request. Signs
// are fixed by V: each component's entry of largest magnitude is positive, so successive
// batches can be compared by a signed cosine (EVA's convergence test). Arithmetic in double.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "../backend/cpu/eigen_bridge.hpp"
#include "../expr/low_rank.hpp"  // backend/cpu/ops.hpp (via randomized_svd.hpp) names low_rank without including it
#include "randomized_svd.hpp"

DELTAW_NAMESPACE_BEGIN

/// Options of incremental_pca.
struct ipca_options {
  /// Use the randomized SVD (q = sketch columns, power iterations); false: dense BDCSVD.
  bool randomized = true;
  index_t sketch = -1;           ///< q; negative: 2k (PEFT's lowrank_q default), capped at min(rows, features)
  index_t power_iterations = 4;  ///< PEFT's lowrank_niter default
  std::uint64_t seed = 0;        ///< Philox key of the randomized SVD (the same each batch, as PEFT's fixed seed)
};

/// Mean-centred PCA with k components, fitted batch by batch (see the top of this header).
class incremental_pca {
 public:
  using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector = Eigen::VectorXd;

  explicit incremental_pca(index_t n_components, ipca_options opt = {}) : k_(n_components), opt_(opt) {
    if (k_ < 1)
      throw rank_error("deltaw::incremental_pca: the number of components must be at least 1; got " +
                       std::to_string(k_));
    if (opt_.power_iterations < 0)
      throw argument_error("deltaw::incremental_pca: power_iterations must be non-negative; got " +
                           std::to_string(opt_.power_iterations));
  }

  /// Folds in a batch X [samples, features] (an Eigen matrix or a CPU view, any element
  /// type deltaw reads). `keep`, when not empty, has one entry per row: rows with 0 are
  /// dropped (padding, ignored labels). The first batch must keep at least k rows.
  template <class M>
  void partial_fit(const M& X, std::span<const std::uint8_t> keep = {}) {
    const auto v = view(X);
    using TX = std::remove_const_t<typename decltype(v)::element_type>;
    const matrix_view<const TX> Xv(v);
    constexpr const char* op = "deltaw::incremental_pca::partial_fit";
    if (!keep.empty() && index_t(keep.size()) != Xv.rows())
      throw shape_error(std::string(op) + ": the keep mask has " + std::to_string(keep.size()) +
                        " entries for a batch " + detail::shape_str(Xv.rows(), Xv.cols()));
    index_t b = 0;
    for (index_t i = 0; i < Xv.rows(); ++i) b += keep.empty() || keep[std::size_t(i)] ? 1 : 0;
    matrix Xb(b, Xv.cols());
    for (index_t i = 0, o = 0; i < Xv.rows(); ++i) {
      if (!keep.empty() && !keep[std::size_t(i)]) continue;
      for (index_t j = 0; j < Xv.cols(); ++j) {
        const double x = convert<double>(Xv(i, j));
        if (!std::isfinite(x))
          throw non_finite_error(std::string(op) + ": the batch " + detail::shape_str(Xv.rows(), Xv.cols()) +
                                 " has a non-finite entry at (" + std::to_string(i) + ", " + std::to_string(j) + ")");
        Xb(o, j) = x;
      }
      ++o;
    }
    fit_rows<M>(Xb);
  }

  /// True once a batch has been folded in.
  bool fitted() const { return n_ > 0; }
  index_t n_components() const { return k_; }
  index_t features() const { return d_; }
  /// Samples folded in so far (after masking).
  index_t samples_seen() const { return n_; }
  /// Batches folded in so far.
  index_t batches_seen() const { return batches_; }

  /// The principal directions [k, features], orthonormal rows, sign fixed by the entry of
  /// largest magnitude (positive).
  const matrix& components() const { return components_; }
  /// Singular values of the centred data [k] (non-increasing).
  const vector& singular_values() const { return S_; }
  /// S²/(n − 1) [k].
  vector explained_variance() const { return S_.array().square() / double(std::max<index_t>(n_ - 1, 1)); }
  /// S² / (total centred sum of squares) [k]: the fraction of the variance each explains.
  vector explained_variance_ratio() const {
    const double total = var_.sum() * double(n_);
    return total > 0 ? vector(S_.array().square() / total) : vector(vector::Zero(S_.size()));
  }
  /// Per-feature mean and (population) variance of the data seen [features].
  const vector& mean() const { return mean_; }
  const vector& variance() const { return var_; }

 private:
  // A template (on the caller's batch type, unused) so that the SVD inside is compiled only
  // in files that fit, not in every file that includes this header.
  template <class>
  void fit_rows(const matrix& Xb) {
    constexpr const char* op = "deltaw::incremental_pca::partial_fit";
    const index_t b = Xb.rows(), d = Xb.cols();
    if (n_ == 0) {
      if (k_ > d)
        throw rank_error(std::string(op) + ": " + std::to_string(k_) + " components need at least as many features; the batch is " +
                         detail::shape_str(b, d));
      if (b < k_)
        throw rank_error(std::string(op) + ": the first batch keeps " + std::to_string(b) + " rows, fewer than the " +
                         std::to_string(k_) + " components");
      d_ = d;
    } else if (d != d_) {
      throw shape_error(std::string(op) + ": the batch has " + std::to_string(d) + " features, earlier batches " +
                        std::to_string(d_));
    }
    if (b == 0) return;

    // Mean and variance of all data (Chan, Golub, LeVeque's pairwise update).
    const vector bmean = Xb.colwise().mean().transpose();
    const vector bss = (Xb.rowwise() - bmean.transpose()).colwise().squaredNorm().transpose();
    const index_t n1 = n_ + b;
    vector mean1, var1;
    if (n_ == 0) {
      mean1 = bmean;
      var1 = bss / double(b);
    } else {
      const vector delta = bmean - mean_;
      mean1 = mean_ + delta * (double(b) / double(n1));
      var1 = (var_ * double(n_) + bss + delta.array().square().matrix() * (double(n_) * double(b) / double(n1))) / double(n1);
    }

    matrix M;
    if (n_ == 0) {
      M = Xb.rowwise() - bmean.transpose();
    } else {
      const index_t kk = components_.rows();
      M.resize(kk + b + 1, d);
      M.topRows(kk) = S_.asDiagonal() * components_;
      M.middleRows(kk, b) = Xb.rowwise() - bmean.transpose();
      M.row(kk + b) = (std::sqrt(double(n_) * double(b) / double(n1)) * (mean_ - bmean)).transpose();
    }

    const index_t keep = std::min({k_, M.rows(), M.cols()});
    svd_result<double> svd;
    if (opt_.randomized) {
      const index_t q = std::min(opt_.sketch < 0 ? 2 * k_ : std::max(opt_.sketch, keep), std::min(M.rows(), M.cols()));
      svd = randomized_svd<double>(M, keep,
                                   rsvd_options{.oversampling = q - keep,
                                                .power_iterations = opt_.power_iterations,
                                                .seed = opt_.seed});
    } else {
      svd = truncated_svd<double>(M, keep);
    }
    // Sign fixed by V (scikit-learn's svd_flip with u_based_decision = False).
    components_ = svd.V.transpose();
    for (index_t c = 0; c < components_.rows(); ++c) {
      Eigen::Index j = 0;
      components_.row(c).cwiseAbs().maxCoeff(&j);
      if (components_(c, j) < 0) components_.row(c) *= -1.0;
    }
    S_ = svd.S;
    mean_ = std::move(mean1);
    var_ = std::move(var1);
    n_ = n1;
    ++batches_;
  }

  index_t k_;
  ipca_options opt_;
  index_t d_ = 0;
  index_t n_ = 0;
  index_t batches_ = 0;
  matrix components_;
  vector S_;
  vector mean_;
  vector var_;
};

DELTAW_NAMESPACE_END
