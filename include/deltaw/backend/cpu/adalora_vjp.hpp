// SPDX-License-Identifier: MIT
// VJP of AdaLoRA, ΔW = s·B·diag(E)·A (backend/cpu/adalora.hpp). With Z = X·Aᵀ and
// V = dY·B (tokens × r):
//   dB = s·dYᵀ·(Z·diag(E)),   dE_i = s·Σ_t V(t, i)·Z(t, i),   dA = s·(V·diag(E))ᵀ·X,
//   dX (update part) = s·(V·diag(E))·A.
// The gradient of E is [r, 1] (PEFT's lora_E) or [1, r]. Any device: the primitives only.
#pragma once

#include <string>

#include "../../expr/adalora.hpp"
#include "adalora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<adalora_update<T, D>> {
  using U = adalora_update<T, D>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) {
    constexpr const char* n[] = {"B", "E", "A"};
    return n[i];
  }
  /// grads = {dB, dE, dA}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<adalora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[2], u.A(), op, "A");
    const index_t r = u.rank();
    const auto& gE = grads[1];
    if (present(gE) && !(gE.rows() == r && gE.cols() == 1) && !(gE.rows() == 1 && gE.cols() == r))
      throw shape_error(std::string(op) + ": the gradient of E must be [r, 1] or [1, r] with r = " + std::to_string(r) +
                        "; got " + deltaw::detail::shape_str(gE.rows(), gE.cols()));
    if (r == 0) return;
    using enum kernels::op;
    const C s = C(u.scale());
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
    const auto e = kernels::vector_scratch<C>(ctx, u.E());
    const auto ev = kernels::as_vector(e);
    const index_t T_ = X.rows();
    auto Z = kernels::make_scratch<C>(ctx, T_, r);
    auto V = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), X, none, A.view(), trans, C(0), Z.view());
    gemm<C>(ctx, C(1), dY, none, B.view(), none, C(0), V.view());
    if (present(gE)) {  // dE += s·(column sums of V ⊙ Z), formed on ctx's device
      auto acc = kernels::make_scratch<C>(ctx, gE.rows(), gE.cols());
      dot_rows(ctx, V.cview().transpose(), Z.cview().transpose(), vector_view<C, D>(acc.view().data(), r));
      axpy<C>(ctx, s, acc.cview(), gE);
    }
    if (present(grads[0])) {
      scale_cols(ctx, Z.view(), ev);
      gemm<C>(ctx, s, dY, trans, Z.cview(), none, C(1), grads[0]);
    }
    scale_cols(ctx, V.view(), ev);
    if (present(grads[2])) gemm<C>(ctx, s, V.cview(), trans, X, none, C(1), grads[2]);
    if (present(dX)) gemm<C>(ctx, s, V.cview(), none, A.view(), none, C(1), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
