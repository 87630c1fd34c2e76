// SPDX-License-Identifier: MIT
// One LoRA training step on a frozen 4096 × 4096 fp32 layer, 512 tokens, r = 16, against
// the minimal work of any training step of that layer: the base GEMM for the output plus
// the GEMM for the input gradient (`two_gemms`), in the same run.
//
//   train_step/4096/16/512   tape: y = lora_linear(x, W, B, A) (x an input that wants its
//                            gradient), loss = mse(y, target), backward, AdamW on B and A,
//                            zero_grad. W is a view: never copied, never differentiated.
//   two_gemms/4096/512       Y = X·Wᵀ and dX = dY·W with deltaw::apply/apply_transposed.
//
// Built twice (bench/train.cmake): with Eigen's own products and with EIGEN_USE_BLAS.
// `--rss_steps=N` skips Google Benchmark and runs N training steps only (no two_gemms
// buffers), printing the sizes of what is held, for `/usr/bin/time -v` (peak RSS). With
// glibc it first fixes malloc's mmap threshold at 128 KiB (its initial value), so that
// every activation buffer the tape frees goes back to the system at once; without that,
// glibc raises the threshold to 8 MiB after the first activation is freed and keeps later
// ones on its heap, where freed blocks stay resident (docs/benchmarks.md, "Memory of the
// training step"). `--rss_malloc_defaults` keeps glibc's dynamic threshold.
#include <benchmark/benchmark.h>
#ifdef DELTAW_BENCH_HAS_OPENBLAS
#include <cblas.h>
#endif

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <Eigen/Core>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <deltaw/autograd/adapters.hpp>
#include <deltaw/optim/optim.hpp>
#include <string>

namespace dw = deltaw;
namespace ag = deltaw::autograd;

namespace {

using mat = dw::dense<float>;
constexpr int features = 4096;
constexpr int tokens = 512;
constexpr int rank = 16;
constexpr double lora_alpha = 32;

void use_threads(int n) {
  Eigen::setNbThreads(n);
#ifdef DELTAW_BENCH_HAS_OPENBLAS
  openblas_set_num_threads(n);
#endif
}

/// What a training step needs: the frozen W, a batch X and its regression target.
struct step_operands {
  mat W, X, target;
  ag::parameter<float> B, A;
  dw::optim::adamw<float>* opt = nullptr;
  step_operands() {
    std::srand(20240611);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    target = mat::Random(tokens, features);
    B = ag::parameter<float>("B", mat::Random(features, rank) * 0.01f);
    A = ag::parameter<float>("A", mat::Random(rank, features) * (1.0f / std::sqrt(float(features))));
  }
};
step_operands& step_data() {
  static step_operands d;
  return d;
}

/// One step; returns the loss.
float train_step_once(step_operands& d, dw::optim::adamw<float>& opt, mat* dX_out = nullptr) {
  ag::tape<float> t;
  t.set_release_values(true);  // Y is freed once the loss's backward has read it
  const auto x = t.input(d.X, "x");
  const auto y = ag::lora_linear(x, dw::view(std::as_const(d.W)), t.param(d.B), t.param(d.A), lora_alpha / rank);
  const auto loss = ag::mse(y, t.frozen(d.target, "target"));
  t.backward(loss);
  if (dX_out) *dX_out = t.grad(x);
  opt.step();
  opt.zero_grad();
  return loss.value()(0, 0);
}

void train_step(benchmark::State& state, int threads) {
  use_threads(threads);
  auto& d = step_data();
  dw::optim::adamw<float> opt({&d.B, &d.A}, {1e-4, 0.9, 0.999, 1e-8, 0.0});
  for (auto _ : state) {
    const float l = train_step_once(d, opt);
    benchmark::DoNotOptimize(l);
  }
  state.counters["GFLOP"] = benchmark::Counter(
      (2.0 * 2 * tokens * double(features) * features + 6.0 * 2 * tokens * rank * features) * 1e-9);
}

struct gemm_operands {
  mat Y, dY, dX;
  gemm_operands() : Y(tokens, features), dY(mat::Random(tokens, features)), dX(tokens, features) {}
};

void two_gemms(benchmark::State& state, int threads) {
  use_threads(threads);
  auto& d = step_data();
  static gemm_operands g;
  const auto Wv = dw::view(std::as_const(d.W));
  for (auto _ : state) {
    dw::apply(Wv, d.X, g.Y);
    dw::apply_transposed(Wv, g.dY, g.dX);
    benchmark::DoNotOptimize(g.Y.data());
    benchmark::DoNotOptimize(g.dX.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP"] = benchmark::Counter(2.0 * 2 * tokens * double(features) * features * 1e-9);
}

/// The step's gradients against the formulas of METHODS.md in double (dB, dA whole; dX on
/// a few rows): a benchmark of a wrong step is worthless.
double check_step() {
  use_threads(1);
  auto& d = step_data();
  const mat B0 = d.B.value(), A0 = d.A.value();
  ag::parameter<float> B("B", B0), A("A", A0);
  ag::tape<float> t;
  const auto x = t.input(d.X, "x");
  const double s = lora_alpha / rank;
  const auto y = ag::lora_linear(x, dw::view(std::as_const(d.W)), t.param(B), t.param(A), s);
  t.backward(ag::mse(y, t.frozen(d.target)));
  using MD = Eigen::MatrixXd;
  const MD Xd = d.X.cast<double>(), Bd = B0.cast<double>(), Ad = A0.cast<double>();
  const MD Z = Xd * Ad.transpose();
  const MD Y = Xd * d.W.cast<double>().transpose() + s * Z * Bd.transpose();
  const MD dY = 2.0 * (Y - d.target.cast<double>()) / double(Y.size());
  const MD dB = s * dY.transpose() * Z, dZ = s * dY * Bd, dA = dZ.transpose() * Xd;
  const MD dX8 = dY.topRows(8) * d.W.cast<double>() + dZ.topRows(8) * Ad;
  auto rel = [](const MD& a, const MD& b) { return (a - b).norm() / b.norm(); };
  return std::max({rel(B.grad().cast<double>(), dB), rel(A.grad().cast<double>(), dA),
                   rel(t.grad(x).topRows(8).cast<double>(), dX8)});
}

/// VmHWM (peak RSS so far) in MiB, from /proc/self/status; −1 where unavailable.
double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;
  return -1;
}

int rss_only(int steps, bool malloc_defaults) {
#if defined(__GLIBC__)
  if (!malloc_defaults) mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  std::printf("malloc: glibc, mmap threshold %s\n", malloc_defaults ? "dynamic (default)" : "fixed at 128 KiB");
#else
  (void)malloc_defaults;
#endif
  const double startup = peak_rss_mib();  // the runtime's libraries, before any tensor
  use_threads(1);
  auto& d = step_data();
  dw::optim::adamw<float> opt({&d.B, &d.A}, {1e-4, 0.9, 0.999, 1e-8, 0.0});
  const double mib = 1.0 / (1024.0 * 1024.0);
  const double act = double(tokens) * features * sizeof(float) * mib;
  for (int i = 0; i < steps; ++i) {
    const double loss = train_step_once(d, opt);
    std::printf("step %d loss %.6f, peak RSS so far %.2f MiB\n", i, loss, peak_rss_mib());
  }
  std::printf("frozen W          %8.2f MiB (viewed by the tape, never copied)\n",
              double(d.W.size()) * sizeof(float) * mib);
  std::printf("X, target         %8.2f MiB (caller's batch, viewed)\n", 2 * act);
  std::printf("Y, dY, dX         %8.2f MiB (tape: output, its gradient, input gradient)\n", 3 * act);
  std::printf("B, A + grads + AdamW moments %8.2f MiB\n",
              4.0 * double(d.B.size() + d.A.size()) * sizeof(float) * mib);
  const double peak = peak_rss_mib();
  const double budget = double(d.W.size()) * sizeof(float) * mib * 1.10 + 5 * act;
  std::printf("peak RSS %.2f MiB, of which %.2f MiB before any tensor existed (libraries)\n", peak, startup);
  std::printf("peak RSS - startup = %.2f MiB; budget W + 10%% + activations (X, target, Y, dY, dX) = %.2f MiB\n",
              peak - startup, budget);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool malloc_defaults = false;
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--rss_malloc_defaults") == 0) malloc_defaults = true;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--rss_steps=", 12) == 0) return rss_only(std::atoi(argv[i] + 12), malloc_defaults);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#ifdef EIGEN_USE_BLAS
  benchmark::AddCustomContext("deltaw_build", "blas");
#else
  benchmark::AddCustomContext("deltaw_build", "eigen");
#endif
  const double err = check_step();
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", err);
  benchmark::AddCustomContext("train_step_grad_rel_err", buf);
  if (!(err < 1e-4)) {
    std::fprintf(stderr, "bench_train_step: gradients differ from the double reference (rel. error %s)\n", buf);
    return 1;
  }
  for (int th : {1, 2}) {
    const std::string suffix = "/threads:" + std::to_string(th);
    benchmark::RegisterBenchmark(("train_step/4096/16/512" + suffix).c_str(), train_step, th)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark(("two_gemms/4096/512" + suffix).c_str(), two_gemms, th)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
