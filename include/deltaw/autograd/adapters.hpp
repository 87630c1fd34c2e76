// SPDX-License-Identifier: MIT
// Differentiable application of a frozen weight plus an update to activations:
//
//   linear(x, W[, b])                 x·Wᵀ (+ b), W a frozen view (never copied, no gradient),
//                                     b an optional frozen bias, added inside the product
//   adapted_linear(x, W, factors, f)  x·(W + ΔW)ᵀ, ΔW = f(views of the factor variables)
//   lora_linear(x, W, B, A, s)        the LoRA case (rsLoRA: pass s = α/√r)
//   dora_linear(x, W, B, A, m, s)     DoRA, the row norms detached
//
// Each takes an optional frozen bias b [out] (a view, no gradient; PyTorch's Linear.bias
// of a frozen base layer): added to the output in the same node, not by a second op.
//
// The forward pass is deltaw::apply over the lazy sum view(W) + ΔW; the backward pass is
// deltaw::apply_transposed for the base and the update type's cpu::vjp for the factors
// and the rest of dX: no dense ΔW and no dense gradient of W is ever formed.
#pragma once

#include <array>
#include <span>
#include <type_traits>
#include <vector>

#include "../backend/cpu/core_low_rank.hpp"
#include "../backend/cpu/core_low_rank_vjp.hpp"
#include "../backend/cpu/dora_vjp.hpp"
#include "../backend/cpu/low_rank_vjp.hpp"
#include "../backend/cpu/ops.hpp"
#include "../kernels/gemm.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace autograd {

/// The frozen weight parameter of the functions below: a view of const or non-const
/// elements (matrix_view<T> converts), T deduced from x alone.
template <class T>
using frozen_weight = std::type_identity_t<matrix_view<const T>>;

namespace detail {
template <class T>
void check_linear(const var<T>& x, const matrix_view<const T>& W, const char* op) {
  if (x.cols() != W.cols())
    throw shape_error(std::string("deltaw::autograd::") + op + ": x is " + shape_of(x.rows(), x.cols()) + " but W is " +
                      shape_of(W.rows(), W.cols()) + "; x·Wᵀ needs x to have " + std::to_string(W.cols()) + " columns");
}
/// dX = dY·W written into a fresh gradient or added to an existing one.
template <class T, class GM>
void base_input_grad(tape<T>& t, index_t ix, const matrix_view<const T>& W, const GM& dY) {
  if (!t.needs_grad(ix)) return;
  auto [buf, fresh] = t.grad_slot(ix);
  if (fresh) {
    deltaw::apply_transposed(W, dY, *buf);
  } else {
    dense<T> tmp = t.buffer(dY.rows(), W.cols());
    deltaw::apply_transposed(W, dY, tmp);
    *buf += tmp;
    t.recycle(std::move(tmp));
  }
}
template <class T>
void check_bias(const vector_view<const T>& b, const matrix_view<const T>& W, const char* op) {
  if (b.size() != 0 && b.size() != W.rows())
    throw shape_error(std::string("deltaw::autograd::") + op + ": the bias has " + std::to_string(b.size()) +
                      " entries but W has " + std::to_string(W.rows()) + " output rows");
}
/// Every row of y set to b (add = false) or increased by b (add = true); no-op for an empty b.
template <class T>
void bias_rows(dense<T>& y, const vector_view<const T>& b, bool add) {
  if (b.size() == 0) return;
  Eigen::Matrix<T, 1, Eigen::Dynamic> copy;
  if (b.stride() != 1) {  // a contiguous copy, so that the row loop vectorises
    copy.resize(b.size());
    for (index_t j = 0; j < b.size(); ++j) copy(j) = b[j];
  }
  const Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> row(b.stride() == 1 ? b.data() : copy.data(), b.size());
  deltaw::detail::parallel_rows(y.rows(), y.cols(), [&](index_t r0, index_t n) {
    for (index_t i = r0; i < r0 + n; ++i) {
      if (add)
        y.row(i) += row;
      else
        y.row(i) = row;
    }
  });
}
template <class T>
matrix_view<const T> view_of(const var<T>& v) {
  const auto m = v.value();
  return matrix_view<const T>(m.data(), m.rows(), m.cols(), m.outerStride(), 1);
}
}  // namespace detail

/// x·Wᵀ (+ b) with W [out, in] a frozen view and b an optional frozen bias [out]:
/// dx = dY·W, W and b get no gradient. With a bias, the output starts as b's rows and the
/// product is accumulated onto it (one pass over the output, not two).
template <class T>
var<T> linear(const var<T>& x, frozen_weight<T> W, std::type_identity_t<vector_view<const T>> b = {}) {
  auto& t = detail::tape_of(x, "linear");
  detail::check_linear(x, W, "linear");
  detail::check_bias(b, W, "linear");
  dense<T> y = t.buffer(x.rows(), W.rows());
  if (b.size() == 0) {
    deltaw::apply(W, x.value(), y);
  } else {
    detail::bias_rows(y, b, /*add=*/false);
    const kernels::cpu_context ctx;
    kernels::gemm<T>(ctx, T(1), detail::view_of(x), kernels::op::none, W, kernels::op::trans, T(1), view(y));
  }
  const index_t ix = x.id();
  return t.record("linear", std::move(y), t.requires_grad(x), [ix, W](tape<T>& t, index_t self) {
    detail::base_input_grad(t, ix, W, t.upstream(self));
  }, /*backward_reads_output=*/false);
}

/// x·(W + ΔW)ᵀ where ΔW = make(views) is rebuilt from the current values of `factors`
/// (vars of this tape, in the order of cpu::vjp<U>'s factors). Works for any update type
/// with a cpu::vjp specialisation.
template <class T, std::size_t N, class Make>
var<T> adapted_linear(const var<T>& x, frozen_weight<T> W, const std::array<var<T>, N>& factors, Make make,
                      const char* name = "adapted_linear", std::type_identity_t<vector_view<const T>> b = {}) {
  auto& t = detail::tape_of(x, name);
  detail::check_linear(x, W, name);
  detail::check_bias(b, W, name);
  std::array<matrix_view<const T>, N> views;
  bool rg = t.requires_grad(x);
  for (std::size_t i = 0; i < N; ++i) {
    detail::same_tape(x, factors[i], name);
    views[i] = detail::view_of(factors[i]);
    rg = rg || t.requires_grad(factors[i]);
  }
  auto u = make(std::as_const(views));
  using U = decltype(u);
  static_assert(cpu::vjp<U>::factor_count == int(N), "deltaw::autograd::adapted_linear: one factor variable per VJP factor");
  if (u.rows() != W.rows() || u.cols() != W.cols())
    throw shape_error(std::string("deltaw::autograd::") + name + ": W is " + detail::shape_of(W.rows(), W.cols()) +
                      " but the update is " + detail::shape_of(u.rows(), u.cols()));
  dense<T> y = t.buffer(x.rows(), W.rows());
  deltaw::apply(W + u, x.value(), y);
  detail::bias_rows(y, b, /*add=*/true);
  std::array<index_t, N> ids;
  for (std::size_t i = 0; i < N; ++i) ids[i] = factors[i].id();
  const index_t ix = x.id();
  return t.record(name, std::move(y), rg, [ix, W, u, ids](tape<T>& t, index_t self) {
    const auto& dY = t.upstream(self);
    std::array<dense<T>*, N> g{};
    for (std::size_t i = 0; i < N; ++i) g[i] = t.needs_grad(ids[i]) ? &t.grad_accumulator(ids[i]) : nullptr;
    detail::base_input_grad(t, ix, W, dY);
    dense<T>* dX = t.needs_grad(ix) ? &t.grad_accumulator(ix) : nullptr;
    cpu::backward<T>(u, t.value_at(ix), dY, std::span<dense<T>* const>(g.data(), N), dX);
  }, /*backward_reads_output=*/false);
}

/// LoRA: x·(W + s·B·A)ᵀ, B [out, r], A [r, in] (rsLoRA: s = α/√r).
template <class T>
var<T> lora_linear(const var<T>& x, frozen_weight<T> W, const var<T>& B, const var<T>& A, double s,
                   std::type_identity_t<vector_view<const T>> b = {}) {
  return adapted_linear<T, 2>(
      x, W, {B, A}, [s](const auto& v) { return deltaw::lora(v[0], v[1], deltaw::scale(s)); }, "lora_linear", b);
}

/// DoRA: x·W'ᵀ, W' = diag(m/n)·(W + s·B·A) with n the row norms of W + s·B·A at this
/// forward pass, treated as constants in the backward pass (as PEFT). m: [1, out].
/// `norms`, when given, are used as n instead of being recomputed (a cache, or the fixed
/// point of a gradient check).
template <class T>
var<T> dora_linear(const var<T>& x, frozen_weight<T> W, const var<T>& B, const var<T>& A, const var<T>& m,
                   double s, std::shared_ptr<const std::vector<double>> norms = nullptr,
                   std::type_identity_t<vector_view<const T>> b = {}) {
  auto& t = detail::tape_of(x, "dora_linear");
  detail::check_linear(x, W, "dora_linear");
  detail::check_bias(b, W, "dora_linear");
  for (const auto* f : {&B, &A, &m}) detail::same_tape(x, *f, "dora_linear");
  if (m.rows() * m.cols() != W.rows() || (m.rows() != 1 && m.cols() != 1))
    throw shape_error("deltaw::autograd::dora_linear: m is " + detail::shape_of(m.rows(), m.cols()) + "; expected [1, " +
                      std::to_string(W.rows()) + "]");
  const auto l = deltaw::lora(detail::view_of(B), detail::view_of(A), deltaw::scale(s));
  const auto mv = m.value();
  const vector_view<const T> mvec(mv.data(), W.rows(), m.rows() == 1 ? 1 : mv.outerStride());
  if (norms && index_t(norms->size()) != W.rows())
    throw shape_error("deltaw::autograd::dora_linear: " + std::to_string(norms->size()) + " cached norms for " +
                      std::to_string(W.rows()) + " rows");
  const auto u = norms ? dora_update<T, T>(held_matrix<T>{W, nullptr}, l, held_vector<T>{mvec, nullptr}, norms)
                       : deltaw::dora(W, l, mvec);
  using V = cpu::vjp<std::remove_cvref_t<decltype(u)>>;
  const kernels::cpu_context ctx;
  dense<T> y = t.buffer(x.rows(), W.rows());
  auto P = t.saved(x.rows(), W.rows());
  {
    const auto xv = view(x.value());
    const kernels::operand<T> X(ctx, matrix_view<const T>(xv));
    V::template forward<T>(ctx, u, X.view(), cpu::detail::dense_view(y), cpu::detail::dense_view(*P));
  }
  detail::bias_rows(y, b, /*add=*/true);
  const index_t ix = x.id();
  const std::array<index_t, 3> ids{B.id(), A.id(), m.id()};
  const bool rg = t.requires_grad(x) || t.requires_grad(B) || t.requires_grad(A) || t.requires_grad(m);
  return t.record("dora_linear", std::move(y), rg, [ix, u, ids, P](tape<T>& t, index_t self) {
    const kernels::cpu_context ctx;
    std::array<matrix_view<T>, 3> g{};
    for (std::size_t i = 0; i < 3; ++i)
      if (t.needs_grad(ids[i])) g[i] = cpu::detail::dense_view(t.grad_accumulator(ids[i]));
    matrix_view<T> dXv;
    bool fresh = false;
    if (t.needs_grad(ix)) {
      dense<T>* dX = nullptr;
      std::tie(dX, fresh) = t.grad_slot(ix);
      if (fresh) dX->resize(t.upstream(self).rows(), u.cols());
      dXv = cpu::detail::dense_view(*dX);
    }
    const auto xv = view(t.value_at(ix));
    const auto gv = view(t.upstream(self));
    const kernels::operand<T> X(ctx, matrix_view<const T>(xv)), dY(ctx, matrix_view<const T>(gv));
    V::template backward_with_base<T>(ctx, u, X.view(), cpu::detail::dense_view(std::as_const(*P)), dY.view(),
                                      std::span<const matrix_view<T>>(g.data(), 3), dXv, fresh);
  }, /*backward_reads_output=*/false);
}

}  // namespace autograd
DELTAW_NAMESPACE_END
