// SPDX-License-Identifier: MIT
// VJPs of the block-affine updates: Bone "bat" and MiSS, written against the primitive
// layer.
//
// Bone bat, ΔW_ij = W_ij·b_i + b_i over r × r blocks (i: output block, j: input block),
// with W frozen. With dY_i = dY[:, i·r : i·r + r], X_j = X[:, j·r : j·r + r] and
// S = Σ_j X_j [T, r], the block gradient ∂ΔW_ij = dY_iᵀ·X_j flows into b_i through both
// terms (W_ij is a constant):
//   ∂b_i = Σ_j W_ijᵀ·dY_iᵀ·X_j + dY_iᵀ·S,
//   dX_j (update part) = Σ_i (dY_i·W_ij)·b_i + Σ_i dY_i·b_i   (exactly dY·ΔW).
// Rows i·r … i·r + r − 1 of a row-major [·, in] matrix with packed rows, seen as
// [· · in/r, r], stack its r-column blocks, so each sum over j is one product:
//   with dX (or tokens ≤ r): Tᵢ = dY_i·W_i [T, in] (W_i: W's rows of block i), then
//     ∂b_i += Tᵢᵀ·X (both as [T·in/r, r]) and dX += Tᵢ·b_i (as [T·in/r, r]);
//   gradient of b only, tokens > r: Gᵢ = dY_iᵀ·X [r, in] (block row i of ∂ΔW), then
//     ∂b_i += W_iᵀ·Gᵢ (both as [r·in/r, r]).
// The bias terms of all blocks are one product each: ∂b += dYᵀ·S and, for dX, the rows
// of dY·b (b [out, r] is the b_i stacked) added to every block of the token's row.
// The first route costs about 4 (6 with dX) · T·out·in flops, the second 2·T·out·in +
// 2·out·in·r; scratch is T × in or r × in, never out × in. In autograd, dY·W (the base) is
// adapted_linear's; the b gradient includes the path through the W-dependent term W_ij·b_i.
//
// MiSS, ΔW[o, j·r + k] = D[k, o mod m]: Y += S·D tiled along the output, S = Σ_j X_j with
// the last block zero-padded, so ∂D = Sᵀ·(Σ_rep dY's m-column blocks) [r, m], and dX is
// the evaluator's apply_transposed (G·Dᵀ tiled along the input).
//
// Both plug into autograd::adapted_linear (autograd/adapters.hpp): for bat, `make` builds
// bone_bat over the same frozen view W that adapted_linear gets, e.g.
//   adapted_linear<T, 1>(x, W, {b}, [W](const auto& v) { return deltaw::bone_bat(W, v[0]); });
// its forward then evaluates X·W'ᵀ with one product by W' (the apply_with_base hook), and
// its backward adds dY·W (base) and this dY·ΔW.
#pragma once

#include <string>

#include "../../expr/block_affine.hpp"
#include "block_affine.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace block_affine_vjp_detail {
template <class U, class XM, class GM, class DM>
void check_io(const U& u, const XM& X, const GM& dY, const DM& dX, const char* op) {
  if (X.cols() != u.cols() || dY.cols() != u.rows() || dY.rows() != X.rows())
    throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) + " and dY " +
                      deltaw::detail::shape_str(dY.rows(), dY.cols()) + " for ΔW " +
                      deltaw::detail::shape_str(u.rows(), u.cols()));
  if (present(dX) && (dX.rows() != X.rows() || dX.cols() != X.cols()))
    throw shape_error(std::string(op) + ": dX is " + deltaw::detail::shape_str(dX.rows(), dX.cols()) + " but X is " +
                      deltaw::detail::shape_str(X.rows(), X.cols()));
}
}  // namespace block_affine_vjp_detail

template <class T, class TW, class D>
struct vjp<bone_bat_update<T, TW, D>> {
  using U = bone_bat_update<T, TW, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "b"; }

  /// grads = {db} (db [out, r]); dX += dY·ΔW. See vjp.hpp. `route` forces the route
  /// (0: via Tᵢ = dY_i·W_i; 1: via Gᵢ = dY_iᵀ·X, gradient of b only; −1: by flops).
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX, int route = -1) {
    using enum kernels::op;
    namespace bad = block_affine_detail;
    constexpr const char* op = "deltaw::cpu::vjp<bone_bat>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.b(), op, "b");
    block_affine_vjp_detail::check_io(u, X, dY, dX, op);
    const mview<C, D> gb = grads[0];
    const bool want_b = present(gb), want_x = present(dX);
    const index_t Tn = X.rows(), in = u.cols(), out = u.rows(), r = u.block(), nb = in / r;
    if (Tn == 0 || in == 0 || out == 0 || (!want_b && !want_x)) return;

    const bool via_g = route < 0 ? (!want_x && Tn > r) : route == 1;
    if (via_g && want_x)
      throw argument_error(std::string(op) + ": the route through dY_iᵀ·X computes the gradient of b only; dX was given");
    auto S = kernels::make_scratch<C>(ctx, want_b ? Tn : 0, r);  // Σ_j X_j
    if (want_b) bad::sum_column_blocks<C>(ctx, X, r, S.view());
    if (via_g) {
      auto Gi = kernels::make_scratch<C>(ctx, r, in);
      auto ws = kernels::make_scratch<C>(ctx, 0, 0);
      for (index_t i = 0; i < out / r; ++i) {
        gemm<C>(ctx, C(1), dY.middle_cols(i * r, r), trans, X, none, C(0), Gi.view());
        // W_i as [r·nb, r] needs its rows packed; a copy of r × in otherwise.
        const auto Wi = bad::packed_rows<C>(ctx, u.W().middle_rows(i * r, r), ws);
        gemm<C>(ctx, C(1), bad::as_blocks(Wi, r), trans, bad::as_blocks(Gi.cview(), r), none, C(1),
                gb.middle_rows(i * r, r));
      }
      gemm<C>(ctx, C(1), dY, trans, S.cview(), none, C(1), gb);  // ∂b_i += dY_iᵀ·S for every i
      return;
    }

    auto xs = kernels::make_scratch<C>(ctx, 0, 0);
    cview<C, D> Xb;  // rows t·nb + j: X_j of token t
    if (want_b) Xb = bad::as_blocks(bad::packed_rows<C>(ctx, X, xs), r);
    const kernels::operand<C, D> b(ctx, u.b());
    // dX as packed rows: dX itself when its rows are, else a scratch added at the end.
    auto dxs = kernels::make_scratch<C>(ctx, 0, 0);
    mview<C, D> dXp = dX;
    const bool dx_direct = !want_x || bad::rows_packed(dX);
    if (!dx_direct) {
      dxs = kernels::make_scratch<C>(ctx, Tn, in);
      fill(ctx, dxs.view(), C(0));
      dXp = dxs.view();
    }
    auto Ti = kernels::make_scratch<C>(ctx, Tn, in);
    const auto Tib = bad::as_blocks(Ti.cview(), r);
    for (index_t i = 0; i < out / r; ++i) {
      const kernels::operand<C, D> Wi(ctx, u.W().middle_rows(i * r, r));
      gemm<C>(ctx, C(1), dY.middle_cols(i * r, r), none, Wi, none, C(0), Ti.view());
      if (want_b) gemm<C>(ctx, C(1), Tib, trans, Xb, none, C(1), gb.middle_rows(i * r, r));
      if (want_x) gemm<C>(ctx, C(1), Tib, none, b.view().middle_rows(i * r, r), none, C(1), bad::as_blocks(dXp, r));
    }
    if (want_b) gemm<C>(ctx, C(1), dY, trans, S.cview(), none, C(1), gb);  // ∂b_i += dY_iᵀ·S for every i
    if (want_x) {
      auto Q = kernels::make_scratch<C>(ctx, Tn, r);
      gemm<C>(ctx, C(1), dY, none, b, none, C(0), Q.view());  // Σ_i dY_i·b_i
      bad::add_row_to_blocks<C>(ctx, bad::as_blocks(dXp, r), nb, Q.cview(), C(1));
      if (!dx_direct) axpy<C>(ctx, C(1), dxs.cview(), dX);
    }
  }
};

template <class T, class D>
struct vjp<miss_update<T, D>> {
  using U = miss_update<T, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "D"; }

  /// grads = {dD} (dD [r, m]); dX += dY·ΔW. See vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    using enum kernels::op;
    constexpr const char* op = "deltaw::cpu::vjp<miss>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.D(), op, "D");
    block_affine_vjp_detail::check_io(u, X, dY, dX, op);
    const index_t Tn = X.rows(), r = u.block(), m = u.block_cols();
    if (Tn == 0 || u.rows() == 0) return;
    if (present(grads[0])) {
      auto S = kernels::make_scratch<C>(ctx, Tn, r);
      block_affine_detail::sum_column_blocks<C>(ctx, X, r, S.view());
      if (u.repeats() == 1) {
        gemm<C>(ctx, C(1), S.cview(), trans, dY, none, C(1), grads[0]);
      } else {
        auto fold = kernels::make_scratch<C>(ctx, Tn, m);
        fill(ctx, fold.view(), C(0));
        for (index_t k = 0; k < u.repeats(); ++k) axpy<C>(ctx, C(1), dY.middle_cols(k * m, m), fold.view());
        gemm<C>(ctx, C(1), S.cview(), trans, fold.cview(), none, C(1), grads[0]);
      }
    }
    if (present(dX)) evaluator<U>::template apply_transposed_add<C>(ctx, u, dY, dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
