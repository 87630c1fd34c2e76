// SPDX-License-Identifier: MIT
// The evaluator protocol. Each update type U specialises cpu::evaluator<U> with, for an
// arithmetic type C (float or double) and a context ctx of the primitive layer
// (deltaw/kernels/), views cv = matrix_view<const C, D> and mv = matrix_view<C, D> on U's
// device D:
//
//   template <class C, class Ctx> static void apply_add(ctx, u, cv X, mv Y);             // Y += X·ΔWᵀ
//   template <class C, class Ctx> static void apply_transposed_add(ctx, u, cv G, mv O);  // O += G·ΔW
//   template <class C, class Ctx> static void add_delta_rows(ctx, u, r0, mv P);          // P += ΔW[r0 : r0+P.rows()]
//   template <class C, class Ctx> static void merge_rows(ctx, u, r0, mv P);              // rows of W ← rows of W + ΔW
//   template <class C, class Ctx> static void unmerge_rows(ctx, u, r0, mv P);            // the exact inverse of merge_rows
//   template <class C> static double frobenius_norm(u);                                  // ‖ΔW‖_F
//
// The views carry their layouts at run time (any strides the kernels accept; X, G and the
// factors arrive BLAS-compatible, see kernels::operand), so each function is compiled once
// per arithmetic type, whatever layouts the caller's matrices have. Bodies call only the
// primitives (kernels::gemm, transform, …) through ctx, which is what lets one evaluator
// serve every backend.
//
// An update simply added to W provides add_scaled_rows (P += factor·ΔW[r0 : …]) and
// inherits the three row operations from additive_rows below. Types whose ΔW depends on W
// (DoRA, Bone bat) may also provide the base hooks used by ops.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../../kernels/kernels.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class C, class D = device::cpu>
using cview = matrix_view<const C, D>;
template <class C, class D = device::cpu>
using mview = matrix_view<C, D>;

template <class U>
struct evaluator {
  static_assert(sizeof(U) == 0,
                "deltaw::cpu::evaluator: this update type has no evaluator; include its header from "
                "deltaw/backend/cpu/ (deltaw/deltaw.hpp includes them all)");
};

/// evaluator<const U> (and references) is the evaluator of the plain type.
template <class U>
struct evaluator<const U> : evaluator<U> {};
template <class U>
struct evaluator<U&> : evaluator<std::remove_const_t<U>> {};
template <class U>
struct evaluator<U&&> : evaluator<std::remove_const_t<U>> {};

namespace detail {
/// A view of a dense row-major matrix (mutable for a mutable matrix).
template <class C>
matrix_view<C> dense_view(dense<C>& m) {
  return matrix_view<C>(m.data(), m.rows(), m.cols(), std::max<index_t>(m.cols(), 1), 1);
}
template <class C>
matrix_view<const C> dense_view(const dense<C>& m) {
  return matrix_view<const C>(m.data(), m.rows(), m.cols(), std::max<index_t>(m.cols(), 1), 1);
}
}  // namespace detail

/// The row operations of an update that is simply added to W (merge = +ΔW, unmerge = −ΔW),
/// derived from the type's one add_scaled_rows. Evaluators inherit it (CRTP).
template <class Derived, class U>
struct additive_rows {
  template <class C, class Ctx, class P>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const P& panel) {
    Derived::template add_scaled_rows<C>(ctx, u, r0, panel, C(1));
  }
  template <class C, class Ctx, class P>
  static void merge_rows(const Ctx& ctx, const U& u, index_t r0, const P& panel) {
    Derived::template add_scaled_rows<C>(ctx, u, r0, panel, C(1));
  }
  template <class C, class Ctx, class P>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t r0, const P& panel) {
    Derived::template add_scaled_rows<C>(ctx, u, r0, panel, C(-1));
  }
};

/// Rows of a weight converted at a time when the weight's storage is not the arithmetic
/// type (bf16 W, or fully strided W): bounds the scratch to panel_rows × in.
inline constexpr index_t panel_rows = 256;

/// True when W is read as arithmetic type C without copying.
template <class C, class T, class D>
bool maps_directly(const matrix_view<T, D>& W) {
  return std::is_same_v<std::remove_cv_t<T>, C> && kernels::is_blas_compatible(W);
}

/// Calls f(row0, P) over panels of rows of the weight W, P a cview<C>. A directly readable
/// W is one panel (no copy); otherwise panels of panel_rows rows are converted one at a time.
template <class C, class Ctx, class T, class D, class F>
void for_row_panels(const Ctx& ctx, const matrix_view<const T, D>& W, F&& f) {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, C>) {
    if (kernels::is_blas_compatible(W)) {
      f(index_t{0}, cview<C, D>(W));
      return;
    }
  }
  auto scratch = kernels::make_scratch<C>(ctx, std::min(panel_rows, W.rows()), W.cols());
  for (index_t r0 = 0; r0 < W.rows(); r0 += panel_rows) {
    const index_t n = std::min(panel_rows, W.rows() - r0);
    const auto P = scratch.view().middle_rows(0, n);
    copy(ctx, W.middle_rows(r0, n), P);
    f(r0, cview<C, D>(P));
  }
}

/// Calls f(row0, P) with P an mview<C> over panels of rows of W, writing converted panels
/// back. A directly writable W is one panel, modified in place.
template <class C, class Ctx, class T, class D, class F>
void for_mutable_row_panels(const Ctx& ctx, const matrix_view<T, D>& W, F&& f) {
  static_assert(!std::is_const_v<T>, "deltaw: the weight is const; in-place operations need a mutable view");
  if constexpr (std::is_same_v<T, C>) {
    if (kernels::is_blas_compatible(W)) {
      f(index_t{0}, W);
      return;
    }
  }
  auto scratch = kernels::make_scratch<C>(ctx, std::min(panel_rows, W.rows()), W.cols());
  for (index_t r0 = 0; r0 < W.rows(); r0 += panel_rows) {
    const index_t n = std::min(panel_rows, W.rows() - r0);
    const auto Wp = W.middle_rows(r0, n);
    const auto P = scratch.view().middle_rows(0, n);
    copy(ctx, matrix_view<const T, D>(Wp), P);
    f(r0, P);
    copy(ctx, cview<C, D>(P), Wp);
  }
}

/// ‖ΔW‖_F computed panel by panel (bounded memory) for types without a closed form.
template <class C, class U>
double frobenius_norm_by_panels(const U& u) {
  const kernels::cpu_context ctx;
  double sq = 0.0;
  auto panel = kernels::make_scratch<C>(ctx, std::min(panel_rows, u.rows()), u.cols());
  for (index_t r0 = 0; r0 < u.rows(); r0 += panel_rows) {
    const index_t n = std::min(panel_rows, u.rows() - r0);
    const auto P = panel.view().middle_rows(0, n);
    kernels::fill(ctx, P, C(0));
    evaluator<U>::template add_delta_rows<C>(ctx, u, r0, P);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < u.cols(); ++j) sq += double(P(i, j)) * double(P(i, j));
  }
  return std::sqrt(sq);
}

/// tr(Gᵀ·H) = Σᵢⱼ G(i, j)·H(i, j) of two same-shaped matrices, in double.
template <class C>
double trace_of_product(const cview<C>& G, const cview<C>& H) {
  double s = 0.0;
  for (index_t i = 0; i < G.rows(); ++i)
    for (index_t j = 0; j < G.cols(); ++j) s += double(G(i, j)) * double(H(i, j));
  return s;
}

}  // namespace cpu
DELTAW_NAMESPACE_END
