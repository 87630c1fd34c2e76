// SPDX-License-Identifier: MIT
// Evaluator of AdaLoRA, ΔW = s·B·diag(E)·A (expr/adalora.hpp): LoRA's two products with the
// r columns of the middle product scaled by E,
//   Y += s·((X·Aᵀ)·diag(E))·Bᵀ,   O += s·((G·B)·diag(E))·A,   rows: P += s·B[rows]·diag(E)·A,
// and ‖ΔW‖_F = |s|·√Σ_ij (BᵀB)_ij·E_i·E_j·(A·Aᵀ)_ij from two r × r Gram matrices in double.
// Scratch: tokens × r (and r × in for the row operations); never out × in.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>

#include "../../expr/adalora.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct evaluator<adalora_update<T, D>> : additive_rows<evaluator<adalora_update<T, D>>, adalora_update<T, D>> {
  using U = adalora_update<T, D>;

  /// Y += s·((X·Aᵀ)·diag(E))·Bᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    if (u.rank() == 0) return;
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
    const auto e = kernels::vector_scratch<C>(ctx, u.E());
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(u.scale()), X, kernels::op::none, A.view(), kernels::op::trans, C(0), Z.view());
    scale_cols(ctx, Z.view(), kernels::as_vector(e));
    gemm<C>(ctx, C(1), Z.cview(), kernels::op::none, B.view(), kernels::op::trans, C(1), Y);
  }
  /// O += s·((G·B)·diag(E))·A.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    if (u.rank() == 0) return;
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
    const auto e = kernels::vector_scratch<C>(ctx, u.E());
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(u.scale()), G, kernels::op::none, B.view(), kernels::op::none, C(0), Z.view());
    scale_cols(ctx, Z.view(), kernels::as_vector(e));
    gemm<C>(ctx, C(1), Z.cview(), kernels::op::none, A.view(), kernels::op::none, C(1), O);
  }
  /// P += factor·s·B[r0 : r0 + P.rows()]·diag(E)·A.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    if (u.rank() == 0 || P.rows() == 0) return;
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B().middle_rows(r0, P.rows()));
    const auto e = kernels::vector_scratch<C>(ctx, u.E());
    auto Bs = kernels::make_scratch<C>(ctx, P.rows(), u.rank());
    copy(ctx, B.view(), Bs.view());
    scale_cols(ctx, Bs.view(), kernels::as_vector(e));
    gemm<C>(ctx, factor * C(u.scale()), Bs.cview(), kernels::op::none, A.view(), kernels::op::none, C(1), P);
  }
  /// |s|·√tr((Bᵀ·B)·diag(E)·(A·Aᵀ)·diag(E)).
  template <class C>
    requires std::same_as<D, device::cpu>  // CUDA forms ΔW by panels (add_delta_rows)
  static double frobenius_norm(const U& u) {
    const kernels::cpu_context ctx;
    const index_t r = u.rank();
    if (r == 0) return 0.0;
    const kernels::operand<double, D> A(ctx, u.A()), B(ctx, u.B());
    const auto e = kernels::vector_scratch<double>(ctx, u.E());
    auto GB = kernels::make_scratch<double>(ctx, r, r);
    auto GA = kernels::make_scratch<double>(ctx, r, r);
    gemm<double>(ctx, 1.0, B.view(), kernels::op::trans, B.view(), kernels::op::none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, A.view(), kernels::op::none, A.view(), kernels::op::trans, 0.0, GA.view());
    scale_rows(ctx, GA.view(), kernels::as_vector(e));
    scale_cols(ctx, GA.view(), kernels::as_vector(e));
    return std::abs(u.scale()) * std::sqrt(std::max(trace_of_product<double>(GB.cview(), GA.cview()), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
