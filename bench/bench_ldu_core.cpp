// SPDX-License-Identifier: MIT
// What LoLDU, the core low-rank form s·B·R·A (LoRA-XS / LoRA-SB / LaMDA) and Block-LoRA
// cost on top of the base GEMM at in = out = 4096, tokens = 512, fp32, r = 16, each beside
// the naive strategy (<type>_peft_strategy: materialise ΔW, add W, one GEMM), as PEFT-style
// implementations do when they build the effective weight every forward.
//
// One thread (Eigen::setNbThreads(1)), so that on a machine shared with other work the
// CPU time of each benchmark is its own; the ratios in docs/benchmarks.md are medians of
// the repetitions of ONE run, from cpu_time (real_time is reported too).

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deltaw/deltaw.hpp>
#include <string>
#include <utility>

namespace dw = deltaw;

namespace {

using mat = dw::dense<float>;
using vec = Eigen::VectorXf;

constexpr int features = 4096;  // in = out
constexpr int tokens = 512;
constexpr int rank = 16;
constexpr int blocks = 4;  // Block-LoRA: B [out, 16] in 4 blocks of r_b = 4 sharing A₀ [4, in]

struct operands {
  mat W, X, Y, B, R, A, Bb, A0;
  vec z;  // LoLDU's trained diagonal, moved away from z₀ so that ΔW ≠ 0
  operands() {
    std::srand(20250214);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    B = mat::Random(features, rank) * 0.01f;
    R = mat::Random(rank, rank);
    A = mat::Random(rank, features) * (1.0f / std::sqrt(float(features)));
    Bb = mat::Random(features, rank) * 0.01f;
    A0 = mat::Random(rank / blocks, features) * (1.0f / std::sqrt(float(features)));
  }
};

operands& data() {
  static operands d;
  return d;
}

// The LoLDU update of W (the LU runs once, here), with z = 1.1·z₀.
const auto& loldu_update() {
  static const auto u0 = dw::loldu(data().W, rank, dw::alpha(1.0));
  static const vec z = [] {
    vec v(rank);
    for (int j = 0; j < rank; ++j) v(j) = 1.1f * u0.z0()[j];
    return v;
  }();
  static const auto u = u0.with_z(z);
  return u;
}
auto core_update() { return dw::lora_xs(data().B, data().R, data().A, dw::alpha(2.0 * rank)); }
auto block_update() { return dw::block_lora(data().Bb, data().A0, dw::alpha(2.0 * rank)); }

void set_flop(benchmark::State& state, double flop) { state.counters["GFLOP"] = benchmark::Counter(flop * 1e-9); }
double base_flop() { return 2.0 * tokens * double(features) * features; }

void base_gemm(benchmark::State& state) {
  auto& d = data();
  const auto Wv = dw::view(std::as_const(d.W));
  for (auto _ : state) {
    dw::apply(Wv, d.X, d.Y);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  set_flop(state, base_flop());
}

// Y = X·(W + ΔW)ᵀ evaluated lazily (never the dense ΔW).
template <class U>
void lazy_apply(benchmark::State& state, const U& u) {
  auto& d = data();
  const auto e = dw::view(std::as_const(d.W)) + u;
  for (auto _ : state) {
    dw::apply(e, d.X, d.Y);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  set_flop(state, base_flop() + double(u.flop_count(tokens)));
}

// The naive strategy: materialise ΔW (out × in, allocated every call), add W, one GEMM.
template <class U>
void peft_strategy(benchmark::State& state, const U& u) {
  auto& d = data();
  for (auto _ : state) {
    mat Wd = dw::materialize(u);
    Wd += d.W;
    dw::apply(dw::view(std::as_const(Wd)), d.X, d.Y);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  set_flop(state, base_flop());
}

/// Relative Frobenius error of the lazy apply against X·(W + ΔW)ᵀ with ΔW materialised in
/// double from the factors: a benchmark of a wrong result is worthless.
template <class U>
double check(const U& u) {
  auto& d = data();
  mat Y(tokens, features);
  dw::apply(dw::view(std::as_const(d.W)) + u, d.X, Y);
  const Eigen::MatrixXd Xd = d.X.cast<double>();
  const Eigen::MatrixXd Wd = d.W.cast<double>() + dw::materialize(u).template cast<double>();
  // Only a slice of the tokens: the double GEMM is the slow part.
  const Eigen::MatrixXd ref = Xd.topRows(32) * Wd.transpose();
  return (Y.topRows(32).cast<double>() - ref).norm() / ref.norm();
}

std::string name(const char* what, std::initializer_list<int> dims) {
  std::string s = what;
  for (int v : dims) s += "/" + std::to_string(v);
  return s;
}

template <class F>
void add(const std::string& n, F fn) {
  benchmark::RegisterBenchmark(n.c_str(), fn)->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  Eigen::setNbThreads(1);
  benchmark::AddCustomContext("deltaw_threads", "1");

  const auto& ld = loldu_update();
  const auto core = core_update();
  const auto blk = block_update();
  const double errs[3] = {check(ld), check(core), check(blk)};
  const char* names[3] = {"loldu", "core_low_rank", "block_lora"};
  for (int i = 0; i < 3; ++i) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3e", errs[i]);
    benchmark::AddCustomContext(std::string(names[i]) + "_apply_rel_err", buf);
    if (!(errs[i] < 1e-5)) {
      std::fprintf(stderr, "bench_ldu_core: %s apply differs from the dense reference (rel. error %s)\n", names[i], buf);
      return 1;
    }
  }

  add(name("base_gemm", {features, tokens}), base_gemm);
  add(name("loldu_apply", {features, rank, tokens}), [&](benchmark::State& s) { lazy_apply(s, ld); });
  add(name("loldu_peft_strategy", {features, rank, tokens}), [&](benchmark::State& s) { peft_strategy(s, ld); });
  add(name("core_low_rank_apply", {features, rank, tokens}), [&](benchmark::State& s) { lazy_apply(s, core); });
  add(name("core_low_rank_peft_strategy", {features, rank, tokens}),
      [&](benchmark::State& s) { peft_strategy(s, core); });
  add(name("block_lora_apply", {features, rank, blocks, tokens}), [&](benchmark::State& s) { lazy_apply(s, blk); });
  add(name("block_lora_peft_strategy", {features, rank, blocks, tokens}),
      [&](benchmark::State& s) { peft_strategy(s, blk); });
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
