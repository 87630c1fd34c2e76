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

template <class T>
struct vjp<block_low_rank<T, device::cpu>> {
  using U = block_low_rank<T, device::cpu>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "B" : "A0"; }

  /// grads = {&dB, &dA0}; see vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<block_lora>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_grad_shape<C>(grads[0], u.B(), op, "B");
    detail::check_grad_shape<C>(grads[1], u.A0(), op, "A0");
    if (X.cols() != u.cols() || dY.cols() != u.rows() || dY.rows() != X.rows())
      throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) + " and dY " +
                        deltaw::detail::shape_str(dY.rows(), dY.cols()) + " for ΔW " +
                        deltaw::detail::shape_str(u.rows(), u.cols()));
    const index_t rb = u.block_rank();
    dense<C> sa;
    const auto A0 = row_major_operand<C>(u.A0(), sa);
    const C s = C(u.scale());
    if (grads[0]) {
      dense<C> Z(X.rows(), rb);
      Z.noalias() = X * A0.transpose();
      dense<C> dS(u.rows(), rb);
      dS.noalias() = dY.transpose() * Z;
      dS *= s;
      for (index_t i = 0; i < u.blocks(); ++i) grads[0]->middleCols(i * rb, rb) += dS;
    }
    if (!grads[1] && !dX) return;
    const dense<C> S = evaluator<U>::template summed_B<C>(u, 0, u.rows(), C(1));
    dense<C> dZ(dY.rows(), rb);
    dZ.noalias() = dY * S;
    dZ *= s;
    if (grads[1]) grads[1]->noalias() += dZ.transpose() * X;
    if (dX) dX->noalias() += dZ * A0;
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
