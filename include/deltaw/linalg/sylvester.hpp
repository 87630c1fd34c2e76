// SPDX-License-Identifier: MIT
// Small dense symmetric solvers: the pseudo-inverse of a damped symmetric matrix and the
// Sylvester equation A·X + X·B = C for symmetric A [p, p] and B [q, q], both through
// symmetric eigendecompositions (Eigen's SelfAdjointEigenSolver).
//
// With A = U·diag(λ)·Uᵀ and B = V·diag(μ)·Vᵀ the equation becomes diagonal in the
// eigenbases: Y_ij·(λ_i + μ_j) = (Uᵀ·C·V)_ij, X = U·Y·Vᵀ. Where a denominator λ_i + μ_j
// is (numerically) zero — A and B positive semidefinite and singular together, as BᵀB
// and A·Aᵀ of a LoRA adapter at B = 0 — the component is set to zero, as a
// pseudo-inverse does: X is then the minimum-norm least-squares solution of the
// Kronecker system (I ⊗ A + Bᵀ ⊗ I)·vec(X) = vec(C). For A, B positive definite this is
// the unique solution.
//
// These are r × r problems (LoRA-Pro, LoRA-FA's preconditioner); they cost O(p³ + q³ +
// p·q·(p + q)) and allocate. T is float or double; callers that want the r × r algebra
// in double whatever their training type convert first (train/lora_pro.hpp does).
#pragma once

#include <Eigen/Core>
#include <deltaw/core/eigen_dense.hpp>
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "../core/eigen.hpp"
#include "../core/error.hpp"

DELTAW_NAMESPACE_BEGIN
namespace linalg {

/// Tolerances of the symmetric solvers. A pivot (eigenvalue, or λ_i + μ_j) is treated as
/// zero when |pivot| ≤ atol + rtol·max|pivot|. rtol < 0 means max(p, q)·ε of T, the
/// default of torch.linalg.pinv and numpy.linalg.pinv.
struct symmetric_solve_options {
  double rtol = -1;
  double atol = 0;
  /// Inputs whose asymmetry max|M − Mᵀ| exceeds this times max(1, max|M|) are rejected
  /// (the eigensolver reads one triangle only and would silently ignore the other).
  double symmetry_tolerance = 1e-6;
};

namespace detail {
template <class T>
using col_mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

template <class M>
void check_symmetric(const M& a, const char* op, const char* what, double tol) {
  if (a.rows() != a.cols())
    throw shape_error(std::string(op) + ": " + what + " must be square; got " +
                      deltaw::detail::shape_str(a.rows(), a.cols()));
  if (!a.allFinite()) throw non_finite_error(std::string(op) + ": " + what + " has a non-finite entry");
  if (a.size() == 0) return;
  const double scale = std::max(1.0, double(a.cwiseAbs().maxCoeff()));
  const double asym = double((a - a.transpose()).cwiseAbs().maxCoeff());
  if (asym > tol * scale)
    throw argument_error(std::string(op) + ": " + what + " is not symmetric (max |M − Mᵀ| = " + std::to_string(asym) +
                         ")");
}

template <class T>
double resolved_rtol(const symmetric_solve_options& o, index_t n) {
  return o.rtol >= 0 ? o.rtol : double(std::max<index_t>(n, 1)) * double(std::numeric_limits<T>::epsilon());
}
}  // namespace detail

/// pinv(M + damping·I) for symmetric M [r, r] (LoRA-Pro's and LoRA-FA's "inverse as
/// pinv(M + 1e-8·I)"): eigenvalues of M + damping·I at or below the tolerance (relative
/// to the largest |eigenvalue|) are dropped instead of inverted.
template <class T, class Derived>
dense<T> symmetric_pinv(const Eigen::MatrixBase<Derived>& M, double damping = 0, symmetric_solve_options o = {}) {
  constexpr const char* op = "deltaw::linalg::symmetric_pinv";
  detail::col_mat<T> a = M.template cast<T>();
  detail::check_symmetric(a, op, "M", o.symmetry_tolerance);
  if (!std::isfinite(damping)) throw non_finite_error(std::string(op) + ": damping must be finite");
  const index_t r = a.rows();
  if (r == 0) return dense<T>(0, 0);
  a.diagonal().array() += T(damping);
  Eigen::SelfAdjointEigenSolver<detail::col_mat<T>> es(a);
  if (es.info() != Eigen::Success)
    throw non_finite_error(std::string(op) + ": the eigendecomposition of " + deltaw::detail::shape_str(r, r) +
                           " did not converge");
  const auto& ev = es.eigenvalues();
  const double cut = o.atol + detail::resolved_rtol<T>(o, r) * double(ev.cwiseAbs().maxCoeff());
  Eigen::Matrix<T, Eigen::Dynamic, 1> inv(r);
  for (index_t i = 0; i < r; ++i) inv(i) = std::abs(double(ev(i))) > cut ? T(1) / ev(i) : T(0);
  const auto& U = es.eigenvectors();
  return dense<T>(U * inv.asDiagonal() * U.transpose());
}

/// X [p, q] with A·X + X·B = C for symmetric A [p, p], B [q, q] (see the file comment;
/// singular pivots give the minimum-norm least-squares solution).
template <class T, class DA, class DB, class DC>
dense<T> solve_sylvester_symmetric(const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B,
                                   const Eigen::MatrixBase<DC>& C, symmetric_solve_options o = {}) {
  constexpr const char* op = "deltaw::linalg::solve_sylvester_symmetric";
  const detail::col_mat<T> a = A.template cast<T>(), b = B.template cast<T>(), c = C.template cast<T>();
  detail::check_symmetric(a, op, "A", o.symmetry_tolerance);
  detail::check_symmetric(b, op, "B", o.symmetry_tolerance);
  if (c.rows() != a.rows() || c.cols() != b.rows())
    throw shape_error(std::string(op) + ": A is " + deltaw::detail::shape_str(a.rows(), a.cols()) + ", B is " +
                      deltaw::detail::shape_str(b.rows(), b.cols()) + ", so C must be " +
                      deltaw::detail::shape_str(a.rows(), b.rows()) + "; got " +
                      deltaw::detail::shape_str(c.rows(), c.cols()));
  if (!c.allFinite()) throw non_finite_error(std::string(op) + ": C has a non-finite entry");
  const index_t p = a.rows(), q = b.rows();
  if (p == 0 || q == 0) return dense<T>(p, q);
  Eigen::SelfAdjointEigenSolver<detail::col_mat<T>> ea(a), eb(b);
  if (ea.info() != Eigen::Success || eb.info() != Eigen::Success)
    throw non_finite_error(std::string(op) + ": an eigendecomposition did not converge");
  const auto &la = ea.eigenvalues(), &lb = eb.eigenvalues();
  const auto &U = ea.eigenvectors(), &V = eb.eigenvectors();
  double biggest = 0;
  for (index_t i = 0; i < p; ++i)
    for (index_t j = 0; j < q; ++j) biggest = std::max(biggest, std::abs(double(la(i)) + double(lb(j))));
  const double cut = o.atol + detail::resolved_rtol<T>(o, std::max(p, q)) * biggest;
  detail::col_mat<T> Y = U.transpose() * c * V;
  for (index_t j = 0; j < q; ++j)
    for (index_t i = 0; i < p; ++i) {
      const double d = double(la(i)) + double(lb(j));
      Y(i, j) = std::abs(d) > cut ? T(double(Y(i, j)) / d) : T(0);
    }
  return dense<T>(U * Y * V.transpose());
}

}  // namespace linalg
DELTAW_NAMESPACE_END
