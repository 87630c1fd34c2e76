// SPDX-License-Identifier: MIT
// Evaluator of the core low-rank form ΔW = s·B·R·A (LoRA-XS, LoRA-SB, LaMDA). Apply
// multiplies the three factors in the cheapest exact order for the number of tokens
// (core_low_rank::cheapest_order); with r1 = r2 = r and tokens < out, in that is
// ((X·Aᵀ)·Rᵀ)·Bᵀ, i.e. LoRA's cost plus 2·tokens·r² flops. Temporaries are tokens × r,
// or one r × in / out × r fold of two factors; never out × in. Written against the
// primitive layer, for any device.
#pragma once

#include <algorithm>
#include <cmath>

#include "../../expr/core_low_rank.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct evaluator<core_low_rank<T, D>> : additive_rows<evaluator<core_low_rank<T, D>>, core_low_rank<T, D>> {
  using U = core_low_rank<T, D>;

  /// Y += s·X·(B·R·A)ᵀ in the cheapest order for X.rows() tokens.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B()), R(ctx, u.R()), A(ctx, u.A());
    const C s = C(u.scale());
    const index_t n = X.rows();
    switch (u.cheapest_order(n)) {
      case core_order::right_to_left: {  // ((X·Aᵀ)·(s·R)ᵀ)·Bᵀ
        auto Z1 = kernels::make_scratch<C>(ctx, n, u.rank_in());
        gemm<C>(ctx, C(1), X, none, A, trans, C(0), Z1.view());
        auto Z2 = kernels::make_scratch<C>(ctx, n, u.rank_out());
        gemm<C>(ctx, s, Z1.cview(), none, R, trans, C(0), Z2.view());
        gemm<C>(ctx, C(1), Z2.cview(), none, B, trans, C(1), Y);
        break;
      }
      case core_order::fold_B_R: {  // (X·Aᵀ)·(B·s·R)ᵀ
        auto BR = kernels::make_scratch<C>(ctx, u.rows(), u.rank_in());
        gemm<C>(ctx, s, B, none, R, none, C(0), BR.view());
        auto Z = kernels::make_scratch<C>(ctx, n, u.rank_in());
        gemm<C>(ctx, C(1), X, none, A, trans, C(0), Z.view());
        gemm<C>(ctx, C(1), Z.cview(), none, BR.cview(), trans, C(1), Y);
        break;
      }
      case core_order::fold_R_A: {  // (X·(s·R·A)ᵀ)·Bᵀ
        auto RA = kernels::make_scratch<C>(ctx, u.rank_out(), u.cols());
        gemm<C>(ctx, s, R, none, A, none, C(0), RA.view());
        auto Z = kernels::make_scratch<C>(ctx, n, u.rank_out());
        gemm<C>(ctx, C(1), X, none, RA.cview(), trans, C(0), Z.view());
        gemm<C>(ctx, C(1), Z.cview(), none, B, trans, C(1), Y);
        break;
      }
    }
  }

  /// O += s·G·B·R·A, in the same order family as apply (the costs are symmetric).
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B()), R(ctx, u.R()), A(ctx, u.A());
    const C s = C(u.scale());
    const index_t n = G.rows();
    switch (u.cheapest_order(n)) {
      case core_order::right_to_left: {  // ((G·B)·(s·R))·A
        auto Z1 = kernels::make_scratch<C>(ctx, n, u.rank_out());
        gemm<C>(ctx, C(1), G, none, B, none, C(0), Z1.view());
        auto Z2 = kernels::make_scratch<C>(ctx, n, u.rank_in());
        gemm<C>(ctx, s, Z1.cview(), none, R, none, C(0), Z2.view());
        gemm<C>(ctx, C(1), Z2.cview(), none, A, none, C(1), O);
        break;
      }
      case core_order::fold_B_R: {  // (G·(B·s·R))·A
        auto BR = kernels::make_scratch<C>(ctx, u.rows(), u.rank_in());
        gemm<C>(ctx, s, B, none, R, none, C(0), BR.view());
        auto Z = kernels::make_scratch<C>(ctx, n, u.rank_in());
        gemm<C>(ctx, C(1), G, none, BR.cview(), none, C(0), Z.view());
        gemm<C>(ctx, C(1), Z.cview(), none, A, none, C(1), O);
        break;
      }
      case core_order::fold_R_A: {  // (G·B)·(s·R·A)
        auto RA = kernels::make_scratch<C>(ctx, u.rank_out(), u.cols());
        gemm<C>(ctx, s, R, none, A, none, C(0), RA.view());
        auto Z = kernels::make_scratch<C>(ctx, n, u.rank_out());
        gemm<C>(ctx, C(1), G, none, B, none, C(0), Z.view());
        gemm<C>(ctx, C(1), Z.cview(), none, RA.cview(), none, C(1), O);
        break;
      }
    }
  }

  /// P += factor·s·B[r0 : r0 + P.rows()]·R·A, through the n × r2 fold B[r0 : …]·R.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B().middle_rows(r0, P.rows())), R(ctx, u.R()), A(ctx, u.A());
    auto BR = kernels::make_scratch<C>(ctx, P.rows(), u.rank_in());
    gemm<C>(ctx, factor * C(u.scale()), B, none, R, none, C(0), BR.view());
    gemm<C>(ctx, C(1), BR.cview(), none, A, none, C(1), P);
  }

  /// ‖s·B·R·A‖_F² = s²·tr(Rᵀ·(BᵀB)·R·(AAᵀ)) from two Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    const index_t r1 = u.rank_out(), r2 = u.rank_in();
    const kernels::operand<double> B(ctx, u.B()), R(ctx, u.R()), A(ctx, u.A());
    auto GB = kernels::make_scratch<double>(ctx, r1, r1);
    auto GA = kernels::make_scratch<double>(ctx, r2, r2);
    gemm<double>(ctx, 1.0, B, trans, B, none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, A, none, A, trans, 0.0, GA.view());
    auto GBR = kernels::make_scratch<double>(ctx, r1, r2);
    gemm<double>(ctx, 1.0, GB.cview(), none, R, none, 0.0, GBR.view());
    auto M = kernels::make_scratch<double>(ctx, r1, r2);
    gemm<double>(ctx, 1.0, GBR.cview(), none, GA.cview(), none, 0.0, M.view());
    const double tr = trace_of_product<double>(M.cview(), R.view());
    return std::abs(u.scale()) * std::sqrt(std::max(tr, 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
