// SPDX-License-Identifier: MIT
// The VJP protocol (every update type knows its own calculus). For Y = X·ΔWᵀ and an
// upstream gradient dY = ∂L/∂Y, cpu::vjp<U> provides
//
//   static constexpr int factor_count;                  // the trainable factors, in order
//   static const char* factor_name(int i);
//   template <class C, class Ctx>
//   static void backward(const Ctx& ctx, const U& u, cview<C> X, cview<C> dY,
//                        std::span<const mview<C>> grads, mview<C> dX);
//
// backward adds ∂L/∂factor_i into grads[i] (skipped when the slot is absent, i.e. a
// default-constructed view; else shaped like the factor) and dY·ΔW into dX (skipped when
// absent). X [tokens, in] and dY [tokens, out] arrive BLAS-compatible in the arithmetic
// type C, as in the evaluator protocol (evaluator.hpp), and bodies call only the
// primitives. Nothing forms the dense ΔW or a dense gradient of W. The frozen base's own
// term dY·W is the caller's (apply_transposed).
//
// cpu::backward<C>(u, X, dY, grads, dX, extra...) is the same call from Eigen matrices
// and dense gradient buffers (null pointers skip).
#pragma once

#include <span>
#include <string>
#include <vector>

#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class U>
struct vjp {
  static_assert(sizeof(U) == 0,
                "deltaw::cpu::vjp: this update type has no VJP yet; the ones available are listed in "
                "deltaw/backend/cpu/*_vjp.hpp");
};

/// True when a gradient slot is present (a default-constructed view is absent).
template <class C, class D>
bool present(const matrix_view<C, D>& g) {
  return g.data() != nullptr || g.rows() != 0 || g.cols() != 0;
}

namespace detail {
template <class G>
void check_grad_slots(std::span<G> grads, int want, const char* op) {
  if (int(grads.size()) != want)
    throw argument_error(std::string(op) + ": expected " + std::to_string(want) + " gradient slots (one per factor), got " +
                         std::to_string(grads.size()));
}
template <class C, class D, class F>
void check_grad_shape(const matrix_view<C, D>& g, const F& factor, const char* op, const char* name) {
  if (present(g) && (g.rows() != factor.rows() || g.cols() != factor.cols()))
    throw shape_error(std::string(op) + ": the gradient of " + name + " is " + deltaw::detail::shape_str(g.rows(), g.cols()) +
                      " but " + name + " is " + deltaw::detail::shape_str(factor.rows(), factor.cols()));
}
template <class C>
matrix_view<C> grad_view(dense<C>* g) {
  return g ? dense_view(*g) : matrix_view<C>();
}
}  // namespace detail

/// vjp<U>::backward from Eigen matrices (any layout or storage type, converted to C when
/// needed) and dense gradient buffers; null pointers skip. `extra` goes to backward as is.
template <class C, class U, class XM, class GM, class... Extra>
void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX,
              Extra&&... extra) {
  const kernels::cpu_context ctx;
  const auto xv = view(X);
  const auto gv = view(dY);
  const kernels::operand<C> Xo(ctx, matrix_view<const std::remove_const_t<typename decltype(xv)::element_type>>(xv));
  const kernels::operand<C> Go(ctx, matrix_view<const std::remove_const_t<typename decltype(gv)::element_type>>(gv));
  std::vector<mview<C>> slots;
  slots.reserve(grads.size());
  for (auto* g : grads) slots.push_back(detail::grad_view(g));
  vjp<U>::template backward<C>(ctx, u, Xo.view(), Go.view(), std::span<const mview<C>>(slots), detail::grad_view(dX),
                               std::forward<Extra>(extra)...);
}

}  // namespace cpu
DELTAW_NAMESPACE_END
