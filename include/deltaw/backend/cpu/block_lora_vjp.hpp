// SPDX-License-Identifier: MIT
// VJP of Block-LoRA, ΔW = s·(Σᵢ Bᵢ)·A₀, B = [B₁ … Bₙ] [out, n·r_b], A₀ [r_b, in]. With
// S = Σᵢ Bᵢ (summed once, out × r_b) and Z = X·A₀ᵀ [tokens, r_b] it is LoRA at rank r_b:
//   ∂S = s·dYᵀ·Z,  ∂Bᵢ = ∂S for every block i (each Bᵢ enters ΔW through the same sum),
//   dZ = s·dY·S,  ∂A₀ = dZᵀ·X,  dX (update part) = dZ·A₀.
// Scratch: S and ∂S (out × r_b) and two tokens × r_b matrices; no out × in matrix.
// Factors, in order: B, A0.
#pragma once

#include <string>

#include "../../expr/block_lora.hpp"
#include "block_lora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<block_low_rank<T, D>> {
  using U = block_low_rank<T, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "B" : "A0"; }

  /// grads = {dB, dA0}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    using enum kernels::op;
    constexpr const char* op = "deltaw::cpu::vjp<block_lora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[1], u.A0(), op, "A0");
    if (X.cols() != u.cols() || dY.cols() != u.rows() || dY.rows() != X.rows())
      throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) + " and dY " +
                        deltaw::detail::shape_str(dY.rows(), dY.cols()) + " for ΔW " +
                        deltaw::detail::shape_str(u.rows(), u.cols()));
    const index_t rb = u.block_rank();
    const kernels::operand<C, D> A0(ctx, u.A0());
    const C s = C(u.scale());
    if (present(grads[0])) {
      auto Z = kernels::make_scratch<C>(ctx, X.rows(), rb);
      gemm<C>(ctx, C(1), X, none, A0, trans, C(0), Z.view());
      auto dS = kernels::make_scratch<C>(ctx, u.rows(), rb);
      gemm<C>(ctx, s, dY, trans, Z.cview(), none, C(0), dS.view());  // s·dYᵀ·Z
      for (index_t i = 0; i < u.blocks(); ++i) axpy<C>(ctx, C(1), dS.cview(), grads[0].middle_cols(i * rb, rb));
    }
    if (!present(grads[1]) && !present(dX)) return;
    const auto S = evaluator<U>::template summed_B<C>(ctx, u, 0, u.rows(), C(1));
    auto dZ = kernels::make_scratch<C>(ctx, dY.rows(), rb);
    gemm<C>(ctx, s, dY, none, S.cview(), none, C(0), dZ.view());  // s·dY·S
    if (present(grads[1])) gemm<C>(ctx, C(1), dZ.cview(), trans, X, none, C(1), grads[1]);
    if (present(dX)) gemm<C>(ctx, C(1), dZ.cview(), none, A0, none, C(1), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
