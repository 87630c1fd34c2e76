// VJP of LoRA/rsLoRA (ΔW = s·B·A; rsLoRA differs only in s). With Z = X·Aᵀ:
//   dB = s·dYᵀ·Z,  dZ = s·dY·B,  dA = dZᵀ·X,  dX (update part) = dZ·A.
// Five rank-r products and two tokens × r temporaries; no out × in matrix.
#pragma once

#include "../../expr/low_rank.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<low_rank<T, device::cpu>> {
  using U = low_rank<T, device::cpu>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "B" : "A"; }

  /// grads = {&dB, &dA}; see vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<lora>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_grad_shape<C>(grads[0], u.B(), op, "B");
    detail::check_grad_shape<C>(grads[1], u.A(), op, "A");
    dense<C> sb, sa;
    const auto B = row_major_operand<C>(u.B(), sb);
    const auto A = row_major_operand<C>(u.A(), sa);
    const C s = C(u.scale());
    dense<C> dZ(dY.rows(), u.rank());
    dZ.noalias() = dY * B;
    dZ *= s;  // dZ = s·dY·B
    if (grads[0]) {
      dense<C> Z(X.rows(), u.rank());
      Z.noalias() = X * A.transpose();
      Z *= s;
      grads[0]->noalias() += dY.transpose() * Z;  // s·dYᵀ·Z
    }
    if (grads[1]) grads[1]->noalias() += dZ.transpose() * X;
    if (dX) dX->noalias() += dZ * A;
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
