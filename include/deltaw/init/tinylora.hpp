// SPDX-License-Identifier: MIT
// TinyLoRA's frozen factors (arXiv:2602.04118; PEFT 0.21's TinyLoraLayer._init_svd): from the
// truncated SVD W ≈ U_r·S_r·V_rᵀ, B = U_r·√S_r [out, r] and A = √S_r·V_rᵀ [r, in] (the singular
// values split evenly), r capped at min(out, in). A dense SVD of W, named as such, run once
// when an adapter is created; PEFT saves B and A in the file (tinylora_B, tinylora_A), so a
// loaded adapter does not need it. The random projections P (torch's generator) are not
// reproduced: draw them with any generator or read them from a file.
#pragma once

#include <algorithm>
#include <string>

#include "../linalg/randomized_svd.hpp"
#include "factors.hpp"

DELTAW_NAMESPACE_BEGIN

/// B = U_r·√S_r, A = √S_r·V_rᵀ of W [out, in] (float or double, any CPU matrix or view), in W's
/// element type; the SVD in double. s = 1 (TinyLoRA has no scale). rank_error for r < 1.
template <class WL>
auto tinylora_factors_dense(const WL& W, index_t r) {
  constexpr const char* op = "deltaw::tinylora_factors_dense";
  const auto Wv = view(W);
  using T = std::remove_const_t<typename decltype(Wv)::element_type>;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "deltaw::tinylora_factors_dense: W must be float or double");
  if (r < 1) throw rank_error(std::string(op) + ": r must be at least 1; got r = " + std::to_string(r));
  const index_t k = std::min({r, Wv.rows(), Wv.cols()});
  const auto svd = truncated_svd<double>(cpu::to_dense<double>(matrix_view<const T>(Wv)), k);
  const Eigen::VectorXd root = svd.S.cwiseSqrt();
  lora_factors<T> f;
  f.B = (svd.U * root.asDiagonal()).template cast<T>();
  f.A = (root.asDiagonal() * svd.V.transpose()).template cast<T>();
  f.s = 1.0;
  return f;
}

DELTAW_NAMESPACE_END
