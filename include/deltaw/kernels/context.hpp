// SPDX-License-Identifier: MIT
// The primitive layer's execution context and scratch memory.
//
// Every evaluator is written once against the primitives of deltaw/kernels/ (GEMM,
// element-wise maps, reductions, gathers, random fills, …), each taking a context as its
// first argument. The context says where the work runs (its device_type) and hands out
// scratch matrices there. A backend is a context type plus overloads of the primitives
// for it, found by argument-dependent lookup: the CPU's live here, in deltaw::kernels.
//
// Layouts are runtime values (a view's strides), never template parameters, so each
// primitive is compiled once per arithmetic type.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>

#include "../core/eigen.hpp"
#include "../core/view.hpp"

DELTAW_NAMESPACE_BEGIN
namespace kernels {

/// The CPU context: the calling thread, with Eigen's (or OpenBLAS's) own threading inside
/// the GEMMs. Stateless, so evaluators may create one wherever they need it.
struct cpu_context {
  using device_type = device::cpu;
};

/// A scratch matrix owned by the caller: dense, row-major, of arithmetic type C, on the
/// context's device. On the CPU it is an Eigen matrix, so CPU-only code may also use it as one.
template <class C, class Device = device::cpu>
class scratch;

template <class C>
class scratch<C, device::cpu> {
 public:
  scratch() = default;
  scratch(index_t rows, index_t cols) : m_(rows, cols) {}
  void resize(index_t rows, index_t cols) { m_.resize(rows, cols); }
  index_t rows() const { return m_.rows(); }
  index_t cols() const { return m_.cols(); }
  C* data() { return m_.data(); }
  const C* data() const { return m_.data(); }
  matrix_view<C> view() { return {m_.data(), m_.rows(), m_.cols(), std::max<index_t>(m_.cols(), 1), 1}; }
  matrix_view<const C> view() const { return {m_.data(), m_.rows(), m_.cols(), std::max<index_t>(m_.cols(), 1), 1}; }
  matrix_view<const C> cview() const { return view(); }
  dense<C>& eigen() { return m_; }
  const dense<C>& eigen() const { return m_; }

 private:
  dense<C> m_;
};

/// A rows × cols scratch matrix on ctx's device (contents unspecified). Another backend's
/// scratch (e.g. deltaw/cuda/scratch.cuh) is built from its context, whose memory it takes.
template <class C, class Ctx>
scratch<C, typename Ctx::device_type> make_scratch(const Ctx& ctx, index_t rows, index_t cols) {
  if constexpr (std::is_same_v<typename Ctx::device_type, device::cpu>) {
    (void)ctx;
    return scratch<C, device::cpu>(rows, cols);
  } else {
    return scratch<C, typename Ctx::device_type>(ctx, rows, cols);
  }
}

namespace detail {
/// The leading dimension of v seen as a column-major BLAS matrix, or −1 when it cannot be
/// (no unit stride between the elements of a column, or columns that overlap).
template <class T, class D>
index_t col_major_ld(const matrix_view<T, D>& v) {
  const index_t r = v.rows(), c = v.cols();
  if (!(v.row_stride() == 1 || r <= 1)) return -1;
  const index_t ld = c <= 1 ? std::max<index_t>(r, 1) : v.col_stride();
  return ld >= std::max<index_t>(r, 1) ? ld : -1;
}
template <class T, class D>
index_t row_major_ld(const matrix_view<T, D>& v) {
  return col_major_ld(v.transpose());
}
}  // namespace detail

/// True when the primitives read v without copying: a unit stride in one dimension and
/// rows (or columns) that do not overlap.
template <class T, class D>
bool is_blas_compatible(const matrix_view<T, D>& v) {
  return detail::col_major_ld(v) >= 0 || detail::row_major_ld(v) >= 0;
}

/// A read-only operand in arithmetic type C: v itself when its element type is C and its
/// layout is BLAS-compatible, else a converted row-major copy it owns.
template <class C, class Device = device::cpu>
class operand {
 public:
  template <class Ctx, class T>
  operand(const Ctx& ctx, const matrix_view<const T, Device>& v) {
    if constexpr (std::is_same_v<std::remove_cv_t<T>, C>) {
      if (is_blas_compatible(v)) {
        view_ = v;
        return;
      }
    }
    copy_ = make_scratch<C>(ctx, v.rows(), v.cols());
    copy(ctx, v, copy_.view());
    view_ = copy_.view();
  }
  template <class Ctx, class T>
  operand(const Ctx& ctx, const matrix_view<T, Device>& v) : operand(ctx, matrix_view<const T, Device>(v)) {}

  const matrix_view<const C, Device>& view() const { return view_; }
  operator const matrix_view<const C, Device>&() const { return view_; }  // NOLINT(google-explicit-constructor)
  index_t rows() const { return view_.rows(); }
  index_t cols() const { return view_.cols(); }
  bool copied() const { return copy_.rows() * copy_.cols() > 0; }

 private:
  scratch<C, Device> copy_;
  matrix_view<const C, Device> view_;
};

/// Y = X element by element, converting the storage type (bf16/fp16/float/double) to C.
template <class T, class C>
void copy(const cpu_context&, const matrix_view<const T>& X, const matrix_view<C>& Y) {
  if (X.rows() != Y.rows() || X.cols() != Y.cols())
    throw shape_error("deltaw::kernels::copy: " + deltaw::detail::shape_str(X.rows(), X.cols()) + " into " +
                      deltaw::detail::shape_str(Y.rows(), Y.cols()));
  if (X.rows() == 0 || X.cols() == 0) return;  // an empty view's data may be null: no pointer arithmetic
  if (X.col_stride() == 1 && Y.col_stride() == 1) {
    for (index_t i = 0; i < X.rows(); ++i) {
      const T* x = X.data() + i * X.row_stride();
      C* y = Y.data() + i * Y.row_stride();
      for (index_t j = 0; j < X.cols(); ++j) y[j] = deltaw::convert<C>(x[j]);
    }
    return;
  }
  for (index_t i = 0; i < X.rows(); ++i)
    for (index_t j = 0; j < X.cols(); ++j) Y(i, j) = deltaw::convert<C>(X(i, j));
}

/// The vector v (on ctx's device) converted to type C, in a [1, n] scratch: the form in which
/// the evaluators hand gains and scales to scale_rows / scale_cols (view it with as_vector).
/// The copy is found by argument-dependent lookup, so another backend's context works too.
template <class C, class Ctx, class T, class D>
auto vector_scratch(const Ctx& ctx, const vector_view<const T, D>& v) {
  auto s = make_scratch<C>(ctx, 1, v.size());
  if (v.size() > 0)
    copy(ctx, matrix_view<const T, D>(v.data(), 1, v.size(), v.size() * v.stride(), v.stride()), s.view());
  return s;
}
/// A [1, n] scratch seen as a vector of n entries.
template <class S>
auto as_vector(const S& s) {
  const auto m = s.cview();
  return vector_view<typename decltype(m)::element_type, typename decltype(m)::device_type>(m.data(), m.cols());
}

}  // namespace kernels
DELTAW_NAMESPACE_END
