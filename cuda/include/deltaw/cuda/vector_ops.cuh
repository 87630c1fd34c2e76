// SPDX-License-Identifier: MIT
// The rest of the element-wise primitive layer on CUDA (deltaw/kernels/elementwise.hpp is
// the CPU side), each one Thrust for_each over a host-device functor (for_each.cuh):
//
//   scale_rows, scale_cols, divide_rows   Y ← diag(g)·Y, Y·diag(g), diag(g)⁻¹·Y
//   gather_rows                            Y(i, :) = X(rows[i], :)
//   fill_random, axpy_random               tiles of Philox bases (core/random.hpp), bit-identical
//                                          to the CPU's
//   to_host_vector                         a device vector read on the host (synchronises)
//   sum_of_squares, count_non_finite_as    reductions (synchronise: they return host values)
//
// The vectors and indices that the evaluators written once compute on the host (DoRA's
// gains, VeRA's λ, NOLA's coefficients and bases, a gather's row indices) arrive as host
// views or spans: they are copied into the context's scratch on its stream
// (cudaMemcpyAsync from pageable memory, which returns once the source has been read), so
// that the functors read device memory only. That scratch is given back as soon as the map
// that reads it is issued: later work that reuses it is ordered after the map on the stream.
#pragma once

#include <thrust/functional.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/transform_reduce.h>

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <deltaw/core/dtype.hpp>
#include <deltaw/core/error.hpp>
#include <deltaw/core/random.hpp>
#include <deltaw/core/view.hpp>

#include "context.cuh"
#include "elementwise.cuh"
#include "error.cuh"
#include "for_each.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

namespace detail {

/// n values from host memory into ctx's scratch, ordered on its stream.
template <class T>
const T* upload_to_scratch(const context& ctx, const T* host, std::size_t n) {
  if (n == 0) return nullptr;
  T* d = ctx.allocate<T>(n);
  DELTAW_CUDA_CHECK(cudaMemcpyAsync(d, host, n * sizeof(T), cudaMemcpyHostToDevice, ctx.stream()));
  return d;
}

/// a·b and a + b rounded once each, also on a GPU (where nvcc would otherwise contract
/// y + c·v into one fused multiply-add): what keeps the device's sums bit-identical to
/// the CPU's.
template <class C>
DELTAW_HOST_DEVICE C mul_rn(C a, C b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<C, float>) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
template <class C>
DELTAW_HOST_DEVICE C add_rn(C a, C b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<C, float>) return __fadd_rn(a, b);
  else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

template <class C>
struct times_row {  // y·g[i0 + i]
  const C* g;
  index_t i0;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t, C y) const { return y * g[i0 + i]; }
};
template <class C>
struct times_col {  // y·g[j0 + j]
  const C* g;
  index_t j0;
  DELTAW_HOST_DEVICE C operator()(index_t, index_t j, C y) const { return y * g[j0 + j]; }
};
template <class C>
struct over_row {  // y / g[i0 + i]
  const C* g;
  index_t i0;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t, C y) const { return y / g[i0 + i]; }
};
/// Strided device vector → contiguous scratch.
template <class T>
struct gather_vector {
  vector_view<const T, device::cuda> v;
  T* out;
  DELTAW_HOST_DEVICE void operator()(index_t i) const { out[i] = v[i]; }
};

template <class T, class C>
struct gather_rows_fn {
  matrix_view<const T, device::cuda> X;
  const index_t* rows;
  index_t stride;  // between consecutive indices
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C) const { return convert<C>(X(rows[i * stride], j)); }
};

template <class C>
struct fill_random_fn {
  basis_entries e;
  std::uint64_t first, ld;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C) const {
    return e.template value<C>(first + std::uint64_t(i) * ld + std::uint64_t(j));
  }
};

template <class C>
struct axpy_random_fn {
  const C* c;
  const basis_entries* bases;
  index_t count;
  std::uint64_t first, ld;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C y) const {
    const std::uint64_t f = first + std::uint64_t(i) * ld + std::uint64_t(j);
    for (index_t k = 0; k < count; ++k) y = add_rn(y, mul_rn(c[k], bases[k].template value<C>(f)));
    return y;
  }
};

template <class C>
struct square_fn {
  matrix_view<const C, device::cuda> X;
  element_index at;
  DELTAW_HOST_DEVICE double operator()(index_t k) const {
    const double x = double(X(at.row(k), at.col(k)));
    return x * x;
  }
};

/// out[i] = Σ_j X(i, j)² in double (one thread per row).
template <class C>
struct row_squares_fn {
  matrix_view<const C, device::cuda> X;
  double* out;
  DELTAW_HOST_DEVICE void operator()(index_t i) const {
    double s = 0.0;
    for (index_t j = 0; j < X.cols(); ++j) {
      const double x = double(X(i, j));
      s += x * x;
    }
    out[i] = s;
  }
};

/// 1 when X's entry is not finite once rounded to TW.
template <class TW, class C>
struct non_finite_fn {
  matrix_view<const C, device::cuda> X;
  element_index at;
  DELTAW_HOST_DEVICE index_t operator()(index_t k) const {
    const double x = convert<double>(convert<TW>(X(at.row(k), at.col(k))));
    return (x - x == 0.0) ? 0 : 1;  // ±inf − ±inf and NaN − NaN are NaN
  }
};

inline void check_window(index_t start, index_t n, index_t size, const char* op, const char* what) {
  if (start < 0 || start + n > size)
    throw shape_error(std::string(op) + ": " + what + " [" + std::to_string(start) + ", " + std::to_string(start + n) +
                      ") of a vector of size " + std::to_string(size));
}

template <class C, class D>
const C* vector_on_device(const context& ctx, const vector_view<const C, D>& g) {
  if constexpr (std::is_same_v<D, device::cuda>) {
    if (g.stride() == 1 || g.size() <= 1) return g.data();
    C* out = ctx.allocate<C>(std::size_t(g.size()));
    for_each_index(ctx, g.size(), gather_vector<C>{g, out}, "deltaw::cuda: strided vector");
    return out;
  } else {
    if (g.stride() == 1 || g.size() <= 1) return upload_to_scratch(ctx, g.data(), std::size_t(g.size()));
    std::vector<C> h(static_cast<std::size_t>(g.size()));
    for (index_t i = 0; i < g.size(); ++i) h[std::size_t(i)] = g[i];
    return upload_to_scratch(ctx, h.data(), h.size());
  }
}

}  // namespace detail

/// Y(i, :) *= g[i0 + i]. g: a host vector (copied into scratch) or a device vector.
template <class C, class D>
void scale_rows(const context& ctx, const matrix_view<C, device::cuda>& Y, const vector_view<const C, D>& g,
                index_t i0 = 0) {
  detail::check_window(i0, Y.rows(), g.size(), "deltaw::cuda::scale_rows", "rows");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  const auto mark = ctx.position();  // the upload is stream-ordered: released once the map is issued
  transform(ctx, Y, detail::times_row<C>{detail::vector_on_device(ctx, g), i0});
  ctx.release(mark);
}

/// Y(:, j) *= g[j0 + j].
template <class C, class D>
void scale_cols(const context& ctx, const matrix_view<C, device::cuda>& Y, const vector_view<const C, D>& g,
                index_t j0 = 0) {
  detail::check_window(j0, Y.cols(), g.size(), "deltaw::cuda::scale_cols", "columns");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  const auto mark = ctx.position();
  transform(ctx, Y, detail::times_col<C>{detail::vector_on_device(ctx, g), j0});
  ctx.release(mark);
}

/// Y(i, :) /= g[i0 + i].
template <class C, class D>
void divide_rows(const context& ctx, const matrix_view<C, device::cuda>& Y, const vector_view<const C, D>& g,
                 index_t i0 = 0) {
  detail::check_window(i0, Y.rows(), g.size(), "deltaw::cuda::divide_rows", "rows");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  const auto mark = ctx.position();
  transform(ctx, Y, detail::over_row<C>{detail::vector_on_device(ctx, g), i0});
  ctx.release(mark);
}

/// v (a device vector) converted to C in host memory. Synchronises ctx's stream: for the
/// few coefficients that an evaluator reads on the host.
template <class C, class T>
std::vector<C> to_host_vector(const context& ctx, const vector_view<const T, device::cuda>& v) {
  std::vector<C> out(static_cast<std::size_t>(v.size()));
  if (v.size() == 0) return out;
  const auto mark = ctx.position();
  const T* src = detail::vector_on_device(ctx, v);
  std::vector<T> raw(static_cast<std::size_t>(v.size()));
  DELTAW_CUDA_CHECK(cudaMemcpyAsync(raw.data(), src, raw.size() * sizeof(T), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  ctx.release(mark);
  for (std::size_t i = 0; i < raw.size(); ++i) out[i] = convert<C>(raw[i]);
  return out;
}

/// Y = X with X in host memory (any layout; packed row-major into scratch first) and Y a
/// device view, converting the storage type to C.
template <class T, class C>
void copy_from_host(const context& ctx, const matrix_view<const T>& X, const matrix_view<C, device::cuda>& Y) {
  detail::check_same_shape(X.rows(), X.cols(), Y.rows(), Y.cols(), "deltaw::cuda::copy_from_host");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  std::vector<std::remove_cv_t<T>> h(static_cast<std::size_t>(X.rows() * X.cols()));
  for (index_t i = 0; i < X.rows(); ++i)
    for (index_t j = 0; j < X.cols(); ++j) h[std::size_t(i * X.cols() + j)] = X(i, j);
  const auto mark = ctx.position();
  const auto* d = detail::upload_to_scratch(ctx, h.data(), h.size());
  copy(ctx, matrix_view<const std::remove_cv_t<T>, device::cuda>(d, X.rows(), X.cols(), X.cols(), 1), Y);
  ctx.release(mark);
}

/// Y(i, :) = X(rows[i], :), rows in host memory (checked, then copied into scratch).
template <class T, class C>
void gather_rows(const context& ctx, const matrix_view<const T, device::cuda>& X, std::span<const index_t> rows,
                 const matrix_view<C, device::cuda>& Y) {
  if (index_t(rows.size()) != Y.rows() || X.cols() != Y.cols())
    throw shape_error("deltaw::cuda::gather_rows: " + std::to_string(rows.size()) + " rows of " +
                      ::deltaw::detail::shape_str(X.rows(), X.cols()) + " into " +
                      ::deltaw::detail::shape_str(Y.rows(), Y.cols()));
  for (const index_t r : rows)
    if (r < 0 || r >= X.rows())
      throw shape_error("deltaw::cuda::gather_rows: row index " + std::to_string(r) + " outside [0, " +
                        std::to_string(X.rows()) + ")");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  const auto mark = ctx.position();
  transform(ctx, Y, detail::gather_rows_fn<T, C>{X, detail::upload_to_scratch(ctx, rows.data(), rows.size()), 1});
  ctx.release(mark);
}

/// Y(i, :) = X(rows[i], :), rows a device vector (not range-checked: it is not read on the host).
template <class T, class C>
void gather_rows(const context& ctx, const matrix_view<const T, device::cuda>& X,
                 const vector_view<const index_t, device::cuda>& rows, const matrix_view<C, device::cuda>& Y) {
  if (rows.size() != Y.rows() || X.cols() != Y.cols())
    throw shape_error("deltaw::cuda::gather_rows: " + std::to_string(rows.size()) + " rows of " +
                      ::deltaw::detail::shape_str(X.rows(), X.cols()) + " into " +
                      ::deltaw::detail::shape_str(Y.rows(), Y.cols()));
  if (Y.rows() == 0 || Y.cols() == 0) return;
  transform(ctx, Y, detail::gather_rows_fn<T, C>{X, rows.data(), rows.stride()});
}

/// Y(i, j) = e(first + i·ld + j): a tile of a Philox basis, bit-identical to
/// kernels::fill_random on the CPU (integer arithmetic and one rounding per entry).
template <class C>
void fill_random(const context& ctx, const basis_entries& e, std::uint64_t first, std::uint64_t ld,
                 const matrix_view<C, device::cuda>& Y) {
  if (Y.rows() == 0 || Y.cols() == 0) return;
  transform(ctx, Y, detail::fill_random_fn<C>{e, first, ld});
}

/// Y(i, j) += Σ_k c[k]·e_k(first + i·ld + j), the bases added in order, each entry rounded
/// to C before its multiply-add, as on the CPU. c and the bases are host values.
template <class C>
void axpy_random(const context& ctx, const vector_view<const C>& c, std::span<const basis_entries> bases,
                 std::uint64_t first, std::uint64_t ld, const matrix_view<C, device::cuda>& Y) {
  if (c.size() != index_t(bases.size()))
    throw shape_error("deltaw::cuda::axpy_random: " + std::to_string(c.size()) + " coefficients for " +
                      std::to_string(bases.size()) + " bases");
  if (Y.rows() == 0 || Y.cols() == 0 || bases.empty()) return;
  static_assert(std::is_trivially_copyable_v<basis_entries>);
  const auto mark = ctx.position();
  const C* cd = detail::vector_on_device(ctx, c);
  const basis_entries* bd = detail::upload_to_scratch(ctx, bases.data(), bases.size());
  transform(ctx, Y, detail::axpy_random_fn<C>{cd, bd, index_t(bases.size()), first, ld});
  ctx.release(mark);
}

/// Σ X(i, j)², accumulated in double; returns on the host (synchronises).
template <class C>
double sum_of_squares(const context& ctx, const matrix_view<const C, device::cuda>& X) {
  const index_t n = X.rows() * X.cols();
  if (n == 0) return 0.0;
  const detail::square_fn<C> f{X, detail::order_of(X.rows(), X.cols(), X.is_col_major())};
  try {
    return thrust::transform_reduce(detail::execution_policy(ctx), thrust::counting_iterator<index_t>(0),
                                    thrust::counting_iterator<index_t>(n), f, 0.0, thrust::plus<double>());
  } catch (const thrust::system_error& e) {
    throw cuda_error(std::string("deltaw::cuda::sum_of_squares failed: ") + e.what(), e.code().value());
  }
}

/// The sums of squares of X's rows, in double, on the host (synchronises).
template <class C>
std::vector<double> row_sums_of_squares(const context& ctx, const matrix_view<const C, device::cuda>& X) {
  if (X.rows() == 0) return {};
  const auto mark = ctx.position();
  double* d = ctx.allocate<double>(std::size_t(X.rows()));
  detail::for_each_index(ctx, X.rows(), detail::row_squares_fn<C>{X, d}, "deltaw::cuda::row_sums_of_squares");
  auto h = to_host_vector<double>(ctx, vector_view<const double, device::cuda>(d, X.rows()));
  ctx.release(mark);
  return h;
}

/// How many entries of X are NaN or ±Inf once rounded to TW; returns on the host.
template <class TW, class C>
index_t count_non_finite_as(const context& ctx, const matrix_view<const C, device::cuda>& X) {
  const index_t n = X.rows() * X.cols();
  if (n == 0) return 0;
  const detail::non_finite_fn<TW, C> f{X, detail::order_of(X.rows(), X.cols(), X.is_col_major())};
  try {
    return thrust::transform_reduce(detail::execution_policy(ctx), thrust::counting_iterator<index_t>(0),
                                    thrust::counting_iterator<index_t>(n), f, index_t(0), thrust::plus<index_t>());
  } catch (const thrust::system_error& e) {
    throw cuda_error(std::string("deltaw::cuda::count_non_finite_as failed: ") + e.what(), e.code().value());
  }
}

namespace detail {

/// Y(target[g], j) += α·Σ_k X(src[k], j) over k in [first[g], first[g + 1]): one thread per
/// entry of the distinct target rows, its sources summed in their order (no atomics).
template <class C>
struct scatter_add_fn {
  matrix_view<const C, device::cuda> X;
  matrix_view<C, device::cuda> Y;
  const index_t* target;
  const index_t* first;
  const index_t* src;
  C alpha;
  DELTAW_HOST_DEVICE void operator()(index_t k) const {
    const index_t g = k / Y.cols(), j = k % Y.cols();
    C s(0);
    for (index_t i = first[g]; i < first[g + 1]; ++i) s += X(src[i], j);
    Y(target[g], j) += alpha * s;
  }
};

}  // namespace detail

/// Y(rows[i], :) += α·X(i, :) (kernels::scatter_add_rows on the CPU): rows in host memory,
/// range-checked; repeated indices add up. The rows are grouped by target on the host and
/// the groups uploaded; each entry of a target row is summed by one thread.
template <class C>
void scatter_add_rows(const context& ctx, std::type_identity_t<C> alpha, const device_view<const C>& X,
                      std::span<const index_t> rows, const device_view<C>& Y) {
  if (index_t(rows.size()) != X.rows() || X.cols() != Y.cols())
    throw shape_error("deltaw::cuda::scatter_add_rows: " + std::to_string(rows.size()) + " rows of " +
                      ::deltaw::detail::shape_str(X.rows(), X.cols()) + " into " + ::deltaw::detail::shape_str(Y.rows(), Y.cols()));
  std::vector<index_t> count(std::size_t(Y.rows()) + 1, 0);
  for (const index_t r : rows) {
    if (r < 0 || r >= Y.rows())
      throw shape_error("deltaw::cuda::scatter_add_rows: row index " + std::to_string(r) + " outside [0, " +
                        std::to_string(Y.rows()) + ")");
    ++count[std::size_t(r) + 1];
  }
  if (rows.empty() || X.cols() == 0) return;
  std::vector<index_t> target, first{0}, src(rows.size()), next(std::size_t(Y.rows()), -1);
  for (index_t r = 0; r < Y.rows(); ++r)
    if (count[std::size_t(r) + 1] > 0) {
      next[std::size_t(r)] = first.back();
      target.push_back(r);
      first.push_back(first.back() + count[std::size_t(r) + 1]);
    }
  for (std::size_t i = 0; i < rows.size(); ++i) src[std::size_t(next[std::size_t(rows[i])]++)] = index_t(i);
  const auto mark = ctx.position();
  const auto* dt = detail::upload_to_scratch(ctx, target.data(), target.size());
  const auto* df = detail::upload_to_scratch(ctx, first.data(), first.size());
  const auto* ds = detail::upload_to_scratch(ctx, src.data(), src.size());
  detail::for_each_index(ctx, index_t(target.size()) * Y.cols(), detail::scatter_add_fn<C>{X, Y, dt, df, ds, C(alpha)},
                 "deltaw::cuda::scatter_add_rows");
  ctx.release(mark);
}

}  // namespace cuda
DELTAW_NAMESPACE_END
