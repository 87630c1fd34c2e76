// SPDX-License-Identifier: MIT
// VJP of LoRA/rsLoRA (ΔW = s·B·A; rsLoRA differs only in s). With Z = X·Aᵀ:
//   dB = s·dYᵀ·Z,  dZ = s·dY·B,  dA = dZᵀ·X,  dX (update part) = dZ·A.
// Five rank-r products and two tokens × r scratches; no out × in matrix.
#pragma once

#include "../../expr/low_rank.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<low_rank<T, D>> {
  using U = low_rank<T, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "B" : "A"; }

  /// grads = {dB, dA}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<lora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[1], u.A(), op, "A");
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    const C s = C(u.scale());
    auto dZ = kernels::make_scratch<C>(ctx, dY.rows(), u.rank());
    gemm<C>(ctx, s, dY, none, B, none, C(0), dZ.view());  // dZ = s·dY·B
    if (present(grads[0])) {
      auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
      gemm<C>(ctx, C(1), X, none, A, trans, C(0), Z.view());
      gemm<C>(ctx, s, dY, trans, Z.cview(), none, C(1), grads[0]);  // s·dYᵀ·Z
    }
    if (present(grads[1])) gemm<C>(ctx, C(1), dZ.cview(), trans, X, none, C(1), grads[1]);
    if (present(dX)) gemm<C>(ctx, C(1), dZ.cview(), none, A, none, C(1), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
