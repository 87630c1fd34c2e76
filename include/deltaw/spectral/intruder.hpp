// SPDX-License-Identifier: MIT
// Intruder dimensions (Shuttleworth, Andreas, Torralba, Sharma 2024, "LoRA vs Full Fine-tuning: An
// Illusion of Equivalence", arXiv:2410.21228): singular vectors of the fine-tuned weight
// that resemble none of the pre-trained weight's. For each of the top-k left singular
// vectors u_j of W₀ + ΔW, c_j = max_i |⟨u_j, u_i⁰⟩| over ALL left singular vectors u_i⁰ of
// W₀; u_j is an intruder when c_j < ε. Defaults k = 10, ε = 0.5.
//
// Both SVDs are dense (exact): this is an analysis of one layer, O(out·in·min(out, in)).
// A rotation that spreads a vector evenly over several of W₀'s own top vectors lowers
// c_j too (to 1/√(number mixed)): the measure is per vector, not per subspace.
//
// Mitigation (same paper): scale the intruders' singular values by λ (0.75) in the
// fine-tuned weight, then re-factor (W_mit − W₀)/s to rank r by SVD.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/cpu/ops.hpp"
#include "../core/error.hpp"
#include "../init/factors.hpp"

DELTAW_NAMESPACE_BEGIN

struct intruder_options {
  index_t k = 10;        ///< how many top singular vectors of the fine-tuned weight to test
  double epsilon = 0.5;  ///< intruder when the best overlap with W₀'s vectors is below this
};

struct intruder_report {
  Eigen::VectorXd similarity;       ///< c_j, j < k
  Eigen::VectorXd singular_values;  ///< σ_j of the fine-tuned weight, j < k
  std::vector<index_t> intruders;   ///< the j with c_j < ε, increasing
  index_t count() const { return index_t(intruders.size()); }
};

namespace detail {
/// A weight as a dense double matrix: an Eigen matrix, or any CPU expression (view,
/// update, W + Δ…), materialised: the analysis needs the full SVD anyway.
template <class X>
Eigen::MatrixXd dense_double(const X& x) {
  if constexpr (eigen_dense<X>) {
    return x.template cast<double>();
  } else {
    static_assert(cpu_expression<X>, "deltaw::intruder_dimensions: weights are Eigen matrices or CPU expressions");
    return materialize(x).template cast<double>();
  }
}
}  // namespace detail

namespace detail {
struct intruder_analysis {
  intruder_report report;
  Eigen::MatrixXd W0, W1;
  Eigen::BDCSVD<Eigen::MatrixXd> svd1;
};
template <class X0, class X1>
intruder_analysis analyse_intruders(const X0& W0, const X1& finetuned, const intruder_options& opt,
                                    const char* op) {
  intruder_analysis a{{}, dense_double(W0), dense_double(finetuned), {}};
  if (a.W0.rows() != a.W1.rows() || a.W0.cols() != a.W1.cols())
    throw shape_error(std::string(op) + ": W0 is " + shape_str(a.W0.rows(), a.W0.cols()) +
                      " but the fine-tuned weight is " + shape_str(a.W1.rows(), a.W1.cols()));
  const index_t t = std::min<index_t>(a.W0.rows(), a.W0.cols());
  if (opt.k < 1 || opt.k > t)
    throw rank_error(std::string(op) + ": k must be in [1, min(out, in)] = [1, " + std::to_string(t) + "] for W " +
                     shape_str(a.W0.rows(), a.W0.cols()) + "; got k = " + std::to_string(opt.k));
  Eigen::BDCSVD<Eigen::MatrixXd> s0(a.W0, Eigen::ComputeThinU);
  a.svd1.compute(a.W1, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::MatrixXd overlap = s0.matrixU().transpose() * a.svd1.matrixU().leftCols(opt.k);  // [t, k]
  a.report.similarity = overlap.cwiseAbs().colwise().maxCoeff().transpose();
  a.report.singular_values = a.svd1.singularValues().head(opt.k);
  for (index_t j = 0; j < opt.k; ++j)
    if (a.report.similarity(j) < opt.epsilon) a.report.intruders.push_back(j);
  return a;
}
}  // namespace detail

/// Intruder dimensions of a fine-tuned weight relative to the pre-trained W₀ [out, in].
/// `finetuned` is an Eigen matrix or a CPU expression such as `view(W0) + lora(B, A, …)`.
template <class X0, class X1>
intruder_report intruder_dimensions(const X0& W0, const X1& finetuned, const intruder_options& opt = {}) {
  return detail::analyse_intruders(W0, finetuned, opt, "deltaw::intruder_dimensions").report;
}

/// Intruder mitigation: W_mit = W_ft − (1 − λ)·Σ_{j intruder} σ_j·u_j·v_jᵀ (each intruder's
/// singular value scaled by λ), then the rank-r truncated SVD of (W_mit − W₀)/s = U·S·Vᵀ
/// split evenly: B = U·√S, A = √S·Vᵀ (so W₀ + s·B·A is the best rank-r update). Returns the
/// new factors in double; r ≤ min(out, in), s > 0.
template <class X0, class X1>
lora_factors<double> mitigate_intruders(const X0& W0, const X1& finetuned, index_t r, double s,
                                        const intruder_options& opt = {}, double lambda = 0.75) {
  constexpr const char* op = "deltaw::mitigate_intruders";
  if (!(std::isfinite(s) && s > 0.0))
    throw argument_error(std::string(op) + ": the scale s must be finite and positive; got " + std::to_string(s));
  if (!std::isfinite(lambda)) throw non_finite_error(std::string(op) + ": lambda must be finite");
  const auto a = detail::analyse_intruders(W0, finetuned, opt, op);
  detail::check_init_rank(r, a.W0.rows(), a.W0.cols(), op);
  Eigen::MatrixXd D = a.W1 - a.W0;
  for (const index_t j : a.report.intruders)
    D.noalias() -= ((1.0 - lambda) * a.svd1.singularValues()(j)) * a.svd1.matrixU().col(j) *
                   a.svd1.matrixV().col(j).transpose();
  D /= s;
  Eigen::BDCSVD<Eigen::MatrixXd> sd(D, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::VectorXd root = sd.singularValues().head(r).cwiseSqrt();
  lora_factors<double> f;
  f.s = s;
  f.B = sd.matrixU().leftCols(r) * root.asDiagonal();
  f.A = root.asDiagonal() * sd.matrixV().leftCols(r).transpose();
  return f;
}

DELTAW_NAMESPACE_END
