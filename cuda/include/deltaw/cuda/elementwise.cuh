// SPDX-License-Identifier: MIT
// The primitive layer's element-wise operations on CUDA views (deltaw/kernels/elementwise.hpp
// is the CPU side): transform by a functor, fill, scale, axpy and the converting copy, each
// one Thrust for_each over the elements on the context's stream (for_each.cuh). Functors
// passed to transform run on the device: their operator() must be DELTAW_HOST_DEVICE and
// they must hold values or device views, never references to host objects.
//
// Views may have any strides (no unit stride needed); consecutive indices walk Y's
// unit-stride dimension when it has one, so that writes coalesce on the GPU.
#pragma once

#include <string>
#include <type_traits>

#include <deltaw/core/dtype.hpp>
#include <deltaw/core/error.hpp>
#include <deltaw/core/view.hpp>

#include "context.cuh"
#include "for_each.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

namespace detail {

inline void check_same_shape(index_t r1, index_t c1, index_t r2, index_t c2, const char* op) {
  if (r1 != r2 || c1 != c2)
    throw shape_error(std::string(op) + ": " + ::deltaw::detail::shape_str(r1, c1) + " and " +
                      ::deltaw::detail::shape_str(r2, c2) + " must have the same shape");
}

/// (i, j) of the k-th element, walking columns first when col_major.
struct element_index {
  index_t rows, cols;
  bool col_major;
  DELTAW_HOST_DEVICE index_t row(index_t k) const { return col_major ? k % rows : k / cols; }
  DELTAW_HOST_DEVICE index_t col(index_t k) const { return col_major ? k / rows : k % cols; }
};

template <class C, class F>
struct transform_unary {
  matrix_view<C, device::cuda> Y;
  F f;
  element_index at;
  DELTAW_HOST_DEVICE void operator()(index_t k) const {
    const index_t i = at.row(k), j = at.col(k);
    Y(i, j) = f(i, j, Y(i, j));
  }
};

template <class T, class C, class F>
struct transform_binary {
  matrix_view<const T, device::cuda> X;
  matrix_view<C, device::cuda> Y;
  F f;
  element_index at;
  DELTAW_HOST_DEVICE void operator()(index_t k) const {
    const index_t i = at.row(k), j = at.col(k);
    Y(i, j) = f(X(i, j), Y(i, j));
  }
};

template <class C>
struct fill_with {
  C v;
  DELTAW_HOST_DEVICE C operator()(index_t, index_t, C) const { return v; }
};
template <class C>
struct scale_by {
  C alpha;
  DELTAW_HOST_DEVICE C operator()(index_t, index_t, C y) const { return alpha * y; }
};
template <class C>
struct add_scaled {
  C alpha;
  DELTAW_HOST_DEVICE C operator()(C x, C y) const { return y + alpha * x; }
};
template <class T, class C>
struct convert_to {
  DELTAW_HOST_DEVICE C operator()(T x, C) const { return convert<C>(x); }
};

inline element_index order_of(index_t rows, index_t cols, bool col_major) { return {rows, cols, col_major}; }

}  // namespace detail

/// Y(i, j) = f(i, j, Y(i, j)) for every element, on ctx's stream.
template <class C, class F>
void transform(const context& ctx, const matrix_view<C, device::cuda>& Y, const F& f) {
  static_assert(!std::is_const_v<C>, "deltaw::cuda::transform: the output view must be writable");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  detail::for_each_index(ctx, Y.rows() * Y.cols(),
                         detail::transform_unary<C, F>{Y, f, detail::order_of(Y.rows(), Y.cols(), Y.is_col_major())},
                         "deltaw::cuda::transform");
}

/// Y(i, j) = f(X(i, j), Y(i, j)) for two views of the same shape, on ctx's stream.
template <class T, class C, class F>
void transform(const context& ctx, const matrix_view<const T, device::cuda>& X, const matrix_view<C, device::cuda>& Y,
               const F& f) {
  static_assert(!std::is_const_v<C>, "deltaw::cuda::transform: the output view must be writable");
  detail::check_same_shape(X.rows(), X.cols(), Y.rows(), Y.cols(), "deltaw::cuda::transform");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  detail::for_each_index(
      ctx, Y.rows() * Y.cols(),
      detail::transform_binary<T, C, F>{X, Y, f, detail::order_of(Y.rows(), Y.cols(), Y.is_col_major())},
      "deltaw::cuda::transform");
}

/// Y = v everywhere.
template <class C>
void fill(const context& ctx, const matrix_view<C, device::cuda>& Y, std::type_identity_t<C> v) {
  transform(ctx, Y, detail::fill_with<C>{v});
}

/// Y = α·Y (α = 0 writes zeros, whatever Y held: NaN included).
template <class C>
void scale(const context& ctx, const matrix_view<C, device::cuda>& Y, std::type_identity_t<C> alpha) {
  if (alpha == C(1)) return;
  if (alpha == C(0)) return fill(ctx, Y, C(0));
  transform(ctx, Y, detail::scale_by<C>{alpha});
}

/// Y += α·X.
template <class C>
void axpy(const context& ctx, std::type_identity_t<C> alpha, const matrix_view<const C, device::cuda>& X,
          const matrix_view<C, device::cuda>& Y) {
  transform(ctx, X, Y, detail::add_scaled<C>{alpha});
}

/// Y = X element by element, converting the storage type (bf16/fp16/float/double) to C.
template <class T, class C>
void copy(const context& ctx, const matrix_view<const T, device::cuda>& X, const matrix_view<C, device::cuda>& Y) {
  detail::check_same_shape(X.rows(), X.cols(), Y.rows(), Y.cols(), "deltaw::cuda::copy");
  transform(ctx, X, Y, detail::convert_to<T, C>{});
}

}  // namespace cuda
DELTAW_NAMESPACE_END
