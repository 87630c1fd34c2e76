// SPDX-License-Identifier: MIT
// LoRA-SB initialisation (Ponkshe et al. 2024, "Initialization Using Update Approximation is
// a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv:2411.19557).
//
// LoRA-SB trains only the core R of ΔW = B·R·A (expr/core_low_rank.hpp, s = 1 since α = r).
// Its initialisation approximates the first update of full fine-tuning with Adam, which
// with zero moments is ΔW₁ = −η₁·sign(Σ G) (Σ G: the gradient accumulated over a few
// samples), by its truncated SVD ΔW₁ ≈ U_r·Σ_r·V_rᵀ:  B = U_r, R = Σ_r, A = V_rᵀ.
// B and A are then frozen; B·R·A is the best rank-r approximation of ΔW₁ (Eckart–Young).
//
// The reference does not offset W: the model starts at W + ΔW₁'s rank-r part, i.e. after an
// approximate first step (METHODS.md). `lora_sb_options::offset_weight` instead rewrites
// W ← W − B·R·A, so that W_res + B·R·A = W and the model is unchanged at initialisation
// (the convention of PiSSA and LoRA-GA); it is off by default.
#pragma once

#include <cmath>
#include <string>

#include "../expr/core_low_rank.hpp"
#include "factors.hpp"  // first: it brings expr/low_rank.hpp, which backend/cpu/ops.hpp needs
#include "../linalg/randomized_svd.hpp"

DELTAW_NAMESPACE_BEGIN

/// Core low-rank factors owned by value: B [out, r], R [r, r], A [r, in], ΔW = s·B·R·A.
template <class T>
struct core_factors {
  dense<T> B;
  dense<T> R;
  dense<T> A;
  double s = 1.0;
  index_t rank() const { return R.rows(); }
  /// The LoRA-SB update over these factors (B, A frozen, R trained, s = 1); it views them.
  auto adapter() const { return deltaw::lora_sb(B, R, A); }
};

struct lora_sb_options {
  double lr = 1e-3;               ///< η₁ of ΔW₁ = −η₁·sign(Σ G)
  index_t power_iterations = -1;  ///< negative: exact dense SVD; N ≥ 0: randomized with N power iterations
  index_t oversampling = 10;      ///< randomized only
  std::uint64_t seed = 0;         ///< randomized only
};

namespace detail {
template <class T>
core_factors<T> lora_sb_factors(const dense<double>& G, index_t r, const lora_sb_options& opt, const char* op) {
  if (!(std::isfinite(opt.lr) && opt.lr > 0.0))
    throw argument_error(std::string(op) + ": the learning rate η₁ must be finite and positive; got " +
                         std::to_string(opt.lr));
  check_init_rank(r, G.rows(), G.cols(), op);
  if (!G.allFinite()) throw non_finite_error(std::string(op) + ": the gradient has a non-finite entry");
  // sign(0) = 0, as torch.sign.
  const dense<double> D = G.unaryExpr([&](double g) { return g > 0 ? -opt.lr : (g < 0 ? opt.lr : 0.0); });
  svd_result<double> svd;
  if (opt.power_iterations < 0) {
    svd = truncated_svd<double>(D, r);
  } else {
    svd = randomized_svd<double>(D, r,
                                 rsvd_options{.oversampling = opt.oversampling,
                                              .power_iterations = opt.power_iterations,
                                              .seed = opt.seed});
  }
  core_factors<T> f;
  f.s = 1.0;
  f.B = svd.U.template cast<T>();
  f.R = svd.S.asDiagonal().toDenseMatrix().template cast<T>();
  f.A = svd.V.transpose().template cast<T>();
  return f;
}
}  // namespace detail

/// LoRA-SB factors of rank r from the accumulated gradient G [out, in] (an Eigen matrix or
/// CPU view); W is not touched (the reference's convention). Factors in G's element type.
template <class GM>
auto lora_sb_init(const GM& G, index_t r, const lora_sb_options& opt = {}) {
  const auto Gv = view(G);
  using T = std::remove_const_t<typename decltype(Gv)::element_type>;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "deltaw::lora_sb_init: the gradient must be float or double");
  return detail::lora_sb_factors<T>(cpu::to_dense<double>(Gv), r, opt, "deltaw::lora_sb_init");
}

/// The same, and W [out, in] (writable, float or double) rewritten into W − B·R·A, so that
/// W_res + B·R·A = W (offset_weight: not the reference's convention, see the top).
template <class WL, class GM>
auto lora_sb_init_offset(WL&& W, const GM& G, index_t r, const lora_sb_options& opt = {}) {
  constexpr const char* op = "deltaw::lora_sb_init_offset";
  auto Wv = detail::writable_weight(std::forward<WL>(W), op);
  using T = typename decltype(Wv)::element_type;
  const auto Gv = view(G);
  if (Gv.rows() != Wv.rows() || Gv.cols() != Wv.cols())
    throw shape_error(std::string(op) + ": the gradient G is " + detail::shape_str(Gv.rows(), Gv.cols()) +
                      " but W is " + detail::shape_str(Wv.rows(), Wv.cols()));
  core_factors<T> f = detail::lora_sb_factors<T>(cpu::to_dense<double>(Gv), r, opt, op);
  // From the stored (rounded) factors, in double: (B·R)·A with unit scale.
  const dense<double> BR = f.B.template cast<double>() * f.R.template cast<double>();
  const dense<double> Ad = f.A.template cast<double>();
  detail::subtract_scaled_product<double>(Wv, BR, Ad, 1.0);
  return f;
}

DELTAW_NAMESPACE_END
