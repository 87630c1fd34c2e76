// SPDX-License-Identifier: MIT
// What the SVD-based tools cost, each beside the dense SVD it avoids (docs/benchmarks.md,
// "Initialisation and spectra"):
//
//   pissa_randomized/4096/16   PiSSA init (init/pissa.hpp) with the randomized SVD, 4 power
//                              iterations, oversampling 10 (PEFT's "pissa_niter_4"); the SVD
//                              runs in double as pissa() does
//   rsvd_float/4096/16         the randomized SVD alone in fp32 (what torch.svd_lowrank does
//                              for bench/compare/svd_lowrank_torch.py)
//   pissa_exact/4096/16        PiSSA with the exact SVD (Eigen BDCSVD in double, thin U, V)
//   dense_svd_float/4096       BDCSVD of the same fp32 matrix in fp32, thin U and V
//   factored_spectrum_BA/n/16  singular values of s·B·A from the factors (thin QRs)
//   factored_spectrum_BRA/n/16 the same for s·B·R·A (spectral/report.hpp)
//   dense_spectrum/n/16        materialise ΔW = s·B·A, then BDCSVD values only, fp32
//
// The weight is W = G/√n + P: G uniform(−1, 1), P a planted rank-16 part with singular
// values 8..1.25·8, so that its top 16 are separated from the bulk (about 1.15) as in real
// weights. A 4096² dense SVD takes minutes on one core: those rows run one iteration.
// Run with OMP_NUM_THREADS=1 (Eigen's parallel GEMM follows OpenMP).

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <Eigen/SVD>
#include <cmath>
#include <cstdlib>
#include <deltaw/deltaw.hpp>
#include <deltaw/init/pissa.hpp>
#include <deltaw/spectral/report.hpp>

namespace dw = deltaw;

namespace {

using mat = dw::dense<float>;

constexpr int rank = 16;

/// W [n, n] = G/√n + P with P = U·diag(8·(1 + i/60))·Vᵀ of rank 16 (U, V: normalised
/// random columns, nearly orthogonal at this size).
mat make_weight(int n) {
  std::srand(20261130);
  mat W = mat::Random(n, n) * (1.0f / std::sqrt(float(n)));
  mat U = mat::Random(n, rank), V = mat::Random(n, rank);
  U.colwise().normalize();
  V.colwise().normalize();
  for (int i = 0; i < rank; ++i) U.col(i) *= 8.0f * (1.0f + float(i) / 60.0f);
  W.noalias() += U * V.transpose();
  return W;
}

const mat& weight(int n) {
  static int cached = -1;
  static mat W;
  if (cached != n) {
    W = make_weight(n);
    cached = n;
  }
  return W;
}

void pissa_randomized(benchmark::State& state) {
  const int n = int(state.range(0)), r = int(state.range(1));
  const mat& W = weight(n);
  mat Wc;
  for (auto _ : state) {
    state.PauseTiming();
    Wc = W;  // pissa rewrites W into W_res
    state.ResumeTiming();
    auto f = dw::pissa(Wc, r, 1.0, {.power_iterations = 4, .oversampling = 10, .seed = 1});
    benchmark::DoNotOptimize(f.A.data());
  }
}

/// The same with weight_type_arithmetic: the SVD and the residual in fp32 (as torch's
/// svd_lowrank on a float tensor).
void pissa_randomized_fp32(benchmark::State& state) {
  const int n = int(state.range(0)), r = int(state.range(1));
  const mat& W = weight(n);
  mat Wc;
  for (auto _ : state) {
    state.PauseTiming();
    Wc = W;
    state.ResumeTiming();
    auto f = dw::pissa(Wc, r, 1.0,
                       {.power_iterations = 4, .oversampling = 10, .seed = 1, .weight_type_arithmetic = true});
    benchmark::DoNotOptimize(f.A.data());
  }
}

void rsvd_float(benchmark::State& state) {
  const int n = int(state.range(0)), r = int(state.range(1));
  const mat& W = weight(n);
  for (auto _ : state) {
    auto s = dw::randomized_svd<float>(W, r, {.oversampling = 10, .power_iterations = 4, .seed = 1});
    benchmark::DoNotOptimize(s.U.data());
  }
}

void pissa_exact(benchmark::State& state) {
  const int n = int(state.range(0)), r = int(state.range(1));
  const mat& W = weight(n);
  mat Wc;
  Eigen::VectorXd exact_S;
  for (auto _ : state) {
    state.PauseTiming();
    Wc = W;
    state.ResumeTiming();
    auto f = dw::pissa(Wc, r, 1.0);
    benchmark::DoNotOptimize(f.A.data());
    state.PauseTiming();
    exact_S = dw::factored_spectrum(f.B, f.A, 1.0);
    state.ResumeTiming();
  }
  // Outside the timing: how close the randomized init's σ₁..σ_r are to the exact ones.
  mat Wr = W;
  const auto fr = dw::pissa(Wr, r, 1.0, {.power_iterations = 4, .oversampling = 10, .seed = 1});
  const Eigen::VectorXd rs = dw::factored_spectrum(fr.B, fr.A, 1.0);
  state.counters["sigma_rel_err_niter4"] = ((rs - exact_S).cwiseAbs().array() / exact_S.array()).maxCoeff();
}

void dense_svd_float(benchmark::State& state) {
  const int n = int(state.range(0));
  const Eigen::MatrixXf W = weight(n);  // BDCSVD wants column-major
  for (auto _ : state) {
    Eigen::BDCSVD<Eigen::MatrixXf> svd(W, Eigen::ComputeThinU | Eigen::ComputeThinV);
    benchmark::DoNotOptimize(svd.singularValues().data());
  }
}

struct factors {
  mat B, R, A;
  explicit factors(int n) {
    std::srand(7);
    B = mat::Random(n, rank) * 0.01f;
    R = mat::Random(rank, rank);
    A = mat::Random(rank, n) * (1.0f / std::sqrt(float(n)));
  }
};

void factored_spectrum_BA(benchmark::State& state) {
  const factors f(int(state.range(0)));
  for (auto _ : state) {
    auto S = dw::factored_spectrum(f.B, f.A, 2.0);
    benchmark::DoNotOptimize(S.data());
  }
}

void factored_spectrum_BRA(benchmark::State& state) {
  const factors f(int(state.range(0)));
  for (auto _ : state) {
    auto S = dw::factored_svd(dw::core_lora(f.B, f.R, f.A, dw::scale(2.0))).S;
    benchmark::DoNotOptimize(S.data());
  }
}

void dense_spectrum(benchmark::State& state) {
  const factors f(int(state.range(0)));
  const auto lo = dw::lora(f.B, f.A, dw::scale(2.0));
  for (auto _ : state) {
    const Eigen::MatrixXf D = dw::materialize(lo);
    Eigen::BDCSVD<Eigen::MatrixXf> svd(D);  // values only: the cheapest dense route
    benchmark::DoNotOptimize(svd.singularValues().data());
  }
}

}  // namespace

BENCHMARK(pissa_randomized)->Args({4096, rank})->Unit(benchmark::kMillisecond);
BENCHMARK(pissa_randomized_fp32)->Args({4096, rank})->Unit(benchmark::kMillisecond);
BENCHMARK(rsvd_float)->Args({4096, rank})->Unit(benchmark::kMillisecond);
BENCHMARK(pissa_exact)->Args({4096, rank})->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(dense_svd_float)->Arg(4096)->Iterations(1)->Unit(benchmark::kMillisecond);
BENCHMARK(factored_spectrum_BA)->Arg(1024)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(factored_spectrum_BRA)->Arg(1024)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(dense_spectrum)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond);
BENCHMARK(dense_spectrum)->Arg(4096)->Iterations(1)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
