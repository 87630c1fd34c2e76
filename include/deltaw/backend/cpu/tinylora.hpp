// SPDX-License-Identifier: MIT
// Evaluator of TinyLoRA, ΔW = s·B·(Σᵢ vᵢPᵢ)·A (expr/tinylora.hpp): the r × r core is formed
// once per call into scratch (vᵀ·P, [1, u]·[u, r²]), then the product runs as core_low_rank's
// right-to-left order, ((X·Aᵀ)·(s·R)ᵀ)·Bᵀ. Temporaries: r², tokens × r. Never out × in.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>

#include "../../expr/tinylora.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {
namespace detail {
/// R = Σᵢ vᵢ·Pᵢ in a [1, r²] scratch of type C (view it with tinylora_core_view).
template <class C, class Ctx, class T, class D>
auto tinylora_core(const Ctx& ctx, const tinylora_update<T, D>& u) {
  using enum kernels::op;
  const kernels::operand<C, D> P(ctx, u.P());
  const auto v = kernels::vector_scratch<C>(ctx, u.v());
  const index_t r = u.rank();
  auto R = kernels::make_scratch<C>(ctx, 1, r * r);
  gemm<C>(ctx, C(1), v.cview(), none, P.view(), none, C(0), R.view());
  return R;
}
/// The [1, r²] core scratch as the r × r matrix R (row-major).
template <class S>
auto tinylora_core_view(const S& R, index_t r) {
  const auto m = R.cview();
  using V = std::remove_cvref_t<decltype(m)>;
  return V(m.data(), r, r, r, 1);
}
}  // namespace detail

template <class T, class D>
struct evaluator<tinylora_update<T, D>> : additive_rows<evaluator<tinylora_update<T, D>>, tinylora_update<T, D>> {
  using U = tinylora_update<T, D>;

  /// Y += ((X·Aᵀ)·(s·R)ᵀ)·Bᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    const auto Rs = detail::tinylora_core<C>(ctx, u);
    const auto R = detail::tinylora_core_view(Rs, u.rank());
    auto Z1 = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), X, none, A.view(), trans, C(0), Z1.view());
    auto Z2 = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(u.scale()), Z1.cview(), none, R, trans, C(0), Z2.view());
    gemm<C>(ctx, C(1), Z2.cview(), none, B.view(), trans, C(1), Y);
  }

  /// O += ((G·B)·(s·R))·A.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    const auto Rs = detail::tinylora_core<C>(ctx, u);
    const auto R = detail::tinylora_core_view(Rs, u.rank());
    auto Z1 = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, B.view(), none, C(0), Z1.view());
    auto Z2 = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(u.scale()), Z1.cview(), none, R, none, C(0), Z2.view());
    gemm<C>(ctx, C(1), Z2.cview(), none, A.view(), none, C(1), O);
  }

  /// P += factor·s·B[r0 : r0 + P.rows()]·R·A through the n × r fold B[r0 : …]·R.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B().middle_rows(r0, P.rows())), A(ctx, u.A());
    const auto Rs = detail::tinylora_core<C>(ctx, u);
    const auto R = detail::tinylora_core_view(Rs, u.rank());
    auto BR = kernels::make_scratch<C>(ctx, P.rows(), u.rank());
    gemm<C>(ctx, factor * C(u.scale()), B.view(), none, R, none, C(0), BR.view());
    gemm<C>(ctx, C(1), BR.cview(), none, A.view(), none, C(1), P);
  }

  /// ‖s·B·R·A‖_F² = s²·tr(Rᵀ·(BᵀB)·R·(AAᵀ)), in double.
  template <class C>
    requires std::same_as<D, device::cpu>  // CUDA forms ΔW by panels (add_delta_rows)
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    const index_t r = u.rank();
    const kernels::operand<double> B(ctx, u.B()), A(ctx, u.A());
    const auto Rs = detail::tinylora_core<double>(ctx, u);
    const auto R = detail::tinylora_core_view(Rs, r);
    auto GB = kernels::make_scratch<double>(ctx, r, r);
    auto GA = kernels::make_scratch<double>(ctx, r, r);
    gemm<double>(ctx, 1.0, B.view(), trans, B.view(), none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, A.view(), none, A.view(), trans, 0.0, GA.view());
    auto GBR = kernels::make_scratch<double>(ctx, r, r);
    gemm<double>(ctx, 1.0, GB.cview(), none, R, none, 0.0, GBR.view());
    auto M = kernels::make_scratch<double>(ctx, r, r);
    gemm<double>(ctx, 1.0, GBR.cview(), none, GA.cview(), none, 0.0, M.view());
    return std::abs(u.scale()) * std::sqrt(std::max(trace_of_product<double>(M.cview(), R), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
