// CPU evaluator of Block-LoRA, ΔW = s·(Σᵢ Bᵢ)·A₀: the n blocks of B are summed once
// (out × r_b scratch, out·r_b·(n − 1) adds), then it is LoRA at rank r_b, so apply costs
// the base GEMM plus 2·tokens·r_b·(in + out) flops.
#pragma once

#include "../../expr/block_lora.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct evaluator<block_low_rank<T, device::cpu>> : additive_rows<evaluator<block_low_rank<T, device::cpu>>, block_low_rank<T, device::cpu>> {
  using U = block_low_rank<T, device::cpu>;

  /// Rows [r0, r0 + n) of Σᵢ Bᵢ, times `factor`, in type C.
  template <class C>
  static dense<C> summed_B(const U& u, index_t r0, index_t n, C factor) {
    dense<C> sb;
    const auto B = row_major_operand<C>(u.B().middle_rows(r0, n), sb);
    const index_t rb = u.block_rank();
    dense<C> S = B.middleCols(0, rb);
    for (index_t i = 1; i < u.blocks(); ++i) S += B.middleCols(i * rb, rb);
    if (factor != C(1)) S *= factor;
    return S;
  }

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    dense<C> sa;
    const auto A0 = row_major_operand<C>(u.A0(), sa);
    const dense<C> S = summed_B<C>(u, 0, u.rows(), C(1));
    dense<C> Z(X.rows(), u.block_rank());
    Z.noalias() = X * A0.transpose();
    Z *= C(u.scale());
    Y.noalias() += Z * S.transpose();
  }

  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    dense<C> sa;
    const auto A0 = row_major_operand<C>(u.A0(), sa);
    const dense<C> S = summed_B<C>(u, 0, u.rows(), C(1));
    dense<C> Z(G.rows(), u.block_rank());
    Z.noalias() = G * S;
    Z *= C(u.scale());
    O.noalias() += Z * A0;
  }

  template <class C, class P>
  static void add_scaled_rows(const U& u, index_t r0, P& panel, C factor) {
    dense<C> sa;
    const auto A0 = row_major_operand<C>(u.A0(), sa);
    const dense<C> S = summed_B<C>(u, r0, panel.rows(), factor * C(u.scale()));
    panel.noalias() += S * A0;
  }


  /// ‖s·S·A₀‖_F = |s|·√tr((SᵀS)(A₀A₀ᵀ)), S = Σᵢ Bᵢ, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    const dense<double> S = summed_B<double>(u, 0, u.rows(), 1.0);
    dense<double> sa;
    const auto A0 = row_major_operand<double>(u.A0(), sa);
    const dense<double> GS = S.transpose() * S;
    const dense<double> GA = A0 * A0.transpose();
    return std::abs(u.scale()) * std::sqrt(std::max(GS.cwiseProduct(GA).sum(), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
