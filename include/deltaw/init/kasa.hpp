// SPDX-License-Identifier: MIT
// KaSA's one-time base-weight truncation (arXiv:2412.06071; PEFT 0.21's
// KasaLinearVariant._truncate_base_weight): W [out, in] keeps its k − r largest singular
// directions (k = min(out, in)), the r smallest are dropped, in place. This is a dense
// operation on W by design — a full SVD, O(out·in·k) — run once when the adapter is created
// (or when a KaSA adapter is loaded onto the original base model, since PEFT saves neither
// the truncated weight nor the dropped part). The update itself is deltaw::kasa (expr/kasa.hpp).
//
// deltaw computes the SVD in double and subtracts the dropped rank-r part, W − U_d·S_d·V_dᵀ
// (row panel by row panel); PEFT recomposes U_p·S_p·V_pᵀ from an fp32 SVD. Both are the same
// matrix up to the SVD's rounding (fixtures: within 1e-5 relative).
#pragma once

#include <string>

#include "../linalg/randomized_svd.hpp"
#include "factors.hpp"

DELTAW_NAMESPACE_BEGIN

/// What kasa_truncate_base_dense dropped: W_before = W_after + U·diag(S)·Vᵀ (r columns each),
/// the factors PEFT's deferred path uses to correct a first forward, in double.
struct kasa_dropped {
  dense<double> U;        ///< [out, r]
  Eigen::VectorXd S;       ///< [r], the r smallest singular values, descending
  dense<double> V;        ///< [in, r]
};

/// Drops the r smallest singular directions of W [out, in] in place (a writable float or double
/// matrix or view). rank_error unless 1 ≤ r < min(out, in) (PEFT keeps at least one direction).
template <class WL>
kasa_dropped kasa_truncate_base_dense(WL&& W, index_t r) {
  constexpr const char* op = "deltaw::kasa_truncate_base_dense";
  auto Wv = detail::writable_weight(std::forward<WL>(W), op);
  const index_t k = std::min(Wv.rows(), Wv.cols());
  if (r < 1 || r >= k)
    throw rank_error(std::string(op) + ": r must be in [1, min(out, in) − 1] = [1, " + std::to_string(k - 1) +
                     "] so that one singular direction of W " + detail::shape_str(Wv.rows(), Wv.cols()) +
                     " is kept; got r = " + std::to_string(r));
  using T = typename decltype(Wv)::element_type;
  const auto svd = truncated_svd<double>(cpu::to_dense<double>(matrix_view<const T>(Wv)), k);
  kasa_dropped d;
  d.U = svd.U.rightCols(r);
  d.S = svd.S.tail(r);
  d.V = svd.V.rightCols(r);
  const dense<double> US = d.U * d.S.asDiagonal();
  const dense<double> Vt = d.V.transpose();
  detail::subtract_scaled_product<double>(Wv, US, Vt, 1.0);
  return d;
}

DELTAW_NAMESPACE_END
