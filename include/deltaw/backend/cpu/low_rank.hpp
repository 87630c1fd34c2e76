// CPU evaluator of LoRA/rsLoRA (ΔW = s·B·A): the rank-r products are accumulated into the
// output, so apply costs the base GEMM plus 2·tokens·r·(in + out) flops and one
// tokens × r temporary.
#pragma once

#include "../../expr/low_rank.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct evaluator<low_rank<T, device::cpu>> : additive_rows<evaluator<low_rank<T, device::cpu>>, low_rank<T, device::cpu>> {
  using U = low_rank<T, device::cpu>;

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    dense<C> sb, sa;
    const auto B = row_major_operand<C>(u.B(), sb);
    const auto A = row_major_operand<C>(u.A(), sa);
    dense<C> Z(X.rows(), u.rank());
    Z.noalias() = X * A.transpose();
    Z *= C(u.scale());
    Y.noalias() += Z * B.transpose();
  }

  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    dense<C> sb, sa;
    const auto B = row_major_operand<C>(u.B(), sb);
    const auto A = row_major_operand<C>(u.A(), sa);
    dense<C> Z(G.rows(), u.rank());
    Z.noalias() = G * B;
    Z *= C(u.scale());
    O.noalias() += Z * A;
  }

  template <class C, class P>
  static void add_scaled_rows(const U& u, index_t r0, P& panel, C factor) {
    dense<C> sb, sa;
    const auto B = row_major_operand<C>(u.B().middle_rows(r0, panel.rows()), sb);
    const auto A = row_major_operand<C>(u.A(), sa);
    panel.noalias() += (factor * C(u.scale()) * B) * A;
  }


  /// ‖s·B·A‖_F = |s|·√tr((BᵀB)(AAᵀ)), from two r × r Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    dense<double> sb, sa;
    const auto B = row_major_operand<double>(u.B(), sb);
    const auto A = row_major_operand<double>(u.A(), sa);
    const dense<double> GB = B.transpose() * B;
    const dense<double> GA = A * A.transpose();
    const double tr = GB.cwiseProduct(GA).sum();
    return std::abs(u.scale()) * std::sqrt(std::max(tr, 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
