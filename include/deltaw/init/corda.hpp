// SPDX-License-Identifier: MIT
// CorDA, context-oriented decomposition adaptation (Yang et al. 2024, arXiv:2406.05223), as
// PEFT's `init_lora_weights="corda"`.
//
// C [in, in] is the covariance of the layer's inputs (the mean of Xᵀ·X over the calibration
// data), damped as C̃ = C + λ·mean(diag C)·I (λ = 0.01 as PEFT's first try). The SVD of
// W·C̃ = U·diag(S)·Vᵀ gives W = U·diag(S)·(Vᵀ·C̃⁻¹) exactly; the adapter takes r of these
// components:
//   IPM (instruction-previewed):  the first r (the directions that matter most on the data)
//   KPM (knowledge-preserving):   the last r (the least used; the rest of W is kept intact)
// With Ŝ = S_sel/s: A = diag(√Ŝ)·(Vᵀ·C̃⁻¹)_sel, B = U_sel·diag(√Ŝ), W_res = W − s·B·A,
// so W_res + s·B·A = W and (s·B·A)·C̃ is the selected rank-r part of W·C̃.
//
// Cost: one dense SVD of the out × in matrix W·C̃ (O(out·in·min(out, in)), KPM needs the
// smallest singular values, which a randomized SVD does not give) and one Cholesky solve
// of C̃ (O(in³)). PEFT doubles λ until its explicit inverse is accurate; here C̃ is solved
// with an LDLᵀ factorisation and a non-positive-definite C̃ is an error.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <cmath>
#include <string>

#include "factors.hpp"

DELTAW_NAMESPACE_BEGIN

enum class corda_method {
  ipm,  ///< instruction-previewed: the first r components of W·C̃
  kpm,  ///< knowledge-preserving: the last r components of W·C̃
};

struct corda_options {
  corda_method method = corda_method::ipm;
  double damp = 0.01;  ///< λ in C̃ = C + λ·mean(diag C)·I
};

/// Accumulates the input covariance C = (1/N)·Σ XᵀX over the N rows of all batches (in
/// double). PEFT averages per batch instead; the scale of C does not change CorDA's
/// adapter (B·A is invariant to C → c·C, damping included).
class corda_covariance {
 public:
  explicit corda_covariance(index_t in_features) : C_(Eigen::MatrixXd::Zero(in_features, in_features)) {}
  template <class M>
  void add(const M& X) {
    const auto v = view(X);
    if (v.cols() != C_.cols())
      throw shape_error("deltaw::corda_covariance::add: X is " + detail::shape_str(v.rows(), v.cols()) + "; expected " +
                        std::to_string(C_.cols()) + " columns");
    const dense<double> Xd = cpu::to_dense<double>(v);
    if (!Xd.allFinite()) throw non_finite_error("deltaw::corda_covariance::add: X has a non-finite entry");
    C_.selfadjointView<Eigen::Lower>().rankUpdate(Xd.transpose());
    n_ += v.rows();
  }
  index_t samples() const { return n_; }
  /// C = (1/N)·Σ XᵀX [in, in].
  Eigen::MatrixXd covariance() const {
    if (n_ == 0) throw argument_error("deltaw::corda_covariance::covariance: no samples were added");
    Eigen::MatrixXd C = C_.selfadjointView<Eigen::Lower>();
    return C / double(n_);
  }

 private:
  Eigen::MatrixXd C_;
  index_t n_ = 0;
};

/// The damped covariance C̃ = C + λ·mean(diag C)·I.
template <class CM>
Eigen::MatrixXd corda_damped(const CM& C, double damp) {
  const Eigen::MatrixXd Cd = C.template cast<double>();
  const double mean_diag = Cd.diagonal().mean();
  return Cd + Eigen::MatrixXd::Identity(Cd.rows(), Cd.cols()) * (damp * mean_diag);
}

/// CorDA adapter of rank r and scale s > 0 on W [out, in] (writable, float or double;
/// rewritten into W_res in place) with the input covariance C [in, in] (an Eigen matrix).
/// Arithmetic in double; factors in W's element type.
template <class WL, class CM>
  requires eigen_dense<CM>
auto corda(WL&& W, const CM& C, index_t r, double s, const corda_options& opt = {}) {
  constexpr const char* op = "deltaw::corda";
  auto Wv = detail::writable_weight(std::forward<WL>(W), op);
  using T = typename decltype(Wv)::element_type;
  const index_t m = Wv.rows(), n = Wv.cols();
  detail::check_init_rank(r, m, n, op);
  if (C.rows() != n || C.cols() != n)
    throw shape_error(std::string(op) + ": the covariance C is " + detail::shape_str(C.rows(), C.cols()) +
                      " but W is " + detail::shape_str(m, n) + "; C must be [in, in]");
  if (!(std::isfinite(s) && s > 0.0))
    throw argument_error(std::string(op) + ": the scale s must be finite and positive (A and B take √(S/s)); got " +
                         std::to_string(s));
  if (!(std::isfinite(opt.damp) && opt.damp >= 0.0))
    throw argument_error(std::string(op) + ": the damping λ must be finite and non-negative; got " + std::to_string(opt.damp));
  const Eigen::MatrixXd Ct = corda_damped(C, opt.damp);
  if (!Ct.allFinite()) throw non_finite_error(std::string(op) + ": the covariance has a non-finite entry");
  Eigen::LDLT<Eigen::MatrixXd> ldlt(Ct);
  if (ldlt.info() != Eigen::Success || !ldlt.isPositive() || ldlt.vectorD().minCoeff() <= 0.0)
    throw argument_error(std::string(op) + ": the damped covariance C + λ·mean(diag C)·I is not positive definite "
                         "(λ = " + std::to_string(opt.damp) + "); raise the damping or add calibration data");

  const Eigen::MatrixXd Wd = cpu::to_dense<double>(matrix_view<const T>(Wv));
  const Eigen::MatrixXd WC = Wd * Ct;
  Eigen::BDCSVD<Eigen::MatrixXd> svd(WC, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const index_t k = svd.singularValues().size();
  const index_t first = opt.method == corda_method::ipm ? 0 : k - r;
  const Eigen::VectorXd root = (svd.singularValues().segment(first, r) / s).cwiseSqrt();
  // (Vᵀ·C̃⁻¹)_sel = (C̃⁻¹·V_sel)ᵀ, C̃ symmetric.
  const Eigen::MatrixXd Vinv = ldlt.solve(svd.matrixV().middleCols(first, r));
  lora_factors<T> f;
  f.s = s;
  f.B = (svd.matrixU().middleCols(first, r) * root.asDiagonal()).template cast<T>();
  f.A = (root.asDiagonal() * Vinv.transpose()).template cast<T>();
  detail::subtract_scaled_product<double>(Wv, f.B, f.A, s);
  return f;
}

DELTAW_NAMESPACE_END
