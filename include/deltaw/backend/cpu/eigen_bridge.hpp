// SPDX-License-Identifier: MIT
// Eigen interop for CPU-only code (init, spectral, linalg): views seen as Eigen Maps,
// without copying whenever the layout and element type allow it. The evaluators do not
// use this header; they are written against deltaw/kernels/ (see evaluator.hpp).
//
// - A view with a unit stride maps directly: row-major as a RowMajor Map, column-major as
//   the transpose of a RowMajor Map of the transposed shape. Eigen's products accept both
//   without a temporary.
// - bf16/fp16 storage, a storage type other than the arithmetic type, or a view without
//   any unit stride are converted into a dense temporary of the operand's own size. The
//   weight itself is never converted whole: see for_row_panels.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>

#include "../../core/eigen.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class C>
using cmap = Eigen::Map<const dense<C>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class C>
using mmap = Eigen::Map<dense<C>, Eigen::Unaligned, Eigen::OuterStride<>>;

namespace detail {
template <class V>
index_t outer_stride_row_major(const V& v) {
  return v.rows() <= 1 ? std::max<index_t>(v.cols(), 1) : v.row_stride();
}
template <class V>
index_t outer_stride_col_major(const V& v) {
  return v.cols() <= 1 ? std::max<index_t>(v.rows(), 1) : v.col_stride();
}
}  // namespace detail

/// Element-converting copy of any view into a dense row-major matrix.
template <class C, class T, class D>
dense<C> to_dense(const matrix_view<T, D>& v) {
  static_assert(std::is_same_v<D, device::cpu>, "deltaw::cpu::to_dense: the view is not on the CPU");
  dense<C> out(v.rows(), v.cols());
  for (index_t i = 0; i < v.rows(); ++i)
    for (index_t j = 0; j < v.cols(); ++j) out(i, j) = convert<C>(v(i, j));
  return out;
}

/// Calls f(M) with M an Eigen expression of v in arithmetic type C: a Map (row-major), a
/// transposed Map (column-major), or a Map of a converted copy (other cases).
template <class C, class T, class F>
decltype(auto) with_operand(const matrix_view<T>& v, F&& f) {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, C>) {
    if (v.is_row_major())
      return f(cmap<C>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(detail::outer_stride_row_major(v))));
    if (v.is_col_major())
      return f(cmap<C>(v.data(), v.cols(), v.rows(), Eigen::OuterStride<>(detail::outer_stride_col_major(v)))
                   .transpose());
  }
  const dense<C> copy = to_dense<C>(v);
  return f(cmap<C>(copy.data(), copy.rows(), copy.cols(), Eigen::OuterStride<>(std::max<index_t>(copy.cols(), 1))));
}

/// A row-major Map of v in type C: direct when v is row-major of type C, else a copy kept
/// in `scratch`. Used for the small factors (B, A, …), where one layout keeps code size down.
template <class C, class T>
cmap<C> row_major_operand(const matrix_view<T>& v, dense<C>& scratch) {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, C>) {
    if (v.is_row_major())
      return cmap<C>(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(detail::outer_stride_row_major(v)));
  }
  scratch = to_dense<C>(v);
  return cmap<C>(scratch.data(), scratch.rows(), scratch.cols(), Eigen::OuterStride<>(std::max<index_t>(scratch.cols(), 1)));
}

/// Calls f(M) with M a writable Eigen expression over an output view of arithmetic type C.
template <class C, class F>
decltype(auto) with_output(const matrix_view<C>& v, F&& f) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw: outputs are float or double (bf16/fp16 are storage types)");
  if (v.is_row_major()) {
    mmap<C> m(v.data(), v.rows(), v.cols(), Eigen::OuterStride<>(detail::outer_stride_row_major(v)));
    return f(m);
  }
  if (v.is_col_major()) {
    mmap<C> m(v.data(), v.cols(), v.rows(), Eigen::OuterStride<>(detail::outer_stride_col_major(v)));
    auto t = m.transpose();
    return f(t);
  }
  throw layout_error("deltaw: an output view needs a unit stride in one dimension; got strides (" +
                     std::to_string(v.row_stride()) + ", " + std::to_string(v.col_stride()) + ")");
}

/// Calls f(row0, P) over panels of rows of the weight W, P an Eigen expression in type C.
/// A directly mappable W is one panel (no copy); otherwise panels of panel_rows rows are
/// converted one at a time.
template <class C, class T, class F>
void for_row_panels(const matrix_view<T>& W, F&& f) {
  if (maps_directly<C>(W)) {
    with_operand<C>(W, [&](const auto& M) { f(index_t{0}, M); });
    return;
  }
  dense<C> scratch;
  for (index_t r0 = 0; r0 < W.rows(); r0 += panel_rows) {
    const index_t n = std::min(panel_rows, W.rows() - r0);
    scratch = to_dense<C>(W.middle_rows(r0, n));
    f(r0, cmap<C>(scratch.data(), n, W.cols(), Eigen::OuterStride<>(std::max<index_t>(W.cols(), 1))));
  }
}

/// Calls f(row0, P) with P a writable Eigen expression over panels of rows of W in type C,
/// writing converted panels back. A directly mappable W is one panel, modified in place.
template <class C, class T, class F>
void for_mutable_row_panels(const matrix_view<T>& W, F&& f) {
  static_assert(!std::is_const_v<T>, "deltaw: the weight is const; in-place operations need a mutable view");
  if (maps_directly<C>(W)) {
    if constexpr (std::is_same_v<T, C>) {
      with_output<C>(W, [&](auto& M) { f(index_t{0}, M); });
    }
    return;
  }
  dense<C> scratch;
  for (index_t r0 = 0; r0 < W.rows(); r0 += panel_rows) {
    const index_t n = std::min(panel_rows, W.rows() - r0);
    const auto Wp = W.middle_rows(r0, n);
    scratch = to_dense<C>(Wp);
    f(r0, scratch);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < W.cols(); ++j) Wp(i, j) = convert<T>(scratch(i, j));
  }
}

}  // namespace cpu
DELTAW_NAMESPACE_END
