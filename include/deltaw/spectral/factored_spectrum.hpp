// SPDX-License-Identifier: MIT
// The SVD of a factored update ΔW = s·B·A (B [m, r], A [r, n]) without the dense m × n
// matrix: B = Q_B·R_B and Aᵀ = Q_A·R_A by thin QR, then the SVD of the small
// R_B·R_Aᵀ = U·Σ·Vᵀ gives ΔW = (Q_B·U)·(|s|·Σ)·(Q_A·V)ᵀ (the sign of s folded into the left
// vectors). Cost O((m + n)·r²) instead of O(m·n·min(m, n)).
//
// Also the effective rank of Roy & Vetterli ("The effective rank: a measure of effective
// dimensionality", EUSIPCO 2007): exp of the Shannon entropy of the singular values
// normalised to sum 1.
#pragma once

#include <Eigen/Core>
#include <deltaw/core/eigen_dense.hpp>
#include <algorithm>
#include <cmath>
#include <string>

#include "../backend/cpu/eigen_bridge.hpp"
#include "../core/error.hpp"
#include "../expr/low_rank.hpp"
#include "../linalg/randomized_svd.hpp"

DELTAW_NAMESPACE_BEGIN

namespace detail {
/// Thin QR of a dense column-major matrix X [p, r]: Q [p, min(p, r)], R [min(p, r), r].
template <class Mat>
void thin_qr(const Mat& X, Mat& Q, Mat& R) {
  const index_t k = std::min<index_t>(X.rows(), X.cols());
  Eigen::HouseholderQR<Mat> qr(X);
  Q = qr.householderQ() * Mat::Identity(X.rows(), k);
  R = qr.matrixQR().topRows(k).template triangularView<Eigen::Upper>();
}
}  // namespace detail

/// The full SVD of s·B·A (rank ≤ min(m, n, r)): U [m, t], S [t], V [n, t] with
/// t = min(m, n, r). B [m, r] and A [r, n]: Eigen matrices or deltaw views; computed in C.
template <class C = double, class TB, class TA>
svd_result<C> factored_svd(const TB& B, const TA& A, double s) {
  using Mat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic>;
  constexpr const char* op = "deltaw::factored_svd";
  const auto Bv = matrix_view<const std::remove_const_t<typename decltype(view(B))::element_type>>(view(B));
  const auto Av = matrix_view<const std::remove_const_t<typename decltype(view(A))::element_type>>(view(A));
  if (Bv.cols() != Av.rows())
    throw shape_error(std::string(op) + ": B [m, r] and A [r, n] must share r; got B " +
                      detail::shape_str(Bv.rows(), Bv.cols()) + " and A " + detail::shape_str(Av.rows(), Av.cols()));
  if (!std::isfinite(s)) throw non_finite_error(std::string(op) + ": the scale must be finite");
  const Mat Bm = cpu::to_dense<C>(Bv);
  const Mat Atm = cpu::to_dense<C>(Av).transpose();
  Mat QB, RB, QA, RA;
  detail::thin_qr(Bm, QB, RB);
  detail::thin_qr(Atm, QA, RA);
  const Mat core = RB * RA.transpose();  // [min(m, r), min(n, r)]
  const index_t t = std::min<index_t>(core.rows(), core.cols());
  svd_result<C> out;
  if (t == 0) {
    out.U = Mat(Bv.rows(), 0);
    out.V = Mat(Av.cols(), 0);
    return out;
  }
  Eigen::JacobiSVD<Mat> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  out.U = QB * svd.matrixU();
  out.S = svd.singularValues() * C(std::abs(s));
  out.V = QA * svd.matrixV();
  if (s < 0) out.U = -out.U;
  return out;
}

/// The SVD of a LoRA update's ΔW = s·B·A, from its factors.
template <class C = double, class T>
svd_result<C> factored_svd(const low_rank<T, device::cpu>& u) {
  return factored_svd<C>(u.B(), u.A(), u.scale());
}

/// The singular values of s·B·A (non-increasing), without the dense matrix.
template <class C = double, class TB, class TA>
Eigen::Matrix<C, Eigen::Dynamic, 1> factored_spectrum(const TB& B, const TA& A, double s) {
  return factored_svd<C>(B, A, s).S;
}
template <class C = double, class T>
Eigen::Matrix<C, Eigen::Dynamic, 1> factored_spectrum(const low_rank<T, device::cpu>& u) {
  return factored_svd<C>(u).S;
}

/// Effective rank (Roy & Vetterli 2007): exp(−Σ pᵢ·log pᵢ) with pᵢ = σᵢ/‖σ‖₁. Between 1 and
/// the number of non-zero values; 0 for an all-zero (or empty) vector. Throws
/// argument_error on a negative or non-finite value.
template <class V>
double effective_rank(const V& sigma) {
  double l1 = 0.0;
  for (Eigen::Index i = 0; i < sigma.size(); ++i) {
    const double x = double(sigma(i));
    if (!std::isfinite(x) || x < 0.0)
      throw argument_error("deltaw::effective_rank: singular values must be finite and non-negative; value " +
                           std::to_string(i) + " is " + std::to_string(x));
    l1 += x;
  }
  if (l1 == 0.0) return 0.0;
  double h = 0.0;
  for (Eigen::Index i = 0; i < sigma.size(); ++i) {
    const double p = double(sigma(i)) / l1;
    if (p > 0.0) h -= p * std::log(p);
  }
  return std::exp(h);
}

DELTAW_NAMESPACE_END
