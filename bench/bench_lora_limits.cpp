// SPDX-License-Identifier: MIT
// Computational limits of LoRA: the LoRA gradient of single-head attention (W_Q, W_K, W_V
// adapted, "full"; and W_Q, W_V, "partial") exactly through the dense n×n attention matrix
// against the chained low-rank approximation (polynomial kernel of degree g, C(d + g, g)
// features), from 128 to 8192 tokens. Entries are kept below the threshold (Γ < √ln n), where
// the approximation is accurate; its relative gradient error is reported as a counter
// (computed outside the timed loop, up to 2048 tokens). Short runs: one to a few iterations.
#include <benchmark/benchmark.h>

#include <deltaw/papers/lora_limits.hpp>

#include <cmath>
#include <memory>
#include <random>

namespace {
namespace ll = deltaw::papers::lora_limits;
using deltaw::index_t;
using Mat = deltaw::dense<float>;

struct problem {
  Mat X, Y, W[3], B[3], A[3];
  ll::attention_layer<float> L;
  problem(index_t n, index_t d) {
    const index_t d_in = 32, r = 4;
    std::mt19937_64 g(7);
    auto randn = [&](index_t rr, index_t c, double sd) {
      std::normal_distribution<double> nd(0.0, sd);
      Mat m(rr, c);
      for (index_t i = 0; i < m.size(); ++i) m.data()[i] = float(nd(g));
      return m;
    };
    X = randn(n, d_in, 1.0);
    Y = randn(n, d, 0.5);
    for (int i = 0; i < 3; ++i) {
      W[i] = randn(d, d_in, 0.3 / std::sqrt(double(d_in)));
      B[i] = randn(d, r, 0.02);
      A[i] = randn(r, d_in, 1.0 / std::sqrt(double(d_in)));
    }
    ll::lora_projection<float>* ps[3] = {&L.q, &L.k, &L.v};
    for (int i = 0; i < 3; ++i) *ps[i] = {deltaw::view(W[i]), deltaw::view(B[i]), deltaw::view(A[i]), 2.0};
  }
};

void bench(benchmark::State& state, bool chained, bool full, int degree) {
  const index_t n = state.range(0), d = state.range(1);
  const problem p(n, d);
  ll::gradient_options o;
  o.full = full;
  o.degree = degree;
  for (auto _ : state) {
    auto g = chained ? ll::attention_lora_grad_chained(p.X, p.Y, p.L, o) : ll::attention_lora_grad_dense(p.X, p.Y, p.L, o);
    benchmark::DoNotOptimize(g.dB[0].data());
  }
  state.counters["tokens"] = double(n);
  if (chained) {
    state.counters["features"] = double(ll::make_polynomial_features(d, degree).size());
    if (n <= 2048) {
      const auto e = ll::attention_lora_grad_dense(p.X, p.Y, p.L, o);
      state.counters["rel_err"] = ll::gradient_rel_error(ll::attention_lora_grad_chained(p.X, p.Y, p.L, o), e);
      state.counters["gamma"] = ll::measure(p.X, p.L).gamma;
    }
  }
}

void reg(const char* name, bool chained, bool full, int degree, index_t d) {
  for (index_t n = 128; n <= 8192; n *= 2)
    benchmark::RegisterBenchmark(name, [=](benchmark::State& s) { bench(s, chained, full, degree); })
        ->Args({n, d})
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->Iterations(n <= 512 ? 20 : n <= 2048 ? 3 : 1);
}
}  // namespace

int main(int argc, char** argv) {
  reg("exact_full/d8", false, true, 0, 8);
  reg("chained_full_g2/d8", true, true, 2, 8);
  reg("chained_full_g3/d8", true, true, 3, 8);
  reg("exact_partial/d8", false, false, 0, 8);
  reg("chained_partial_g2/d8", true, false, 2, 8);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
