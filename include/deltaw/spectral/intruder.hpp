// Intruder dimensions (Shuttleworth, Andreas, Torralba, Sharma 2024, "LoRA vs Full Fine-tuning: An
// Illusion of Equivalence", arXiv:2410.21228): singular vectors of the fine-tuned weight
// that resemble none of the pre-trained weight's. For each of the top-k left singular
// vectors u_j of W₀ + ΔW, c_j = max_i |⟨u_j, u_i⁰⟩| over ALL left singular vectors u_i⁰ of
// W₀; u_j is an intruder when c_j < ε. Defaults k = 10, ε = 0.5.
//
// Both SVDs are dense (exact): this is an analysis of one layer, O(out·in·min(out, in)).
// A rotation that spreads a vector evenly over several of W₀'s own top vectors lowers
// c_j too (to 1/√(number mixed)): the measure is per vector, not per subspace.
#pragma once

#include <Eigen/SVD>
#include <string>
#include <type_traits>
#include <vector>

#include "../backend/cpu/ops.hpp"
#include "../core/error.hpp"

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

/// Intruder dimensions of a fine-tuned weight relative to the pre-trained W₀ [out, in].
/// `finetuned` is an Eigen matrix or a CPU expression such as `view(W0) + lora(B, A, …)`.
template <class X0, class X1>
intruder_report intruder_dimensions(const X0& W0, const X1& finetuned, const intruder_options& opt = {}) {
  constexpr const char* op = "deltaw::intruder_dimensions";
  const Eigen::MatrixXd A0 = detail::dense_double(W0);
  const Eigen::MatrixXd A1 = detail::dense_double(finetuned);
  if (A0.rows() != A1.rows() || A0.cols() != A1.cols())
    throw shape_error(std::string(op) + ": W0 is " + detail::shape_str(A0.rows(), A0.cols()) +
                      " but the fine-tuned weight is " + detail::shape_str(A1.rows(), A1.cols()));
  const index_t t = std::min<index_t>(A0.rows(), A0.cols());
  if (opt.k < 1 || opt.k > t)
    throw rank_error(std::string(op) + ": k must be in [1, min(out, in)] = [1, " + std::to_string(t) + "] for W " +
                     detail::shape_str(A0.rows(), A0.cols()) + "; got k = " + std::to_string(opt.k));
  Eigen::BDCSVD<Eigen::MatrixXd> s0(A0, Eigen::ComputeThinU);
  Eigen::BDCSVD<Eigen::MatrixXd> s1(A1, Eigen::ComputeThinU);
  const Eigen::MatrixXd overlap = s0.matrixU().transpose() * s1.matrixU().leftCols(opt.k);  // [t, k]
  intruder_report rep;
  rep.similarity = overlap.cwiseAbs().colwise().maxCoeff().transpose();
  rep.singular_values = s1.singularValues().head(opt.k);
  for (index_t j = 0; j < opt.k; ++j)
    if (rep.similarity(j) < opt.epsilon) rep.intruders.push_back(j);
  return rep;
}

DELTAW_NAMESPACE_END
