// SPDX-License-Identifier: MIT
// Multi-adapter serving (docs/benchmarks.md, "Multi-adapter serving"; issue 17): one layer
// in = out = 4096 in float, tokens 512 (and 64 for decode), LoRA adapters of ranks mixed in
// {8, 16, 32, 64} (adapter i has rank {8, 16, 32, 64}[i mod 4]), N = 8 / 64 / 512 adapters,
// each token's adapter drawn uniformly or by Zipf(1.0) popularity. Side by side in one run:
//
//   base        X·Wᵀ alone (deltaw::apply of the weight view): the floor
//   segments    serve::apply_lora_batch, strategy::segments (SGMV-like)
//   gather      serve::apply_lora_batch, strategy::gather (BGMV-like)
//   auto        serve::apply_lora_batch, strategy::automatic
//   grouped     serve::apply_grouped (the generic path: deltaw::apply per group)
//   serial      one request group at a time, deltaw::apply(W + ΔW_a, X_a): what a server that
//               does not batch across adapters runs (the base GEMM per adapter)
//
// plus "single": every token on one adapter (r = 16), apply_lora_batch against
// deltaw::apply(W + ΔW, X); and "crossover": segments against gather for groups of exactly
// g tokens (rank 16), which sets batch_options::segments_min_tokens (docs/serving.md).
// Times to read are real_time (wall clock): the products use both cores (OpenMP).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deltaw/serve/batch.hpp>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace dw = deltaw;
namespace sv = deltaw::serve;

namespace {

using mat = dw::dense<float>;
constexpr int features = 4096;
constexpr int ranks[] = {8, 16, 32, 64};

struct base_data {
  mat W, X;
  base_data() : W(features, features), X(512, features) {
    deltaw_bench::fill_uniform(W, 1, 1.0f / std::sqrt(float(features)));
    deltaw_bench::fill_uniform(X, 2, 1.0f);
  }
};
base_data& base() {
  static base_data d;
  return d;
}

struct adapter_set {
  std::vector<std::unique_ptr<mat>> B, A;
  std::vector<dw::low_rank<float>> u;
};
/// The first n adapters (shared by every N: the set grows to the largest N asked for).
const std::vector<dw::low_rank<float>>& adapters(int n) {
  static adapter_set s;
  while (int(s.u.size()) < n) {
    const int i = int(s.u.size()), r = ranks[i % 4];
    s.B.push_back(std::make_unique<mat>(features, r));
    s.A.push_back(std::make_unique<mat>(r, features));
    deltaw_bench::fill_uniform(*s.B.back(), 100 + 2 * std::uint64_t(i), 0.01f);
    deltaw_bench::fill_uniform(*s.A.back(), 101 + 2 * std::uint64_t(i), 1.0f / std::sqrt(float(features)));
    s.u.push_back(dw::lora(*s.B.back(), *s.A.back(), dw::alpha(2.0 * r)));
  }
  static std::map<int, std::vector<dw::low_rank<float>>> prefix;
  auto& p = prefix[n];
  if (p.empty()) p.assign(s.u.begin(), s.u.begin() + n);
  return p;
}

/// Token → adapter: uniform, or Zipf(1.0) over the adapters (popularity 1/k, shuffled ids).
std::vector<dw::index_t> assignment(int tokens, int n, bool zipf, std::uint64_t seed = 7) {
  std::mt19937_64 g(seed);
  std::vector<dw::index_t> idx(static_cast<std::size_t>(tokens));
  if (!zipf) {
    std::uniform_int_distribution<dw::index_t> d(0, n - 1);
    for (auto& i : idx) i = d(g);
    return idx;
  }
  std::vector<double> w(static_cast<std::size_t>(n));
  for (int k = 0; k < n; ++k) w[std::size_t(k)] = 1.0 / double(k + 1);
  std::discrete_distribution<dw::index_t> d(w.begin(), w.end());
  std::vector<dw::index_t> perm(static_cast<std::size_t>(n));
  for (int k = 0; k < n; ++k) perm[std::size_t(k)] = k;
  std::shuffle(perm.begin(), perm.end(), g);  // the popular adapters are not the low-rank ones
  for (auto& i : idx) i = perm[std::size_t(d(g))];
  return idx;
}

enum method { m_base, m_segments, m_gather, m_auto, m_grouped, m_serial };

void report(benchmark::State& st, int tokens, const std::vector<dw::index_t>& idx, int n) {
  const auto g = sv::group_tokens(idx, n);
  st.counters["adapters_used"] = double(g.used.size());
  st.counters["mean_group"] = g.mean_group_size();
  st.counters["chosen_segments"] = sv::choose_strategy(g) == sv::strategy::segments ? 1 : 0;
  st.SetItemsProcessed(std::int64_t(st.iterations()) * tokens);
}

void BM_serve(benchmark::State& st) {
  const auto how = method(st.range(0));
  const int n = int(st.range(1)), tokens = int(st.range(3));
  const bool zipf = st.range(2) != 0;
  auto& d = base();
  const auto& ad = adapters(n);
  const auto idx = assignment(tokens, n, zipf);
  const auto X = dw::view(d.X).middle_rows(0, tokens);
  mat Y(tokens, features);
  const auto g = sv::group_tokens(idx, n);
  for (auto _ : st) {
    switch (how) {
      case m_base: dw::apply(dw::view(d.W), X, Y); break;
      case m_segments: sv::apply_lora_batch(d.W, ad, idx, X, Y, {.how = sv::strategy::segments}); break;
      case m_gather: sv::apply_lora_batch(d.W, ad, idx, X, Y, {.how = sv::strategy::gather}); break;
      case m_auto: sv::apply_lora_batch(d.W, ad, idx, X, Y); break;
      case m_grouped: sv::apply_grouped(d.W, ad, idx, X, Y); break;
      case m_serial:
        for (const dw::index_t a : g.used) {
          const auto rows = g.tokens(a);
          mat Xa(dw::index_t(rows.size()), features), Ya(dw::index_t(rows.size()), features);
          for (std::size_t i = 0; i < rows.size(); ++i) Xa.row(Eigen::Index(i)) = d.X.row(rows[i]);
          dw::apply(dw::view(d.W) + ad[std::size_t(a)], Xa, Ya);
          benchmark::DoNotOptimize(Ya.data());
        }
        break;
    }
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  report(st, tokens, idx, n);
}

void serve_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"method", "adapters", "zipf", "tokens"});
  for (const int tokens : {512})
    for (const int n : {8, 64, 512})
      for (const int zipf : {0, 1})
        for (const int m : {m_base, m_segments, m_gather, m_auto, m_grouped, m_serial}) {
          if (m == m_base && (n != 8 || zipf)) continue;  // one base row per token count
          b->Args({m, n, zipf, tokens});
        }
  // Decode: 64 requests of one token, each on its own adapter (N = 64, a permutation) and
  // uniform over 512.
  for (const int m : {m_base, m_segments, m_gather, m_auto, m_serial}) b->Args({m, 512, 0, 64});
}
BENCHMARK(BM_serve)->Apply(serve_args)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

/// Paired ratios, for a shared machine: every iteration times the base GEMM and then the
/// method on the same inputs, back to back, and the counter `ratio` is the median of the
/// per-iteration ratios (load that changes over seconds cancels; the medians of separate
/// benchmarks do not). Arguments as BM_serve; method 6 is "every token on adapter 1 (r 16)"
/// against deltaw::apply(W + ΔW, X) instead of the base.
void BM_paired(benchmark::State& st) {
  const int how = int(st.range(0)), n = int(st.range(1)), tokens = int(st.range(3));
  auto& d = base();
  const auto& ad = adapters(std::max(n, 2));
  const auto idx = how == 6 ? std::vector<dw::index_t>(std::size_t(tokens), 1) : assignment(tokens, n, st.range(2) != 0);
  const auto X = dw::view(d.X).middle_rows(0, tokens);
  mat Y(tokens, features);
  std::vector<double> ratios, base_ms;
  for (auto _ : st) {
    const auto t0 = std::chrono::steady_clock::now();
    if (how == 6) dw::apply(dw::view(d.W) + ad[1], X, Y);
    else dw::apply(dw::view(d.W), X, Y);
    const auto t1 = std::chrono::steady_clock::now();
    const sv::strategy s = how == m_segments ? sv::strategy::segments
                           : how == m_gather ? sv::strategy::gather
                                             : sv::strategy::automatic;
    if (how == m_grouped) sv::apply_grouped(d.W, ad, idx, X, Y);
    else sv::apply_lora_batch(d.W, ad, idx, X, Y, {.how = s});
    const auto t2 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(Y.data());
    ratios.push_back(std::chrono::duration<double>(t2 - t1).count() / std::chrono::duration<double>(t1 - t0).count());
    base_ms.push_back(1e3 * std::chrono::duration<double>(t1 - t0).count());
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  st.counters["ratio"] = median(ratios);
  st.counters["base_ms"] = median(base_ms);
}
void paired_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"method", "adapters", "zipf", "tokens"});
  for (const int n : {8, 64, 512})
    for (const int zipf : {0, 1})
      for (const int m : {m_segments, m_gather, m_auto}) b->Args({m, n, zipf, 512});
  for (const int m : {m_segments, m_gather, m_auto}) b->Args({m, 512, 0, 64});
  b->Args({6, 2, 0, 512});
}
BENCHMARK(BM_paired)->Apply(paired_args)->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(9);

/// Every token on one adapter (r = 16): the batch against the single-adapter apply.
void BM_single(benchmark::State& st) {
  auto& d = base();
  const auto& ad = adapters(2);
  const std::vector<dw::index_t> idx(512, 1);
  mat Y(512, features);
  for (auto _ : st) {
    if (st.range(0) == 0) dw::apply(dw::view(d.W) + ad[1], d.X, Y);
    else sv::apply_lora_batch(d.W, ad, idx, d.X, Y);
    benchmark::DoNotOptimize(Y.data());
  }
  st.SetItemsProcessed(std::int64_t(st.iterations()) * 512);
}
BENCHMARK(BM_single)->ArgName("batch")->Arg(0)->Arg(1)->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);

/// The ΔY part alone (no base GEMM) for groups of exactly g tokens, rank 16, 256 tokens in
/// 256/g groups: where segments starts to beat gather.
void BM_crossover(benchmark::State& st) {
  const int gsize = int(st.range(1)), tokens = 256, n = tokens / gsize;
  static std::vector<std::unique_ptr<mat>> keep;
  std::vector<dw::low_rank<float>> ad;
  for (int i = 0; i < n; ++i) {
    keep.push_back(std::make_unique<mat>(features, 16));
    deltaw_bench::fill_uniform(*keep.back(), 5000 + std::uint64_t(2 * i), 0.01f);
    keep.push_back(std::make_unique<mat>(16, features));
    deltaw_bench::fill_uniform(*keep.back(), 5001 + std::uint64_t(2 * i), 0.015f);
    ad.push_back(dw::lora(*keep[keep.size() - 2], *keep.back(), dw::alpha(32)));
  }
  std::vector<dw::index_t> idx(static_cast<std::size_t>(tokens));
  for (int t = 0; t < tokens; ++t) idx[std::size_t(t)] = t % n;  // groups of g, not consecutive
  const auto g = sv::group_tokens(idx, n);
  const mat X = base().X.topRows(tokens);
  mat Y = mat::Zero(tokens, features);
  const dw::kernels::cpu_context ctx;
  for (auto _ : st) {
    if (st.range(0) == 0)
      sv::detail::lora_segments<float, dw::low_rank<float>>(ctx, ad, g, dw::view(X), dw::view(Y), true);
    else
      sv::detail::lora_gather<float, dw::low_rank<float>>(ctx, ad, g, dw::view(X), dw::view(Y), true);
    benchmark::DoNotOptimize(Y.data());
  }
  st.SetItemsProcessed(std::int64_t(st.iterations()) * tokens);
  keep.clear();
}
BENCHMARK(BM_crossover)
    ->ArgNames({"gather", "group"})
    ->ArgsProduct({{0, 1}, {1, 2, 4, 8, 16, 32}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.3);

}  // namespace

BENCHMARK_MAIN();
