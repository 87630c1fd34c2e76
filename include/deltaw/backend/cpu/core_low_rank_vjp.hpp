// SPDX-License-Identifier: MIT
// VJP of the core low-rank form ΔW = s·B·R·A (LoRA-XS, LoRA-SB, LaMDA). With
// Z₁ = X·Aᵀ [tokens, r2], Z₂ = Z₁·Rᵀ [tokens, r1]:
//   dB = s·dYᵀ·Z₂,  dZ₂ = s·dY·B,  dR = dZ₂ᵀ·Z₁,  dZ₁ = dZ₂·R,  dA = dZ₁ᵀ·X,
//   dX (update part) = dZ₁·A.
// Gradients of factors the type marks frozen (core_trainable) are skipped even when a
// slot is given. Only tokens × r temporaries. Written against the primitive layer, for
// any device.
#pragma once

#include "../../expr/core_low_rank.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<core_low_rank<T, D>> {
  using U = core_low_rank<T, D>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "B" : i == 1 ? "R" : "A"; }

  /// grads = {dB, dR, dA}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<core_lora>::backward";
    using enum kernels::op;
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[1], u.R(), op, "R");
    detail::check_grad_shape(grads[2], u.A(), op, "A");
    const mview<C, D> gB = u.trainable().B ? grads[0] : mview<C, D>();
    const mview<C, D> gR = u.trainable().R ? grads[1] : mview<C, D>();
    const mview<C, D> gA = u.trainable().A ? grads[2] : mview<C, D>();
    const bool need_dz1 = present(gA) || present(dX);
    if (!present(gB) && !present(gR) && !need_dz1) return;
    const kernels::operand<C, D> B(ctx, u.B()), R(ctx, u.R()), A(ctx, u.A());
    const C s = C(u.scale());
    const index_t n = X.rows();
    const bool need_z1 = present(gB) || present(gR);
    auto Z1 = kernels::make_scratch<C>(ctx, need_z1 ? n : 0, u.rank_in());
    if (need_z1) gemm<C>(ctx, C(1), X, none, A, trans, C(0), Z1.view());
    if (present(gB)) {
      auto Z2 = kernels::make_scratch<C>(ctx, n, u.rank_out());
      gemm<C>(ctx, C(1), Z1.cview(), none, R, trans, C(0), Z2.view());
      gemm<C>(ctx, s, dY, trans, Z2.cview(), none, C(1), gB);  // s·dYᵀ·Z₂
    }
    if (!present(gR) && !need_dz1) return;
    auto dZ2 = kernels::make_scratch<C>(ctx, dY.rows(), u.rank_out());
    gemm<C>(ctx, s, dY, none, B, none, C(0), dZ2.view());  // dZ₂ = s·dY·B
    if (present(gR)) gemm<C>(ctx, C(1), dZ2.cview(), trans, Z1.cview(), none, C(1), gR);
    if (!need_dz1) return;
    auto dZ1 = kernels::make_scratch<C>(ctx, dY.rows(), u.rank_in());
    gemm<C>(ctx, C(1), dZ2.cview(), none, R, none, C(0), dZ1.view());
    if (present(gA)) gemm<C>(ctx, C(1), dZ1.cview(), trans, X, none, C(1), gA);
    if (present(dX)) gemm<C>(ctx, C(1), dZ1.cview(), none, A, none, C(1), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
