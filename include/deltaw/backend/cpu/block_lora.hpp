// SPDX-License-Identifier: MIT
// Evaluator of Block-LoRA, ΔW = s·(Σᵢ Bᵢ)·A₀: the n blocks of B are summed once
// (out × r_b scratch, out·r_b·(n − 1) adds), then it is LoRA at rank r_b, so apply costs
// the base GEMM plus 2·tokens·r_b·(in + out) flops. Written against the primitive layer,
// for any device.
#pragma once

#include <algorithm>
#include <cmath>

#include "../../expr/block_lora.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace detail {
/// s + b converted to C: the block sum of Block-LoRA (a host-device functor).
template <class C>
struct add_converted {
  template <class B>
  DELTAW_HOST_DEVICE C operator()(B b, C s) const {
    return s + deltaw::convert<C>(b);
  }
};
}  // namespace detail

template <class T, class D>
struct evaluator<block_low_rank<T, D>> : additive_rows<evaluator<block_low_rank<T, D>>, block_low_rank<T, D>> {
  using U = block_low_rank<T, D>;

  /// Rows [r0, r0 + n) of Σᵢ Bᵢ, times `factor`, in type C: an n × r_b scratch.
  template <class C, class Ctx>
  static auto summed_B(const Ctx& ctx, const U& u, index_t r0, index_t n, C factor) {
    const index_t rb = u.block_rank();
    const auto B = u.B().middle_rows(r0, n);
    auto S = kernels::make_scratch<C>(ctx, n, rb);
    copy(ctx, B.middle_cols(0, rb), S.view());
    for (index_t i = 1; i < u.blocks(); ++i)
      transform(ctx, B.middle_cols(i * rb, rb), S.view(), detail::add_converted<C>{});
    if (factor != C(1)) transform(ctx, S.view(), kernels::scale_by<C>{factor});
    return S;
  }

  /// Y += (s·X·A₀ᵀ)·Sᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const kernels::operand<C, D> A0(ctx, u.A0());
    const auto S = summed_B<C>(ctx, u, 0, u.rows(), C(1));
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.block_rank());
    gemm<C>(ctx, C(u.scale()), X, none, A0, trans, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, S.cview(), trans, C(1), Y);
  }

  /// O += (s·G·S)·A₀.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const kernels::operand<C, D> A0(ctx, u.A0());
    const auto S = summed_B<C>(ctx, u, 0, u.rows(), C(1));
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.block_rank());
    gemm<C>(ctx, C(u.scale()), G, none, S.cview(), none, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, A0, none, C(1), O);
  }

  /// P += factor·s·S[r0 : r0 + P.rows()]·A₀.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    const kernels::operand<C, D> A0(ctx, u.A0());
    const auto S = summed_B<C>(ctx, u, r0, P.rows(), factor * C(u.scale()));
    gemm<C>(ctx, C(1), S.cview(), kernels::op::none, A0, kernels::op::none, C(1), P);
  }

  /// ‖s·S·A₀‖_F = |s|·√tr((SᵀS)(A₀A₀ᵀ)), S = Σᵢ Bᵢ, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    const index_t rb = u.block_rank();
    const auto S = summed_B<double>(ctx, u, 0, u.rows(), 1.0);
    const kernels::operand<double> A0(ctx, u.A0());
    auto GS = kernels::make_scratch<double>(ctx, rb, rb);
    auto GA = kernels::make_scratch<double>(ctx, rb, rb);
    gemm<double>(ctx, 1.0, S.cview(), trans, S.cview(), none, 0.0, GS.view());
    gemm<double>(ctx, 1.0, A0, none, A0, trans, 0.0, GA.view());
    return std::abs(u.scale()) * std::sqrt(std::max(trace_of_product<double>(GS.cview(), GA.cview()), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
