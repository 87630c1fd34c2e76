// VJPs of the block-affine updates: Bone "bat" and MiSS.
//
// Bone bat, ΔW_ij = W_ij·b_i + b_i over r × r blocks (i: output block, j: input block),
// with W frozen. With dY_i = dY[:, i·r : i·r + r], X_j = X[:, j·r : j·r + r] and
// S = Σ_j X_j [T, r], the block gradient ∂ΔW_ij = dY_iᵀ·X_j flows into b_i through both
// terms (W_ij is a constant):
//   ∂b_i = Σ_j W_ijᵀ·dY_iᵀ·X_j + dY_iᵀ·S,
//   dX_j (update part) = Σ_i (dY_i·W_ij)·b_i + Σ_i dY_i·b_i   (exactly dY·ΔW).
// Rows i·r … i·r + r − 1 of a row-major [·, in] matrix, seen as [· · in/r, r], stack its
// r-column blocks, so each sum over j is one product:
//   with dX (or tokens ≤ r): Tᵢ = dY_i·W_i [T, in] (W_i: W's rows of block i), then
//     ∂b_i += Tᵢᵀ·X (both as [T·in/r, r]) + dY_iᵀ·S and dX += Tᵢ·b_i (as [T·in/r, r]);
//   gradient of b only, tokens > r: Gᵢ = dY_iᵀ·X [r, in] (block row i of ∂ΔW), then
//     ∂b_i += W_iᵀ·Gᵢ (both as [r·in/r, r]) + dY_iᵀ·S.
// The first costs about 4 (6 with dX) · T·out·in flops, the second 2·T·out·in + 2·out·in·r;
// scratch is T × in or r × in per block, never out × in. In autograd, dY·W (the base) is
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

#include <optional>
#include <string>
#include <type_traits>

#include "../../expr/block_affine.hpp"
#include "block_affine.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace block_affine_vjp_detail {
template <class U, class XM, class GM>
void check_io(const U& u, const XM& X, const GM& dY, const void* dX_ptr, index_t dx_rows, index_t dx_cols,
              const char* op) {
  if (X.cols() != u.cols() || dY.cols() != u.rows() || dY.rows() != X.rows())
    throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) + " and dY " +
                      deltaw::detail::shape_str(dY.rows(), dY.cols()) + " for ΔW " +
                      deltaw::detail::shape_str(u.rows(), u.cols()));
  if (dX_ptr && (dx_rows != X.rows() || dx_cols != X.cols()))
    throw shape_error(std::string(op) + ": dX is " + deltaw::detail::shape_str(dx_rows, dx_cols) + " but X is " +
                      deltaw::detail::shape_str(X.rows(), X.cols()));
}
}  // namespace block_affine_vjp_detail

template <class T, class TW>
struct vjp<bone_bat_update<T, TW, device::cpu>> {
  using U = bone_bat_update<T, TW, device::cpu>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "b"; }

  /// grads = {&db} (db [out, r]); dX += dY·ΔW. See vjp.hpp. `route` forces the route
  /// (0: via Tᵢ = dY_i·W_i; 1: via Gᵢ = dY_iᵀ·X, gradient of b only; −1: by flops).
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX,
                       int route = -1) {
    constexpr const char* op = "deltaw::cpu::vjp<bone_bat>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_grad_shape<C>(grads[0], u.b(), op, "b");
    block_affine_vjp_detail::check_io(u, X, dY, dX, dX ? dX->rows() : 0, dX ? dX->cols() : 0, op);
    dense<C>* gb = grads[0];
    const index_t Tn = X.rows(), in = u.cols(), out = u.rows(), r = u.block(), nb = in / r;
    if (Tn == 0 || in == 0 || out == 0 || (!gb && !dX)) return;
    using CMap = Eigen::Map<const dense<C>>;
    using Map = Eigen::Map<dense<C>>;
    dense<C> xs, sb;
    const CMap Xb(kron_detail::packed_rows<C>(X, xs), Tn * nb, r);  // row t·nb + j: X_j of token t
    const auto b = row_major_operand<C>(u.b(), sb);
    dense<C> S(Tn, r);
    for (index_t t = 0; t < Tn; ++t) S.row(t) = Xb.middleRows(t * nb, nb).colwise().sum();

    const bool via_g = route < 0 ? (!dX && Tn > r) : route == 1;
    if (via_g && dX)
      throw argument_error(std::string(op) + ": the route through dY_iᵀ·X computes the gradient of b only; dX was given");
    if (via_g) {
      dense<C> Gi(r, in);
      for (index_t i = 0; i < out / r; ++i) {
        const auto dYi = dY.middleCols(i * r, r);
        Gi.noalias() = dYi.transpose() * X;
        const CMap Gm(Gi.data(), r * nb, r);
        auto gbi = gb->middleRows(i * r, r);
        with_operand<C>(u.W().middle_rows(i * r, r), [&](const auto& Wi) {
          // W_i as [r·nb, r] needs its rows packed; a copy of r × in otherwise.
          dense<C> Wc;
          const C* w = nullptr;
          if constexpr (std::is_same_v<typename std::remove_cvref_t<decltype(Wi)>::Scalar, C> &&
                        (int(std::remove_cvref_t<decltype(Wi)>::Flags) & Eigen::DirectAccessBit)) {
            if (kron_detail::is_packed_row_major(Wi)) w = Wi.data();
          }
          if (!w) {
            Wc = Wi;
            w = Wc.data();
          }
          gbi.noalias() += CMap(w, r * nb, r).transpose() * Gm;
        });
        gbi.noalias() += dYi.transpose() * S;
      }
      return;
    }

    dense<C> Ti(Tn, in);
    dense<C> Q;
    std::optional<Map> dXb;
    if (dX) {
      dXb.emplace(dX->data(), Tn * nb, r);
      Q.setZero(Tn, r);
    }
    for (index_t i = 0; i < out / r; ++i) {
      const auto dYi = dY.middleCols(i * r, r);
      with_operand<C>(u.W().middle_rows(i * r, r), [&](const auto& Wi) { Ti.noalias() = dYi * Wi; });
      const CMap Tib(Ti.data(), Tn * nb, r);
      const auto bi = b.middleRows(i * r, r);
      if (gb) {
        auto gbi = gb->middleRows(i * r, r);
        gbi.noalias() += Tib.transpose() * Xb;
        gbi.noalias() += dYi.transpose() * S;
      }
      if (dX) {
        dXb->noalias() += Tib * bi;
        Q.noalias() += dYi * bi;
      }
    }
    if (dX)
      for (index_t t = 0; t < Tn; ++t) dXb->middleRows(t * nb, nb).rowwise() += Q.row(t);
  }
};

template <class T>
struct vjp<miss_update<T, device::cpu>> {
  using U = miss_update<T, device::cpu>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "D"; }

  /// grads = {&dD} (dD [r, m]); dX += dY·ΔW. See vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<miss>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_grad_shape<C>(grads[0], u.D(), op, "D");
    block_affine_vjp_detail::check_io(u, X, dY, dX, dX ? dX->rows() : 0, dX ? dX->cols() : 0, op);
    const index_t Tn = X.rows(), in = u.cols(), r = u.block(), m = u.block_cols();
    if (Tn == 0 || u.rows() == 0) return;
    if (grads[0]) {
      dense<C> S = dense<C>::Zero(Tn, r);
      const index_t full = in / r, tail = in % r;
      for (index_t j = 0; j < full; ++j) S += X.middleCols(j * r, r);
      if (tail > 0) S.leftCols(tail) += X.middleCols(full * r, tail);
      if (u.repeats() == 1) {
        grads[0]->noalias() += S.transpose() * dY;
      } else {
        dense<C> fold = dense<C>::Zero(Tn, m);
        for (index_t k = 0; k < u.repeats(); ++k) fold += dY.middleCols(k * m, m);
        grads[0]->noalias() += S.transpose() * fold;
      }
    }
    if (dX) evaluator<U>::template apply_transposed_add<C>(u, dY, *dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
