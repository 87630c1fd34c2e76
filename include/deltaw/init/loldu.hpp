// SPDX-License-Identifier: MIT
// LoLDU initialisation in the reference's residual form (Shi et al. 2024, arXiv:2410.13618).
//
// deltaw already has LoLDU: `loldu(W, r, alpha(α))` (backend/cpu/ldu.hpp) runs the r leading
// steps of the partial-pivot LU, W = P·L·diag(D)·U, and returns ΔW = P·L_r·diag(σz − σ₀z₀)·U_r,
// which is exactly 0 at init, without touching W. This header reuses that factorisation
// (cpu::partial_pivot_ldu) and the same update type (ldu<T>) for the reference's other
// bookkeeping, where the weight keeps a residual:
//     W_res = W − σ·P·L_r·diag(D_r)·U_r,   W' = W_res + σ·P·L_r·diag(z)·U_r,   z₀ = D_r,
// i.e. the update is returned with z = D_r and a zero z₀ (ΔW relative to W_res is
// σ·P·L_r·diag(z)·U_r), and W is rewritten into W_res in place. Then W_res + ΔW = W up to
// the rounding of W_res. Use it to match checkpoints or code that expect W_res; otherwise
// `loldu` is the exact, residual-free choice.
//
// With σ = 1 (α = r) the residual is the Schur complement left after r steps of the LU: in
// pivoted row order its first r rows and first r columns vanish.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../backend/cpu/ldu.hpp"
#include "factors.hpp"

DELTAW_NAMESPACE_BEGIN

/// LoLDU of rank r on W [out, in] (writable, float or double), rewriting W into
/// W_res = W − σ·P·L_r·diag(D_r)·U_r in place, σ = α/r (reference α = 1). Returns the
/// ldu<T> update (T = W's element type) with z = D_r, z₀ = 0: W_res + ΔW = W at init.
template <class WL>
auto loldu_residual(WL&& W, index_t r, alpha a = alpha(1.0), ldu_options opt = {}) {
  constexpr const char* op = "deltaw::loldu_residual";
  auto Wv = detail::writable_weight(std::forward<WL>(W), op);
  using T = typename decltype(Wv)::element_type;
  if (!std::isfinite(a.value)) throw non_finite_error(std::string(op) + ": alpha must be finite, got " + std::to_string(a.value));
  detail::check_init_rank(r, Wv.rows(), Wv.cols(), op);
  ldu_factors f = cpu::partial_pivot_ldu(matrix_view<const T>(Wv), r, op);
  const double sigma = a.value / double(r);
  using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  dense<T> L = f.L.cast<T>();
  dense<T> U = f.U.cast<T>();
  Vec z = f.D.cast<T>();
  Vec z0 = Vec::Zero(r);
  // P·L_r·diag(D_r) from the stored (rounded) factors, in double: row o is row perm[o] of L_r.
  dense<double> PLD(Wv.rows(), r);
  for (index_t o = 0; o < Wv.rows(); ++o)
    PLD.row(o) = L.row(f.perm[std::size_t(o)]).template cast<double>().cwiseProduct(z.template cast<double>().transpose());
  const dense<double> Ud = U.template cast<double>();
  detail::subtract_scaled_product<double>(Wv, PLD, Ud, sigma);
  return ldu<T>(detail::hold_perm(std::move(f.perm)), hold(std::move(L)), hold_vector(std::move(z)),
                hold_vector(std::move(z0)), hold(std::move(U)), sigma, sigma, opt);
}

DELTAW_NAMESPACE_END
