// SPDX-License-Identifier: MIT
// Zero-copy views over caller memory: a pointer, a shape and element strides.
// The canonical layout is PyTorch's: W is [out, in] row-major, activations [tokens, in].
#pragma once

#include <algorithm>
#include <cstdint>
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

namespace detail {
inline index_t gcd_index(index_t a, index_t b) {
  while (b != 0) {
    const index_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}
/// True when two distinct elements (i, j) of a rows × cols lattice with strides
/// (rs, cs) ≥ 0 share an address: a nonzero (di, dj), |di| < rows, |dj| < cols, with
/// di·rs = dj·cs. Exact and O(log): the smallest such pair is (cs/g, rs/g), g = gcd.
inline bool lattice_self_overlaps(index_t rows, index_t cols, index_t rs, index_t cs) {
  if (rows == 0 || cols == 0) return false;
  if (rows > 1 && rs == 0) return true;
  if (cols > 1 && cs == 0) return true;
  if (rows == 1 || cols == 1) return false;
  const index_t g = gcd_index(rs, cs);
  return cs / g <= rows - 1 && rs / g <= cols - 1;
}
// Out of line (and out of every view constructor's inlined body): the aliasing checks
// are rare, cold paths.
#if defined(__GNUC__) || defined(__clang__)
#define DELTAW_DETAIL_COLD [[gnu::noinline, gnu::cold]]
#define DELTAW_DETAIL_NOINLINE [[gnu::noinline]]
#else
#define DELTAW_DETAIL_COLD
#define DELTAW_DETAIL_NOINLINE
#endif
[[noreturn]] DELTAW_DETAIL_COLD inline void throw_self_overlap(index_t rows, index_t cols, index_t rs, index_t cs) {
  throw layout_error("deltaw::matrix_view: a writable " + shape_str(rows, cols) + " view with strides (" +
                     std::to_string(rs) + ", " + std::to_string(cs) +
                     ") overlaps itself (two of its elements share memory); only a read-only view may");
}
}  // namespace detail

/// A 2-D view: element (i, j) lives at data[i*row_stride + j*col_stride].
/// Row-major contiguous is (cols, 1), column-major is (1, rows). Never owns memory.
/// A view of writable elements must not overlap itself (two elements at one address,
/// e.g. row_stride 10 < cols 64 row-major): its constructor throws layout_error. A
/// read-only view may (a stride of 0 broadcasts a row or a column).
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
    if constexpr (!std::is_const_v<T>) {
      if (detail::lattice_self_overlaps(rows, cols, row_stride, col_stride))
        detail::throw_self_overlap(rows, cols, row_stride, col_stride);
    }
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
    if constexpr (!std::is_const_v<T>) {
      if (size > 1 && stride == 0)
        throw layout_error("deltaw::vector_view: a writable vector of size " + std::to_string(size) +
                           " with stride 0 overlaps itself; only a read-only view may");
    }
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

namespace detail {
/// The memory a view covers: elements of `esize` bytes at base + (i·s0 + j·s1)·esize,
/// i < n0, j < n1 (a vector has n1 = 1).
struct memory_lattice {
  std::uintptr_t base = 0;
  index_t esize = 1, n0 = 0, s0 = 0, n1 = 1, s1 = 0;
  bool empty() const { return n0 == 0 || n1 == 0; }
  /// One past the last byte, relative to base.
  index_t extent() const { return ((n0 - 1) * s0 + (n1 - 1) * s1 + 1) * esize; }
};
template <class T, class D>
memory_lattice lattice_of(const matrix_view<T, D>& v) {
  return {reinterpret_cast<std::uintptr_t>(v.data()), index_t(sizeof(T)), v.rows(), v.row_stride(), v.cols(),
          v.col_stride()};
}
template <class T, class D>
memory_lattice lattice_of(const vector_view<T, D>& v) {
  return {reinterpret_cast<std::uintptr_t>(v.data()), index_t(sizeof(T)), v.size(), v.stride(), 1, 0};
}

#if defined(__SIZEOF_INT128__)
/// True when Σ_k x_k·s_k = d has a solution with x_k in [lo_k, hi_k], for at most two
/// distinct strides s_k > 0 (n = 0, 1 or 2). Exact: extended Euclid and a range test,
/// in 128-bit arithmetic.
__extension__ typedef __int128 wide_index;  // __extension__: no -Wpedantic warning
inline bool lattice_equation_solvable(int n, const index_t* s, const index_t* lo, const index_t* hi, index_t d) {
  using wide = wide_index;
  if (n == 0) return d == 0;
  if (n == 1) return d % s[0] == 0 && d / s[0] >= lo[0] && d / s[0] <= hi[0];
  const wide p = s[0], q = s[1];
  // p·x + q·y = g.
  wide r0 = p, r1 = q, x0 = 1, x1 = 0;
  while (r1 != 0) {
    const wide t = r0 / r1;
    const wide r2 = r0 - t * r1, x2 = x0 - t * x1;
    r0 = r1, r1 = r2, x0 = x1, x1 = x2;
  }
  const wide g = r0;
  if (wide(d) % g != 0) return false;
  const wide qg = q / g;
  // i ≡ (d/g)·x0 (mod q/g) makes d − i·p a multiple of q; then j = (d − i·p)/q, which
  // falls as i grows, must lie in [lo1, hi1]: i ∈ [⌈(d − hi1·q)/p⌉, ⌊(d − lo1·q)/p⌋].
  auto floor_div = [](wide a, wide b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0); };
  auto ceil_div = [&](wide a, wide b) { return -floor_div(-a, b); };
  wide i_lo = std::max<wide>(lo[0], ceil_div(wide(d) - wide(hi[1]) * q, p));
  wide i_hi = std::min<wide>(hi[0], floor_div(wide(d) - wide(lo[1]) * q, p));
  if (i_lo > i_hi) return false;
  wide i0 = ((wide(d) / g) % qg) * (x0 % qg) % qg;
  if (i0 < 0) i0 += qg;
  // The smallest i ≥ i_lo with i ≡ i0 (mod q/g).
  const wide first = i_lo + ((i0 - i_lo) % qg + qg) % qg;
  return first <= i_hi;
}
#endif

/// Whether two lattices share a byte. First the [first, last] byte intervals (disjoint:
/// no overlap, the usual case, O(1)); when they intersect and both have the same element
/// size, the exact test on the element lattices when they use at most two distinct
/// strides between them (blocks, rows or columns of one matrix, a matrix and its
/// transpose, a row or column as a vector). Conservative (reported as overlap when the
/// intervals meet): different element sizes, three or more distinct strides (e.g. a
/// row-major and a column-major block of one buffer), or a compiler without __int128.
DELTAW_DETAIL_NOINLINE inline bool lattices_overlap(const memory_lattice& a, const memory_lattice& b) {
  if (a.empty() || b.empty()) return false;
  if (a.base + std::uintptr_t(a.extent()) <= b.base || b.base + std::uintptr_t(b.extent()) <= a.base) return false;
#if defined(__SIZEOF_INT128__)
  if (a.esize != b.esize) return true;
  // Strides of the dimensions that move (count > 1, stride > 0); a dimension of stride 0
  // repeats one address and adds nothing.
  index_t s[2] = {0, 0}, lo[2] = {0, 0}, hi[2] = {0, 0};
  int n = 0;
  auto add = [&](index_t count, index_t stride, bool of_a) {
    if (count <= 1 || stride == 0) return true;
    int k = 0;
    while (k < n && s[k] != stride) ++k;
    if (k == n) {
      if (n == 2) return false;
      s[n] = stride, lo[n] = 0, hi[n] = 0, ++n;
    }
    (of_a ? hi[k] : lo[k]) += of_a ? count - 1 : -(count - 1);
    return true;
  };
  if (!(add(a.n0, a.s0, true) && add(a.n1, a.s1, true) && add(b.n0, b.s0, false) && add(b.n1, b.s1, false)))
    return true;  // three or more distinct strides: conservative
  // a's element Σ x_k·s_k (x_k = a's index − b's index) meets b's at byte offset db.
  const std::intptr_t db = std::intptr_t(b.base - a.base);
  const index_t es = a.esize;
  const index_t d0 = index_t(db >= 0 ? db / es : -((-db + es - 1) / es));  // ⌊db / es⌋
  if (lattice_equation_solvable(n, s, lo, hi, d0)) return true;
  return index_t(db) != d0 * es && lattice_equation_solvable(n, s, lo, hi, d0 + 1);
#else
  return true;
#endif
}
}  // namespace detail

/// True when two views (matrix or vector, any element types) share any byte of memory.
/// O(1): an interval test, refined exactly when the intervals meet (see
/// detail::lattices_overlap for the rare conservative cases).
template <class A, class B>
bool views_overlap(const A& a, const B& b) {
  return detail::lattices_overlap(detail::lattice_of(a), detail::lattice_of(b));
}

namespace detail {
/// Throws aliasing_error: "<op>: <out_a><out_b> overlaps <in_a><in_b> …". Out of line and
/// with plain strings, so that the checks add no string code to their callers.
[[noreturn]] DELTAW_DETAIL_COLD inline void throw_overlap(const char* op, const char* out_a, const char* out_b,
                                                          const char* in_a, const char* in_b) {
  throw aliasing_error(std::string(op) + ": " + out_a + out_b + " overlaps " + in_a + in_b +
                       " (they share memory); write into a separate buffer");
}
/// Throws aliasing_error, naming both, when the output `out` of `op` overlaps the
/// operand `in`. The names are strings only on failure.
template <class A, class B>
void check_no_overlap(const char* op, const char* out_name, const A& out, const char* in_name, const B& in) {
  if (views_overlap(out, in)) throw_overlap(op, out_name, "", in_name, "");
}
}  // namespace detail

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

#undef DELTAW_DETAIL_COLD
#undef DELTAW_DETAIL_NOINLINE

DELTAW_NAMESPACE_END
