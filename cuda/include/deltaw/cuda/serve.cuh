// SPDX-License-Identifier: MIT
// Heterogeneous batches on CUDA (docs/serving.md): Y = X·Wᵀ + ΔY where row t of ΔY is
// X(t, :)·ΔW_aᵀ for the adapter a = adapter_of_token[t] (none when serve::no_adapter), the
// device counterpart of deltaw/serve/batch.hpp with the same grouping, strategies and
// options. The adapter index of each token is either host data (what a CPU scheduler
// holds: grouped on the host by serve::group_tokens, the result copied into the context's
// scratch once per batch) or device memory (what a GPU scheduler holds: checked and
// grouped on the device, see "Device-side grouping" below).
//
//   apply_lora_batch(ctx, W, adapters, adapter_of_token, X, Y[, options])
//       LoRA/rsLoRA adapters (low_rank<T, device::cuda>, or serve::sliced_lora<T,
//       device::cuda> as the CUDA pool of pool.cuh hands them out) of any ranks and scales.
//       segments (SGMV), with grouped GEMMs: the rows of the groups that are not
//         consecutive rows of X are gathered once into one scratch matrix Xs (all groups'
//         rows when X's type is not the output's); ONE cublas<t>gemmGroupedBatched call
//         computes every shrink product Z_g,i = X_g·A_g,iᵀ (one problem per rank slice i
//         of adapter g, each writing its own column block of the group's Z_g), then ONE
//         call per wave k computes the expand products Y_g += s_g·Z_g,k·B_g,kᵀ of the k-th
//         slices of all adapters (s_g in α; wave 0 writes a gathered group's rows of the
//         scratch P with β = 0, consecutive groups accumulate into Y in place with β = 1,
//         later waves β = 1): no two problems of one call write the same memory. P's rows
//         are scatter-added into Y in one map. Launches per batch: 1 + waves GEMM calls
//         (waves = the most slices of an adapter; 1 for low_rank), whatever the number of
//         adapters, plus the gather and the scatter-add. Adapters whose element type is not
//         the output's (bf16 factors, say) take the per-adapter loop instead: two
//         converting GEMMs per slice (cuBLAS's grouped call has no mixed types).
//       gather (BGMV): every token's rank-r_a intermediate in one map over Σ_t r_a(t)
//         entries (z = s·A_a·x, a dot product of length in per entry; the entry's token
//         found by binary search over the per-token offsets), then one map over Y's
//         entries adding B_a(o, :)·z_t: two launches per batch whatever the number of
//         adapters, nothing padded to the largest rank.
//   apply_grouped(ctx, W, updates, adapter_of_token, X, Y)
//       Any CUDA update type (or a std::variant of several): the base product once, then
//       per adapter in use its CUDA evaluator on its rows (gathered when not consecutive)
//       into a group × out scratch, scatter-added.
//
// Device-side grouping (the overloads taking adapter_of_token as a
// vector_view<const index_t, device::cuda>): the indices are copied into scratch as sort
// keys and the token indices stably sorted by them (Thrust stable_sort_by_key, so each
// group keeps its tokens in their order); one map finds every adapter's first position
// by binary search and the smallest and largest key, and those N + 3 values are the
// only download (one synchronisation): a key outside [−1, N) fails the batch with the
// host overload's argument_error (the first such token and its index are then located
// on the device and read). Segments and apply_grouped then run as above with every group
// gathered (contiguity is not known on the host). The gather strategy chosen explicitly
// sorts nothing: one transform-reduce checks the indices and sums the ranks (one
// synchronisation, for the size of z), a chunked scan (three maps) forms the per-token
// offsets; no per-token value is read on the host. strategy::automatic needs the group
// sizes, so it sorts first.
//
// Scratch: the token order (index_t per token; device grouping: two such arrays), then
// at most tokens × (in + out) values for the gathered rows and their results, Σ_g n_g·r_g
// values for Z (segments, at most tokens × the largest rank) and three pointers per GEMM
// problem; per group at most group × (in + out) (apply_grouped, the per-adapter loop);
// Σ_t r_a(t) values plus the adapter table (gather). Never out × in. Everything is issued
// on ctx's stream.
#pragma once

#include <thrust/iterator/counting_iterator.h>
#include <thrust/sort.h>
#include <thrust/system_error.h>
#include <thrust/transform_reduce.h>

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
#include "primitives.cuh"
#include "vector_ops.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda::serve {

using ::deltaw::serve::batch_options;
using ::deltaw::serve::choose_strategy;
using ::deltaw::serve::group_tokens;
using ::deltaw::serve::no_adapter;
using ::deltaw::serve::strategy;
using ::deltaw::serve::token_groups;

/// Adapter indices in device memory, one per token (serve::no_adapter for none).
using device_indices = vector_view<const index_t, device::cuda>;

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

/// z[f] = s·Σ_j A(k, j)·X(t, j) for the f-th rank entry of the batch: its token t is the
/// one with zoff[t] ≤ f < zoff[t + 1] (binary search over the tokens + 1 offsets), a its
/// adapter, k = f − zoff[t] its rank index, found in a's slices slices[first[a] … first[a + 1]).
template <class T, class TX, class C>
struct gather_down_fn {
  matrix_view<const TX, device::cuda> X;
  const lora_entry<T>* slices;
  const index_t* first;
  vector_view<const index_t, device::cuda> adapter_of_token;
  const index_t* zoff;
  C* z;
  DELTAW_HOST_DEVICE void operator()(index_t f) const {
    index_t lo = 0, hi = X.rows();  // zoff[lo] ≤ f < zoff[hi]
    while (hi - lo > 1) {
      const index_t mid = lo + (hi - lo) / 2;
      if (zoff[mid] <= f) lo = mid;
      else hi = mid;
    }
    const index_t t = lo;
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
  vector_view<const index_t, device::cuda> adapter_of_token;
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
/// adapters' memory; `tokens_indexed` adapter indices), layouts, Y against X and W.
template <class TW, class TX, class C, class U>
void check_views(const char* op, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                 std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                 const matrix_view<C, device::cuda>& Y) {
  const matrix_view<const std::remove_const_t<TW>, device::cuda> Wc(W);
  ::deltaw::serve::detail::check_batch(op, Wc, updates, adapter_of_token, X.rows(), X.cols(), Y);
  ::deltaw::cuda::detail::check_unit_stride(W, "W", op);
  ::deltaw::cuda::detail::check_unit_stride(X, "X", op);
  ::deltaw::cuda::detail::check_unit_stride(Y, "the output", op);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "the input X", X);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "the weight W", W);
}

/// The checks, then the token groups (host indices).
template <class TW, class TX, class C, class U>
token_groups check_and_group(const char* op, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                             std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                             const matrix_view<C, device::cuda>& Y) {
  check_views<TW, TX, C, U>(op, W, updates, adapter_of_token, X, Y);
  return group_tokens(adapter_of_token, index_t(updates.size()), op);
}

/// The checks for device indices: the same as the host overload's (check_batch reads only
/// the number of indices, through a span over the device pointer that is never
/// dereferenced), plus Y against the indices.
template <class TW, class TX, class C, class U>
void check_device_batch(const char* op, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                        const device_indices& adapter_of_token, const matrix_view<TX, device::cuda>& X,
                        const matrix_view<C, device::cuda>& Y) {
  check_views<TW, TX, C, U>(op, W, updates,
                            std::span<const index_t>(adapter_of_token.data(), std::size_t(adapter_of_token.size())),
                            X, Y);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "adapter_of_token", adapter_of_token);
}

// ---- device-side grouping ---------------------------------------------------------------

/// keys[t] = adapter_of_token[t], tokens[t] = t.
struct sort_keys_fn {
  vector_view<const index_t, device::cuda> aot;
  index_t* keys;
  index_t* tokens;
  DELTAW_HOST_DEVICE void operator()(index_t t) const {
    keys[t] = aot[t];
    tokens[t] = t;
  }
};

/// Over the sorted keys: out[a] = the first position with key ≥ a for a = 0 … N (binary
/// search), out[N + 1] = the smallest key, out[N + 2] = the largest.
struct group_bounds_fn {
  const index_t* keys;
  index_t n, adapters;
  index_t* out;
  DELTAW_HOST_DEVICE void operator()(index_t a) const {
    if (a == adapters + 1) {
      out[a] = keys[0];
    } else if (a == adapters + 2) {
      out[a] = keys[n - 1];
    } else {
      index_t lo = 0, hi = n;
      while (lo < hi) {
        const index_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < a) lo = mid + 1;
        else hi = mid;
      }
      out[a] = lo;
    }
  }
};

/// The first token whose index is outside [−1, N) (reduced by minimum; `tokens` when none),
/// and the sum of the ranks of the tokens' adapters (rank[a] per adapter).
struct token_stats {
  index_t first_bad, ranks;
};
struct token_stats_fn {
  vector_view<const index_t, device::cuda> aot;
  const index_t* rank;  // null: ranks not summed
  index_t adapters;
  DELTAW_HOST_DEVICE token_stats operator()(index_t t) const {
    const index_t a = aot[t];
    if (a < -1 || a >= adapters) return {t, 0};
    return {aot.size(), a >= 0 && rank != nullptr ? rank[a] : 0};
  }
};
struct combine_token_stats {
  DELTAW_HOST_DEVICE token_stats operator()(const token_stats& x, const token_stats& y) const {
    return {x.first_bad < y.first_bad ? x.first_bad : y.first_bad, x.ranks + y.ranks};
  }
};

/// rank[aot[t]] for t < tokens (0 without an adapter), 0 at t = tokens: scanned into the
/// per-token offsets of the gather strategy's z.
struct token_rank_fn {
  vector_view<const index_t, device::cuda> aot;
  const index_t* rank;
  DELTAW_HOST_DEVICE index_t operator()(index_t t) const {
    if (t >= aot.size()) return 0;
    const index_t a = aot[t];
    return a >= 0 ? rank[a] : 0;
  }
};

/// The per-token offsets of the gather strategy's z: out[t] = Σ_{t' < t} rank(t') for
/// t = 0 … tokens (out[tokens] = Σ_t r_a(t)), a chunked exclusive scan in three maps
/// (chunk sums, their scan by one thread, each chunk's fill); not thrust::exclusive_scan,
/// whose CUB dispatch draws a -Wmaybe-uninitialized false positive from GCC under nvcc.
struct chunk_sums_fn {
  token_rank_fn rank;
  index_t n, chunk;
  index_t* sums;
  DELTAW_HOST_DEVICE void operator()(index_t c) const {
    const index_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    index_t s = 0;
    for (index_t t = c * chunk; t < end; ++t) s += rank(t);
    sums[c] = s;
  }
};
struct chunk_scan_fn {
  index_t* sums;
  index_t chunks;
  DELTAW_HOST_DEVICE void operator()(index_t) const {
    index_t s = 0;
    for (index_t c = 0; c < chunks; ++c) {
      const index_t v = sums[c];
      sums[c] = s;
      s += v;
    }
  }
};
struct chunk_fill_fn {
  token_rank_fn rank;
  index_t n, chunk;
  const index_t* sums;
  index_t* out;
  DELTAW_HOST_DEVICE void operator()(index_t c) const {
    const index_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    index_t s = sums[c];
    for (index_t t = c * chunk; t < end; ++t) {
      out[t] = s;
      s += rank(t);
    }
  }
};
inline void token_offsets(const context& c, const token_rank_fn& rank, index_t* out) {
  const index_t n = rank.aot.size() + 1;
  const index_t chunk = std::max<index_t>(256, (n + 1023) / 1024), chunks = (n + chunk - 1) / chunk;
  const auto mark = c.position();
  index_t* sums = c.allocate<index_t>(std::size_t(chunks));
  using ::deltaw::cuda::detail::for_each_index;
  for_each_index(c, chunks, chunk_sums_fn{rank, n, chunk, sums}, "deltaw::cuda::serve (offsets: chunk sums)");
  for_each_index(c, 1, chunk_scan_fn{sums, chunks}, "deltaw::cuda::serve (offsets: chunk scan)");
  for_each_index(c, chunks, chunk_fill_fn{rank, n, chunk, sums, out}, "deltaw::cuda::serve (offsets)");
  c.release(mark);  // stream order: later scratch is written after the fill
}

/// One reduction over the device indices (synchronises): the first bad token and Σ ranks.
inline token_stats device_token_stats(const context& c, const device_indices& aot, const index_t* rank,
                                      index_t adapters, const char* op) {
  const index_t n = aot.size();
  if (n == 0) return {0, 0};
  try {
    return thrust::transform_reduce(::deltaw::cuda::detail::execution_policy(c), thrust::counting_iterator<index_t>(0),
                                    thrust::counting_iterator<index_t>(n), token_stats_fn{aot, rank, adapters},
                                    token_stats{n, 0}, combine_token_stats{});
  } catch (const thrust::system_error& e) {
    throw cuda_error(std::string(op) + ": checking the adapter indices failed: " + e.what(), e.code().value());
  }
}

/// The host overload's error for token t (its index read from the device).
[[noreturn]] inline void throw_bad_token(const context& c, const device_indices& aot, index_t t, index_t adapters,
                                         const char* op) {
  const index_t a = to_host_vector<index_t>(c, device_indices(aot.data() + t * aot.stride(), 1))[0];
  throw argument_error(std::string(op) + ": token " + std::to_string(t) + " names adapter " + std::to_string(a) +
                       " but the batch has " + std::to_string(adapters) +
                       " adapters (valid: 0 … n − 1, or −1 for none; adapter_of_token is in device memory)");
}

/// Tokens grouped on the device: `order` (device) holds the tokens with an adapter sorted
/// by adapter, each group in token order; adapter a's are order[offsets[a] … offsets[a + 1])
/// (offsets on the host, N + 1 values).
struct device_groups {
  const index_t* order = nullptr;
  std::vector<index_t> offsets;
  std::vector<index_t> used;
  index_t size(index_t a) const { return offsets[std::size_t(a) + 1] - offsets[std::size_t(a)]; }
  index_t adapted() const { return offsets.back(); }
  /// The same groups as serve::token_groups for choose_strategy, which reads only the
  /// group sizes (its order holds placeholders: the device keeps the real one).
  token_groups sizes_only() const {
    token_groups g;
    g.offsets = offsets;
    g.used = used;
    g.order.assign(std::size_t(adapted()), 0);
    return g;
  }
};

/// Sorts, bounds, one download of N + 3 values; the order stays in ctx's scratch.
inline device_groups group_on_device(const context& c, const device_indices& aot, index_t adapters, const char* op) {
  device_groups g;
  g.offsets.assign(std::size_t(adapters) + 1, 0);
  const index_t n = aot.size();
  if (n == 0) return g;
  index_t* tokens = c.allocate<index_t>(std::size_t(n));
  const auto mark = c.position();
  index_t* keys = c.allocate<index_t>(std::size_t(n));
  index_t* bounds = c.allocate<index_t>(std::size_t(adapters) + 3);
  using ::deltaw::cuda::detail::for_each_index;
  for_each_index(c, n, sort_keys_fn{aot, keys, tokens}, "deltaw::cuda::serve (sort keys)");
  try {
    thrust::stable_sort_by_key(::deltaw::cuda::detail::execution_policy(c), keys, keys + n, tokens);
  } catch (const thrust::system_error& e) {
    throw cuda_error(std::string(op) + ": sorting the tokens by adapter failed: " + e.what(), e.code().value());
  }
  for_each_index(c, adapters + 3, group_bounds_fn{keys, n, adapters, bounds}, "deltaw::cuda::serve (group bounds)");
  const std::vector<index_t> h =
      to_host_vector<index_t>(c, vector_view<const index_t, device::cuda>(bounds, adapters + 3));
  c.release(mark);
  if (h[std::size_t(adapters) + 1] < -1 || h[std::size_t(adapters) + 2] >= adapters)
    throw_bad_token(c, aot, device_token_stats(c, aot, nullptr, adapters, op).first_bad, adapters, op);
  const index_t none = h[0];
  for (index_t a = 0; a <= adapters; ++a) g.offsets[std::size_t(a)] = h[std::size_t(a)] - none;
  for (index_t a = 0; a < adapters; ++a)
    if (g.size(a) > 0) g.used.push_back(a);
  g.order = tokens + none;
  return g;
}

// ---- LoRA products ----------------------------------------------------------------------

/// The adapters' slices, flat, for the gather maps: adapter a's are table[first[a] …
/// first[a + 1]); rank[a] its total rank.
template <class T, class L>
struct slice_table {
  std::vector<lora_entry<T>> table;
  std::vector<index_t> first, rank;
  explicit slice_table(std::span<const L> adapters) : first(adapters.size() + 1, 0), rank(adapters.size(), 0) {
    for (std::size_t a = 0; a < adapters.size(); ++a) {
      for (const auto& l : slices_of(adapters[a])) table.push_back({l.B(), l.A(), l.scale()});
      first[a + 1] = index_t(table.size());
      rank[a] = adapters[a].rank();
    }
  }
};

/// The gather strategy's two maps, zoff (tokens + 1 offsets) and the indices on the device.
template <class T, class TX, class C>
void gather_maps(const context& c, const matrix_view<const TX, device::cuda>& X, const matrix_view<C, device::cuda>& Y,
                 const lora_entry<T>* table, const index_t* first, const device_indices& aot, const index_t* zoff,
                 index_t entries) {
  C* z = c.allocate<C>(std::size_t(std::max<index_t>(1, entries)));
  ::deltaw::cuda::detail::for_each_index(c, entries, gather_down_fn<T, TX, C>{X, table, first, aot, zoff, z},
                                         "deltaw::cuda::serve::apply_lora_batch (gather: z = s·A·x)");
  transform(c, Y, gather_up_fn<T, C>{table, first, aot, zoff, z});
}

/// A group of the segments strategy: adapter, tokens, where its rows are read (X in
/// place, or Xs) and where its result goes (Y in place, or P, scatter-added afterwards).
struct segment {
  index_t adapter, n;
  index_t x_row;  // first row in X when x_in_place, else in Xs
  index_t y_row;  // first row in Y when y_in_place, else in P
  bool x_in_place, y_in_place;
};

/// The shrink and expand products of the segments as grouped GEMMs (the adapters' element
/// type is C): Z_g = [X_g·A_g,1ᵀ … X_g·A_g,mᵀ] (one problem per slice, each its own column
/// block of the group's column-major n_g × r_g block of Z) in one call, then per wave k
/// Y_g (β = 1) or P_g (β = 0 in wave 0) += s_g·Z_g,k·B_g,kᵀ in one call.
template <class C, class L>
void segments_grouped(const context& c, std::span<const L> adapters, std::span<const segment> segs,
                      const matrix_view<const C, device::cuda>& X, const matrix_view<const C, device::cuda>& Xs,
                      const matrix_view<C, device::cuda>& Y, const matrix_view<C, device::cuda>& P, const char* op) {
  std::size_t zsize = 0, waves = 0;
  for (const segment& s : segs) {
    const L& l = adapters[std::size_t(s.adapter)];
    zsize += std::size_t(s.n) * std::size_t(l.rank());
    waves = std::max(waves, slices_of(l).size());
  }
  const auto mark = c.position();
  C* Z = c.allocate<C>(std::max<std::size_t>(1, zsize));
  std::vector<::deltaw::cuda::detail::grouped_gemm_call<C>> calls(1 + waves);
  std::size_t zo = 0;
  for (const segment& s : segs) {
    const L& l = adapters[std::size_t(s.adapter)];
    const matrix_view<const C, device::cuda> Xg = s.x_in_place ? X.middle_rows(s.x_row, s.n) : Xs.middle_rows(s.x_row, s.n);
    const matrix_view<C, device::cuda> Yg = s.y_in_place ? Y.middle_rows(s.y_row, s.n) : P.middle_rows(s.y_row, s.n);
    index_t col = 0;
    std::size_t wave = 0;
    for (const auto& sl : slices_of(l)) {
      const index_t r = sl.rank();
      const matrix_view<C, device::cuda> Zi(Z + zo + std::size_t(col) * std::size_t(s.n), s.n, r, 1, s.n);
      calls[0].add(C(1), Xg, sl.A().transpose(), C(0), Zi);
      calls[1 + wave].add(C(sl.scale()), Zi, sl.B().transpose(), s.y_in_place || wave > 0 ? C(1) : C(0), Yg);
      col += r;
      ++wave;
    }
    zo += std::size_t(s.n) * std::size_t(l.rank());
  }
  ::deltaw::cuda::detail::issue_grouped<C>(c, calls, op);
  c.release(mark);
}

/// The per-adapter loop of the segments (adapters whose element type is not C: each
/// product converts its operands, as cuda::gemm does): per group two GEMMs per slice, in
/// place for consecutive rows (first ≥ 0), else gathered by `rows` (device) and
/// scatter-added.
template <class C, class L, class TX>
void segments_per_adapter(const context& c, const L& l, index_t n, index_t first, const index_t* rows,
                          const matrix_view<const TX, device::cuda>& X, const matrix_view<C, device::cuda>& Y,
                          const char* op) {
  const index_t in = X.cols(), out = Y.cols();
  const auto mark = c.position();
  matrix_view<const C, device::cuda> Xg;
  matrix_view<C, device::cuda> Yg, P;
  if (first >= 0) {  // consecutive rows: read and write in place
    Yg = Y.middle_rows(first, n);
  } else {
    const device_view<C> Xs(c.allocate<C>(std::size_t(n * in)), n, in, in, 1);
    gather_rows(c, X, vector_view<const index_t, device::cuda>(rows, n), Xs);
    Xg = Xs;
    P = device_view<C>(c.allocate<C>(std::size_t(n * out)), n, out, out, 1);
    Yg = P;
  }
  bool first_slice = true;
  for (const auto& sl : slices_of(l)) {
    const index_t r = sl.rank();
    const auto mk = c.position();
    const device_view<C> Z(c.allocate<C>(std::size_t(n * r)), n, r, 1, std::max<index_t>(1, n));
    if (first >= 0) gemm(c, Z, X.middle_rows(first, n), sl.A().transpose(), 1.0, 0.0, op);
    else gemm(c, Z, Xg, sl.A().transpose(), 1.0, 0.0, op);
    // In place: accumulate into Y; gathered: the first slice writes P, the others add.
    gemm(c, Yg, device_view<const C>(Z), sl.B().transpose(), sl.scale(), first >= 0 || !first_slice ? 1.0 : 0.0, op);
    first_slice = false;
    c.release(mk);
  }
  if (first < 0)
    ::deltaw::cuda::detail::for_each_index(c, n * out, scatter_add_rows_fn<C>{P, Y, rows},
                                           "deltaw::cuda::serve::apply_lora_batch (scatter-add)");
  c.release(mark);
}

/// The segments strategy over the groups in use (increasing adapter order): per group its
/// size, its first row when its tokens are consecutive rows (else −1), its token list in
/// device memory (`rows`) and, for host groups, on the host (`host_rows`; empty for
/// device groups, whose lists are adjacent in one device order). Grouped GEMMs when the
/// adapters' element type is C, else the per-adapter loop.
template <class C, class L, class TX>
void segments(const context& c, std::span<const L> adapters, std::span<const index_t> used,
              std::span<const index_t> sizes, std::span<const index_t> starts, std::span<const index_t* const> rows,
              std::span<const std::span<const index_t>> host_rows, const matrix_view<const TX, device::cuda>& X,
              const matrix_view<C, device::cuda>& Y, const char* op) {
  using T = typename L::value_type;
  if constexpr (!std::is_same_v<std::remove_cv_t<T>, C>) {
    (void)host_rows;
    for (std::size_t i = 0; i < used.size(); ++i)
      segments_per_adapter<C>(c, adapters[std::size_t(used[i])], sizes[i], starts[i], rows[i], X, Y, op);
  } else {
    constexpr bool x_direct = std::is_same_v<std::remove_cv_t<TX>, C>;
    const index_t in = X.cols(), out = Y.cols();
    std::vector<segment> segs;
    std::vector<std::size_t> xgroups, pgroups;  // the groups read from Xs, written to P
    index_t nx = 0, np = 0;
    for (std::size_t i = 0; i < used.size(); ++i) {
      segment s{used[i], sizes[i], 0, 0, false, false};
      if (starts[i] >= 0 && x_direct) {
        s.x_in_place = true, s.x_row = starts[i];
      } else {
        s.x_row = nx, nx += s.n;
        xgroups.push_back(i);
      }
      if (starts[i] >= 0) {
        s.y_in_place = true, s.y_row = starts[i];
      } else {
        s.y_row = np, np += s.n;
        pgroups.push_back(i);
      }
      segs.push_back(s);
    }
    const auto mark = c.position();
    // The token list of some groups: their device lists when adjacent (always for device
    // groups), else the host lists joined and uploaded in one copy.
    auto joined = [&](const std::vector<std::size_t>& groups, index_t total) -> const index_t* {
      if (groups.empty()) return nullptr;
      bool adjacent = true;
      for (std::size_t k = 1; k < groups.size(); ++k)
        adjacent = adjacent && rows[groups[k]] == rows[groups[k - 1]] + sizes[groups[k - 1]];
      if (adjacent) return rows[groups[0]];
      std::vector<index_t> h;
      h.reserve(std::size_t(total));
      for (const std::size_t i : groups) h.insert(h.end(), host_rows[i].begin(), host_rows[i].end());
      return ::deltaw::cuda::detail::upload_to_scratch(c, h.data(), h.size());
    };
    const index_t* xrows = joined(xgroups, nx);
    const index_t* prows = joined(pgroups, np);
    matrix_view<const C, device::cuda> Xin, Xs;
    if constexpr (x_direct) Xin = X;
    if (nx > 0) {
      const device_view<C> Xw(c.allocate<C>(std::size_t(nx * in)), nx, in, in, 1);
      gather_rows(c, X, vector_view<const index_t, device::cuda>(xrows, nx), Xw);
      Xs = Xw;
    }
    device_view<C> P;
    if (np > 0) P = device_view<C>(c.allocate<C>(std::size_t(np * out)), np, out, out, 1);
    segments_grouped<C, L>(c, adapters, segs, Xin, Xs, Y, P, op);
    if (np > 0)
      ::deltaw::cuda::detail::for_each_index(c, np * out, scatter_add_rows_fn<C>{P, Y, prows},
                                             "deltaw::cuda::serve::apply_lora_batch (scatter-add)");
    c.release(mark);
  }
}

/// apply_grouped's work for one adapter: its evaluator on the group's rows (copied, or
/// gathered by the device rows), added into Y in place or scatter-added.
template <class C, class U, class TX>
void grouped_one(context& ctx, const U& u, index_t n, index_t first, const index_t* rows,
                 const matrix_view<const TX, device::cuda>& X, const matrix_view<C, device::cuda>& Y) {
  const context& c = ctx;
  const index_t in = X.cols(), out = Y.cols();
  const auto mark = c.position();
  const device_view<C> Xg(c.allocate<C>(std::size_t(n * in)), n, in, in, 1);
  if (first >= 0) copy(c, X.middle_rows(first, n), Xg);
  else gather_rows(c, X, vector_view<const index_t, device::cuda>(rows, n), Xg);
  const device_view<C> P(c.allocate<C>(std::size_t(n * out)), n, out, out, 1);
  ::deltaw::serve::detail::visit_update(u, [&](const auto& v) {
    using V = std::remove_cvref_t<decltype(v)>;
    static_assert(std::is_same_v<device_of<V>, device::cuda>,
                  "deltaw::cuda::serve::apply_grouped: the updates must be CUDA updates (built over cuda::view)");
    evaluator<V>::template apply<C, C>(ctx, v, device_view<const C>(Xg), P, 0.0);
  });
  if (first >= 0) axpy(c, C(1), device_view<const C>(P), Y.middle_rows(first, n));
  else
    ::deltaw::cuda::detail::for_each_index(c, n * out, scatter_add_rows_fn<C>{P, Y, rows},
                                           "deltaw::cuda::serve::apply_grouped (scatter-add)");
  c.release(mark);
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
  using ::deltaw::cuda::detail::upload_to_scratch;

  if (how == strategy::gather) {
    using T = typename L::value_type;
    const detail::slice_table<T, L> st(adapters);
    // Per token: the offset of its rank entries in z.
    std::vector<index_t> zoff(std::size_t(X.rows()) + 1, 0);
    for (index_t t = 0; t < X.rows(); ++t) {
      const index_t a = adapter_of_token[std::size_t(t)];
      zoff[std::size_t(t) + 1] = zoff[std::size_t(t)] + (a >= 0 ? st.rank[std::size_t(a)] : 0);
    }
    const auto* dt = upload_to_scratch(c, st.table.data(), st.table.size());
    const auto* df = upload_to_scratch(c, st.first.data(), st.first.size());
    const auto* da = upload_to_scratch(c, adapter_of_token.data(), adapter_of_token.size());
    const auto* dz = upload_to_scratch(c, zoff.data(), zoff.size());
    detail::gather_maps<T, TX, C>(c, Xc, Y, dt, df, device_indices(da, X.rows()), dz, zoff.back());
    return how;
  }

  const auto* order = upload_to_scratch(c, g.order.data(), g.order.size());
  std::vector<index_t> sizes, starts;
  std::vector<const index_t*> rows;
  std::vector<std::span<const index_t>> host_rows;
  for (const index_t a : g.used) {
    sizes.push_back(g.size(a));
    starts.push_back(g.contiguous_start(a));
    rows.push_back(order + g.offsets[std::size_t(a)]);
    host_rows.push_back(g.tokens(a));
  }
  detail::segments<C, L, TX>(c, adapters, g.used, sizes, starts, rows, host_rows, Xc, Y, op);
  return how;
}

/// The same with adapter_of_token in device memory, as a GPU scheduler holds it: checked
/// and grouped on the device (the header's "Device-side grouping"). Strategy: options.how
/// when explicit; strategy::automatic applies batch_options::segments_min_tokens to the
/// group sizes (choose_strategy, as the host overload), read from the device after a sort
/// by adapter. segments reads N + 3 values on the host (the groups' offsets: the shapes of
/// the grouped GEMMs), gathering every group's rows; gather reads two (the first bad token
/// and Σ_t r_a(t)). Each synchronises ctx's stream once. An index outside [−1, N) throws
/// argument_error naming the first such token before Y is written. The results equal the
/// host overload's: bit for bit for gather, and for segments when no group's tokens are
/// consecutive rows (the same products run; otherwise the host overload reads those in
/// place and the sums are rounded in another order).
template <class TW, class L, class TX, class C>
  requires(detail::is_lora_adapter<L>)
strategy apply_lora_batch(context& ctx, const matrix_view<TW, device::cuda>& W, std::span<const L> adapters,
                          const device_indices& adapter_of_token, const matrix_view<TX, device::cuda>& X,
                          const matrix_view<C, device::cuda>& Y, const batch_options& options = {}) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::serve::apply_lora_batch: the output is float or double (16-bit types are storage)");
  constexpr const char* op = "deltaw::cuda::serve::apply_lora_batch";
  detail::check_device_batch<TW, TX, C, L>(op, W, adapters, adapter_of_token, X, Y);
  using T = typename L::value_type;
  const index_t N = index_t(adapters.size());
  device_guard guard(ctx.device());
  ctx.begin_operation();
  const context& c = ctx;
  const matrix_view<const TX, device::cuda> Xc(X);
  using ::deltaw::cuda::detail::upload_to_scratch;
  const detail::slice_table<T, L> st(adapters);

  if (options.how == strategy::gather) {
    const auto* dr = upload_to_scratch(c, st.rank.data(), st.rank.size());
    const detail::token_stats s = detail::device_token_stats(c, adapter_of_token, dr, N, op);
    if (s.first_bad < adapter_of_token.size()) detail::throw_bad_token(c, adapter_of_token, s.first_bad, N, op);
    if (Y.rows() == 0 || Y.cols() == 0) return strategy::gather;
    gemm(c, Y, Xc, matrix_view<const TW, device::cuda>(W).transpose(), 1.0, 0.0, op);
    if (s.ranks == 0 || X.cols() == 0) return strategy::gather;
    index_t* zoff = c.allocate<index_t>(std::size_t(X.rows()) + 1);
    detail::token_offsets(c, detail::token_rank_fn{adapter_of_token, dr}, zoff);
    const auto* dt = upload_to_scratch(c, st.table.data(), st.table.size());
    const auto* df = upload_to_scratch(c, st.first.data(), st.first.size());
    detail::gather_maps<T, TX, C>(c, Xc, Y, dt, df, adapter_of_token, zoff, s.ranks);
    return strategy::gather;
  }

  const detail::device_groups g = detail::group_on_device(c, adapter_of_token, N, op);
  const strategy how = choose_strategy(g.sizes_only(), options);
  if (Y.rows() == 0 || Y.cols() == 0) return how;
  gemm(c, Y, Xc, matrix_view<const TW, device::cuda>(W).transpose(), 1.0, 0.0, op);
  if (g.adapted() == 0 || X.cols() == 0) return how;
  if (how == strategy::gather) {
    index_t entries = 0;
    for (const index_t a : g.used) entries += g.size(a) * st.rank[std::size_t(a)];
    index_t* zoff = c.allocate<index_t>(std::size_t(X.rows()) + 1);
    const auto* dr = upload_to_scratch(c, st.rank.data(), st.rank.size());
    detail::token_offsets(c, detail::token_rank_fn{adapter_of_token, dr}, zoff);
    const auto* dt = upload_to_scratch(c, st.table.data(), st.table.size());
    const auto* df = upload_to_scratch(c, st.first.data(), st.first.size());
    detail::gather_maps<T, TX, C>(c, Xc, Y, dt, df, adapter_of_token, zoff, entries);
    return how;
  }
  std::vector<index_t> sizes, starts;
  std::vector<const index_t*> rows;
  for (const index_t a : g.used) {
    sizes.push_back(g.size(a));
    starts.push_back(-1);  // contiguity is not known on the host: every group is gathered
    rows.push_back(g.order + g.offsets[std::size_t(a)]);
  }
  detail::segments<C, L, TX>(c, adapters, g.used, sizes, starts, rows, {}, Xc, Y, op);
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
template <class TW, class L, class TX, class C>
  requires(detail::is_lora_adapter<L>)
strategy apply_lora_batch(context& ctx, const matrix_view<TW, device::cuda>& W, const std::vector<L>& adapters,
                          const device_indices& adapter_of_token, const matrix_view<TX, device::cuda>& X,
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
  const auto* order = ::deltaw::cuda::detail::upload_to_scratch(c, g.order.data(), g.order.size());
  for (const index_t a : g.used)
    detail::grouped_one<C>(ctx, updates[std::size_t(a)], g.size(a), g.contiguous_start(a),
                           order + g.offsets[std::size_t(a)], Xc, Y);
}

/// The same with adapter_of_token in device memory: grouped on the device as
/// apply_lora_batch's overload (N + 3 values read on the host, one synchronisation), every
/// group's rows gathered by the device order; the same argument_error for a bad index.
template <class TW, class U, class TX, class C>
void apply_grouped(context& ctx, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                   const device_indices& adapter_of_token, const matrix_view<TX, device::cuda>& X,
                   const matrix_view<C, device::cuda>& Y) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::serve::apply_grouped: the output is float or double (16-bit types are storage)");
  constexpr const char* op = "deltaw::cuda::serve::apply_grouped";
  detail::check_device_batch<TW, TX, C, U>(op, W, updates, adapter_of_token, X, Y);
  device_guard guard(ctx.device());
  ctx.begin_operation();
  const context& c = ctx;
  const detail::device_groups g = detail::group_on_device(c, adapter_of_token, index_t(updates.size()), op);
  if (Y.rows() == 0 || Y.cols() == 0) return;
  const matrix_view<const TX, device::cuda> Xc(X);
  gemm(c, Y, Xc, matrix_view<const TW, device::cuda>(W).transpose(), 1.0, 0.0, op);
  for (const index_t a : g.used)
    detail::grouped_one<C>(ctx, updates[std::size_t(a)], g.size(a), -1, g.order + g.offsets[std::size_t(a)], Xc, Y);
}

/// The same with the updates in a std::vector.
template <class TW, class U, class TX, class C>
void apply_grouped(context& ctx, const matrix_view<TW, device::cuda>& W, const std::vector<U>& updates,
                   std::span<const index_t> adapter_of_token, const matrix_view<TX, device::cuda>& X,
                   const matrix_view<C, device::cuda>& Y) {
  apply_grouped(ctx, W, std::span<const U>(updates), adapter_of_token, X, Y);
}
template <class TW, class U, class TX, class C>
void apply_grouped(context& ctx, const matrix_view<TW, device::cuda>& W, const std::vector<U>& updates,
                   const device_indices& adapter_of_token, const matrix_view<TX, device::cuda>& X,
                   const matrix_view<C, device::cuda>& Y) {
  apply_grouped(ctx, W, std::span<const U>(updates), adapter_of_token, X, Y);
}

}  // namespace cuda::serve
DELTAW_NAMESPACE_END
