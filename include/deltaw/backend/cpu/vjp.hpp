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
#include <type_traits>
#include <vector>

#include "../../expr/update.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class U>
struct vjp {
  static_assert(sizeof(U) == 0,
                "deltaw::cpu::vjp: this update type has no VJP yet; the ones available are listed in "
                "deltaw/backend/cpu/*_vjp.hpp");
};

/// vjp<decltype(u)> for a const u (or a reference) is vjp of the plain type.
template <class U>
struct vjp<const U> : vjp<U> {};
template <class U>
struct vjp<U&> : vjp<std::remove_const_t<U>> {};
template <class U>
struct vjp<U&&> : vjp<std::remove_const_t<U>> {};

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
/// The aliasing checks of a backward call: each present gradient slot and dX against X,
/// dY, every view the update reads (its base weight too) and each other; throws
/// aliasing_error naming both. O(slots × operands), before anything is written.
template <class U, class C, class D>
void check_backward_no_overlap(const U& u, const matrix_view<const C, D>& X, const matrix_view<const C, D>& dY,
                               std::span<const matrix_view<C, D>> grads, const matrix_view<C, D>& dX,
                               const char* (*factor_name)(int), const char* op) {
  const int n = int(grads.size());
  for (int i = 0; i <= n; ++i) {
    const auto& g = i < n ? grads[std::size_t(i)] : dX;
    if (!present(g)) continue;
    const deltaw::detail::memory_lattice lg = deltaw::detail::lattice_of(g);
    const char* a = i < n ? "the gradient of " : "the input gradient dX";
    const char* b = i < n ? factor_name(i) : "";
    if (deltaw::detail::lattices_overlap(lg, deltaw::detail::lattice_of(X)))
      deltaw::detail::throw_overlap(op, a, b, "the input X", "");
    if (deltaw::detail::lattices_overlap(lg, deltaw::detail::lattice_of(dY)))
      deltaw::detail::throw_overlap(op, a, b, "the upstream gradient dY", "");
    deltaw::detail::for_each_input(u, [&](const char* f, const auto& v) {
      if (deltaw::detail::lattices_overlap(lg, deltaw::detail::lattice_of(v)))
        deltaw::detail::throw_overlap(op, a, b, "the update's ", f);
    }, true);
    for (int j = i + 1; j <= n; ++j) {
      const auto& h = j < n ? grads[std::size_t(j)] : dX;
      if (present(h) && deltaw::detail::lattices_overlap(lg, deltaw::detail::lattice_of(h)))
        deltaw::detail::throw_overlap(op, a, b, j < n ? "the gradient of " : "the input gradient dX",
                                      j < n ? factor_name(j) : "");
    }
  }
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

/// a·b and x: the maps of the backward passes that multiply or sum element-wise, as
/// host-device functors so that the same passes run on any device.
struct product_map {
  template <class C>
  DELTAW_HOST_DEVICE C operator()(C a, C b) const {
    return a * b;
  }
};
struct identity_map {
  template <class C>
  DELTAW_HOST_DEVICE C operator()(C x) const {
    return x;
  }
};

/// g += v for a gradient slot g ([1, n] or [n, 1], or any shape packed row-major in v)
/// on ctx's device and v computed on the host: v is copied to the device (a plain copy on
/// the CPU) and added with one axpy. For the few values a backward pass sums on the host.
template <class C, class D, class Ctx>
void add_from_host(const Ctx& ctx, const std::vector<C>& v, const matrix_view<C, D>& g) {
  if (g.rows() == 0 || g.cols() == 0) return;
  auto s = kernels::make_scratch<C>(ctx, g.rows(), g.cols());
  copy_from_host(ctx, matrix_view<const C>(v.data(), g.rows(), g.cols(), g.cols(), 1), s.view());
  axpy<C>(ctx, C(1), s.cview(), g);
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
  slots.reserve(grads.size() + 1);
  for (auto* g : grads) slots.push_back(detail::grad_view(g));
  slots.push_back(detail::grad_view(dX));
  // X and dY as given (the type's backward sees converted copies when they are not C).
  constexpr const char* op = "deltaw::cpu::backward";
  for (std::size_t i = 0; i < slots.size(); ++i) {
    if (!present(slots[i])) continue;
    const bool is_dx = i + 1 == slots.size();
    const char* a = is_dx ? "the input gradient dX" : "the gradient of ";
    const char* b = is_dx ? "" : vjp<U>::factor_name(int(i));
    if (views_overlap(slots[i], xv)) deltaw::detail::throw_overlap(op, a, b, "the input X", "");
    if (views_overlap(slots[i], gv)) deltaw::detail::throw_overlap(op, a, b, "the upstream gradient dY", "");
  }
  slots.pop_back();
  vjp<U>::template backward<C>(ctx, u, Xo.view(), Go.view(), std::span<const mview<C>>(slots), detail::grad_view(dX),
                               std::forward<Extra>(extra)...);
}

}  // namespace cpu
DELTAW_NAMESPACE_END
