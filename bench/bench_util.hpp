// SPDX-License-Identifier: MIT
// What the "deltaw apply against PEFT's strategy" benchmarks share: the FLOP counter, the
// timing loop over one set of operands, the registration (milliseconds, real time, median of
// repetitions), the single-thread context line, and the correctness gate that runs before
// anything is timed (a benchmark of a wrong result is worthless, so the program refuses to
// time it). Each benchmark program keeps its own operands and strategies.
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <deltaw/deltaw.hpp>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <type_traits>

namespace deltaw_bench {

/// A fast deterministic fill of a float matrix with values in [-a, a): mt19937 over the 10⁹
/// floats of the 4096-wide serving benchmarks would dominate their set-up.
template <class M>
void fill_uniform(M& m, std::uint64_t seed, float a) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (Eigen::Index i = 0; i < m.size(); ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    m.data()[i] = a * (float((s >> 40) & 0xFFFFFF) / float(1 << 23) - 1.0f);
  }
}

inline double gemm_flop(double m, double n, double k) { return 2.0 * m * n * k; }

inline void set_flop_counter(benchmark::State& state, double flop) {
  state.counters["GFLOP"] = benchmark::Counter(flop * 1e-9);
}

/// Times `body(d)`; d.Y is what the body writes, kept alive against the optimiser.
template <class Operands, class F>
void run(benchmark::State& state, Operands& d, F&& body) {
  for (auto _ : state) {
    body(d);
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
}

/// Registers `fn` as NAME: milliseconds, real time, `reps` repetitions of at least 1 s, median
/// and spread reported.
inline void add(const std::string& name, void (*fn)(benchmark::State&), int reps = 3) {
  benchmark::RegisterBenchmark(name.c_str(), fn)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime()
      ->MinTime(1.0)
      ->Repetitions(reps)
      ->ReportAggregatesOnly(true);
}

/// max |y − ref| / max |ref|, in double.
template <class A, class B>
double max_rel_err(const A& y, const B& ref) {
  const Eigen::MatrixXd r = ref.template cast<double>();
  return (y.template cast<double>() - r).cwiseAbs().maxCoeff() / r.cwiseAbs().maxCoeff();
}

/// max |a − b| / max |b| of deltaw's apply of `e` against `strategy(d, R)` (the peer's way of
/// computing the same output into R [tokens, out]), on the first 16 tokens of d.X.
template <class Operands, class E, class F>
double strategy_error(Operands& d, const E& e, F&& strategy) {
  using M = std::remove_cvref_t<decltype(d.Y)>;
  const M X16 = d.X.topRows(16);
  M Y(16, d.Y.cols()), R(d.Y.rows(), d.Y.cols());
  deltaw::apply(e, X16, Y);
  strategy(d, R);
  return max_rel_err(Y, R.topRows(16));
}

/// Eigen on one thread, said in the benchmark's context.
inline void single_thread() {
  Eigen::setNbThreads(1);
  benchmark::AddCustomContext("threads", "1");
}

struct named_error {
  const char* name;
  double value;
};

/// Puts each error in the benchmark's context; false (after saying which, on stderr) if one is
/// not below `bound`: the caller returns 1 instead of timing a wrong result.
inline bool errors_below(const char* program, std::initializer_list<named_error> errors, double bound = 1e-4) {
  bool ok = true;
  for (const auto& e : errors) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3e", e.value);
    benchmark::AddCustomContext(e.name, buf);
    if (!(e.value < bound)) {
      std::fprintf(stderr, "%s: %s = %s (bound %.0e): deltaw's result differs from the reference strategy\n", program, e.name,
                   buf, bound);
      ok = false;
    }
  }
  return ok;
}

}  // namespace deltaw_bench
