// SPDX-License-Identifier: MIT
// PiSSA (Meng, Wang, Zhang 2024, arXiv:2404.02948): the adapter starts as the principal
// rank-r part of W and W keeps the residual. With W = U·S·Vᵀ:
//   A = diag(√(S_r/s))·V_rᵀ,  B = U_r·diag(√(S_r/s)),  W_res = W − s·B·A,
// so s·B·A is the best rank-r approximation of W and the model is unchanged.
// The exact form uses a dense SVD (O(out·in·min(out, in))); PEFT's "pissa_niter_N" uses a
// randomized SVD with N power iterations, as pissa_options{.power_iterations = N} does here.
#pragma once

#include <cmath>
#include <string>

#include "../linalg/randomized_svd.hpp"
#include "factors.hpp"

DELTAW_NAMESPACE_BEGIN

struct pissa_options {
  /// Negative: exact dense SVD. N ≥ 0: randomized SVD with N power iterations.
  index_t power_iterations = -1;
  index_t oversampling = 10;  ///< randomized only
  std::uint64_t seed = 0;     ///< randomized only
  /// Randomized only: compute the SVD and the residual in W's own type (fp32 for a float
  /// W, as torch.svd_lowrank on a float tensor; about 2× faster) instead of double.
  bool weight_type_arithmetic = false;
};

/// Initialises a PiSSA adapter of rank r and scale s > 0 from W [out, in] (a writable float
/// or double Eigen matrix or view), and rewrites W into W_res in place. The SVD is computed
/// in double (or, randomized, in W's type with weight_type_arithmetic); the factors are
/// returned in W's element type.
template <class WL>
auto pissa(WL&& W, index_t r, double s, const pissa_options& opt = {}) {
  constexpr const char* op = "deltaw::pissa";
  auto Wv = detail::writable_weight(std::forward<WL>(W), op);
  using T = typename decltype(Wv)::element_type;
  detail::check_init_rank(r, Wv.rows(), Wv.cols(), op);
  if (!(std::isfinite(s) && s > 0.0))
    throw argument_error(std::string(op) + ": the scale s must be finite and positive (A and B take √(S/s)); got " +
                         std::to_string(s));
  const matrix_view<const T> Wc(Wv);
  lora_factors<T> f;
  f.s = s;
  auto finish = [&]<class C>(const svd_result<C>& svd) {
    const Eigen::Matrix<C, Eigen::Dynamic, 1> root = (svd.S / C(s)).cwiseSqrt();
    f.B = (svd.U * root.asDiagonal()).template cast<T>();
    f.A = (root.asDiagonal() * svd.V.transpose()).template cast<T>();
    detail::subtract_scaled_product<C>(Wv, f.B, f.A, s);
  };
  const rsvd_options ro{.oversampling = opt.oversampling, .power_iterations = opt.power_iterations, .seed = opt.seed};
  if (opt.power_iterations < 0) {
    finish(truncated_svd<double>(cpu::to_dense<double>(Wc), r));
  } else if (opt.weight_type_arithmetic) {
    finish(randomized_svd<T>(Wc, r, ro));
  } else {
    finish(randomized_svd<double>(Wc, r, ro));
  }
  return f;
}

DELTAW_NAMESPACE_END
