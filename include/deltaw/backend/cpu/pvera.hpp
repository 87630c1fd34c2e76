// SPDX-License-Identifier: MIT
// Evaluator of PVeRA (expr/pvera.hpp). The update is the deterministic path, a VeRA update
// with λ_d's mean half, so every operation is VeRA's evaluator on u.mean() (bases drawn in
// tiles, never r × in or out × in). pvera_apply_sampled is PEFT's sampled forward with the
// caller's noise.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <string>

#include "../../expr/pvera.hpp"
#include "random_basis.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct evaluator<pvera_update<T, D>> : additive_rows<evaluator<pvera_update<T, D>>, pvera_update<T, D>> {
  using U = pvera_update<T, D>;
  using E = evaluator<vera_update<T, D>>;

  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    E::template apply_add<C>(ctx, u.mean(), X, Y);
  }
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    E::template apply_transposed_add<C>(ctx, u.mean(), G, O);
  }
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    E::template add_scaled_rows<C>(ctx, u.mean(), r0, P, factor);
  }
  template <class C>
    requires std::same_as<D, device::cpu>  // CUDA forms ΔW by panels (add_delta_rows)
  static double frobenius_norm(const U& u) {
    return E::template frobenius_norm<C>(u.mean());
  }
};

/// PEFT's sampled PVeRA forward (training, or eval with sample_at_inference):
///   H = X·(diag(λ_d)·A₂)ᵀ [tokens, 2r],  μ = H[:, :r],  log σ² = H[:, r:],
///   Y += (μ + ε ⊙ exp(½·log σ²))·(diag(λ_b)·B)ᵀ
/// with ε [tokens, r] the caller's standard-normal noise (PEFT draws it with torch's
/// generator, which deltaw does not reproduce). ε = 0 gives apply's deterministic path.
/// A₂ and B are drawn in tiles as VeRA's; scratch tokens × 2r. X, eps and Y are views in the
/// arithmetic type C (deltaw::view of Eigen matrices).
template <class C, class T>
void pvera_apply_sampled(const pvera_update<T, device::cpu>& u, const cview<C>& X, const cview<C>& eps,
                         const mview<C>& Y) {
  constexpr const char* op = "deltaw::cpu::pvera_apply_sampled";
  using enum kernels::op;
  using E = evaluator<vera_update<T, device::cpu>>;
  const kernels::cpu_context ctx;
  const index_t r = u.rank(), in = u.cols(), out = u.rows(), tokens = X.rows();
  if (X.cols() != in || eps.rows() != tokens || eps.cols() != r || Y.rows() != tokens || Y.cols() != out)
    throw shape_error(std::string(op) + ": X " + deltaw::detail::shape_str(X.rows(), X.cols()) + ", eps " +
                      deltaw::detail::shape_str(eps.rows(), eps.cols()) + ", Y " +
                      deltaw::detail::shape_str(Y.rows(), Y.cols()) + " must be [tokens, in], [tokens, r], [tokens, out] " +
                      "for the layer " + deltaw::detail::shape_str(out, in) + " with r = " + std::to_string(r));
  const auto& v = u.mean();
  const auto ld = to_host_vector<C>(ctx, u.lambda_d());  // [2r]
  const auto lb = to_host_vector<C>(ctx, u.lambda_b());
  const index_t ta = E::a_tile(v), tb = E::b_tile(v);
  auto At = kernels::make_scratch<C>(ctx, 2 * r, ta);
  auto H = kernels::make_scratch<C>(ctx, tokens, 2 * r);
  kernels::fill(ctx, H.view(), C(0));
  for (index_t j0 = 0; j0 < in; j0 += ta) {
    const index_t tj = std::min(ta, in - j0);
    const auto a = At.view().middle_cols(0, tj);
    E::template A_tile<C>(ctx, v, detail::host_view(ld), j0, a);  // rows 0..2r−1 of A₂, scaled by λ_d
    gemm<C>(ctx, C(1), X.middle_cols(j0, tj), none, cview<C>(a), trans, C(1), H.view());
  }
  auto Z = kernels::make_scratch<C>(ctx, tokens, r);
  const auto Hv = H.cview();
  const auto Zv = Z.view();
  for (index_t t = 0; t < tokens; ++t)
    for (index_t k = 0; k < r; ++k) Zv(t, k) = Hv(t, k) + eps(t, k) * C(std::exp(0.5 * double(Hv(t, r + k))));
  auto Bt = kernels::make_scratch<C>(ctx, tb, r);
  for (index_t i0 = 0; i0 < out; i0 += tb) {
    const index_t ti = std::min(tb, out - i0);
    const auto bt = Bt.view().middle_rows(0, ti);
    E::template B_tile<C>(ctx, v, detail::host_view(lb), i0, bt);
    gemm<C>(ctx, C(1), Z.cview(), none, cview<C>(bt), trans, C(1), Y.middle_cols(i0, ti));
  }
}

}  // namespace cpu
DELTAW_NAMESPACE_END
