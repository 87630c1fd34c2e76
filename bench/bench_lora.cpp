// SPDX-License-Identifier: MIT
// The foundation benchmarks: what LoRA (r = 16) costs on top of the base GEMM, against
// the naive materialise-then-multiply strategy, merge/unmerge, and OpenBLAS's sgemm.
//
// One source, two programs (bench/lora.cmake): bench_lora uses Eigen's own product,
// bench_lora_blas is built with EIGEN_USE_BLAS (deltaw's DELTAW_USE_BLAS mode), so that
// deltaw's products go through OpenBLAS's sgemm. Names carry the shape and the thread
// count (".../threads:N") so that runs compare by name; tools/bench_ratios.py reads the
// JSON of one run and prints the ratios that docs/benchmarks.md tabulates.
//
// Times to read are real_time (wall clock): the products run on several threads.

#include <benchmark/benchmark.h>
#include <cblas.h>

#include <Eigen/Core>
#include <cmath>
#include <cstdio>
#include <deltaw/deltaw.hpp>
#include <string>
#include <utility>

namespace dw = deltaw;

namespace {

using mat = dw::dense<float>;  // row-major, PyTorch's layout

constexpr int out_features = 4096;
constexpr int in_features = 4096;
constexpr int tokens = 512;
constexpr int rank = 16;
constexpr double lora_alpha = 32;

/// The operands, shared by every benchmark: W [out, in], X [tokens, in], B [out, r], A [r, in].
struct operands {
  mat W, X, B, A, Y;
  operands() {
    std::srand(20240611);
    W = mat::Random(out_features, in_features) * (1.0f / std::sqrt(float(in_features)));
    X = mat::Random(tokens, in_features);
    B = mat::Random(out_features, rank) * 0.01f;
    A = mat::Random(rank, in_features) * (1.0f / std::sqrt(float(in_features)));
    Y = mat::Zero(tokens, out_features);
  }
};

operands& data() {
  static operands d;
  return d;
}

/// Threads for both Eigen's own products (OpenMP) and OpenBLAS (its pthread pool).
void use_threads(int n) {
  Eigen::setNbThreads(n);
  openblas_set_num_threads(n);
}

double gemm_flop(int m, int n, int k) { return 2.0 * m * n * k; }

void set_flop_counter(benchmark::State& state, double flop) {
  // Per iteration, not a rate: Google Benchmark's rates divide by CPU time, which is not
  // wall time for threaded products. tools/bench_ratios.py derives GFLOP/s from real_time.
  state.counters["GFLOP"] = benchmark::Counter(flop * 1e-9);
}

void base_gemm(benchmark::State& state, int threads) {
  use_threads(threads);
  auto& d = data();
  const auto Wv = dw::view(std::as_const(d.W));
  for (auto _ : state) {
    dw::apply(Wv, d.X, d.Y);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, gemm_flop(tokens, out_features, in_features));
}

void lora_apply(benchmark::State& state, int threads) {
  use_threads(threads);
  auto& d = data();
  const auto e = dw::view(std::as_const(d.W)) + dw::lora(d.B, d.A, dw::alpha(lora_alpha));
  for (auto _ : state) {
    dw::apply(e, d.X, d.Y);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, gemm_flop(tokens, out_features, in_features) +
                              2.0 * tokens * rank * (in_features + out_features));
}

// The naive strategy: form the dense ΔW each call, add W, one GEMM with W + ΔW. The
// out × in allocation is part of what it costs.
void lora_materialized(benchmark::State& state, int threads) {
  use_threads(threads);
  auto& d = data();
  const auto u = dw::lora(d.B, d.A, dw::alpha(lora_alpha));
  for (auto _ : state) {
    mat Wd = dw::materialize(u);
    Wd += d.W;
    dw::apply(dw::view(std::as_const(Wd)), d.X, d.Y);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, gemm_flop(tokens, out_features, in_features) + gemm_flop(out_features, in_features, rank));
}

// merge then unmerge (one pair per iteration), on a copy of W so the other benchmarks see
// the original weight.
void lora_merge(benchmark::State& state, int threads) {
  use_threads(threads);
  auto& d = data();
  static mat Wm = d.W;
  const auto u = dw::lora(d.B, d.A, dw::alpha(lora_alpha));
  for (auto _ : state) {
    dw::merge(Wm, u);
    dw::unmerge(Wm, u);
    benchmark::DoNotOptimize(Wm.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, 2.0 * gemm_flop(out_features, in_features, rank));
}

// The reference: one sgemm for Y = X·Wᵀ, row-major as PyTorch stores it.
void openblas_sgemm(benchmark::State& state, int threads) {
  use_threads(threads);
  auto& d = data();
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, out_features, in_features, 1.0f, d.X.data(),
                in_features, d.W.data(), in_features, 0.0f, d.Y.data(), out_features);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  set_flop_counter(state, gemm_flop(tokens, out_features, in_features));
}

/// Relative Frobenius error of lora_apply against the materialised result in double:
/// a benchmark of a wrong result is worthless.
double check_lora_apply() {
  auto& d = data();
  use_threads(1);
  mat Y(tokens, out_features);
  dw::apply(dw::view(std::as_const(d.W)) + dw::lora(d.B, d.A, dw::alpha(lora_alpha)), d.X, Y);
  const Eigen::MatrixXd Wd = d.W.cast<double>() + (lora_alpha / rank) * d.B.cast<double>() * d.A.cast<double>();
  const Eigen::MatrixXd ref = d.X.cast<double>() * Wd.transpose();
  return (Y.cast<double>() - ref).norm() / ref.norm();
}

std::string shape_name(const char* what, std::initializer_list<int> dims, int threads) {
  std::string s = what;
  for (int v : dims) s += "/" + std::to_string(v);
  return s + "/threads:" + std::to_string(threads);
}

template <class F>
void add(const std::string& name, F fn, int threads) {
  benchmark::RegisterBenchmark(name.c_str(), fn, threads)->Unit(benchmark::kMillisecond);
}

void register_all() {
  for (int t : {1, 2}) {
    add(shape_name("base_gemm", {in_features, tokens}, t), base_gemm, t);
    add(shape_name("lora_apply", {in_features, rank, tokens}, t), lora_apply, t);
    add(shape_name("lora_materialized", {in_features, rank, tokens}, t), lora_materialized, t);
    add(shape_name("lora_merge", {in_features, rank}, t), lora_merge, t);
    add(shape_name("openblas_sgemm", {in_features, tokens}, t), openblas_sgemm, t);
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#ifdef EIGEN_USE_BLAS
  benchmark::AddCustomContext("deltaw_build", "blas");
#else
  benchmark::AddCustomContext("deltaw_build", "eigen");
#endif
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("openblas_config", openblas_get_config());
  const double err = check_lora_apply();
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", err);
  benchmark::AddCustomContext("lora_apply_rel_err", buf);
  if (!(err < 1e-5)) {
    std::fprintf(stderr, "bench_lora: lora_apply differs from the dense reference (rel. error %s)\n", buf);
    return 1;
  }
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
