// SPDX-License-Identifier: MIT
// VJP of LoHa, ΔW = s·K_B·K_A (backend/cpu/loha.hpp). With Z = X·K_Aᵀ [tokens, r₁r₂]:
//   dK_B = s·dYᵀ·Z,  dZ = s·dY·K_B,  dK_A = dZᵀ·X,  dX (update part) = dZ·K_A,
// then through the Khatri–Rao products, block a of r₂ columns of dK_B (rows of dK_A):
//   dB₁[:, a] = rowsum(dK_B[:, a] ⊙ B₂),   dB₂ += diag(B₁[:, a])·dK_B[:, a],
//   dA₁[a, :] = colsum(dK_A[a] ⊙ A₂),      dA₂ += dK_A[a]·diag(A₁[a, :]).
// Every scratch is tokens × r₁r₂ or a factor's size × r₂; no out × in matrix.
#pragma once

#include "../../expr/loha.hpp"
#include "loha.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<hadamard_update<T, D>> {
  using U = hadamard_update<T, D>;
  static constexpr int factor_count = 4;
  static const char* factor_name(int i) {
    constexpr const char* n[] = {"B1", "A1", "B2", "A2"};
    return n[i];
  }

  /// grads = {dB1, dA1, dB2, dA2}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<loha>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B1(), op, "B1");
    detail::check_grad_shape(grads[1], u.A1(), op, "A1");
    detail::check_grad_shape(grads[2], u.B2(), op, "B2");
    detail::check_grad_shape(grads[3], u.A2(), op, "A2");
    using enum kernels::op;
    const index_t k = u.kr_rank(), r1 = u.rank1(), r2 = u.rank2();
    const C s = C(u.scale());
    const auto KA = loha_detail::right_factor<C>(ctx, u);
    const auto KB = loha_detail::left_factor<C>(ctx, u, 0, u.rows());
    auto dZ = kernels::make_scratch<C>(ctx, dY.rows(), k);
    gemm<C>(ctx, s, dY, none, KB.cview(), none, C(0), dZ.view());  // dZ = s·dY·K_B
    if (present(dX)) gemm<C>(ctx, C(1), dZ.cview(), none, KA.cview(), none, C(1), dX);
    if (present(grads[0]) || present(grads[2])) {
      auto Z = kernels::make_scratch<C>(ctx, X.rows(), k);
      gemm<C>(ctx, C(1), X, none, KA.cview(), trans, C(0), Z.view());
      auto dKB = kernels::make_scratch<C>(ctx, u.rows(), k);
      gemm<C>(ctx, s, dY, trans, Z.cview(), none, C(0), dKB.view());  // s·dYᵀ·Z
      const kernels::operand<C, D> B1(ctx, u.B1()), B2(ctx, u.B2());
      auto tmp = kernels::make_scratch<C>(ctx, u.rows(), r2);
      for (index_t a = 0; a < r1; ++a) {
        const auto blk = dKB.cview().middle_cols(a * r2, r2);
        if (present(grads[0]) && u.rows() > 0) {
          const auto& g = grads[0];
          dot_rows(ctx, blk, B2.view(), vector_view<C, D>(g.data() + a * g.col_stride(), g.rows(), g.row_stride()), true);
        }
        if (present(grads[2])) {
          copy(ctx, blk, tmp.view());
          scale_rows(ctx, tmp.view(), loha_detail::column(B1.view(), a));
          axpy<C>(ctx, C(1), tmp.cview(), grads[2]);
        }
      }
    }
    if (present(grads[1]) || present(grads[3])) {
      auto dKA = kernels::make_scratch<C>(ctx, k, u.cols());
      gemm<C>(ctx, C(1), dZ.cview(), trans, X, none, C(0), dKA.view());  // dZᵀ·X
      const kernels::operand<C, D> A1(ctx, u.A1()), A2(ctx, u.A2());
      auto tmp = kernels::make_scratch<C>(ctx, r2, u.cols());
      for (index_t a = 0; a < r1; ++a) {
        const auto blk = dKA.cview().middle_rows(a * r2, r2);
        if (present(grads[1]) && u.cols() > 0) {
          const auto& g = grads[1];
          dot_rows(ctx, blk.transpose(), A2.view().transpose(),
                   vector_view<C, D>(g.data() + a * g.row_stride(), g.cols(), g.col_stride()), true);
        }
        if (present(grads[3])) {
          copy(ctx, blk, tmp.view());
          scale_cols(ctx, tmp.view(), loha_detail::row(A1.view(), a));
          axpy<C>(ctx, C(1), tmp.cview(), grads[3]);
        }
      }
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
