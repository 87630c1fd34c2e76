// CPU evaluator of the core low-rank form ΔW = s·B·R·A (LoRA-XS, LoRA-SB, LaMDA). Apply
// multiplies the three factors in the cheapest exact order for the number of tokens
// (core_low_rank::cheapest_order); with r1 = r2 = r and tokens < out, in that is
// ((X·Aᵀ)·Rᵀ)·Bᵀ, i.e. LoRA's cost plus 2·tokens·r² flops. Temporaries are tokens × r,
// or one r × in / out × r fold of two factors; never out × in.
#pragma once

#include "../../expr/core_low_rank.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct evaluator<core_low_rank<T, device::cpu>> : additive_rows<evaluator<core_low_rank<T, device::cpu>>, core_low_rank<T, device::cpu>> {
  using U = core_low_rank<T, device::cpu>;

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    dense<C> sb, sr, sa;
    const auto B = row_major_operand<C>(u.B(), sb);
    const auto R = row_major_operand<C>(u.R(), sr);
    const auto A = row_major_operand<C>(u.A(), sa);
    const C s = C(u.scale());
    switch (u.cheapest_order(X.rows())) {
      case core_order::right_to_left: {
        dense<C> Z1(X.rows(), u.rank_in());
        Z1.noalias() = X * A.transpose();
        dense<C> Z2(X.rows(), u.rank_out());
        Z2.noalias() = Z1 * (s * R).transpose();
        Y.noalias() += Z2 * B.transpose();
        break;
      }
      case core_order::fold_B_R: {
        dense<C> BR(u.rows(), u.rank_in());
        BR.noalias() = B * (s * R);
        dense<C> Z(X.rows(), u.rank_in());
        Z.noalias() = X * A.transpose();
        Y.noalias() += Z * BR.transpose();
        break;
      }
      case core_order::fold_R_A: {
        dense<C> RA(u.rank_out(), u.cols());
        RA.noalias() = (s * R) * A;
        dense<C> Z(X.rows(), u.rank_out());
        Z.noalias() = X * RA.transpose();
        Y.noalias() += Z * B.transpose();
        break;
      }
    }
  }

  /// O += s·G·B·R·A, in the same order family as apply (the costs are symmetric).
  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    dense<C> sb, sr, sa;
    const auto B = row_major_operand<C>(u.B(), sb);
    const auto R = row_major_operand<C>(u.R(), sr);
    const auto A = row_major_operand<C>(u.A(), sa);
    const C s = C(u.scale());
    switch (u.cheapest_order(G.rows())) {
      case core_order::right_to_left: {
        dense<C> Z1(G.rows(), u.rank_out());
        Z1.noalias() = G * B;
        dense<C> Z2(G.rows(), u.rank_in());
        Z2.noalias() = Z1 * (s * R);
        O.noalias() += Z2 * A;
        break;
      }
      case core_order::fold_B_R: {
        dense<C> BR(u.rows(), u.rank_in());
        BR.noalias() = B * (s * R);
        dense<C> Z(G.rows(), u.rank_in());
        Z.noalias() = G * BR;
        O.noalias() += Z * A;
        break;
      }
      case core_order::fold_R_A: {
        dense<C> RA(u.rank_out(), u.cols());
        RA.noalias() = (s * R) * A;
        dense<C> Z(G.rows(), u.rank_out());
        Z.noalias() = G * B;
        O.noalias() += Z * RA;
        break;
      }
    }
  }

  template <class C, class P>
  static void add_scaled_rows(const U& u, index_t r0, P& panel, C factor) {
    dense<C> sb, sr, sa;
    const auto B = row_major_operand<C>(u.B().middle_rows(r0, panel.rows()), sb);
    const auto R = row_major_operand<C>(u.R(), sr);
    const auto A = row_major_operand<C>(u.A(), sa);
    dense<C> BR(panel.rows(), u.rank_in());
    BR.noalias() = B * ((factor * C(u.scale())) * R);
    panel.noalias() += BR * A;
  }


  /// ‖s·B·R·A‖_F² = s²·tr(Rᵀ·(BᵀB)·R·(AAᵀ)) from two Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    dense<double> sb, sr, sa;
    const auto B = row_major_operand<double>(u.B(), sb);
    const auto R = row_major_operand<double>(u.R(), sr);
    const auto A = row_major_operand<double>(u.A(), sa);
    const dense<double> GB = B.transpose() * B;
    const dense<double> GA = A * A.transpose();
    const dense<double> M = GB * R * GA;
    const double tr = M.cwiseProduct(R).sum();
    return std::abs(u.scale()) * std::sqrt(std::max(tr, 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
