// VJP of the core low-rank form ΔW = s·B·R·A (LoRA-XS, LoRA-SB, LaMDA). With
// Z₁ = X·Aᵀ [tokens, r2], Z₂ = Z₁·Rᵀ [tokens, r1]:
//   dB = s·dYᵀ·Z₂,  dZ₂ = s·dY·B,  dR = dZ₂ᵀ·Z₁,  dZ₁ = dZ₂·R,  dA = dZ₁ᵀ·X,
//   dX (update part) = dZ₁·A.
// Gradients of factors the type marks frozen (core_trainable) are skipped even when a
// slot is given. Only tokens × r temporaries.
#pragma once

#include "../../expr/core_low_rank.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<core_low_rank<T, device::cpu>> {
  using U = core_low_rank<T, device::cpu>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "B" : i == 1 ? "R" : "A"; }

  /// grads = {&dB, &dR, &dA}; see vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<core_lora>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_grad_shape<C>(grads[0], u.B(), op, "B");
    detail::check_grad_shape<C>(grads[1], u.R(), op, "R");
    detail::check_grad_shape<C>(grads[2], u.A(), op, "A");
    dense<C>* gB = u.trainable().B ? grads[0] : nullptr;
    dense<C>* gR = u.trainable().R ? grads[1] : nullptr;
    dense<C>* gA = u.trainable().A ? grads[2] : nullptr;
    dense<C> sb, sr, sa;
    const auto B = row_major_operand<C>(u.B(), sb);
    const auto R = row_major_operand<C>(u.R(), sr);
    const auto A = row_major_operand<C>(u.A(), sa);
    const C s = C(u.scale());
    dense<C> Z1(X.rows(), u.rank_in());
    Z1.noalias() = X * A.transpose();
    if (gB) {
      dense<C> Z2(X.rows(), u.rank_out());
      Z2.noalias() = Z1 * R.transpose();
      gB->noalias() += s * (dY.transpose() * Z2);
    }
    dense<C> dZ2(dY.rows(), u.rank_out());
    dZ2.noalias() = dY * B;
    dZ2 *= s;
    if (gR) gR->noalias() += dZ2.transpose() * Z1;
    if (!gA && !dX) return;
    dense<C> dZ1(dY.rows(), u.rank_in());
    dZ1.noalias() = dZ2 * R;
    if (gA) gA->noalias() += dZ1.transpose() * X;
    if (dX) dX->noalias() += dZ1 * A;
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
