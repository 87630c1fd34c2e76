// SPDX-License-Identifier: MIT
// Evaluator of LoRA/rsLoRA (ΔW = s·B·A): the rank-r products are accumulated into the
// output, so apply costs the base GEMM plus 2·tokens·r·(in + out) flops and one
// tokens × r scratch. Written against the primitive layer, for any device.
#pragma once

#include "../../expr/low_rank.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct evaluator<low_rank<T, D>> : additive_rows<evaluator<low_rank<T, D>>, low_rank<T, D>> {
  using U = low_rank<T, D>;

  /// Y += s·(X·Aᵀ)·Bᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(u.scale()), X, kernels::op::none, A, kernels::op::trans, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), kernels::op::none, B, kernels::op::trans, C(1), Y);
  }

  /// O += s·(G·B)·A.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(u.scale()), G, kernels::op::none, B, kernels::op::none, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), kernels::op::none, A, kernels::op::none, C(1), O);
  }

  /// P += factor·s·B[r0 : r0 + P.rows()]·A.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    const kernels::operand<C, D> B(ctx, u.B().middle_rows(r0, P.rows())), A(ctx, u.A());
    gemm<C>(ctx, factor * C(u.scale()), B, kernels::op::none, A, kernels::op::none, C(1), P);
  }

  /// ‖s·B·A‖_F = |s|·√tr((BᵀB)(AAᵀ)), from two r × r Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    const kernels::cpu_context ctx;
    const kernels::operand<double> B(ctx, u.B()), A(ctx, u.A());
    auto GB = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    auto GA = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    gemm<double>(ctx, 1.0, B, kernels::op::trans, B, kernels::op::none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, A, kernels::op::none, A, kernels::op::trans, 0.0, GA.view());
    return std::abs(u.scale()) * std::sqrt(std::max(trace_of_product<double>(GB.cview(), GA.cview()), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
