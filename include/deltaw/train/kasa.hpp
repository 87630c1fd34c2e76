// SPDX-License-Identifier: MIT
// KaSA's auxiliary regularisers (arXiv:2412.06071, Eq. 9–11; PEFT 0.21's
// LoraModel._get_kasa_loss), added by the user to the task loss, per KaSA layer:
//     β·L2 + γ·L3,   L2 = Σᵢ ΔΣᵢ²,   L3 = ‖BᵀB − I_r‖_F + ‖A·Aᵀ − I_r‖_F,
// with β = KasaConfig.beta (1e-4), γ = KasaConfig.gamma (1e-3). Gradients (for symmetric
// M_B = BᵀB − I, M_A = AAᵀ − I):
//     ∂/∂ΔΣ = 2β·ΔΣ,   ∂/∂B = 2γ·B·M_B/‖M_B‖_F,   ∂/∂A = 2γ·M_A·A/‖M_A‖_F
// (a norm that is exactly 0 contributes a zero subgradient). Computed in double, r × r Grams
// only (never out × in).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <string>

#include "../backend/cpu/eigen_bridge.hpp"
#include "../core/eigen.hpp"
#include "../core/error.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

struct kasa_options {
  double beta = 1e-4;   ///< KasaConfig.beta: weight of Σ ΔΣ²
  double gamma = 1e-3;  ///< KasaConfig.gamma: weight of the orthogonality terms
};

/// The loss of one layer and its parts.
struct kasa_loss {
  double l2 = 0;     ///< Σ ΔΣ²
  double l3 = 0;     ///< ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F
  double value = 0;  ///< β·l2 + γ·l3
};

/// KaSA's regulariser for one layer: B [out, r], diag [r], A [r, in] (any float/double CPU
/// matrices, vectors or views). When the gradient views are non-empty, d value/d{B, diag, A}
/// is ADDED into them (shapes of B, [r] / [r, 1] / [1, r] for diag, A).
template <class BL, class DL, class AL>
kasa_loss kasa_regularizer(const BL& B_, const DL& diag_, const AL& A_, const kasa_options& o = {},
                           const matrix_view<double>& dB = {}, const matrix_view<double>& ddiag = {},
                           const matrix_view<double>& dA = {}) {
  constexpr const char* op = "deltaw::train::kasa_regularizer";
  const auto Bv = view(B_);
  const auto Av = view(A_);
  const auto hd = hold_vector(diag_);
  const auto& dv = hd.view;
  const index_t r = Av.rows();
  if (Bv.cols() != r || dv.size() != r)
    throw shape_error(std::string(op) + ": B [out, r], diag [r] and A [r, in] must share r; got B " +
                      deltaw::detail::shape_str(Bv.rows(), Bv.cols()) + ", diag [" + std::to_string(dv.size()) + "], A " +
                      deltaw::detail::shape_str(Av.rows(), Av.cols()));
  if (!(o.beta >= 0) || !(o.gamma >= 0) || !std::isfinite(o.beta) || !std::isfinite(o.gamma))
    throw argument_error(std::string(op) + ": beta and gamma must be finite and non-negative; got beta = " +
                         std::to_string(o.beta) + ", gamma = " + std::to_string(o.gamma));
  auto check_grad = [&](const matrix_view<double>& g, index_t rows, index_t cols, const char* what) {
    if (g.empty() && rows * cols > 0) return false;
    if (g.rows() != rows || g.cols() != cols)
      throw shape_error(std::string(op) + ": the gradient of " + what + " must be " + deltaw::detail::shape_str(rows, cols) +
                        "; got " + deltaw::detail::shape_str(g.rows(), g.cols()));
    return true;
  };
  const dense<double> B = cpu::to_dense<double>(matrix_view<const typename decltype(Bv)::value_type>(Bv));
  const dense<double> A = cpu::to_dense<double>(matrix_view<const typename decltype(Av)::value_type>(Av));
  Eigen::VectorXd d(r);
  for (index_t i = 0; i < r; ++i) d(i) = double(dv[i]);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(r, r);
  const Eigen::MatrixXd MB = B.transpose() * B - I, MA = A * A.transpose() - I;
  kasa_loss L;
  L.l2 = d.squaredNorm();
  const double nB = MB.norm(), nA = MA.norm();
  L.l3 = nB + nA;
  L.value = o.beta * L.l2 + o.gamma * L.l3;
  if (check_grad(dB, Bv.rows(), r, "B") && nB > 0) {
    const Eigen::MatrixXd g = (2 * o.gamma / nB) * (B * MB);
    for (index_t i = 0; i < g.rows(); ++i)
      for (index_t j = 0; j < g.cols(); ++j) dB(i, j) += g(i, j);
  }
  if (!ddiag.empty()) {
    const bool col = ddiag.cols() == 1 && ddiag.rows() == r, row = ddiag.rows() == 1 && ddiag.cols() == r;
    if (!col && !row)
      throw shape_error(std::string(op) + ": the gradient of diag must be [r, 1] or [1, r] with r = " +
                        std::to_string(r) + "; got " + deltaw::detail::shape_str(ddiag.rows(), ddiag.cols()));
    for (index_t i = 0; i < r; ++i) (col ? ddiag(i, 0) : ddiag(0, i)) += 2 * o.beta * d(i);
  }
  if (check_grad(dA, r, Av.cols(), "A") && nA > 0) {
    const Eigen::MatrixXd g = (2 * o.gamma / nA) * (MA * A);
    for (index_t i = 0; i < g.rows(); ++i)
      for (index_t j = 0; j < g.cols(); ++j) dA(i, j) += g(i, j);
  }
  return L;
}

}  // namespace train
DELTAW_NAMESPACE_END
