// SPDX-License-Identifier: MIT
// Heterogeneous batches: Y = X·Wᵀ + ΔY where every token (row of X) names its own adapter
// (or none). LoRA adapters of different ranks and scales are applied without padding to the
// largest rank, by one of two strategies:
//
//   segments  tokens sorted (a stable counting sort) into one group per adapter; per group
//             Z = s·X_g·Aᵀ and Y_g += Z·Bᵀ, two GEMMs of the primitive layer (S-LoRA/Punica's
//             SGMV). Weights are read once per group: wins when groups are large.
//   gather    per token, z = s·A_a·x and y += B_a·z (matrix-vector products; Punica's BGMV):
//             no packing and no per-group GEMM set-up: wins when most adapters see a token
//             or two (decode with many distinct adapters).
//
// `strategy::automatic` picks segments when the mean number of tokens per adapter in use is
// at least batch_options::segments_min_tokens (docs/serving.md gives the measurement behind
// the default). Both strategies use every core: the base GEMM and large group GEMMs through
// Eigen's OpenMP split, many groups (or the tokens of gather) split over OpenMP threads.
//
// Every other update type goes through apply_grouped: the base product once for all tokens,
// then each adapter's deltaw::apply on the rows of its group, scatter-added.
#pragma once

#include <algorithm>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "../core/parallel.hpp"
#include "../deltaw.hpp"

DELTAW_NAMESPACE_BEGIN
namespace serve {

/// The adapter index of a token that uses the base weight only.
inline constexpr index_t no_adapter = -1;

/// How apply_lora_batch applies the adapters.
enum class strategy : unsigned char { automatic, segments, gather };

inline const char* strategy_name(strategy s) {
  return s == strategy::segments ? "segments" : s == strategy::gather ? "gather" : "automatic";
}

/// A LoRA update ΔW = s·Σ_i B_i·A_i held as rank slices (B_i [out, r_i], A_i [r_i, in]):
/// how the adapter pool (pool.hpp) hands out an adapter whose rank vectors live in
/// several pages. Equal to one low_rank of rank Σ r_i with B = [B_1 … B_n], A = [A_1; …].
/// D: the device of the slices (device::cuda for the CUDA pool's mirror, cuda/serve.cuh).
template <class T, class D = device::cpu>
class sliced_lora {
 public:
  using value_type = T;
  using device_type = D;
  sliced_lora() = default;
  explicit sliced_lora(std::vector<low_rank<T, D>> parts) : parts_(std::move(parts)) {
    if (parts_.empty()) throw argument_error("deltaw::serve::sliced_lora: no slices (a LoRA has rank ≥ 1)");
    for (const auto& p : parts_) {
      if (p.rows() != parts_[0].rows() || p.cols() != parts_[0].cols())
        throw shape_error("deltaw::serve::sliced_lora: a slice is " + deltaw::detail::shape_str(p.rows(), p.cols()) +
                          " but the first is " + deltaw::detail::shape_str(parts_[0].rows(), parts_[0].cols()));
      if (p.scale() != parts_[0].scale())
        throw argument_error("deltaw::serve::sliced_lora: the slices of one adapter share its scale; got " +
                             std::to_string(p.scale()) + " and " + std::to_string(parts_[0].scale()));
      rank_ += p.rank();
    }
  }
  index_t rows() const { return parts_.empty() ? 0 : parts_[0].rows(); }
  index_t cols() const { return parts_.empty() ? 0 : parts_[0].cols(); }
  index_t rank() const { return rank_; }
  double scale() const { return parts_.empty() ? 0.0 : parts_[0].scale(); }
  const std::vector<low_rank<T, D>>& parts() const { return parts_; }
  template <class F>
  void for_each_operand(F&& f) const {
    for (const auto& p : parts_) p.for_each_operand(f);
  }

 private:
  std::vector<low_rank<T, D>> parts_;
  index_t rank_ = 0;
};

/// Options of the batch operations.
struct batch_options {
  strategy how = strategy::automatic;
  /// automatic: segments when (tokens with an adapter) / (adapters in use) is at least this.
  /// The default is the crossover measured by bench_serve (docs/serving.md, "Choosing").
  double segments_min_tokens = 6.0;
  /// Split many small groups (segments, apply_grouped) or the tokens (gather) over OpenMP
  /// threads; off runs the loop on the calling thread (GEMMs still split internally).
  bool parallel = true;
};

/// Tokens grouped by adapter: a stable counting sort of the tokens that use one.
struct token_groups {
  /// Token indices sorted by adapter, in their original order within an adapter.
  std::vector<index_t> order;
  /// Adapter a's tokens are order[offsets[a] … offsets[a + 1]); size adapters + 1.
  std::vector<index_t> offsets;
  /// The adapters with at least one token, in increasing order.
  std::vector<index_t> used;

  index_t adapter_count() const { return index_t(offsets.size()) - 1; }
  index_t tokens_adapted() const { return index_t(order.size()); }
  index_t size(index_t a) const { return offsets[std::size_t(a) + 1] - offsets[std::size_t(a)]; }
  std::span<const index_t> tokens(index_t a) const {
    return std::span<const index_t>(order).subspan(std::size_t(offsets[std::size_t(a)]), std::size_t(size(a)));
  }
  /// The first token of a's group when its tokens are consecutive rows of X, else −1.
  index_t contiguous_start(index_t a) const {
    const auto t = tokens(a);
    if (t.empty()) return -1;
    return t.back() - t.front() + 1 == index_t(t.size()) ? t.front() : -1;
  }
  /// Mean tokens per adapter in use (0 when no token has one).
  double mean_group_size() const { return used.empty() ? 0.0 : double(order.size()) / double(used.size()); }
};

/// Groups tokens by adapter. argument_error names the token whose index is outside
/// [−1, adapter_count).
inline token_groups group_tokens(std::span<const index_t> adapter_of_token, index_t adapter_count,
                                 const char* op = "deltaw::serve::group_tokens") {
  token_groups g;
  g.offsets.assign(std::size_t(adapter_count) + 1, 0);
  for (std::size_t t = 0; t < adapter_of_token.size(); ++t) {
    const index_t a = adapter_of_token[t];
    if (a < -1 || a >= adapter_count)
      throw argument_error(std::string(op) + ": token " + std::to_string(t) + " names adapter " + std::to_string(a) +
                           " but the batch has " + std::to_string(adapter_count) +
                           " adapters (valid: 0 … n − 1, or −1 for none)");
    if (a >= 0) ++g.offsets[std::size_t(a) + 1];
  }
  for (index_t a = 0; a < adapter_count; ++a) {
    if (g.offsets[std::size_t(a) + 1] > 0) g.used.push_back(a);
    g.offsets[std::size_t(a) + 1] += g.offsets[std::size_t(a)];
  }
  g.order.resize(std::size_t(g.offsets.back()));
  std::vector<index_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (std::size_t t = 0; t < adapter_of_token.size(); ++t)
    if (const index_t a = adapter_of_token[t]; a >= 0) g.order[std::size_t(next[std::size_t(a)]++)] = index_t(t);
  return g;
}

/// The strategy automatic picks for these groups.
inline strategy choose_strategy(const token_groups& g, const batch_options& o = {}) {
  if (o.how != strategy::automatic) return o.how;
  return g.mean_group_size() >= o.segments_min_tokens ? strategy::segments : strategy::gather;
}

namespace detail {

using deltaw::detail::max_threads;
using deltaw::detail::parallel_for;

/// y += α·M·x for a BLAS-compatible M (rows contiguous or columns contiguous) and strided
/// vectors x, y (Eigen's matrix-vector kernels).
template <class C>
void gemv_add(C alpha, const matrix_view<const C>& M, const C* x, index_t incx, C* y, index_t incy) {
  using Vec = Eigen::Matrix<C, Eigen::Dynamic, 1>;
  const Eigen::Map<const Vec, 0, Eigen::InnerStride<>> xv(x, M.cols(), Eigen::InnerStride<>(incx));
  Eigen::Map<Vec, 0, Eigen::InnerStride<>> yv(y, M.rows(), Eigen::InnerStride<>(incy));
  if (M.rows() == 0 || M.cols() == 0) return;
#if defined(EIGEN_USE_BLAS)
  // Eigen's own kernels rather than the BLAS ones EIGEN_USE_BLAS routes matrix-vector products
  // to: an adapter's products are small and many, and a BLAS call's set-up costs more than the
  // product (bench_serve_regimes_blas against bench_serve_regimes).
  {
    using Eigen::Index;
    using Eigen::internal::const_blas_data_mapper;
    using Eigen::internal::general_matrix_vector_product;
    using RowMapper = const_blas_data_mapper<C, Index, Eigen::RowMajor>;
    using ColMapper = const_blas_data_mapper<C, Index, Eigen::ColMajor>;
    if ((M.col_stride() == 1 || M.cols() == 1) && incx == 1) {
      general_matrix_vector_product<Index, C, RowMapper, Eigen::RowMajor, false, C, ColMapper, false, Eigen::BuiltIn>::run(
          M.rows(), M.cols(), RowMapper(M.data(), std::max<index_t>(M.row_stride(), M.cols())), ColMapper(x, 1), y,
          incy, alpha);
      return;
    }
    if (M.col_stride() != 1 && M.cols() != 1 && incy == 1) {
      general_matrix_vector_product<Index, C, ColMapper, Eigen::ColMajor, false, C, RowMapper, false, Eigen::BuiltIn>::run(
          M.rows(), M.cols(), ColMapper(M.data(), std::max<index_t>(M.col_stride(), M.rows())), RowMapper(x, incx), y, 1,
          alpha);
      return;
    }
  }
#endif
  if (M.col_stride() == 1 || M.cols() == 1) {
    using RM = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const Eigen::Map<const RM, 0, Eigen::OuterStride<>> m(M.data(), M.rows(), M.cols(),
                                                         Eigen::OuterStride<>(std::max<index_t>(M.row_stride(), M.cols())));
    yv.noalias() += alpha * (m * xv);
  } else {
    using CM = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
    const Eigen::Map<const CM, 0, Eigen::OuterStride<>> m(M.data(), M.rows(), M.cols(),
                                                         Eigen::OuterStride<>(std::max<index_t>(M.col_stride(), M.rows())));
    yv.noalias() += alpha * (m * xv);
  }
}

template <class T>
std::span<const low_rank<T>> slices_of(const sliced_lora<T>& u) {
  return std::span<const low_rank<T>>(u.parts());
}

/// The factors of one adapter as operands in arithmetic type C (zero-copy when they are
/// BLAS-compatible C already).
template <class C>
struct lora_operands {
  kernels::operand<C> B, A;
  C s;
  template <class T>
  lora_operands(const kernels::cpu_context& ctx, const low_rank<T>& u) : B(ctx, u.B()), A(ctx, u.A()), s(C(u.scale())) {}
};

template <class L>
inline constexpr bool is_lora_adapter = false;
template <class T>
inline constexpr bool is_lora_adapter<low_rank<T, device::cpu>> = true;
template <class T>
inline constexpr bool is_lora_adapter<sliced_lora<T>> = true;

template <class U>
struct is_variant : std::false_type {};
template <class... Us>
struct is_variant<std::variant<Us...>> : std::true_type {};

/// f(u) for an update, or for the alternative a std::variant of updates holds.
template <class U, class F>
void visit_update(const U& u, F&& f) {
  if constexpr (is_variant<U>::value) std::visit(std::forward<F>(f), u);
  else f(u);
}

/// Shape and aliasing checks shared by the batch operations (also the CUDA ones:
/// cuda/include/deltaw/cuda/serve.cuh).
template <class U, class TW, class C, class D>
void check_batch(const char* op, const matrix_view<const TW, D>& W, std::span<const U> adapters,
                 std::span<const index_t> adapter_of_token, index_t x_rows, index_t x_cols,
                 const matrix_view<C, D>& Y) {
  if (x_cols != W.cols())
    throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(x_rows, x_cols) + " but W is " +
                      deltaw::detail::shape_str(W.rows(), W.cols()) + "; X·Wᵀ needs X to have " +
                      std::to_string(W.cols()) + " columns");
  if (Y.rows() != x_rows || Y.cols() != W.rows())
    throw shape_error(std::string(op) + ": the output is " + deltaw::detail::shape_str(Y.rows(), Y.cols()) +
                      " but X·Wᵀ is " + deltaw::detail::shape_str(x_rows, W.rows()));
  if (index_t(adapter_of_token.size()) != x_rows)
    throw shape_error(std::string(op) + ": " + std::to_string(adapter_of_token.size()) +
                      " adapter indices for X with " + std::to_string(x_rows) + " tokens (one index per row of X)");
  for (std::size_t a = 0; a < adapters.size(); ++a) {
    auto check_one = [&](const auto& u) {
      if (u.rows() != W.rows() || u.cols() != W.cols())
        throw shape_error(std::string(op) + ": adapter " + std::to_string(a) + " is " +
                          deltaw::detail::shape_str(u.rows(), u.cols()) + " but W is " +
                          deltaw::detail::shape_str(W.rows(), W.cols()));
      if constexpr (requires { u.W(); }) {
        if (!same_view(u.W(), W))
          throw argument_error(std::string(op) + ": adapter " + std::to_string(a) +
                               " reads its own base weight (DoRA, Bone bat, IA³, OFT, HRA) and was built over "
                               "another view than this batch's W");
      }
      deltaw::detail::check_update_no_overlap(op, "the output Y", Y, u, true);
    };
    visit_update(adapters[a], check_one);
  }
}

/// The rows `rows` of X as a dense C matrix (a view when they are consecutive).
template <class C>
struct group_rows {
  kernels::scratch<C> copy;
  matrix_view<const C> view;
  group_rows(const kernels::cpu_context& ctx, const matrix_view<const C>& X, std::span<const index_t> rows,
             index_t start) {
    if (start >= 0) {
      view = X.middle_rows(start, index_t(rows.size()));
    } else {
      copy = kernels::make_scratch<C>(ctx, index_t(rows.size()), X.cols());
      kernels::gather_rows(ctx, X, rows, copy.view());
      view = copy.cview();
    }
  }
};

/// The rank slices of an adapter: one for a low_rank, its parts for a sliced_lora.
template <class T>
std::span<const low_rank<T>> slices_of(const low_rank<T>& u) {
  return std::span<const low_rank<T>>(&u, 1);
}

/// An adapter's slices as operands in arithmetic type C, with each slice's first column
/// in the adapter's rank-r intermediate.
template <class C>
struct slice_operands {
  std::vector<kernels::operand<C>> B, A;
  std::vector<index_t> offset;
  index_t rank = 0;
  C s = C(0);
  template <class T>
  slice_operands(const kernels::cpu_context& ctx, std::span<const low_rank<T>> parts) {
    B.reserve(parts.size());  // no reallocation: an operand may view its own copy
    A.reserve(parts.size());
    for (const auto& p : parts) {
      B.emplace_back(ctx, p.B());
      A.emplace_back(ctx, p.A());
      offset.push_back(rank);
      rank += p.rank();
      s = C(p.scale());
    }
  }
};

/// ΔY for LoRA adapters, segments: per adapter in use, Z = s·X_g·Aᵀ then Y_g += Z·Bᵀ (one
/// pair of GEMMs per rank slice).
template <class C, class L>
void lora_segments(const kernels::cpu_context& ctx, std::span<const L> adapters, const token_groups& g,
                   const matrix_view<const C>& X, const matrix_view<C>& Y, bool parallel) {
  using enum kernels::op;
  const index_t n = index_t(g.used.size());
  // Few groups: one after the other, each GEMM split by Eigen. Many: groups over threads.
  const bool over_groups = parallel && n >= 2 * max_threads(parallel);
  parallel_for(n, over_groups, [&](index_t i) {
    const index_t a = g.used[std::size_t(i)];
    const slice_operands<C> f(ctx, slices_of(adapters[std::size_t(a)]));
    const auto rows = g.tokens(a);
    const index_t m = index_t(rows.size()), start = g.contiguous_start(a);
    const group_rows<C> Xg(ctx, X, rows, start);
    auto Z = kernels::make_scratch<C>(ctx, m, f.rank);
    for (std::size_t k = 0; k < f.A.size(); ++k)
      gemm<C>(ctx, f.s, Xg.view, none, f.A[k], trans, C(0), Z.view().middle_cols(f.offset[k], f.A[k].rows()));
    kernels::scratch<C> D;
    matrix_view<C> out = start >= 0 ? Y.middle_rows(start, m) : matrix_view<C>();
    if (start < 0) {
      D = kernels::make_scratch<C>(ctx, m, Y.cols());
      out = D.view();
    }
    for (std::size_t k = 0; k < f.B.size(); ++k)
      gemm<C>(ctx, C(1), Z.cview().middle_cols(f.offset[k], f.B[k].cols()), none, f.B[k], trans,
              start >= 0 || k > 0 ? C(1) : C(0), out);
    if (start < 0) kernels::scatter_add_rows<C>(ctx, C(1), D.cview(), rows, Y);
  });
}

/// y_j += α·M·x_j for the vectors j = 0 … m − 1 (x_j = x_of(j), y_j = y_of(j)), with M read
/// from memory once: M is cut along its strided dimension into slabs of about
/// slab_bytes, and each slab is applied to every vector while it sits in cache. With one
/// vector, one matrix-vector product over M.
template <class C, class XOf, class YOf>
void gemv_add_many(C alpha, const matrix_view<const C>& M, index_t m, XOf&& x_of, index_t incx, YOf&& y_of,
                   index_t incy, std::size_t slab_bytes = std::size_t(128) << 10) {
  if (m == 1 || M.rows() == 0 || M.cols() == 0) {
    for (index_t j = 0; j < m; ++j) gemv_add<C>(alpha, M, x_of(j), incx, y_of(j), incy);
    return;
  }
  if (M.col_stride() == 1 || M.cols() == 1) {  // rows contiguous: slabs of rows, y offset
    const index_t step = std::max<index_t>(1, index_t(slab_bytes / (sizeof(C) * std::size_t(M.cols()))));
    for (index_t r0 = 0; r0 < M.rows(); r0 += step) {
      const auto S = M.middle_rows(r0, std::min(step, M.rows() - r0));
      for (index_t j = 0; j < m; ++j) gemv_add<C>(alpha, S, x_of(j), incx, y_of(j) + r0 * incy, incy);
    }
  } else {  // columns contiguous: slabs of columns, x offset
    const index_t step = std::max<index_t>(1, index_t(slab_bytes / (sizeof(C) * std::size_t(M.rows()))));
    for (index_t c0 = 0; c0 < M.cols(); c0 += step) {
      const auto S = M.middle_cols(c0, std::min(step, M.cols() - c0));
      for (index_t j = 0; j < m; ++j) gemv_add<C>(alpha, S, x_of(j) + c0 * incx, incx, y_of(j), incy);
    }
  }
}

/// ΔY for LoRA adapters, gather: per token, z = s·A·x and y += B·z as matrix-vector
/// products. The tokens of one adapter are taken together (gemv_add_many): its A and B
/// are read from memory once per piece of its group, not once per token.
template <class C, class L>
void lora_gather(const kernels::cpu_context& ctx, std::span<const L> adapters, const token_groups& g,
                 const matrix_view<const C>& X, const matrix_view<C>& Y, bool parallel) {
  // Operands once per adapter in use (conversions happen here, not per token).
  std::vector<std::unique_ptr<slice_operands<C>>> ops(adapters.size());
  for (const index_t a : g.used)
    ops[std::size_t(a)] = std::make_unique<slice_operands<C>>(ctx, slices_of(adapters[std::size_t(a)]));
  // Work items: an adapter's tokens (positions in g.order), cut into pieces of at most
  // `piece` tokens so that one popular adapter does not serialise the threads.
  const int threads = max_threads(parallel);
  const index_t piece =
      std::max<index_t>(1, threads > 1 ? (g.tokens_adapted() + 4 * threads - 1) / (4 * threads) : g.tokens_adapted());
  struct item {
    index_t adapter, begin, end;
  };
  std::vector<item> items;
  for (const index_t a : g.used)
    for (index_t k = g.offsets[std::size_t(a)]; k < g.offsets[std::size_t(a) + 1]; k += piece)
      items.push_back({a, k, std::min(k + piece, g.offsets[std::size_t(a) + 1])});
  parallel_for(index_t(items.size()), parallel, [&](index_t i) {
    const item it = items[std::size_t(i)];
    const auto& f = *ops[std::size_t(it.adapter)];
    const index_t m = it.end - it.begin;
    std::vector<C> Z(std::size_t(m * f.rank), C(0));  // token j's intermediate: Z[j·rank …]
    const index_t* tok = g.order.data() + it.begin;
    const auto x_of = [&](index_t j) { return X.data() + tok[j] * X.row_stride(); };
    const auto y_of = [&](index_t j) { return Y.data() + tok[j] * Y.row_stride(); };
    for (std::size_t p = 0; p < f.A.size(); ++p) {
      const index_t off = f.offset[p];
      gemv_add_many<C>(f.s, f.A[p].view(), m, x_of, X.col_stride(),
                       [&](index_t j) { return Z.data() + j * f.rank + off; }, 1);
    }
    for (std::size_t p = 0; p < f.B.size(); ++p) {
      const index_t off = f.offset[p];
      gemv_add_many<C>(C(1), f.B[p].view(), m, [&](index_t j) -> const C* { return Z.data() + j * f.rank + off; }, 1,
                       y_of, Y.col_stride());
    }
  });
}

template <class XL>
auto batch_input_view(const XL& X) {
  auto v = view(X);
  static_assert(std::same_as<typename decltype(v)::device_type, device::cpu>, "deltaw::serve: CPU views only");
  using T = std::remove_const_t<typename decltype(v)::element_type>;
  return matrix_view<const T>(v);
}

}  // namespace detail

/// Y = X·Wᵀ + ΔY, ΔY's row t = X(t, :)·ΔW_aᵀ for the adapter a = adapter_of_token[t]
/// (none when −1), with ΔW_a = s_a·B_a·A_a of rank r_a (a low_rank<T>, or a sliced_lora<T>
/// as the pool hands out; one type per call). W [out, in], X [tokens, in], Y
/// [tokens, out] (caller-provided; float or double, the arithmetic type). Returns the
/// strategy used. Never forms out × in; scratch is at most one group's tokens × out.
template <class WL, class L, class XL, class YL>
  requires(detail::is_lora_adapter<L>)
strategy apply_lora_batch(const WL& W, std::span<const L> adapters, std::span<const index_t> adapter_of_token,
                          const XL& X, YL&& Y, const batch_options& options = {}) {
  constexpr const char* op = "deltaw::serve::apply_lora_batch";
  const auto Wv = detail::batch_input_view(W);
  const auto Xv = detail::batch_input_view(X);
  auto Yv = deltaw::detail::cpu_output_view(std::forward<YL>(Y), op);
  using C = std::remove_const_t<typename decltype(Yv)::element_type>;
  detail::check_batch<L>(op, Wv, adapters, adapter_of_token, Xv.rows(), Xv.cols(), Yv);
  deltaw::detail::check_no_overlap(op, "the output Y", Yv, "the input X", Xv);
  deltaw::detail::check_no_overlap(op, "the output Y", Yv, "the weight W", Wv);
  const token_groups g = group_tokens(adapter_of_token, index_t(adapters.size()), op);
  const strategy s = choose_strategy(g, options);
  cpu::with_views<C>(Xv, Yv, [&](const kernels::cpu_context& ctx, const cpu::cview<C>& Xm, const cpu::mview<C>& Ym) {
    cpu::base_apply<C>(ctx, Wv, Xm, Ym);
    if (g.used.empty()) return;
    if (s == strategy::segments) detail::lora_segments<C, L>(ctx, adapters, g, Xm, Ym, options.parallel);
    else detail::lora_gather<C, L>(ctx, adapters, g, Xm, Ym, options.parallel);
  });
  return s;
}

/// The same with the adapters in a std::vector.
template <class WL, class L, class XL, class YL>
  requires(detail::is_lora_adapter<L>)
strategy apply_lora_batch(const WL& W, const std::vector<L>& adapters, std::span<const index_t> adapter_of_token,
                          const XL& X, YL&& Y, const batch_options& options = {}) {
  return apply_lora_batch(W, std::span<const L>(adapters), adapter_of_token, X, std::forward<YL>(Y), options);
}

/// Y = X·Wᵀ + ΔY for updates of any type (or a std::variant of update types, e.g.
/// io::peft_update<TW>::variant_type): the base product once, then each adapter in use
/// applies its ΔW with deltaw::apply to its group's rows, added into those rows. Updates
/// whose ΔW reads a base weight (DoRA, Bone bat, IA³, OFT, HRA) must have been built over
/// this W. Groups run over OpenMP threads when there are many.
template <class WL, class U, class XL, class YL>
void apply_grouped(const WL& W, std::span<const U> updates, std::span<const index_t> adapter_of_token, const XL& X,
                   YL&& Y, const batch_options& options = {}) {
  constexpr const char* op = "deltaw::serve::apply_grouped";
  const auto Wv = detail::batch_input_view(W);
  const auto Xv = detail::batch_input_view(X);
  auto Yv = deltaw::detail::cpu_output_view(std::forward<YL>(Y), op);
  using C = std::remove_const_t<typename decltype(Yv)::element_type>;
  detail::check_batch<U>(op, Wv, updates, adapter_of_token, Xv.rows(), Xv.cols(), Yv);
  deltaw::detail::check_no_overlap(op, "the output Y", Yv, "the input X", Xv);
  deltaw::detail::check_no_overlap(op, "the output Y", Yv, "the weight W", Wv);
  const token_groups g = group_tokens(adapter_of_token, index_t(updates.size()), op);
  cpu::with_views<C>(Xv, Yv, [&](const kernels::cpu_context& ctx, const cpu::cview<C>& Xm, const cpu::mview<C>& Ym) {
    cpu::base_apply<C>(ctx, Wv, Xm, Ym);
    const index_t n = index_t(g.used.size());
    const bool over_groups = options.parallel && n >= 2 * detail::max_threads(options.parallel);
    detail::parallel_for(n, over_groups, [&](index_t i) {
      const index_t a = g.used[std::size_t(i)];
      const auto rows = g.tokens(a);
      const detail::group_rows<C> Xg(ctx, Xm, rows, g.contiguous_start(a));
      auto D = kernels::make_scratch<C>(ctx, index_t(rows.size()), Ym.cols());
      detail::visit_update(updates[std::size_t(a)], [&](const auto& u) { deltaw::apply(u, Xg.view, D.view()); });
      kernels::scatter_add_rows<C>(ctx, C(1), D.cview(), rows, Ym);
    });
  });
}

/// The same with the updates in a std::vector.
template <class WL, class U, class XL, class YL>
void apply_grouped(const WL& W, const std::vector<U>& updates, std::span<const index_t> adapter_of_token, const XL& X,
                   YL&& Y, const batch_options& options = {}) {
  apply_grouped(W, std::span<const U>(updates), adapter_of_token, X, std::forward<YL>(Y), options);
}

}  // namespace serve
DELTAW_NAMESPACE_END
