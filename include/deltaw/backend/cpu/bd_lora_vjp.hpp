// SPDX-License-Identifier: MIT
// VJP of BD-LoRA, ΔW = s·BD(B)·BD(A) (backend/cpu/bd_lora.hpp). With Z = X·BD(A)ᵀ and
// V = dY·BD(B) (tokens × r, both computed block-wise):
//   dB = s·dYᵀ·Z,  dA = s·Vᵀ·X,  each kept only on its factor's diagonal blocks and written
//   in the stored layout ([out, r/n_b], [r, in/n_a]);  dX (update part) = s·V·BD(A).
#pragma once

#include "../../expr/bd_lora.hpp"
#include "bd_lora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<bd_lora_update<T, D>> {
  using U = bd_lora_update<T, D>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) {
    constexpr const char* n[] = {"B", "A"};
    return n[i];
  }
  /// grads = {dB, dA} in the stored shapes; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<bd_lora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[1], u.A(), op, "A");
    const C s = C(u.scale());
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    const index_t n = X.rows(), r = u.rank();
    if (present(grads[0])) {
      auto Z = kernels::make_scratch<C>(ctx, n, r);
      detail::bd_mul_trans<C>(ctx, C(1), X, A.view(), u.a_blocks(), C(0), Z.view());
      detail::bd_grad<C>(ctx, s, dY, Z.cview(), u.b_blocks(), grads[0]);
    }
    if (!present(grads[1]) && !present(dX)) return;
    auto V = kernels::make_scratch<C>(ctx, n, r);
    detail::bd_mul<C>(ctx, C(1), dY, B.view(), u.b_blocks(), C(0), V.view());
    if (present(grads[1])) detail::bd_grad<C>(ctx, s, V.cview(), X, u.a_blocks(), grads[1]);
    if (present(dX)) detail::bd_mul<C>(ctx, s, V.cview(), A.view(), u.a_blocks(), C(1), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
