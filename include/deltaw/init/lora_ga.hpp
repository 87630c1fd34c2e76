// SPDX-License-Identifier: MIT
// LoRA-GA (Wang, Yu, Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
// arXiv:2407.05000): the adapter starts from the SVD of the averaged full gradient G of W,
// so that the first step of LoRA moves W like the first step of full fine-tuning.
//
// With G ≈ U·diag(S)·Vᵀ (randomized SVD, q = min(4r, min(out, in)), 4 power iterations):
//   paper ("ArB2r"):  A = ζ·V[:, :r]ᵀ,   B = ζ·U[:, r:2r]
//   PEFT:             A = V[:, :r]ᵀ,     B = ζ·U[:, r:2r]·diag(S[r:2r])
// with ζ = out^{1/4}/√γ ("stable", γ = 16) or ζ = 1 ("unit"), and W ← W − s·B·A so that the
// model is unchanged at initialisation.
//
// Why: with W_eff = W_res + s·B·A, the factor gradients are g_B = s·G·Aᵀ and g_A = s·Bᵀ·G, so
// one SGD step of size η changes W_eff by
//     s·(B'A' − BA) = −η·s²·(G·AᵀA + B·BᵀG) + η²·s³·G·Aᵀ·Bᵀ·G.
// In the paper's variant AᵀA = ζ²·V_r·V_rᵀ and BBᵀ = ζ²·U_{r:2r}·U_{r:2r}ᵀ, so the first-order
// change is −η·s²·ζ²·(U_r·S_r·V_rᵀ + U_{r:2r}·S_{r:2r}·V_{r:2r}ᵀ) = −η·s²·ζ²·G_{2r}: full
// fine-tuning's step restricted to the rank-2r truncation of G (A takes the first r right
// vectors, B the next r left vectors). PEFT's variant gives
// −η·s²·(U_r·S_r·V_rᵀ + ζ²·U_{r:2r}·S_{r:2r}³·V_{r:2r}ᵀ) instead: not the truncation.
//
// The gradient G is the caller's (the mean over a few batches of dL/dW); the helper
// estimate_weight_gradients below computes it with deltaw's autograd.
#pragma once

#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "../autograd/tape.hpp"
#include "factors.hpp"  // first: it brings expr/low_rank.hpp, which backend/cpu/ops.hpp needs
#include "../linalg/randomized_svd.hpp"

DELTAW_NAMESPACE_BEGIN

/// Which of the two published forms of LoRA-GA's factors.
enum class lora_ga_variant {
  paper,  ///< the paper's "ArB2r": A = ζ·V_rᵀ, B = ζ·U_{r:2r}
  peft,   ///< PEFT's: A = V_rᵀ, B = ζ·U_{r:2r}·diag(S_{r:2r})
};

/// The factor ζ of both variants.
enum class lora_ga_scale {
  stable,  ///< ζ = out^{1/4}/√γ
  unit,    ///< ζ = 1
};

struct lora_ga_options {
  lora_ga_variant variant = lora_ga_variant::paper;
  lora_ga_scale scale = lora_ga_scale::stable;
  double gamma = 16.0;            ///< γ of the stable scale
  index_t power_iterations = 4;   ///< of the randomized SVD; negative: exact dense SVD of G
  std::uint64_t seed = 0;
};

/// ζ for W with `out` rows.
inline double lora_ga_zeta(index_t out, const lora_ga_options& opt) {
  return opt.scale == lora_ga_scale::stable ? std::pow(double(out), 0.25) / std::sqrt(opt.gamma) : 1.0;
}

/// Initialises a LoRA-GA adapter of rank r and scale s from W [out, in] (writable, float or
/// double; rewritten into W − s·B·A in place) and the averaged gradient G [out, in] of the
/// loss with respect to W (an Eigen matrix or CPU view). Needs 2r ≤ min(out, in). The SVD
/// is computed in double; the factors are returned in W's element type.
template <class WL, class GM>
auto lora_ga(WL&& W, const GM& G, index_t r, double s, const lora_ga_options& opt = {}) {
  constexpr const char* op = "deltaw::lora_ga";
  auto Wv = detail::writable_weight(std::forward<WL>(W), op);
  using T = typename decltype(Wv)::element_type;
  const index_t m = Wv.rows(), n = Wv.cols();
  const auto Gv = view(G);
  if (Gv.rows() != m || Gv.cols() != n)
    throw shape_error(std::string(op) + ": the gradient G is " + detail::shape_str(Gv.rows(), Gv.cols()) +
                      " but W is " + detail::shape_str(m, n));
  if (r < 1 || 2 * r > std::min(m, n))
    throw rank_error(std::string(op) + ": A and B take 2r singular vectors of G, so r must be in [1, min(out, in)/2] = [1, " +
                     std::to_string(std::min(m, n) / 2) + "] for W " + detail::shape_str(m, n) + "; got r = " +
                     std::to_string(r));
  if (!std::isfinite(s) || s == 0.0)
    throw argument_error(std::string(op) + ": the scale s must be finite and non-zero; got " + std::to_string(s));
  if (!(std::isfinite(opt.gamma) && opt.gamma > 0.0))
    throw argument_error(std::string(op) + ": γ must be finite and positive; got " + std::to_string(opt.gamma));
  const dense<double> Gd = cpu::to_dense<double>(Gv);
  if (!Gd.allFinite()) throw non_finite_error(std::string(op) + ": the gradient G has a non-finite entry");

  svd_result<double> svd;
  if (opt.power_iterations < 0) {
    svd = truncated_svd<double>(Gd, 2 * r);
  } else {
    const index_t q = std::min<index_t>(4 * r, std::min(m, n));
    svd = randomized_svd<double>(Gd, 2 * r,
                                 rsvd_options{.oversampling = q - 2 * r,
                                              .power_iterations = opt.power_iterations,
                                              .seed = opt.seed});
  }
  const double zeta = lora_ga_zeta(m, opt);
  lora_factors<T> f;
  f.s = s;
  if (opt.variant == lora_ga_variant::paper) {
    f.A = (zeta * svd.V.leftCols(r).transpose()).template cast<T>();
    f.B = (zeta * svd.U.middleCols(r, r)).template cast<T>();
  } else {
    f.A = svd.V.leftCols(r).transpose().template cast<T>();
    f.B = (zeta * svd.U.middleCols(r, r) * svd.S.segment(r, r).asDiagonal()).template cast<T>();
  }
  detail::subtract_scaled_product<double>(Wv, f.B, f.A, s);
  return f;
}

/// The averaged gradients of a loss with respect to frozen weights, from deltaw's autograd.
///
/// The tape gives no gradient for a frozen view (autograd::linear and nn::linear keep W
/// frozen on purpose), so `step(tape, W, batch)` receives each weight as a variable that
/// carries a gradient (tape::input: a view of the caller's memory, never copied) and must
/// build its forward pass for those layers with it, e.g. autograd::matmul_nt(x, W[i])
/// for x·W[i]ᵀ, and return the scalar loss. For each of `batches` batches one tape is
/// recorded and swept; the result is the mean over the batches of dL/dW[i] (as PEFT's
/// preprocess_loraga). If the forward pass cannot be written that way, compute G by other
/// means and pass it to lora_ga directly.
template <class T, class Step>
std::vector<dense<T>> estimate_weight_gradients(std::span<const matrix_view<const T>> weights, index_t batches,
                                                Step&& step) {
  if (batches < 1)
    throw argument_error("deltaw::estimate_weight_gradients: the number of batches must be at least 1; got " +
                         std::to_string(batches));
  std::vector<dense<T>> G;
  for (const auto& w : weights) G.push_back(dense<T>::Zero(w.rows(), w.cols()));
  for (index_t b = 0; b < batches; ++b) {
    autograd::tape<T> t;
    std::vector<autograd::var<T>> vars;
    for (std::size_t i = 0; i < weights.size(); ++i) vars.push_back(t.input(weights[i], "W[" + std::to_string(i) + "]"));
    const autograd::var<T> loss = step(t, std::span<const autograd::var<T>>(vars), b);
    t.backward(loss);
    for (std::size_t i = 0; i < weights.size(); ++i) G[i] += t.grad(vars[i]);
  }
  for (auto& g : G) g /= T(batches);
  return G;
}

DELTAW_NAMESPACE_END
