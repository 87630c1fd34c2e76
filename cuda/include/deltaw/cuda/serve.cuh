// SPDX-License-Identifier: MIT
// Heterogeneous batches on CUDA (docs/serving.md): Y = X·Wᵀ + ΔY where row t of ΔY is
// X(t, :)·ΔW_aᵀ for the adapter a = adapter_of_token[t] (none when serve::no_adapter), the
// device counterpart of deltaw/serve/batch.hpp with the same grouping, strategies and
// options. The adapter index of each token is host data (what a scheduler holds); the
// grouping (a stable counting sort, serve::group_tokens) runs on the host and its result
// reaches the device once per batch, copied into the context's scratch.
//
//   apply_lora_batch(ctx, W, adapters, adapter_of_token, X, Y[, options])
//       LoRA/rsLoRA adapters (low_rank<T, device::cuda>, or serve::sliced_lora<T,
//       device::cuda> as the CUDA pool of pool.cuh hands them out) of any ranks and scales.
//       segments (SGMV): per adapter in use, Z = X_g·Aᵀ and Y_g += s·Z·Bᵀ with cuBLAS; a
//         group of consecutive rows is read and written in place, another is gathered
//         into scratch and its result scatter-added (one thread per entry: each token
//         belongs to one group, so no two threads write one entry).
//       gather (BGMV): every token's rank-r_a intermediate in one map over Σ_t r_a(t)
//         entries (z = s·A_a·x, a dot product of length in per entry), then one map over
//         Y's entries adding B_a(o, :)·z_t: two launches per batch whatever the number of
//         adapters, nothing padded to the largest rank.
//   apply_grouped(ctx, W, updates, adapter_of_token, X, Y)
//       Any CUDA update type (or a std::variant of several): the base product once, then
//       per adapter in use its CUDA evaluator on its rows (gathered when not consecutive)
//       into a group × out scratch, scatter-added.
//
// Scratch: the token order and offsets (index_t per token), then per group at most
// group × (in + r + out) values (segments, apply_grouped) or Σ_t r_a(t) values plus one
// adapter table (gather); never out × in. Everything is issued on ctx's stream.
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include <deltaw/serve/batch.hpp>

#include "context.cuh"
#include "elementwise.cuh"
#include "evaluator.cuh"
#include "for_each.cuh"
#include "gemm.cuh"
#include "low_rank.cuh"
#include "ops.cuh"
#include "vector_ops.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda::serve {

using ::deltaw::serve::batch_options;
using ::deltaw::serve::choose_strategy;
using ::deltaw::serve::group_tokens;
using ::deltaw::serve::no_adapter;
using ::deltaw::serve::strategy;
using ::deltaw::serve::token_groups;

namespace detail {

/// Y(rows[i], j) += P(i, j): one thread per entry of P (the rows are distinct).
template <class C>
struct scatter_add_rows_fn {
  matrix_view<const C, device::cuda> P;
  matrix_view<C, device::cuda> Y;
  const index_t* rows;
  DELTAW_HOST_DEVICE void operator()(index_t k) const {
    const index_t i = k / P.cols(), j = k % P.cols();
    Y(rows[i], j) += P(i, j);
  }
};

/// One rank slice as the gather maps read it: its factors' views and its scale.
template <class T>
struct lora_entry {
  matrix_view<const T, device::cuda> B, A;
  double scale;
};

/// z[f] = s·Σ_j A(k, j)·X(t, j) for the f-th rank entry of the batch: token t = owner[f],
/// a its adapter, k = f − zoff[t] its rank index, found in a's slices
/// slices[first[a] … first[a + 1]).
template <class T, class TX, class C>
struct gather_down_fn {
  matrix_view<const TX, device::cuda> X;
  const lora_entry<T>* slices;
  const index_t* first;
  const index_t* adapter_of_token;
  const index_t* owner;
  const index_t* zoff;
  C* z;
  DELTAW_HOST_DEVICE void operator()(index_t f) const {
    const index_t t = owner[f];
    const index_t a = adapter_of_token[t];
    index_t k = f - zoff[t], i = first[a];
    while (k >= slices[i].A.rows()) k -= slices[i++].A.rows();
    const lora_entry<T>& e = slices[i];
    C s(0);
    for (index_t j = 0; j < X.cols(); ++j) s += convert<C>(e.A(k, j)) * convert<C>(X(t, j));
    z[f] = C(e.scale) * s;
  }
};

/// y(t, o) += Σ_k B_a(o, k)·z[zoff[t] + k] for the tokens with an adapter (over its slices).
template <class T, class C>
struct gather_up_fn {
  const lora_entry<T>* slices;
  const index_t* first;
  const index_t* adapter_of_token;
  const index_t* zoff;
  const C* z;
  DELTAW_HOST_DEVICE C operator()(index_t t, index_t o, C y) const {
    const index_t a = adapter_of_token[t];
    if (a < 0) return y;
    const C* zt = z + zoff[t];
    C s(0);
    for (index_t i = first[a]; i < first[a + 1]; ++i) {
      const lora_entry<T>& e = slices[i];
      for (index_t k = 0; k < e.B.cols(); ++k) s += convert<C>(e.B(o, k)) * zt[k];
      zt += e.B.cols();
    }
    return y + s;
  }
};

/// The rank slices of an adapter: one for a low_rank, its parts for a sliced_lora (the
/// CUDA pool's modules, pool.cuh).
template <class T>
std::span<const low_rank<T, device::cuda>> slices_of(const low_rank<T, device::cuda>& l) {
  return {&l, 1};
}
template <class T>
std::span<const low_rank<T, device::cuda>> slices_of(const ::deltaw::serve::sliced_lora<T, device::cuda>& l) {
  return l.parts();
}
template <class L>
inline constexpr bool is_lora_adapter = false;
template <class T>
inline constexpr bool is_lora_adapter<low_rank<T, device::cuda>> = true;
template <class T>
inline constexpr bool is_lora_adapter<::deltaw::serve::sliced_lora<T, device::cuda>> = true;

/// Shapes (batch.hpp's checks: W, X, Y, the adapters, their own weights, Y against the
/// adapters' memory), layouts, Y against X; returns the token groups.
template <class TW, class TX, class C, class U>
token_groups check_and_group(const char* op, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                             std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                             const matrix_view<C, device::cuda>& Y) {
  const matrix_view<const std::remove_const_t<TW>, device::cuda> Wc(W);
  ::deltaw::serve::detail::check_batch(op, Wc, updates, adapter_of_token, X.rows(), X.cols(), Y);
  ::deltaw::cuda::detail::check_unit_stride(W, "W", op);
  ::deltaw::cuda::detail::check_unit_stride(X, "X", op);
  ::deltaw::cuda::detail::check_unit_stride(Y, "the output", op);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "the input X", X);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "the weight W", W);
  return group_tokens(adapter_of_token, index_t(updates.size()), op);
}

}  // namespace detail

/// Y = X·Wᵀ + ΔY on ctx's stream, ΔY's row t = X(t, :)·ΔW_aᵀ for a = adapter_of_token[t]
/// (host memory; −1 for none), ΔW_a = s_a·B_a·A_a a CUDA LoRA of rank r_a: a
/// low_rank<T, device::cuda>, or a serve::sliced_lora<T, device::cuda> as the CUDA pool
/// hands out (one type per call). W [out, in] and X [tokens, in]: CUDA views of any storage
/// type; Y [tokens, out]: a writable float or double CUDA view (the arithmetic type).
/// Returns the strategy used (options.how, or the rule of
/// batch_options::segments_min_tokens). Never forms out × in.
template <class TW, class L, class TX, class C>
  requires(detail::is_lora_adapter<L>)
strategy apply_lora_batch(context& ctx, const matrix_view<TW, device::cuda>& W, std::span<const L> adapters,
                          std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                          const matrix_view<C, device::cuda>& Y, const batch_options& options = {}) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::serve::apply_lora_batch: the output is float or double (16-bit types are storage)");
  constexpr const char* op = "deltaw::cuda::serve::apply_lora_batch";
  const token_groups g = detail::check_and_group<TW, TX, C, L>(op, W, adapters, adapter_of_token, X, Y);
  const strategy how = choose_strategy(g, options);
  if (Y.rows() == 0 || Y.cols() == 0) return how;
  device_guard guard(ctx.device());
  ctx.begin_operation();
  const context& c = ctx;
  const matrix_view<const TX, device::cuda> Xc(X);
  gemm(c, Y, Xc, matrix_view<const TW, device::cuda>(W).transpose(), 1.0, 0.0, op);
  if (g.order.empty() || X.cols() == 0) return how;
  const index_t in = X.cols(), out = Y.cols();

  if (how == strategy::gather) {
    using T = typename L::value_type;
    using E = detail::lora_entry<T>;
    // The slices of every adapter, flat; adapter a's are slices[first[a] … first[a + 1]).
    std::vector<E> table;
    std::vector<index_t> first(adapters.size() + 1, 0);
    for (std::size_t a = 0; a < adapters.size(); ++a) {
      for (const auto& l : detail::slices_of(adapters[a])) table.push_back({l.B(), l.A(), l.scale()});
      first[a + 1] = index_t(table.size());
    }
    // Per token: the offset of its rank entries; per rank entry: its token.
    std::vector<index_t> zoff(std::size_t(X.rows()) + 1, 0), owner,
        aot(adapter_of_token.begin(), adapter_of_token.end());
    for (index_t t = 0; t < X.rows(); ++t) {
      const index_t a = aot[std::size_t(t)];
      const index_t r = a >= 0 ? adapters[std::size_t(a)].rank() : 0;
      zoff[std::size_t(t) + 1] = zoff[std::size_t(t)] + r;
      owner.insert(owner.end(), std::size_t(r), t);
    }
    using ::deltaw::cuda::detail::upload_to_scratch;
    const auto* dt = upload_to_scratch(c, table.data(), table.size());
    const auto* df = upload_to_scratch(c, first.data(), first.size());
    const auto* da = upload_to_scratch(c, aot.data(), aot.size());
    const auto* dz = upload_to_scratch(c, zoff.data(), zoff.size());
    const auto* dn = upload_to_scratch(c, owner.data(), owner.size());
    C* z = c.allocate<C>(std::max<std::size_t>(1, owner.size()));
    ::deltaw::cuda::detail::for_each_index(c, index_t(owner.size()),
                                           detail::gather_down_fn<T, TX, C>{Xc, dt, df, da, dn, dz, z},
                                           "deltaw::cuda::serve::apply_lora_batch (gather: z = s·A·x)");
    transform(c, Y, detail::gather_up_fn<T, C>{dt, df, da, dz, z});
    return how;
  }

  const auto* order = ::deltaw::cuda::detail::upload_to_scratch(c, g.order.data(), g.order.size());
  for (const index_t a : g.used) {
    const L& l = adapters[std::size_t(a)];
    const index_t n = g.size(a), first = g.contiguous_start(a);
    const auto mark = c.position();
    const index_t* rows = order + g.offsets[std::size_t(a)];
    matrix_view<const C, device::cuda> Xg;
    matrix_view<C, device::cuda> Yg, P;
    if (first >= 0) {  // consecutive rows: read and write in place
      Yg = Y.middle_rows(first, n);
    } else {
      const device_view<C> Xs(c.allocate<C>(std::size_t(n * in)), n, in, in, 1);
      gather_rows(c, Xc, vector_view<const index_t, device::cuda>(rows, n), Xs);
      Xg = Xs;
      P = device_view<C>(c.allocate<C>(std::size_t(n * out)), n, out, out, 1);
      Yg = P;
    }
    bool first_slice = true;
    for (const auto& sl : detail::slices_of(l)) {
      const index_t r = sl.rank();
      const auto mk = c.position();
      const device_view<C> Z(c.allocate<C>(std::size_t(n * r)), n, r, 1, std::max<index_t>(1, n));
      if (first >= 0) gemm(c, Z, Xc.middle_rows(first, n), sl.A().transpose(), 1.0, 0.0, op);
      else gemm(c, Z, Xg, sl.A().transpose(), 1.0, 0.0, op);
      // In place: accumulate into Y; gathered: the first slice writes P, the others add.
      gemm(c, Yg, device_view<const C>(Z), sl.B().transpose(), sl.scale(), first >= 0 || !first_slice ? 1.0 : 0.0, op);
      first_slice = false;
      c.release(mk);
    }
    if (first < 0)
      ::deltaw::cuda::detail::for_each_index(c, n * out, detail::scatter_add_rows_fn<C>{P, Y, rows},
                                             "deltaw::cuda::serve::apply_lora_batch (scatter-add)");
    c.release(mark);
  }
  return how;
}

/// The same with the adapters in a std::vector.
template <class TW, class L, class TX, class C>
  requires(detail::is_lora_adapter<L>)
strategy apply_lora_batch(context& ctx, const matrix_view<TW, device::cuda>& W, const std::vector<L>& adapters,
                          std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                          const matrix_view<C, device::cuda>& Y, const batch_options& options = {}) {
  return apply_lora_batch(ctx, W, std::span<const L>(adapters), adapter_of_token, X, Y, options);
}

/// Y = X·Wᵀ + ΔY for CUDA updates of any type U (or a std::variant of CUDA update types):
/// the base product once, then per adapter in use its CUDA evaluator on its tokens' rows.
/// Updates whose ΔW reads a base weight (DoRA, Bone bat) must have been built over W.
template <class TW, class U, class TX, class C>
void apply_grouped(context& ctx, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                   std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                   const matrix_view<C, device::cuda>& Y) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::serve::apply_grouped: the output is float or double (16-bit types are storage)");
  constexpr const char* op = "deltaw::cuda::serve::apply_grouped";
  const token_groups g = detail::check_and_group<TW, TX, C, U>(op, W, updates, adapter_of_token, X, Y);
  if (Y.rows() == 0 || Y.cols() == 0) return;
  device_guard guard(ctx.device());
  ctx.begin_operation();
  const context& c = ctx;
  const matrix_view<const TX, device::cuda> Xc(X);
  gemm(c, Y, Xc, matrix_view<const TW, device::cuda>(W).transpose(), 1.0, 0.0, op);
  if (g.order.empty()) return;
  const index_t in = X.cols(), out = Y.cols();
  const auto* order = ::deltaw::cuda::detail::upload_to_scratch(c, g.order.data(), g.order.size());
  for (const index_t a : g.used) {
    const index_t n = g.size(a), first = g.contiguous_start(a);
    const index_t* rows = order + g.offsets[std::size_t(a)];
    const auto mark = c.position();
    const device_view<C> Xg(c.allocate<C>(std::size_t(n * in)), n, in, in, 1);
    if (first >= 0) copy(c, Xc.middle_rows(first, n), Xg);
    else gather_rows(c, Xc, vector_view<const index_t, device::cuda>(rows, n), Xg);
    const device_view<C> P(c.allocate<C>(std::size_t(n * out)), n, out, out, 1);
    ::deltaw::serve::detail::visit_update(updates[std::size_t(a)], [&](const auto& v) {
      using V = std::remove_cvref_t<decltype(v)>;
      static_assert(std::is_same_v<device_of<V>, device::cuda>,
                    "deltaw::cuda::serve::apply_grouped: the updates must be CUDA updates (built over cuda::view)");
      evaluator<V>::template apply<C, C>(ctx, v, device_view<const C>(Xg), P, 0.0);
    });
    if (first >= 0) axpy(c, C(1), device_view<const C>(P), Y.middle_rows(first, n));
    else
      ::deltaw::cuda::detail::for_each_index(c, n * out, detail::scatter_add_rows_fn<C>{P, Y, rows},
                                             "deltaw::cuda::serve::apply_grouped (scatter-add)");
    c.release(mark);
  }
}

/// The same with the updates in a std::vector.
template <class TW, class U, class TX, class C>
void apply_grouped(context& ctx, const matrix_view<TW, device::cuda>& W, const std::vector<U>& updates,
                   std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                   const matrix_view<C, device::cuda>& Y) {
  apply_grouped(ctx, W, std::span<const U>(updates), adapter_of_token, X, Y);
}

}  // namespace cuda::serve
DELTAW_NAMESPACE_END
