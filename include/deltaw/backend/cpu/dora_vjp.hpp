// SPDX-License-Identifier: MIT
// VJP of DoRA, W' = diag(g)·(W + s·B·A), g = m/n, the row norms n detached (constants in
// the backward pass, as PEFT does). With P = X·Wᵀ + s·(X·Aᵀ)·Bᵀ the output before the
// gain, Y = P·diag(g):
//   dm_o = Σ_t dY[t, o]·P[t, o] / n_o,   dP = dY·diag(g),
// then LoRA's VJP with dP (B, A), and the input gradient dX = dP·W + s·(dP·B)·A — one
// product with W, the same as the base alone. P is saved by forward() or recomputed.
#pragma once

#include "../../expr/dora.hpp"
#include "dora.hpp"
#include "low_rank_vjp.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW, class D>
struct vjp<dora_update<T, TW, D>> {
  using U = dora_update<T, TW, D>;
  using E = evaluator<U>;
  using L = vjp<low_rank<T, D>>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "B" : i == 1 ? "A" : "m"; }

  /// Y = X·W'ᵀ (the whole effective weight, base included) and P, the output before the
  /// gain, which backward_with_base needs for dm. Y and P: [tokens, out].
  template <class C, class Ctx>
  static void forward(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y, const mview<C, D>& P) {
    constexpr const char* op = "deltaw::cpu::vjp<dora>::forward";
    deltaw::detail::check_no_overlap(op, "the output Y", Y, "the input X", X);
    deltaw::detail::check_no_overlap(op, "the pre-gain output P", P, "the input X", X);
    deltaw::detail::check_no_overlap(op, "the output Y", Y, "the pre-gain output P", P);
    deltaw::detail::check_update_no_overlap(op, "the output Y", Y, u, true);
    deltaw::detail::check_update_no_overlap(op, "the pre-gain output P", P, u, true);
    if constexpr (std::is_same_v<D, device::cpu>) {
      apply_expr<C>(ctx, u.W() + u.lora(), X, P);
    } else {  // the same two products: X·Wᵀ, then s·(X·Aᵀ)·Bᵀ added
      base_apply<C>(ctx, u.W(), X, P);
      evaluator<low_rank<T, D>>::template apply_add<C>(ctx, u.lora(), X, P);
    }
    copy(ctx, cview<C, D>(P), Y);
    scale_cols(ctx, Y, E::as_view(E::template gains<C>(ctx, u)));
  }

  /// Gradients for Y = X·W'ᵀ with W' the whole DoRA weight: grads = {dB, dA, dm}
  /// (dm [1, out] or [out, 1]) and dX += dY·W' (or dX = when dX_fresh: the first
  /// contribution is written, saving a pass). P: from forward().
  template <class C, class Ctx>
  static void backward_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& P,
                                 const cview<C, D>& dY, std::span<const mview<C, D>> grads, const mview<C, D>& dX,
                                 bool dX_fresh = false) {
    constexpr const char* op = "deltaw::cpu::vjp<dora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    for (int i = 0; i <= factor_count; ++i) {
      const auto& g = i < factor_count ? grads[std::size_t(i)] : dX;
      if (present(g) && views_overlap(g, P))
        deltaw::detail::throw_overlap(op, i < factor_count ? "the gradient of " : "the input gradient dX",
                                      i < factor_count ? factor_name(i) : "", "the pre-gain output P", "");
    }
    if (present(grads[2]) && grads[2].size() != u.rows())
      throw shape_error(std::string(op) + ": the gradient of m has " + std::to_string(grads[2].size()) +
                        " entries; m has " + std::to_string(u.rows()));
    if (P.rows() != dY.rows() || P.cols() != dY.cols())
      throw shape_error(std::string(op) + ": the saved pre-gain output is " + deltaw::detail::shape_str(P.rows(), P.cols()) +
                        " but dY is " + deltaw::detail::shape_str(dY.rows(), dY.cols()));
    if (present(grads[2])) {
      // dm_o = Σ_t dY[t, o]·P[t, o] / n_o (the column sums read on the host: a download
      // of out values on a device).
      auto prod = kernels::make_scratch<C>(ctx, dY.rows(), dY.cols());
      copy(ctx, dY, prod.view());
      transform(ctx, P, prod.view(), detail::product_map{});
      std::vector<C> colsum(std::size_t(u.rows()));
      reduce_cols(ctx, prod.cview(), vector_view<C>(colsum.data(), u.rows()), detail::identity_map{});
      for (index_t o = 0; o < u.rows(); ++o) colsum[std::size_t(o)] *= C(1.0 / u.norms()[std::size_t(o)]);
      detail::add_from_host(ctx, colsum, grads[2]);  // dm [1, out] or [out, 1]
    }
    auto dP = kernels::make_scratch<C>(ctx, dY.rows(), dY.cols());
    copy(ctx, dY, dP.view());
    scale_cols(ctx, dP.view(), E::as_view(E::template gains<C>(ctx, u)));
    if (present(dX)) base_apply_transposed<C>(ctx, u.W(), dP.cview(), dX, dX_fresh ? C(0) : C(1));
    const mview<C, D> lg[2] = {grads[0], grads[1]};
    L::template backward<C>(ctx, u.lora(), X, dP.cview(), std::span<const mview<C, D>>(lg, 2), dX);
  }

  /// The protocol form (vjp.hpp): dX += dY·ΔW with ΔW = W' − W. Recomputes P; prefer
  /// forward + backward_with_base in training.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    detail::check_grad_slots(grads, factor_count, "deltaw::cpu::vjp<dora>::backward");
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, "deltaw::cpu::vjp<dora>::backward");
    auto Y = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    forward<C>(ctx, u, X, Y.view(), P.view());
    if (!present(dX)) {
      backward_with_base<C>(ctx, u, X, P.cview(), dY, grads, mview<C, D>());
      return;
    }
    auto full = kernels::make_scratch<C>(ctx, dY.rows(), u.cols());  // dY·W' (base included)
    backward_with_base<C>(ctx, u, X, P.cview(), dY, grads, full.view(), true);
    auto base = kernels::make_scratch<C>(ctx, dY.rows(), u.cols());  // dY·W
    base_apply_transposed<C>(ctx, u.W(), dY, base.view());
    axpy<C>(ctx, C(1), full.cview(), dX);
    axpy<C>(ctx, C(-1), base.cview(), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
