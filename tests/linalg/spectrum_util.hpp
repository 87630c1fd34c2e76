// Matrices with a known spectrum for the linear-algebra tests: U·diag(σ)·Vᵀ with U, V
// orthonormal (Q factors of seeded random matrices).
#pragma once

#include <Eigen/QR>

#include "test_util.hpp"

namespace dwt {

using ColD = Eigen::MatrixXd;

/// p × k with orthonormal columns, from the QR of a seeded random matrix.
inline ColD random_orthonormal(Eigen::Index p, Eigen::Index k, std::uint64_t seed) {
  const ColD G = random<ColD>(p, k, seed);
  Eigen::HouseholderQR<ColD> qr(G);
  return qr.householderQ() * ColD::Identity(p, k);
}

/// σᵢ = σ₀·decay^i, i < min(m, n).
inline Eigen::VectorXd geometric_spectrum(Eigen::Index t, double s0, double decay) {
  Eigen::VectorXd s(t);
  for (Eigen::Index i = 0; i < t; ++i) s(i) = s0 * std::pow(decay, double(i));
  return s;
}

/// U·diag(σ)·Vᵀ, row-major [m, n].
inline MatD with_spectrum(Eigen::Index m, Eigen::Index n, const Eigen::VectorXd& sigma, std::uint64_t seed) {
  const ColD U = random_orthonormal(m, sigma.size(), seed);
  const ColD V = random_orthonormal(n, sigma.size(), seed + 1000);
  return U * sigma.asDiagonal() * V.transpose();
}

/// max over i < k of |a_i − b_i| / |b_i|.
template <class A, class B>
double max_rel_diff(const A& a, const B& b, Eigen::Index k) {
  double e = 0.0;
  for (Eigen::Index i = 0; i < k; ++i) e = std::max(e, std::abs(double(a(i)) - double(b(i))) / std::abs(double(b(i))));
  return e;
}

/// ‖P_U − P_V‖ max-entry: compares the subspaces spanned by two orthonormal bases.
template <class A, class B>
double subspace_diff(const A& U, const B& V) {
  const ColD Ud = U.template cast<double>(), Vd = V.template cast<double>();
  return (Ud * Ud.transpose() - Vd * Vd.transpose()).cwiseAbs().maxCoeff();
}

}  // namespace dwt
