// The CPU VJP protocol (DESIGN.md principle 4: every update type knows its own calculus).
// For Y = X·ΔWᵀ and an upstream gradient dY = ∂L/∂Y, cpu::vjp<U> provides
//
//   static constexpr int factor_count;                  // the trainable factors, in order
//   static const char* factor_name(int i);
//   template <class C, class XM, class GM>
//   static void backward(const U& u, const XM& X, const GM& dY,
//                        std::span<dense<C>* const> grads, dense<C>* dX);
//
// backward adds ∂L/∂factor_i into *grads[i] (skipped when null; each already sized like
// the factor) and dY·ΔW into *dX (skipped when null). X [tokens, in], dY [tokens, out]
// are Eigen expressions of the arithmetic type C. Nothing forms the dense ΔW or a dense
// gradient of W. The frozen base's own term dY·W is the caller's (apply_transposed).
#pragma once

#include <span>
#include <string>

#include "eigen_bridge.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class U>
struct vjp {
  static_assert(sizeof(U) == 0,
                "deltaw::cpu::vjp: this update type has no VJP yet; the ones available are listed in "
                "deltaw/backend/cpu/*_vjp.hpp");
};

namespace detail {
template <class C>
void check_grad_slots(std::span<dense<C>* const> grads, int want, const char* op) {
  if (int(grads.size()) != want)
    throw argument_error(std::string(op) + ": expected " + std::to_string(want) + " gradient slots (one per factor), got " +
                         std::to_string(grads.size()));
}
template <class C, class F>
void check_grad_shape(const dense<C>* g, const F& factor, const char* op, const char* name) {
  if (g && (g->rows() != factor.rows() || g->cols() != factor.cols()))
    throw shape_error(std::string(op) + ": the gradient of " + name + " is " + deltaw::detail::shape_str(g->rows(), g->cols()) +
                      " but " + name + " is " + deltaw::detail::shape_str(factor.rows(), factor.cols()));
}
}  // namespace detail

}  // namespace cpu
DELTAW_NAMESPACE_END
