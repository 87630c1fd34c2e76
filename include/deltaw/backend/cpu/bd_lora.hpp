// SPDX-License-Identifier: MIT
// Evaluator of BD-LoRA, ΔW = s·BD(B)·BD(A) (expr/bd_lora.hpp). Every product with a
// block-diagonal factor runs block by block on column slices of the activations (one GEMM
// per block), so apply costs 2·tokens·(r·in/n_a + out·r/n_b) flops and one tokens × r
// scratch; no block-diagonal matrix is ever assembled. Written against the primitive layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>

#include "../../expr/bd_lora.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {
namespace detail {

// M_full [p, q] is block-diagonal with nb blocks, stored as M [p, q/nb] (blocks stacked
// along the rows). The three products every BD-LoRA evaluation needs:

/// Y = α·X·M_fullᵀ + β·Y   (X [n, q], Y [n, p]).
template <class C, class Ctx, class D>
void bd_mul_trans(const Ctx& ctx, C alpha, const matrix_view<const C, D>& X, const matrix_view<const C, D>& M,
                  index_t nb, C beta, const matrix_view<C, D>& Y) {
  using enum kernels::op;
  const index_t pb = M.rows() / nb, qb = M.cols();
  for (index_t i = 0; i < nb; ++i)
    gemm<C>(ctx, alpha, X.middle_cols(i * qb, qb), none, M.middle_rows(i * pb, pb), trans, beta,
            Y.middle_cols(i * pb, pb));
}
/// O = α·G·M_full + β·O   (G [n, p], O [n, q]).
template <class C, class Ctx, class D>
void bd_mul(const Ctx& ctx, C alpha, const matrix_view<const C, D>& G, const matrix_view<const C, D>& M, index_t nb,
            C beta, const matrix_view<C, D>& O) {
  using enum kernels::op;
  const index_t pb = M.rows() / nb, qb = M.cols();
  for (index_t i = 0; i < nb; ++i)
    gemm<C>(ctx, alpha, G.middle_cols(i * pb, pb), none, M.middle_rows(i * pb, pb), none, beta,
            O.middle_cols(i * qb, qb));
}
/// dM += α·(Lᵀ·R restricted to M's blocks)   (L [n, p], R [n, q]): the gradient of a
/// block-diagonal factor in its stored layout.
template <class C, class Ctx, class D>
void bd_grad(const Ctx& ctx, C alpha, const matrix_view<const C, D>& L, const matrix_view<const C, D>& R, index_t nb,
             const matrix_view<C, D>& dM) {
  using enum kernels::op;
  const index_t pb = dM.rows() / nb, qb = dM.cols();
  for (index_t i = 0; i < nb; ++i)
    gemm<C>(ctx, alpha, L.middle_cols(i * pb, pb), trans, R.middle_cols(i * qb, qb), none, C(1),
            dM.middle_rows(i * pb, pb));
}
}  // namespace detail

template <class T, class D>
struct evaluator<bd_lora_update<T, D>> : additive_rows<evaluator<bd_lora_update<T, D>>, bd_lora_update<T, D>> {
  using U = bd_lora_update<T, D>;

  /// Y += s·(X·BD(A)ᵀ)·BD(B)ᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    detail::bd_mul_trans<C>(ctx, C(u.scale()), X, A.view(), u.a_blocks(), C(0), Z.view());
    detail::bd_mul_trans<C>(ctx, C(1), Z.cview(), B.view(), u.b_blocks(), C(1), Y);
  }

  /// O += s·(G·BD(B))·BD(A).
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    detail::bd_mul<C>(ctx, C(u.scale()), G, B.view(), u.b_blocks(), C(0), Z.view());
    detail::bd_mul<C>(ctx, C(1), Z.cview(), A.view(), u.a_blocks(), C(1), O);
  }

  /// P += factor·s·BD(B)[r0 : r0 + P.rows()]·BD(A), without assembling either factor: the
  /// rows of one block of B meet r/n_b consecutive rows of BD(A), which lie in one or more
  /// blocks of A; each such pair is one GEMM into the columns of that A block.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    const index_t nb = u.b_blocks(), ob = u.rows() / nb, rb = u.rank() / nb, n = P.rows();
    const index_t na = u.a_blocks(), ra = u.rank() / na, qa = A.view().cols();
    if (n == 0 || u.rank() == 0) return;
    const C f = factor * C(u.scale());
    for (index_t row = r0; row < r0 + n;) {
      const index_t blk = row / ob, end = std::min(r0 + n, (blk + 1) * ob), c0 = blk * rb;
      for (index_t j = c0 / ra; j < na && j * ra < c0 + rb; ++j) {
        const index_t k0 = std::max(c0, j * ra), k1 = std::min(c0 + rb, (j + 1) * ra);
        gemm<C>(ctx, f, B.view().block(row, k0 - c0, end - row, k1 - k0), none, A.view().block(k0, 0, k1 - k0, qa), none,
                C(1), P.block(row - r0, j * qa, end - row, qa));
      }
      row = end;
    }
  }

  /// ‖s·BD(B)·BD(A)‖_F = |s|·√tr((BᵀB)(AAᵀ)) from the two r × r Gram matrices of the
  /// full factors (block-diagonal Grams for a block-diagonal factor), in double.
  template <class C>
    requires std::same_as<D, device::cpu>  // CUDA forms ΔW by panels (add_delta_rows)
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    const kernels::operand<double> B(ctx, u.B()), A(ctx, u.A());
    const index_t r = u.rank();
    auto GB = kernels::make_scratch<double>(ctx, r, r);
    auto GA = kernels::make_scratch<double>(ctx, r, r);
    fill(ctx, GB.view(), 0.0);
    fill(ctx, GA.view(), 0.0);
    const index_t nb = u.b_blocks(), ob = u.rows() / nb, rb = r / nb;
    for (index_t i = 0; i < nb; ++i) {  // (BD(B)ᵀBD(B)) block i = B_iᵀB_i
      const auto Bi = B.view().middle_rows(i * ob, ob);
      gemm<double>(ctx, 1.0, Bi, trans, Bi, none, 0.0, GB.view().block(i * rb, i * rb, rb, rb));
    }
    const index_t na = u.a_blocks(), ra = r / na;
    for (index_t i = 0; i < na; ++i) {  // (BD(A)·BD(A)ᵀ) block i = A_i·A_iᵀ
      const auto Ai = A.view().middle_rows(i * ra, ra);
      gemm<double>(ctx, 1.0, Ai, none, Ai, trans, 0.0, GA.view().block(i * ra, i * ra, ra, ra));
    }
    return std::abs(u.scale()) * std::sqrt(std::max(trace_of_product<double>(GB.cview(), GA.cview()), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
