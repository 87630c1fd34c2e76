// SPDX-License-Identifier: MIT
// Multi-adapter serving by regime (docs/benchmarks.md, "Serving regimes"; issue 17 item 4):
// one layer in = out = 4096 in float, LoRA adapters of ranks {8, 16, 32, 64}[i mod 4], N =
// 1, 8, 64, 512 or 4096 adapters registered, in three regimes:
//
//   decode64    64 requests × 1 token
//   decode256   256 requests × 1 token
//   prefill     8 requests × 64 tokens (each request's tokens are consecutive rows)
//
// and four popularity laws for the requests' adapters: distinct (request i on its own
// adapter; needs N ≥ requests), uniform, Zipf(1.0) (popularity 1/k over a shuffled order)
// and identical (every request on adapter 1, rank 16).
//
// Ratios are paired (the machine is shared): every iteration runs each measured path on the
// same inputs back to back, and a counter is the median over the iterations of the
// per-iteration ratio. The times are the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID),
// which a loaded machine's time slicing does not inflate: run with OMP_NUM_THREADS=1, so
// that all the work is on that thread. BM_regime times, per iteration:
//
//   base     X·Wᵀ (deltaw::apply of the weight view): the floor
//   batch    serve::apply_lora_batch, strategy::automatic, over the N registered adapters
//   hit      the adapter pool's hit path for the batch: acquire every adapter in use from a
//            pool with N registered (all resident), take its module, release the pins
//   paged    apply_lora_batch over the pool's paged modules (sliced_lora, 8 rank vectors a page)
//   single   (identical only) deltaw::apply(W + ΔW, X), the single-adapter apply
//
// counters: batch_base = batch / base, hit_pct = 100·hit / batch, paged_batch = paged / batch,
// batch_single = batch / single; base_ms, batch_ms and paged_ms are medians of the times. BM_regime_serial times batch and serial (one adapter's
// requests at a time through deltaw::apply(W + ΔW_a, X_a), a server that does not batch
// across adapters): serial_batch = serial / batch.
//
// Adapters that no request uses are registered but never read: their entries share one set
// of factors per rank, so that 4096 registered adapters do not take 4 GiB.
//
// With DELTAW_SERVE_ASSIGNMENTS=<file> in the environment, BM_regime appends one line per
// case to that file: "<regime> <adapters> <popularity> <tokens per request> <adapter of
// request 0> …", so that a peer (bench/compare/serve_peft.py, PEFT) serves the very same
// requests. The BLAS build of this file is bench_serve_regimes_blas (bench/serve.cmake).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <deltaw/serve/batch.hpp>
#include <deltaw/serve/pool.hpp>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <time.h>
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace dw = deltaw;
namespace sv = deltaw::serve;

namespace serve_regimes {

using mat = dw::dense<float>;
/// The calling thread's CPU time.
struct clk {
  using time_point = double;
  static double now() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  }
};
constexpr int features = 4096;
constexpr int ranks[] = {8, 16, 32, 64};

enum regime { decode64, decode256, prefill };
enum popularity { distinct, uniform, zipf, identical };
constexpr int requests_of[] = {64, 256, 8};
constexpr int tokens_per_request[] = {1, 1, 64};

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

struct factors {
  mat B, A;
};
/// The factors of adapter i (made on first use and kept).
const factors& factors_of(int i) {
  static std::map<int, std::unique_ptr<factors>> made;
  auto& f = made[i];
  if (!f) {
    const int r = ranks[i % 4];
    f = std::make_unique<factors>(factors{mat(features, r), mat(r, features)});
    deltaw_bench::fill_uniform(f->B, 100 + 2 * std::uint64_t(i), 0.01f);
    deltaw_bench::fill_uniform(f->A, 101 + 2 * std::uint64_t(i), 1.0f / std::sqrt(float(features)));
  }
  return *f;
}
/// The placeholder factors of the unused registered adapters of rank ranks[k].
const factors& unused_of(int k) { return factors_of(1'000'000 + k); }

/// Request → adapter for a popularity law (fixed seeds).
std::vector<int> request_adapters(int requests, int n, popularity p) {
  std::mt19937_64 g(11);
  std::vector<int> perm(static_cast<std::size_t>(n));
  for (int k = 0; k < n; ++k) perm[std::size_t(k)] = k;
  std::shuffle(perm.begin(), perm.end(), g);
  std::vector<int> out(static_cast<std::size_t>(requests));
  if (p == distinct)
    for (int i = 0; i < requests; ++i) out[std::size_t(i)] = perm[std::size_t(i)];
  else if (p == identical)
    std::fill(out.begin(), out.end(), std::min(1, n - 1));
  else if (p == uniform) {
    std::uniform_int_distribution<int> d(0, n - 1);
    for (auto& a : out) a = d(g);
  } else {
    std::vector<double> w(static_cast<std::size_t>(n));
    for (int k = 0; k < n; ++k) w[std::size_t(k)] = 1.0 / double(k + 1);
    std::discrete_distribution<int> d(w.begin(), w.end());
    for (auto& a : out) a = perm[std::size_t(d(g))];
  }
  return out;
}

std::string name_of(int i) {
  std::string s = "a";
  s += std::to_string(i);
  return s;
}

/// One benchmark's set-up: the registered adapters, the token → adapter index, the pool.
struct setup {
  int tokens = 0;
  std::vector<int> per_request;                // adapter of each request
  std::vector<int> used;                       // adapters in use, first-use order
  std::vector<dw::low_rank<float>> registered;  // N adapters (unused ones share factors)
  std::vector<dw::index_t> idx;                // token → registered adapter
  std::unique_ptr<sv::adapter_pool> pool;

  setup(regime rg, int n, popularity p) {
    const int reqs = requests_of[rg], tpr = tokens_per_request[rg];
    tokens = reqs * tpr;
    per_request = request_adapters(reqs, n, p);
    std::set<int> seen;
    for (const int a : per_request)
      if (seen.insert(a).second) used.push_back(a);
    registered.reserve(std::size_t(n));
    for (int i = 0; i < n; ++i) {
      const int r = ranks[i % 4];
      const factors& f = seen.count(i) ? factors_of(i) : unused_of(i % 4);
      registered.push_back(dw::lora(f.B, f.A, dw::alpha(2.0 * r)));
    }
    for (const int a : per_request) idx.insert(idx.end(), std::size_t(tpr), dw::index_t(a));
    // The pool: pages of 256 KiB (8 rank vectors of [4096, 4096]), room for every adapter in use.
    std::size_t pages = 0;
    for (const int a : used) pages += std::size_t(ranks[a % 4] / 8);
    pool = std::make_unique<sv::adapter_pool>(
        sv::pool_options{.budget_bytes = (pages + 1) * (std::size_t(256) << 10), .page_bytes = std::size_t(256) << 10});
    for (int i = 0; i < n; ++i)
      pool->register_loader(name_of(i), [this, i] { return std::vector<sv::adapter_module>{{"lin", registered[std::size_t(i)]}}; });
    for (const int a : used) (void)pool->acquire(name_of(a));  // loaded; released at once
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}
double secs(double a, double b) { return b - a; }

void BM_regime(benchmark::State& st) {
  const auto rg = regime(st.range(0));
  const int n = int(st.range(1));
  const auto p = popularity(st.range(2));
  auto& d = base();
  setup s(rg, n, p);
  const auto X = dw::view(d.X).middle_rows(0, s.tokens);
  mat Y(s.tokens, features);
  if (const char* out = std::getenv("DELTAW_SERVE_ASSIGNMENTS")) {
    std::ofstream f(out, std::ios::app);
    f << int(rg) << ' ' << n << ' ' << int(p) << ' ' << tokens_per_request[rg];
    for (const int a : s.per_request) f << ' ' << a;
    f << '\n';
  }
  std::vector<double> r_base, r_hit, r_paged, r_single, base_ms, batch_ms, paged_ms, hit_us;
  std::vector<sv::pinned_adapter> pins;
  std::vector<sv::sliced_lora<float>> paged;
  std::vector<dw::index_t> slot_of(std::size_t(n), dw::index_t(-1)), paged_idx(s.idx.size());
  for (auto _ : st) {
    const auto t0 = clk::now();
    dw::apply(dw::view(d.W), X, Y);
    const auto t1 = clk::now();
    sv::apply_lora_batch(d.W, s.registered, s.idx, X, Y);
    const auto t2 = clk::now();
    benchmark::DoNotOptimize(Y.data());
    // The hit path: pins and modules for the adapters in use, in request order.
    for (const int a : s.per_request) {
      if (slot_of[std::size_t(a)] >= 0) continue;
      pins.push_back(s.pool->acquire(name_of(a)));
      slot_of[std::size_t(a)] = dw::index_t(paged.size());
      paged.push_back(pins.back().at("lin"));
    }
    for (std::size_t t = 0; t < s.idx.size(); ++t) paged_idx[t] = slot_of[std::size_t(s.idx[t])];
    const auto t3 = clk::now();
    sv::apply_lora_batch(d.W, paged, paged_idx, X, Y);
    const auto t4 = clk::now();
    benchmark::DoNotOptimize(Y.data());
    paged.clear();
    pins.clear();  // unpinned
    for (const int a : s.used) slot_of[std::size_t(a)] = -1;
    const auto t5 = clk::now();
    if (p == identical) {
      dw::apply(dw::view(d.W) + s.registered[std::size_t(s.per_request[0])], X, Y);
      const auto t6 = clk::now();
      r_single.push_back(secs(t1, t2) / secs(t5, t6));
    }
    const double hit = secs(t2, t3) + secs(t4, t5);
    r_base.push_back(secs(t1, t2) / secs(t0, t1));
    r_hit.push_back(hit / secs(t1, t2));
    r_paged.push_back(secs(t3, t4) / secs(t1, t2));
    base_ms.push_back(1e3 * secs(t0, t1));
    batch_ms.push_back(1e3 * secs(t1, t2));
    paged_ms.push_back(1e3 * secs(t3, t4));
    hit_us.push_back(1e6 * hit);
  }
  st.counters["batch_base"] = median(r_base);
  st.counters["hit_pct"] = 100 * median(r_hit);
  st.counters["hit_us"] = median(hit_us);
  st.counters["paged_batch"] = median(r_paged);
  if (!r_single.empty()) st.counters["batch_single"] = median(r_single);
  st.counters["base_ms"] = median(base_ms);
  st.counters["batch_ms"] = median(batch_ms);
  st.counters["paged_ms"] = median(paged_ms);
  st.counters["used"] = double(s.used.size());
  st.counters["segments"] =
      sv::choose_strategy(sv::group_tokens(s.idx, n)) == sv::strategy::segments ? 1 : 0;
}

void BM_regime_serial(benchmark::State& st) {
  const auto rg = regime(st.range(0));
  const int n = int(st.range(1));
  const auto p = popularity(st.range(2));
  auto& d = base();
  setup s(rg, n, p);
  const auto X = dw::view(d.X).middle_rows(0, s.tokens);
  mat Y(s.tokens, features);
  const auto g = sv::group_tokens(s.idx, n);
  std::vector<double> r;
  for (auto _ : st) {
    const auto t0 = clk::now();
    sv::apply_lora_batch(d.W, s.registered, s.idx, X, Y);
    const auto t1 = clk::now();
    for (const dw::index_t a : g.used) {
      const auto rows = g.tokens(a);
      mat Xa(dw::index_t(rows.size()), features), Ya(dw::index_t(rows.size()), features);
      for (std::size_t i = 0; i < rows.size(); ++i) Xa.row(Eigen::Index(i)) = d.X.row(rows[i]);
      dw::apply(dw::view(d.W) + s.registered[std::size_t(a)], Xa, Ya);
      benchmark::DoNotOptimize(Ya.data());
    }
    const auto t2 = clk::now();
    r.push_back(secs(t1, t2) / secs(t0, t1));
  }
  st.counters["serial_batch"] = median(r);
  st.counters["used"] = double(g.used.size());
}

void regime_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"regime", "adapters", "popularity"});
  for (const int rg : {decode64, decode256, prefill}) {
    for (const int n : {1, 8, 64, 512, 4096}) {
      if (n >= requests_of[rg]) b->Args({rg, n, distinct});
      if (n > 1) {
        b->Args({rg, n, uniform});
        b->Args({rg, n, zipf});
      }
    }
    b->Args({rg, 1, identical});
    b->Args({rg, 4096, identical});
  }
}
BENCHMARK(BM_regime)->Apply(regime_args)->Unit(benchmark::kMillisecond)->Iterations(3);

BENCHMARK(BM_regime_serial)
    ->ArgNames({"regime", "adapters", "popularity"})
    ->Args({decode64, 64, distinct})
    ->Args({decode64, 4096, zipf})
    ->Args({decode256, 4096, uniform})
    ->Args({prefill, 8, uniform})
    ->Args({prefill, 4096, zipf})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(2);

}  // namespace serve_regimes

BENCHMARK_MAIN();
