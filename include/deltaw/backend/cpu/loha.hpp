// SPDX-License-Identifier: MIT
// Evaluator of LoHa, ΔW = s·(B₁A₁) ⊙ (B₂A₂) = s·K_B·K_A with the Khatri–Rao factors
// K_B = B₁ ⊙_r B₂ [out, r₁r₂] and K_A = A₁ ⊙_c A₂ [r₁r₂, in] (expr/loha.hpp). Apply forms
// K_A and K_B (r₁r₂·(in + out) values, each column / row block one scaled copy of a factor)
// and runs LoRA's two products through them: the base GEMM plus 2·tokens·r₁r₂·(in + out)
// flops, never the out × in ΔW. Written against the primitive layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>

#include "../../expr/loha.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace loha_detail {

/// Column j of M as a (strided) vector view.
template <class C, class D>
vector_view<const C, D> column(const matrix_view<const C, D>& M, index_t j) {
  if (M.rows() == 0) return {};
  return vector_view<const C, D>(M.data() + j * M.col_stride(), M.rows(), M.row_stride());
}
/// Row i of M as a (strided) vector view.
template <class C, class D>
vector_view<const C, D> row(const matrix_view<const C, D>& M, index_t i) {
  if (M.cols() == 0) return {};
  return vector_view<const C, D>(M.data() + i * M.row_stride(), M.cols(), M.col_stride());
}

/// K [n, r₁r₂] = B₁ ⊙_r B₂ (rows of B₁ [n, r₁] and B₂ [n, r₂]): K[:, a·r₂ : a·r₂ + r₂] = diag(B₁[:, a])·B₂.
template <class C, class Ctx, class D>
void khatri_rao_rows(const Ctx& ctx, const cview<C, D>& B1, const cview<C, D>& B2, const mview<C, D>& K) {
  const index_t r2 = B2.cols();
  if (K.rows() == 0) return;
  for (index_t a = 0; a < B1.cols(); ++a) {
    const auto Kb = K.middle_cols(a * r2, r2);
    copy(ctx, B2, Kb);
    scale_rows(ctx, Kb, column(B1, a));
  }
}
/// K [r₁r₂, n] = A₁ ⊙_c A₂ (columns of A₁ [r₁, n] and A₂ [r₂, n]): K[a·r₂ : a·r₂ + r₂, :] = A₂·diag(A₁[a, :]).
template <class C, class Ctx, class D>
void khatri_rao_cols(const Ctx& ctx, const cview<C, D>& A1, const cview<C, D>& A2, const mview<C, D>& K) {
  const index_t r2 = A2.rows();
  if (K.cols() == 0) return;
  for (index_t a = 0; a < A1.rows(); ++a) {
    const auto Kb = K.middle_rows(a * r2, r2);
    copy(ctx, A2, Kb);
    scale_cols(ctx, Kb, row(A1, a));
  }
}

/// K_B (rows [r0, r0 + n) only) and K_A of u in type C.
template <class C, class Ctx, class U>
auto left_factor(const Ctx& ctx, const U& u, index_t r0, index_t n) {
  using D = typename U::device_type;
  const kernels::operand<C, D> B1(ctx, u.B1().middle_rows(r0, n)), B2(ctx, u.B2().middle_rows(r0, n));
  auto K = kernels::make_scratch<C>(ctx, n, u.kr_rank());
  khatri_rao_rows<C>(ctx, B1.view(), B2.view(), K.view());
  return K;
}
template <class C, class Ctx, class U>
auto right_factor(const Ctx& ctx, const U& u) {
  using D = typename U::device_type;
  const kernels::operand<C, D> A1(ctx, u.A1()), A2(ctx, u.A2());
  auto K = kernels::make_scratch<C>(ctx, u.kr_rank(), u.cols());
  khatri_rao_cols<C>(ctx, A1.view(), A2.view(), K.view());
  return K;
}

}  // namespace loha_detail

template <class T, class D>
struct evaluator<hadamard_update<T, D>> : additive_rows<evaluator<hadamard_update<T, D>>, hadamard_update<T, D>> {
  using U = hadamard_update<T, D>;

  /// Y += s·(X·K_Aᵀ)·K_Bᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const auto KA = loha_detail::right_factor<C>(ctx, u);
    const auto KB = loha_detail::left_factor<C>(ctx, u, 0, u.rows());
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.kr_rank());
    gemm<C>(ctx, C(u.scale()), X, kernels::op::none, KA.cview(), kernels::op::trans, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), kernels::op::none, KB.cview(), kernels::op::trans, C(1), Y);
  }

  /// O += s·(G·K_B)·K_A.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const auto KA = loha_detail::right_factor<C>(ctx, u);
    const auto KB = loha_detail::left_factor<C>(ctx, u, 0, u.rows());
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.kr_rank());
    gemm<C>(ctx, C(u.scale()), G, kernels::op::none, KB.cview(), kernels::op::none, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), kernels::op::none, KA.cview(), kernels::op::none, C(1), O);
  }

  /// P += factor·s·K_B[r0 : r0 + P.rows()]·K_A.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    const auto KA = loha_detail::right_factor<C>(ctx, u);
    const auto KB = loha_detail::left_factor<C>(ctx, u, r0, P.rows());
    gemm<C>(ctx, factor * C(u.scale()), KB.cview(), kernels::op::none, KA.cview(), kernels::op::none, C(1), P);
  }

  /// ‖s·K_B·K_A‖_F = |s|·√tr((K_BᵀK_B)(K_AK_Aᵀ)), two r₁r₂ × r₁r₂ Gram matrices in double.
  template <class C>
    requires std::same_as<D, device::cpu>  // CUDA forms ΔW by panels (add_delta_rows)
  static double frobenius_norm(const U& u) {
    const kernels::cpu_context ctx;
    const index_t k = u.kr_rank();
    const auto KA = loha_detail::right_factor<double>(ctx, u);
    const auto KB = loha_detail::left_factor<double>(ctx, u, 0, u.rows());
    auto GB = kernels::make_scratch<double>(ctx, k, k);
    auto GA = kernels::make_scratch<double>(ctx, k, k);
    gemm<double>(ctx, 1.0, KB.cview(), kernels::op::trans, KB.cview(), kernels::op::none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, KA.cview(), kernels::op::none, KA.cview(), kernels::op::trans, 0.0, GA.view());
    return std::abs(u.scale()) * std::sqrt(std::max(trace_of_product<double>(GB.cview(), GA.cview()), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
