// SPDX-License-Identifier: MIT
// Evaluator of UniLoRA (expr/unilora.hpp): A [r, in] and B [out, r] are gathered from θ
// (A[i, j] = θ[idx_A[i, j]]·σ_A[i, j], likewise B) into scratch once per call, then
//   apply:       Y += (X·Aᵀ)·Bᵀ
//   transposed:  O += (G·B)·A
//   rows:        P += f·B[rows]·A
// Scratch r·(in + out) + tokens × r; never out × in.
#pragma once

#include "../../expr/unilora.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace unilora_detail {

/// A [r, in] (which = 0) or B [out, r] (which = 1) gathered from θ in type C.
template <class C, class Ctx, class U>
auto gather(const Ctx& ctx, const U& u, int which) {
  const auto& p = *u.pattern();
  const index_t rows = which == 0 ? p.r : p.out, cols = which == 0 ? p.in : p.r;
  const auto& idx = which == 0 ? p.idx_A : p.idx_B;
  const auto& sc = which == 0 ? p.scale_A : p.scale_B;
  auto M = kernels::make_scratch<C>(ctx, rows, cols);
  const auto v = M.view();
  const auto& t = u.theta();
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) {
      const std::size_t k = std::size_t(i * cols + j);
      v(i, j) = convert<C>(t[idx[k]]) * C(sc[k]);
    }
  return M;
}

}  // namespace unilora_detail

template <class T>
struct evaluator<unilora_update<T, device::cpu>>
    : additive_rows<evaluator<unilora_update<T, device::cpu>>, unilora_update<T, device::cpu>> {
  using D = device::cpu;
  using U = unilora_update<T, D>;

  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y) {
    using enum kernels::op;
    if (X.rows() == 0) return;
    const auto A = unilora_detail::gather<C>(ctx, u, 0), B = unilora_detail::gather<C>(ctx, u, 1);
    auto H = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), X, none, A.cview(), trans, C(0), H.view());
    gemm<C>(ctx, C(1), H.cview(), none, B.cview(), trans, C(1), Y);
  }
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C>& G, const mview<C>& O) {
    using enum kernels::op;
    if (G.rows() == 0) return;
    const auto A = unilora_detail::gather<C>(ctx, u, 0), B = unilora_detail::gather<C>(ctx, u, 1);
    auto H = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, B.cview(), none, C(0), H.view());
    gemm<C>(ctx, C(1), H.cview(), none, A.cview(), none, C(1), O);
  }
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C>& P, C factor) {
    using enum kernels::op;
    if (P.rows() == 0) return;
    const auto A = unilora_detail::gather<C>(ctx, u, 0), B = unilora_detail::gather<C>(ctx, u, 1);
    gemm<C>(ctx, factor, B.cview().middle_rows(r0, P.rows()), none, A.cview(), none, C(1), P);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
