// SPDX-License-Identifier: MIT
// Zero-copy views over caller memory: a pointer, a shape and element strides.
// The canonical layout is PyTorch's: W is [out, in] row-major, activations [tokens, in].
#pragma once

#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "config.hpp"
#include "dtype.hpp"
#include "error.hpp"

DELTAW_NAMESPACE_BEGIN

/// Device tags. A view's device is part of its type, so the backend that evaluates an
/// expression is chosen at compile time.
namespace device {
struct cpu {
  static constexpr const char* name = "cpu";
};
struct cuda {
  static constexpr const char* name = "cuda";
};
}  // namespace device

/// A 2-D view: element (i, j) lives at data[i*row_stride + j*col_stride].
/// Row-major contiguous is (cols, 1), column-major is (1, rows). Never owns memory.
template <class T, class Device = device::cpu>
class matrix_view {
  static_assert(storage_type<T>, "deltaw::matrix_view: element type must be float, double, deltaw::bf16 or deltaw::fp16");

 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using device_type = Device;

  constexpr matrix_view() = default;

  /// Row-major contiguous [rows, cols].
  matrix_view(T* data, index_t rows, index_t cols) : matrix_view(data, rows, cols, cols, 1) {}

  /// General strides (in elements).
  matrix_view(T* data, index_t rows, index_t cols, index_t row_stride, index_t col_stride)
      : data_(data), rows_(rows), cols_(cols), rs_(row_stride), cs_(col_stride) {
    if (rows < 0 || cols < 0)
      throw shape_error("deltaw::matrix_view: negative shape " + detail::shape_str(rows, cols));
    if (row_stride < 0 || col_stride < 0)
      throw layout_error("deltaw::matrix_view: negative strides (" + std::to_string(row_stride) + ", " +
                         std::to_string(col_stride) + ") are not supported");
    if (data == nullptr && rows * cols > 0)
      throw null_data_error("deltaw::matrix_view: null data pointer for a non-empty " + detail::shape_str(rows, cols) +
                            " view");
  }

  /// A view of non-const elements converts to a view of const elements.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  matrix_view(const matrix_view<U, Device>& o)  // NOLINT(google-explicit-constructor)
      : data_(o.data()), rows_(o.rows()), cols_(o.cols()), rs_(o.row_stride()), cs_(o.col_stride()) {}

  DELTAW_HOST_DEVICE T* data() const { return data_; }
  DELTAW_HOST_DEVICE index_t rows() const { return rows_; }
  DELTAW_HOST_DEVICE index_t cols() const { return cols_; }
  DELTAW_HOST_DEVICE index_t row_stride() const { return rs_; }
  DELTAW_HOST_DEVICE index_t col_stride() const { return cs_; }
  DELTAW_HOST_DEVICE index_t size() const { return rows_ * cols_; }
  DELTAW_HOST_DEVICE bool empty() const { return rows_ == 0 || cols_ == 0; }

  /// Unit stride along columns (each row contiguous); trivially true for one column.
  DELTAW_HOST_DEVICE bool is_row_major() const { return cs_ == 1 || cols_ <= 1; }
  /// Unit stride along rows (each column contiguous).
  DELTAW_HOST_DEVICE bool is_col_major() const { return rs_ == 1 || rows_ <= 1; }

  DELTAW_HOST_DEVICE T& operator()(index_t i, index_t j) const { return data_[i * rs_ + j * cs_]; }

  /// Sub-block [r0, r0+nr) x [c0, c0+nc).
  matrix_view block(index_t r0, index_t c0, index_t nr, index_t nc) const {
    if (r0 < 0 || c0 < 0 || nr < 0 || nc < 0 || r0 + nr > rows_ || c0 + nc > cols_)
      throw shape_error("deltaw::matrix_view::block: [" + std::to_string(r0) + ":" + std::to_string(r0 + nr) + ", " +
                        std::to_string(c0) + ":" + std::to_string(c0 + nc) + "] is outside " +
                        detail::shape_str(rows_, cols_));
    matrix_view v;
    v.data_ = empty_block(nr, nc) ? data_ : data_ + r0 * rs_ + c0 * cs_;
    v.rows_ = nr;
    v.cols_ = nc;
    v.rs_ = rs_;
    v.cs_ = cs_;
    return v;
  }
  matrix_view middle_rows(index_t r0, index_t nr) const { return block(r0, 0, nr, cols_); }
  matrix_view middle_cols(index_t c0, index_t nc) const { return block(0, c0, rows_, nc); }

  /// The transpose, as a view (no data moves).
  matrix_view transpose() const {
    matrix_view v;
    v.data_ = data_;
    v.rows_ = cols_;
    v.cols_ = rows_;
    v.rs_ = cs_;
    v.cs_ = rs_;
    return v;
  }

 private:
  static bool empty_block(index_t nr, index_t nc) { return nr == 0 || nc == 0; }

  T* data_ = nullptr;
  index_t rows_ = 0;
  index_t cols_ = 0;
  index_t rs_ = 0;
  index_t cs_ = 1;
};

/// A 1-D view with a stride (vectors such as DoRA's magnitude).
template <class T, class Device = device::cpu>
class vector_view {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using device_type = Device;

  constexpr vector_view() = default;
  vector_view(T* data, index_t size, index_t stride = 1) : data_(data), size_(size), stride_(stride) {
    if (size < 0) throw shape_error("deltaw::vector_view: negative size " + std::to_string(size));
    if (data == nullptr && size > 0)
      throw null_data_error("deltaw::vector_view: null data pointer for a non-empty vector of size " +
                            std::to_string(size));
  }
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  vector_view(const vector_view<U, Device>& o) : data_(o.data()), size_(o.size()), stride_(o.stride()) {}  // NOLINT

  DELTAW_HOST_DEVICE T* data() const { return data_; }
  DELTAW_HOST_DEVICE index_t size() const { return size_; }
  DELTAW_HOST_DEVICE index_t stride() const { return stride_; }
  DELTAW_HOST_DEVICE T& operator[](index_t i) const { return data_[i * stride_]; }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
  index_t stride_ = 1;
};

/// True when a and b view the same elements the same way (same memory, shape and strides).
template <class A, class B, class D>
bool same_view(const matrix_view<A, D>& a, const matrix_view<B, D>& b) {
  return static_cast<const void*>(a.data()) == static_cast<const void*>(b.data()) && a.rows() == b.rows() &&
         a.cols() == b.cols() && a.row_stride() == b.row_stride() && a.col_stride() == b.col_stride();
}

template <class V>
struct is_matrix_view : std::false_type {};
template <class T, class D>
struct is_matrix_view<matrix_view<T, D>> : std::true_type {};
template <class V>
inline constexpr bool is_matrix_view_v = is_matrix_view<std::remove_cvref_t<V>>::value;

template <class V>
struct is_vector_view : std::false_type {};
template <class T, class D>
struct is_vector_view<vector_view<T, D>> : std::true_type {};
template <class V>
inline constexpr bool is_vector_view_v = is_vector_view<std::remove_cvref_t<V>>::value;

/// Row-major contiguous view over a raw pointer.
template <storage_type T>
matrix_view<T> view(T* data, index_t rows, index_t cols) {
  return matrix_view<T>(data, rows, cols);
}
/// Strided view over a raw pointer (strides in elements).
template <storage_type T>
matrix_view<T> view(T* data, index_t rows, index_t cols, index_t row_stride, index_t col_stride) {
  return matrix_view<T>(data, rows, cols, row_stride, col_stride);
}
/// A view is its own view.
template <class T, class D>
matrix_view<T, D> view(const matrix_view<T, D>& v) {
  return v;
}

/// A view plus an optional keep-alive: how expressions hold their operands.
/// Built from an lvalue it only views (the caller keeps the memory alive); built from an
/// rvalue owning matrix it takes ownership, so `auto e = W + lora(std::move(B), ...)` or
/// `lora(make_B(), ...)` never dangles (xtensor's closure rule).
template <class T, class Device = device::cpu>
struct held_matrix {
  matrix_view<const T, Device> view;
  std::shared_ptr<const void> owner;
};
template <class T, class Device = device::cpu>
struct held_vector {
  vector_view<const T, Device> view;
  std::shared_ptr<const void> owner;
};

DELTAW_NAMESPACE_END
