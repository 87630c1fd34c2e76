// SPDX-License-Identifier: MIT
// Evaluator of GraLoRA (expr/gralora.hpp). With ib = in/k, ob = out/k, q = r/k, A_n the rows
// n·ib … of A [in, r] and B_j the rows j·r … of B [k·r, out/k]:
//   apply:       Z[:, n·r …] = s·X[:, n-block]·A_n                        (tokens × k·r)
//                U_j[:, n·q + t] = Z[:, n·r + j·q + t]                      (tokens × r, a gather)
//                Y[:, j-block] += U_j·B_j;   hybrid: Y += (s·X·A_hᵀ)·B_hᵀ
//   transposed:  V[:, j·r …] = s·G[:, j-block]·B_jᵀ, W_n[:, j·q + t] = V[:, j·r + n·q + t],
//                O[:, n-block] += W_n·A_nᵀ;   hybrid: O += (s·G·B_h)·A_h
//   rows:        P[rows of block j, n-block] += f·s·B_j[n·q …, rows]ᵀ·A_n[:, j·q …]ᵀ (+ f·s·B_h[rows]·A_h)
// 2·tokens·(r + hr)·(in + out) flops; scratch tokens × (k·r + r + hr); never out × in nor a
// [out/k, in/k] block (merge writes the blocks into W directly).
// Templated on the device: the same code runs with a cuda::context (cuda/updates_structured.cuh).
#pragma once

#include <algorithm>

#include "../../expr/gralora.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace gralora_detail {

/// Dst[:, i·q …] = Src[:, i·stride + offset …] for i < k: the q columns each block gives.
template <class C, class Ctx, class D>
void gather_blocks(const Ctx& ctx, const cview<C, D>& Src, index_t k, index_t stride, index_t offset, index_t q,
                   const mview<C, D>& Dst) {
  for (index_t i = 0; i < k; ++i) copy(ctx, Src.middle_cols(i * stride + offset, q), Dst.middle_cols(i * q, q));
}

}  // namespace gralora_detail

template <class T, class D>
struct evaluator<gralora_update<T, D>> : additive_rows<evaluator<gralora_update<T, D>>, gralora_update<T, D>> {
  using U = gralora_update<T, D>;

  /// Y += X·ΔWᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const index_t k = u.k(), r = u.rank(), q = u.block_rank(), ib = u.cols() / k, ob = u.rows() / k, T_ = X.rows();
    if (T_ == 0) return;
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
    auto Z = kernels::make_scratch<C>(ctx, T_, k * r);
    for (index_t n = 0; n < k; ++n)
      gemm<C>(ctx, C(u.scale()), X.middle_cols(n * ib, ib), none, A.view().middle_rows(n * ib, ib), none, C(0),
              Z.view().middle_cols(n * r, r));
    auto Uj = kernels::make_scratch<C>(ctx, T_, r);
    for (index_t j = 0; j < k; ++j) {
      gralora_detail::gather_blocks<C>(ctx, Z.cview(), k, r, j * q, q, Uj.view());
      gemm<C>(ctx, C(1), Uj.cview(), none, B.view().middle_rows(j * r, r), none, C(1), Y.middle_cols(j * ob, ob));
    }
    if (u.hybrid_rank() > 0) {
      const kernels::operand<C, D> Ah(ctx, u.hybrid_A()), Bh(ctx, u.hybrid_B());
      auto H = kernels::make_scratch<C>(ctx, T_, u.hybrid_rank());
      gemm<C>(ctx, C(u.scale()), X, none, Ah.view(), trans, C(0), H.view());
      gemm<C>(ctx, C(1), H.cview(), none, Bh.view(), trans, C(1), Y);
    }
  }

  /// O += G·ΔW.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const index_t k = u.k(), r = u.rank(), q = u.block_rank(), ib = u.cols() / k, ob = u.rows() / k, T_ = G.rows();
    if (T_ == 0) return;
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
    auto V = kernels::make_scratch<C>(ctx, T_, k * r);
    for (index_t j = 0; j < k; ++j)
      gemm<C>(ctx, C(u.scale()), G.middle_cols(j * ob, ob), none, B.view().middle_rows(j * r, r), trans, C(0),
              V.view().middle_cols(j * r, r));
    auto Wn = kernels::make_scratch<C>(ctx, T_, r);
    for (index_t n = 0; n < k; ++n) {
      gralora_detail::gather_blocks<C>(ctx, V.cview(), k, r, n * q, q, Wn.view());
      gemm<C>(ctx, C(1), Wn.cview(), none, A.view().middle_rows(n * ib, ib), trans, C(1), O.middle_cols(n * ib, ib));
    }
    if (u.hybrid_rank() > 0) {
      const kernels::operand<C, D> Ah(ctx, u.hybrid_A()), Bh(ctx, u.hybrid_B());
      auto H = kernels::make_scratch<C>(ctx, T_, u.hybrid_rank());
      gemm<C>(ctx, C(u.scale()), G, none, Bh.view(), none, C(0), H.view());
      gemm<C>(ctx, C(1), H.cview(), none, Ah.view(), none, C(1), O);
    }
  }

  /// P += factor·ΔW[r0 : r0 + P.rows()], block by block of the grid.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const index_t k = u.k(), r = u.rank(), q = u.block_rank(), ib = u.cols() / k, ob = u.rows() / k, m = P.rows();
    if (m == 0) return;
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
    const C f = factor * C(u.scale());
    for (index_t a = r0; a < r0 + m;) {
      const index_t j = a / ob, lo = a - j * ob, len = std::min(ob - lo, r0 + m - a);
      for (index_t n = 0; n < k; ++n)
        gemm<C>(ctx, f, B.view().block(j * r + n * q, lo, q, len), trans, A.view().block(n * ib, j * q, ib, q), trans,
                C(1), P.block(a - r0, n * ib, len, ib));
      a += len;
    }
    if (u.hybrid_rank() > 0) {
      const kernels::operand<C, D> Ah(ctx, u.hybrid_A()), Bh(ctx, u.hybrid_B().middle_rows(r0, m));
      gemm<C>(ctx, f, Bh.view(), none, Ah.view(), none, C(1), P);
    }
  }

  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
