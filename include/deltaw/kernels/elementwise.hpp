// SPDX-License-Identifier: MIT
// Element-wise primitives over views with runtime layouts: fill, scale, axpy, maps by a
// functor, diagonal scalings, row and column reductions, row gathers and scatters, and
// Philox fills of random bases. Loops run along the contiguous dimension.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "../core/random.hpp"
#include "context.hpp"

DELTAW_NAMESPACE_BEGIN
namespace kernels {

namespace detail {
inline void check_same(index_t r1, index_t c1, index_t r2, index_t c2, const char* op) {
  if (r1 != r2 || c1 != c2)
    throw shape_error(std::string(op) + ": " + deltaw::detail::shape_str(r1, c1) + " and " +
                      deltaw::detail::shape_str(r2, c2) + " differ");
}
/// Calls f(i, j) for every element of a rows × cols matrix, j innermost when the matrix
/// is row-major (row_major = true), i innermost otherwise.
template <class F>
void for_each_index(index_t rows, index_t cols, bool row_major, F&& f) {
  if (row_major) {
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j < cols; ++j) f(i, j);
  } else {
    for (index_t j = 0; j < cols; ++j)
      for (index_t i = 0; i < rows; ++i) f(i, j);
  }
}
}  // namespace detail

/// Y(i, j) = f(i, j, Y(i, j)) for every element: the general element-wise map.
template <class C, class F>
void transform(const cpu_context&, const matrix_view<C>& Y, F&& f) {
  if (Y.rows() == 0 || Y.cols() == 0) return;  // an empty view's data may be null
  if (Y.col_stride() == 1) {
    for (index_t i = 0; i < Y.rows(); ++i) {
      C* y = Y.data() + i * Y.row_stride();
      for (index_t j = 0; j < Y.cols(); ++j) y[j] = f(i, j, y[j]);
    }
    return;
  }
  detail::for_each_index(Y.rows(), Y.cols(), !Y.is_col_major(), [&](index_t i, index_t j) { Y(i, j) = f(i, j, Y(i, j)); });
}

/// Y(i, j) = f(X(i, j), Y(i, j)): a binary map of two same-shaped views.
template <class T, class C, class F>
void transform(const cpu_context&, const matrix_view<const T>& X, const matrix_view<C>& Y, F&& f) {
  detail::check_same(X.rows(), X.cols(), Y.rows(), Y.cols(), "deltaw::kernels::transform");
  if (Y.rows() == 0 || Y.cols() == 0) return;
  if (X.col_stride() == 1 && Y.col_stride() == 1) {
    for (index_t i = 0; i < Y.rows(); ++i) {
      const T* x = X.data() + i * X.row_stride();
      C* y = Y.data() + i * Y.row_stride();
      for (index_t j = 0; j < Y.cols(); ++j) y[j] = f(x[j], y[j]);
    }
    return;
  }
  detail::for_each_index(Y.rows(), Y.cols(), !Y.is_col_major(), [&](index_t i, index_t j) { Y(i, j) = f(X(i, j), Y(i, j)); });
}

/// Y = v everywhere.
template <class C>
void fill(const cpu_context& ctx, const matrix_view<C>& Y, std::type_identity_t<C> v) {
  transform(ctx, Y, [v](index_t, index_t, C) { return v; });
}

/// Y = α·Y (α = 0 writes zeros, whatever Y held).
template <class C>
void scale(const cpu_context& ctx, const matrix_view<C>& Y, std::type_identity_t<C> alpha) {
  if (alpha == C(1)) return;
  if (alpha == C(0)) return fill(ctx, Y, C(0));
  transform(ctx, Y, [alpha](index_t, index_t, C y) { return alpha * y; });
}

/// Y += α·X.
template <class C>
void axpy(const cpu_context& ctx, std::type_identity_t<C> alpha, const matrix_view<const C>& X, const matrix_view<C>& Y) {
  transform(ctx, X, Y, [alpha](C x, C y) { return y + alpha * x; });
}

/// Y(i, :) *= g[i0 + i]: diag(g)·Y for a window of g starting at i0.
template <class C>
void scale_rows(const cpu_context& ctx, const matrix_view<C>& Y, const vector_view<const C>& g, index_t i0 = 0) {
  if (i0 < 0 || i0 + Y.rows() > g.size())
    throw shape_error("deltaw::kernels::scale_rows: rows [" + std::to_string(i0) + ", " + std::to_string(i0 + Y.rows()) +
                      ") of a vector of size " + std::to_string(g.size()));
  transform(ctx, Y, [&](index_t i, index_t, C y) { return y * g[i0 + i]; });
}

/// Y(i, :) /= g[i0 + i]: diag(g)⁻¹·Y, divided (not multiplied by 1/g), so that it undoes
/// scale_rows up to one rounding.
template <class C>
void divide_rows(const cpu_context& ctx, const matrix_view<C>& Y, const vector_view<const C>& g, index_t i0 = 0) {
  if (i0 < 0 || i0 + Y.rows() > g.size())
    throw shape_error("deltaw::kernels::divide_rows: rows [" + std::to_string(i0) + ", " + std::to_string(i0 + Y.rows()) +
                      ") of a vector of size " + std::to_string(g.size()));
  transform(ctx, Y, [&](index_t i, index_t, C y) { return y / g[i0 + i]; });
}

/// y = α·y as a functor (host and device): kernels::scale where the context may be any.
template <class C>
struct scale_by {
  C alpha;
  DELTAW_HOST_DEVICE C operator()(index_t, index_t, C y) const { return alpha * y; }
};

/// The vector v converted to C in host memory (a copy; on a device, a synchronising
/// download): for the few coefficients an evaluator reads on the host.
template <class C, class T>
std::vector<C> to_host_vector(const cpu_context&, const vector_view<const T>& v) {
  std::vector<C> out(static_cast<std::size_t>(v.size()));
  for (index_t i = 0; i < v.size(); ++i) out[std::size_t(i)] = deltaw::convert<C>(v[i]);
  return out;
}

/// Y = X with X in host memory and Y on the context's device (a plain copy on the CPU; an
/// upload on a device), converting the storage type to C.
template <class T, class C>
void copy_from_host(const cpu_context& ctx, const matrix_view<const T>& X, const matrix_view<C>& Y) {
  copy(ctx, X, Y);
}

/// Y(:, j) *= g[j0 + j]: Y·diag(g) for a window of g starting at j0.
template <class C>
void scale_cols(const cpu_context& ctx, const matrix_view<C>& Y, const vector_view<const C>& g, index_t j0 = 0) {
  if (j0 < 0 || j0 + Y.cols() > g.size())
    throw shape_error("deltaw::kernels::scale_cols: columns [" + std::to_string(j0) + ", " +
                      std::to_string(j0 + Y.cols()) + ") of a vector of size " + std::to_string(g.size()));
  transform(ctx, Y, [&](index_t, index_t j, C y) { return y * g[j0 + j]; });
}

/// out[i] (+)= Σ_j f(X(i, j)), accumulated in out's type (double for the norms).
template <class T, class A, class F>
void reduce_rows(const cpu_context&, const matrix_view<const T>& X, const vector_view<A>& out, F&& f,
                 bool accumulate = false) {
  if (out.size() != X.rows())
    throw shape_error("deltaw::kernels::reduce_rows: " + std::to_string(out.size()) + " outputs for " +
                      deltaw::detail::shape_str(X.rows(), X.cols()));
  for (index_t i = 0; i < X.rows(); ++i) {
    A s = accumulate ? out[i] : A(0);
    for (index_t j = 0; j < X.cols(); ++j) s += A(f(X(i, j)));
    out[i] = s;
  }
}

/// out[j] (+)= Σ_i f(X(i, j)).
template <class T, class A, class F>
void reduce_cols(const cpu_context& ctx, const matrix_view<const T>& X, const vector_view<A>& out, F&& f,
                 bool accumulate = false) {
  if (out.size() != X.cols())
    throw shape_error("deltaw::kernels::reduce_cols: " + std::to_string(out.size()) + " outputs for " +
                      deltaw::detail::shape_str(X.rows(), X.cols()));
  if (!accumulate)
    for (index_t j = 0; j < X.cols(); ++j) out[j] = A(0);
  for (index_t i = 0; i < X.rows(); ++i)
    for (index_t j = 0; j < X.cols(); ++j) out[j] += A(f(X(i, j)));
  (void)ctx;
}

/// Y(i, :) = X(rows[i], :).
template <class T, class C>
void gather_rows(const cpu_context& ctx, const matrix_view<const T>& X, std::span<const index_t> rows,
                 const matrix_view<C>& Y) {
  if (index_t(rows.size()) != Y.rows() || X.cols() != Y.cols())
    throw shape_error("deltaw::kernels::gather_rows: " + std::to_string(rows.size()) + " rows of " +
                      deltaw::detail::shape_str(X.rows(), X.cols()) + " into " +
                      deltaw::detail::shape_str(Y.rows(), Y.cols()));
  for (index_t i = 0; i < Y.rows(); ++i) {
    const index_t r = rows[std::size_t(i)];
    if (r < 0 || r >= X.rows())
      throw shape_error("deltaw::kernels::gather_rows: row index " + std::to_string(r) + " outside [0, " +
                        std::to_string(X.rows()) + ")");
    copy(ctx, X.middle_rows(r, 1), Y.middle_rows(i, 1));
  }
}

/// Y(i, :) = X(rows[i], :) with the indices in a vector view (on the context's device).
template <class T, class C>
void gather_rows(const cpu_context& ctx, const matrix_view<const T>& X, const vector_view<const index_t>& rows,
                 const matrix_view<C>& Y) {
  if (rows.stride() == 1 || rows.size() <= 1)
    return gather_rows(ctx, X, std::span<const index_t>(rows.data(), std::size_t(rows.size())), Y);
  std::vector<index_t> r(static_cast<std::size_t>(rows.size()));
  for (index_t i = 0; i < rows.size(); ++i) r[std::size_t(i)] = rows[i];
  gather_rows(ctx, X, std::span<const index_t>(r), Y);
}

/// Y(rows[i], :) += α·X(i, :). Repeated indices add up.
template <class C>
void scatter_add_rows(const cpu_context& ctx, std::type_identity_t<C> alpha, const matrix_view<const C>& X,
                      std::span<const index_t> rows, const matrix_view<C>& Y) {
  if (index_t(rows.size()) != X.rows() || X.cols() != Y.cols())
    throw shape_error("deltaw::kernels::scatter_add_rows: " + std::to_string(rows.size()) + " rows of " +
                      deltaw::detail::shape_str(X.rows(), X.cols()) + " into " +
                      deltaw::detail::shape_str(Y.rows(), Y.cols()));
  for (index_t i = 0; i < X.rows(); ++i) {
    const index_t r = rows[std::size_t(i)];
    if (r < 0 || r >= Y.rows())
      throw shape_error("deltaw::kernels::scatter_add_rows: row index " + std::to_string(r) + " outside [0, " +
                        std::to_string(Y.rows()) + ")");
    axpy<C>(ctx, alpha, X.middle_rows(i, 1), Y.middle_rows(r, 1));
  }
}

/// Y(i, j) = e(first + i·ld + j): a tile of a random basis regenerated from its Philox
/// stream, `ld` the row length of the basis's full shape (bit-identical on every device).
template <class C>
void fill_random(const cpu_context&, const basis_entries& e, std::uint64_t first, std::uint64_t ld,
                 const matrix_view<C>& Y) {
  if (Y.rows() == 0 || Y.cols() == 0) return;
  if (Y.col_stride() == 1) {
    for (index_t i = 0; i < Y.rows(); ++i)
      fill_entries<C>(e, first + std::uint64_t(i) * ld, std::uint64_t(Y.cols()), Y.data() + i * Y.row_stride());
    return;
  }
  for (index_t i = 0; i < Y.rows(); ++i)
    for (index_t j = 0; j < Y.cols(); ++j) Y(i, j) = e.template value<C>(first + std::uint64_t(i) * ld + std::uint64_t(j));
}

/// Y(i, j) += Σ_k c[k]·e_k(first + i·ld + j): a weighted sum of random bases (NOLA's
/// A₀ + Σᵢ αᵢ·Aᵢ) added to a tile, `ld` the row length of the bases' full shape. The bases
/// are added in order and each entry is rounded to C before its multiply-add (as
/// axpy_entries), so the sum is bit-identical on every device. The CPU sweeps the tile in
/// pieces of 16 K entries and adds every basis to a piece while it is in cache.
template <class C>
void axpy_random(const cpu_context&, const vector_view<const C>& c, std::span<const basis_entries> bases,
                 std::uint64_t first, std::uint64_t ld, const matrix_view<C>& Y) {
  if (c.size() != index_t(bases.size()))
    throw shape_error("deltaw::kernels::axpy_random: " + std::to_string(c.size()) + " coefficients for " +
                      std::to_string(bases.size()) + " bases");
  if (Y.rows() == 0 || Y.cols() == 0 || bases.empty()) return;
  constexpr std::uint64_t piece = std::uint64_t(1) << 14;
  const auto sweep = [&](std::uint64_t f0, std::uint64_t n, C* y) {
    for (std::uint64_t f = 0; f < n; f += piece) {
      const std::uint64_t m = std::min(piece, n - f);
      for (std::size_t k = 0; k < bases.size(); ++k) axpy_entries<C>(c[index_t(k)], bases[k], f0 + f, m, y + f);
    }
  };
  if (Y.col_stride() == 1) {
    if (Y.rows() == 1 || (Y.row_stride() == Y.cols() && ld == std::uint64_t(Y.cols())))
      sweep(first, std::uint64_t(Y.rows()) * std::uint64_t(Y.cols()), Y.data());  // one contiguous range
    else
      for (index_t i = 0; i < Y.rows(); ++i)
        sweep(first + std::uint64_t(i) * ld, std::uint64_t(Y.cols()), Y.data() + i * Y.row_stride());
    return;
  }
  for (std::size_t k = 0; k < bases.size(); ++k)
    for (index_t i = 0; i < Y.rows(); ++i)
      for (index_t j = 0; j < Y.cols(); ++j)
        Y(i, j) += c[index_t(k)] * bases[k].template value<C>(first + std::uint64_t(i) * ld + std::uint64_t(j));
}

/// out[i] (+)= Σ_j X(i, j)·Y(i, j): the inner products of the rows of two same-shaped views
/// (the diagonal of X·Yᵀ; pass transposed views for columns), accumulated in out's type.
template <class T, class A>
void dot_rows(const cpu_context&, const matrix_view<const T>& X, const matrix_view<const T>& Y,
              const vector_view<A>& out, bool accumulate = false) {
  detail::check_same(X.rows(), X.cols(), Y.rows(), Y.cols(), "deltaw::kernels::dot_rows");
  if (out.size() != X.rows())
    throw shape_error("deltaw::kernels::dot_rows: " + std::to_string(out.size()) + " outputs for " +
                      deltaw::detail::shape_str(X.rows(), X.cols()));
  if (X.cols() == 0) {  // empty rows (their data may be null): every inner product is 0
    for (index_t i = 0; i < X.rows(); ++i) out[i] = accumulate ? out[i] : A(0);
    return;
  }
  for (index_t i = 0; i < X.rows(); ++i) {
    A s(0);
    if constexpr (std::is_same_v<A, T> && (std::is_same_v<T, float> || std::is_same_v<T, double>)) {
      if (X.col_stride() == 1 && Y.col_stride() == 1) {
        using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
        s = Eigen::Map<const vec>(X.data() + i * X.row_stride(), X.cols())
                .dot(Eigen::Map<const vec>(Y.data() + i * Y.row_stride(), Y.cols()));
        out[i] = accumulate ? out[i] + s : s;
        continue;
      }
    }
    for (index_t j = 0; j < X.cols(); ++j) s += A(X(i, j)) * A(Y(i, j));
    out[i] = accumulate ? out[i] + s : s;
  }
}

}  // namespace kernels
DELTAW_NAMESPACE_END
