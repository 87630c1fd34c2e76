// SPDX-License-Identifier: MIT
// A spectrum report of any update ΔW: its singular values, effective rank, Frobenius norm
// and the fraction of ‖ΔW‖²_F held by the top-k directions, without the dense ΔW.
//
//   LoRA s·B·A           the exact full spectrum by factored_svd (thin QRs, O((m+n)·r²))
//   core B·R·A           the same on B and the small R·A [r1, in] (O((m+n)·r1² + r1·r2·in))
//   any other update     the top-k by randomized_svd (the update is only applied), and
//                        ‖ΔW‖_F from the update's own exact norm, so energies stay exact
//                        fractions of the whole even though the tail is not computed
//   a dense matrix       all singular values by BDCSVD (the reference)
//
// Built on spectral/factored_spectrum.hpp and linalg/randomized_svd.hpp; this header only
// adds the core-form SVD and the report around them.
#pragma once

#include <Eigen/Core>
#include <deltaw/core/eigen_dense.hpp>
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "../backend/cpu/core_low_rank.hpp"
#include "../backend/cpu/low_rank.hpp"
#include "../backend/cpu/ops.hpp"
#include "../expr/core_low_rank.hpp"
#include "../linalg/randomized_svd.hpp"
#include "factored_spectrum.hpp"

DELTAW_NAMESPACE_BEGIN

/// The full SVD of a core low-rank update s·B·R·A (LoRA-XS, LoRA-SB, LaMDA), rank ≤
/// min(r1, r2): B = Q_B·R_B and Aᵀ = Q_A·R_A by thin QR, then the SVD of the small
/// R_B·R·R_Aᵀ [r1, r2] = U·Σ·Vᵀ gives ΔW = (Q_B·U)·(|s|·Σ)·(Q_A·V)ᵀ. O((m + n)·r² + r³).
template <class C = double, class T>
svd_result<C> factored_svd(const core_low_rank<T, device::cpu>& u) {
  using Mat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic>;
  const Mat Bm = cpu::to_dense<C>(u.B());
  const Mat Rm = cpu::to_dense<C>(u.R());
  const Mat Atm = cpu::to_dense<C>(u.A()).transpose();
  Mat QB, RB, QA, RA;
  detail::thin_qr(Bm, QB, RB);
  detail::thin_qr(Atm, QA, RA);
  const Mat core = RB * Rm * RA.transpose();  // [min(out, r1), min(in, r2)]
  Eigen::JacobiSVD<Mat> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  svd_result<C> out;
  out.U = QB * svd.matrixU();
  out.S = svd.singularValues() * C(std::abs(u.scale()));
  out.V = QA * svd.matrixV();
  if (u.scale() < 0) out.U = -out.U;
  return out;
}

struct spectrum_options {
  /// Singular values to compute on the randomized path (capped at min(out, in)). The exact
  /// paths return all of them.
  index_t top_k = 32;
  rsvd_options rsvd{.oversampling = 10, .power_iterations = 4, .seed = 0};
};

struct spectrum_report {
  Eigen::VectorXd singular_values;  ///< non-increasing; the whole non-zero spectrum when `complete`
  double frobenius_norm = 0;        ///< ‖ΔW‖_F, exact on every path
  bool complete = false;            ///< singular_values is the full spectrum (exact paths)
  const char* method = "";          ///< "factored", "factored core", "randomized" or "dense"

  /// Effective rank (Roy & Vetterli) of singular_values: the update's own when `complete`,
  /// that of its top-k part otherwise.
  double effective_rank() const { return deltaw::effective_rank(singular_values); }
  /// Σ_{i<k} σ_i² / ‖ΔW‖²_F: the fraction of the update's energy in its top-k directions
  /// (k ≤ number of computed values; 0 for a zero update).
  double energy(index_t k) const {
    if (k < 0 || k > singular_values.size())
      throw argument_error("deltaw::spectrum_report::energy: k must be in [0, " + std::to_string(singular_values.size()) +
                           "] (the computed singular values); got " + std::to_string(k));
    const double total = frobenius_norm * frobenius_norm;
    return total > 0 ? std::min(1.0, singular_values.head(k).squaredNorm() / total) : 0.0;
  }
  /// The smallest k whose top-k directions hold at least `fraction` of the energy; −1 when
  /// the computed values do not reach it (randomized path: raise top_k).
  index_t rank_for_energy(double fraction) const {
    if (!(std::isfinite(fraction) && fraction >= 0.0 && fraction <= 1.0))
      throw argument_error("deltaw::spectrum_report::rank_for_energy: the fraction must lie in [0, 1]; got " +
                           std::to_string(fraction));
    const double total = frobenius_norm * frobenius_norm;
    if (total == 0 || fraction == 0) return 0;
    double acc = 0;
    for (index_t i = 0; i < singular_values.size(); ++i) {
      acc += singular_values(i) * singular_values(i);
      // a relative slack for rounding when the fraction is 1 and the spectrum complete
      if (acc >= fraction * total * (1 - 1e-12)) return i + 1;
    }
    return -1;
  }
};

namespace detail {
template <class U>
inline constexpr bool is_low_rank_cpu = false;
template <class T>
inline constexpr bool is_low_rank_cpu<low_rank<T, device::cpu>> = true;
template <class U>
inline constexpr bool is_core_low_rank_cpu = false;
template <class T>
inline constexpr bool is_core_low_rank_cpu<core_low_rank<T, device::cpu>> = true;
}  // namespace detail

/// The spectrum report of an update (see the header comment for the path each type takes).
template <class U>
  requires update<U>
spectrum_report spectrum(const U& u, const spectrum_options& opt = {}) {
  spectrum_report rep;
  if constexpr (detail::is_low_rank_cpu<U> || detail::is_core_low_rank_cpu<U>) {
    rep.singular_values = factored_svd<double>(u).S;
    rep.frobenius_norm = rep.singular_values.norm();
    rep.complete = true;
    rep.method = detail::is_low_rank_cpu<U> ? "factored" : "factored core";
  } else {
    const index_t k = std::min<index_t>(opt.top_k, std::min(u.rows(), u.cols()));
    if (k < 1)
      throw rank_error("deltaw::spectrum: top_k must be at least 1 for an update " + detail::shape_str(u.rows(), u.cols()) +
                       "; got " + std::to_string(opt.top_k));
    rep.singular_values = randomized_svd<double>(u, k, opt.rsvd).S;
    rep.frobenius_norm = deltaw::frobenius_norm(u);
    rep.complete = k == std::min(u.rows(), u.cols());
    rep.method = "randomized";
  }
  return rep;
}

/// The report of a dense matrix (e.g. a materialised ΔW): all singular values by BDCSVD.
template <class D>
  requires eigen_dense<D>
spectrum_report spectrum(const D& M) {
  spectrum_report rep;
  const Eigen::MatrixXd Md = M.template cast<double>();
  rep.singular_values = Eigen::BDCSVD<Eigen::MatrixXd>(Md).singularValues();
  rep.frobenius_norm = Md.norm();
  rep.complete = true;
  rep.method = "dense";
  return rep;
}

DELTAW_NAMESPACE_END
