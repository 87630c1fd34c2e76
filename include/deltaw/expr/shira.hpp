// SPDX-License-Identifier: MIT
// SHiRA (Bhardwaj et al. 2024, "Sparse High Rank Adapters", arXiv:2406.13175; PEFT 0.21's
// `shira`): ΔW is sparse with a fixed pattern of nnz entries (PEFT: nnz = r·(out + in),
// chosen by a mask function; by default a random mask), its values the trainable vector v:
//     ΔW[rows[k], cols[k]] = s·v[k],   k < nnz        (PEFT: s = scaling, 1 by default)
// ΔW is high rank, so no low-rank trick applies; it is applied as a sparse product instead.
// The pattern is given once in PEFT's COO order (shira_indices [2, nnz]: row indices, then
// column indices) and converted once, when the update is built, into CSR (row pointers, int32
// column indices and the position of each CSR entry in v), shared between copies of the
// update. apply is 2·tokens·nnz flops; merge scatters s·v into W in place; nothing out × in is
// formed (materialize excepted). Indices must be distinct (PEFT's masks are 0/1 matrices).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "update.hpp"

DELTAW_NAMESPACE_BEGIN

/// A SHiRA sparsity pattern: PEFT's COO order and the CSR built from it once.
struct shira_pattern {
  index_t out = 0, in = 0;
  std::vector<index_t> rows, cols;      ///< COO, in v's order (PEFT's shira_indices[0], [1])
  std::vector<index_t> row_ptr;         ///< CSR: out + 1 offsets
  std::vector<std::int32_t> csr_col;    ///< CSR: column of each entry
  std::vector<index_t> csr_value;       ///< CSR: index into v of each entry
  index_t nnz() const { return index_t(rows.size()); }
};

namespace detail {
/// Builds the CSR of a SHiRA pattern [out, in] from COO indices (any integer or floating
/// type holding integers, as PEFT's int32 / Windows float32 shira_indices). index_error-like
/// argument errors name the offending entry.
template <class I>
std::shared_ptr<const shira_pattern> shira_make_pattern(index_t out, index_t in, std::span<const I> rows,
                                                        std::span<const I> cols) {
  constexpr const char* op = "deltaw::shira";
  if (out < 0 || in < 0) throw shape_error(std::string(op) + ": negative shape " + shape_str(out, in));
  if (in > index_t(std::numeric_limits<std::int32_t>::max()))
    throw shape_error(std::string(op) + ": in = " + std::to_string(in) + " exceeds the int32 column indices");
  if (rows.size() != cols.size())
    throw shape_error(std::string(op) + ": " + std::to_string(rows.size()) + " row indices but " +
                      std::to_string(cols.size()) + " column indices");
  auto p = std::make_shared<shira_pattern>();
  p->out = out;
  p->in = in;
  const std::size_t n = rows.size();
  p->rows.resize(n);
  p->cols.resize(n);
  for (std::size_t k = 0; k < n; ++k) {
    const auto as_index = [&](I v, index_t bound, const char* what) {
      const double d = double(v);
      if (!(d >= 0) || d >= double(bound) || d != double(index_t(d)))
        throw argument_error(std::string(op) + ": entry " + std::to_string(k) + " has " + what + " index " +
                             std::to_string(d) + ", outside [0, " + std::to_string(bound) + ") for ΔW " +
                             shape_str(out, in));
      return index_t(d);
    };
    p->rows[k] = as_index(rows[k], out, "row");
    p->cols[k] = as_index(cols[k], in, "column");
  }
  std::vector<index_t> order(n);
  std::iota(order.begin(), order.end(), index_t(0));
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    return p->rows[std::size_t(a)] != p->rows[std::size_t(b)] ? p->rows[std::size_t(a)] < p->rows[std::size_t(b)]
                                                              : p->cols[std::size_t(a)] < p->cols[std::size_t(b)];
  });
  p->row_ptr.assign(std::size_t(out + 1), 0);
  p->csr_col.resize(n);
  p->csr_value.resize(n);
  for (std::size_t j = 0; j < n; ++j) {
    const index_t k = order[j];
    if (j > 0 && p->rows[std::size_t(k)] == p->rows[std::size_t(order[j - 1])] &&
        p->cols[std::size_t(k)] == p->cols[std::size_t(order[j - 1])])
      throw argument_error(std::string(op) + ": the entry (" + std::to_string(p->rows[std::size_t(k)]) + ", " +
                           std::to_string(p->cols[std::size_t(k)]) + ") appears twice in the pattern (entries " +
                           std::to_string(order[j - 1]) + " and " + std::to_string(k) + ")");
    ++p->row_ptr[std::size_t(p->rows[std::size_t(k)] + 1)];
    p->csr_col[j] = std::int32_t(p->cols[std::size_t(k)]);
    p->csr_value[j] = k;
  }
  for (index_t o = 0; o < out; ++o) p->row_ptr[std::size_t(o + 1)] += p->row_ptr[std::size_t(o)];
  return p;
}
}  // namespace detail

/// SHiRA: ΔW [out, in] sparse, ΔW[rows[k], cols[k]] = s·v[k].
template <class T, class Device = device::cpu>
class shira_update {
 public:
  using value_type = T;
  using device_type = Device;
  static constexpr bool is_update = true;
  static constexpr const char* method_name = "SHiRA";

  shira_update(std::shared_ptr<const shira_pattern> p, held_vector<T, Device> v, double s)
      : P_(std::move(p)), v_(std::move(v)), s_(detail::checked_scale(s, "deltaw::shira")) {
    if (!P_) throw argument_error("deltaw::shira: no pattern");
    if (v_.view.size() != P_->nnz())
      throw shape_error("deltaw::shira: the pattern has " + std::to_string(P_->nnz()) + " entries but v has " +
                        std::to_string(v_.view.size()) + " values");
  }

  index_t rows() const { return P_->out; }
  index_t cols() const { return P_->in; }
  /// The number of stored entries (PEFT: r·(out + in)).
  index_t nnz() const { return P_->nnz(); }
  double scale() const { return s_; }
  const vector_view<const T, Device>& values() const { return v_.view; }
  const std::shared_ptr<const shira_pattern>& pattern() const { return P_; }
  template <class F>
  void for_each_operand(F&& f) const {
    f("v", v_.view);
  }

  /// nnz values.
  index_t parameter_count() const { return nnz(); }
  /// Extra flops of apply over the base GEMM: one multiply-add per entry and token.
  index_t flop_count(index_t tokens) const { return 2 * tokens * nnz(); }

 private:
  std::shared_ptr<const shira_pattern> P_;
  held_vector<T, Device> v_;
  double s_;
};

/// SHiRA over a weight [out, in] with the pattern (rows, cols) in PEFT's COO order
/// (shira_indices[0], shira_indices[1]; any integer type) and the values v (a deltaw vector
/// view or an Eigen vector, held by view or owned if a temporary): ΔW[rows[k], cols[k]] =
/// s·v[k]. The CSR is built here, once; argument_error for an index out of range or repeated.
template <class I, class VL>
auto shira(index_t out, index_t in, std::span<const I> rows, std::span<const I> cols, VL&& v,
           scale s = scale(1.0)) {
  auto hv = hold_vector(std::forward<VL>(v));
  using T = std::remove_const_t<typename decltype(hv.view)::element_type>;
  using D = typename decltype(hv.view)::device_type;
  return shira_update<T, D>(detail::shira_make_pattern(out, in, rows, cols), std::move(hv), s.value);
}
/// The same over an existing pattern (shared, not copied), e.g. new values for the same mask.
template <class VL>
auto shira(std::shared_ptr<const shira_pattern> p, VL&& v, scale s = scale(1.0)) {
  auto hv = hold_vector(std::forward<VL>(v));
  using T = std::remove_const_t<typename decltype(hv.view)::element_type>;
  using D = typename decltype(hv.view)::device_type;
  return shira_update<T, D>(std::move(p), std::move(hv), s.value);
}

DELTAW_NAMESPACE_END
