// SPDX-License-Identifier: MIT
// FourierFT, C3A and WaveFT (issue 16; deltaw/fourier.hpp, FFTW) at in = out = 4096, tokens = 512,
// fp32, one thread, against the base GEMM in one program and one run (docs/benchmarks.md,
// "PEFT methods at 4096"); the sizes are bench/compare/peft_forward.py's METHODS entries
// ("fourierft", "c3a", "waveft"), which time PEFT's own forward on torch:
//
//   base_gemm                 Y = X·Wᵀ
//   fourierft_apply           Y = X·Wᵀ + X·ΔWᵀ by FFTs, n = 1000 (PEFT's n_frequency default)
//   fourierft_delta           Y = X·ΔWᵀ alone (the update's cost)
//   fourierft_materialize     ΔW [out, in] formed row-tile by row-tile (what merge costs;
//                             PEFT forms it with a dense ifft2 on every forward)
//   c3a_apply / c3a_delta     the same for C3A, block_size 256 (PEFT's default)
//   waveft_apply / _delta     the same for WaveFT (Haar), n = 2592 (PEFT's default): sparse 2 × 2
//                             atoms, no FFT
//
// Times to read are real_time; 3 repetitions, the median is reported. Before timing each
// apply is checked against X·materialize(ΔW)ᵀ on 16 tokens (the tests check every path
// against independent double references and PEFT's files).

#include <benchmark/benchmark.h>

#include "bench_util.hpp"

#include <Eigen/Core>
#include <cmath>
#include <cstdio>
#include <deltaw/fourier.hpp>
#include <string>
#include <utility>

namespace dw = deltaw;

namespace {

using namespace deltaw_bench;

using mat = dw::dense<float>;

constexpr int features = 4096;  // in = out
constexpr int tokens = 512;
constexpr int n_frequency = 1000;  // FourierFTConfig default
constexpr int block = 256;         // C3AConfig default
constexpr int waveft_n = 2592;     // WaveFTConfig default

struct operands {
  mat W, X, Y, K;
  Eigen::VectorXf c, cw;
  operands() {
    std::srand(20241207);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    c = Eigen::VectorXf::Random(n_frequency) * 0.02f;
    cw = Eigen::VectorXf::Random(waveft_n) * 0.02f;
    K = mat::Random((features / block) * (features / block), block) * 0.02f;
  }
};

operands& data() {
  static operands d;
  return d;
}

const dw::fourierft_update<float>& fourierft_u() {
  static const auto u = dw::fourierft(dw::vector_view<const float>(data().c.data(), data().c.size()), features, features,
                                      777, dw::scale(150.0));
  return u;
}
const dw::c3a_update<float>& c3a_u() {
  static const auto u = dw::c3a(dw::view(std::as_const(data().K)), features, features);
  return u;
}

const dw::waveft_update<float>& waveft_u() {
  static const auto u = dw::waveft(dw::vector_view<const float>(data().cw.data(), data().cw.size()), features, features, 777,
                                   dw::scale(25.0));
  return u;
}

void base_gemm(benchmark::State& state) {
  run(state, data(), [](operands& d) { dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y); });
}
template <const auto& (*U)()>
void apply_sum(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + U();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
}
template <const auto& (*U)()>
void apply_delta(benchmark::State& state) {
  run(state, data(), [&](operands& d) { dw::apply(U(), d.X, d.Y); });
}
template <const auto& (*U)()>
void materialize_delta(benchmark::State& state) {
  for (auto _ : state) {
    auto D = dw::materialize(U());
    benchmark::DoNotOptimize(D.data());
  }
}

/// max |a − b| / max |b| of deltaw's apply against X·ΔWᵀ with ΔW materialised, 16 tokens.
template <class U>
double check(const U& u) {
  const mat X16 = data().X.topRows(16);
  mat Y(16, features);
  dw::apply(u, X16, Y);
  const Eigen::MatrixXd Dd = dw::materialize(u).template cast<double>();
  const Eigen::MatrixXd ref = X16.cast<double>() * Dd.transpose();
  return (Y.cast<double>() - ref).cwiseAbs().maxCoeff() / ref.cwiseAbs().maxCoeff();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  single_thread();
  if (!errors_below("bench_fourier", {{"fourierft_rel_err", check(fourierft_u())}, {"c3a_rel_err", check(c3a_u())},
                                                {"waveft_rel_err", check(waveft_u())}})) return 1;
  const std::string f = std::to_string(features), t = std::to_string(tokens);
  const std::string n = "/n" + std::to_string(n_frequency), b = "/b" + std::to_string(block);
  add("base_gemm/" + f + "/" + t, base_gemm);
  add("fourierft_apply/" + f + n + "/" + t, apply_sum<fourierft_u>);
  add("fourierft_delta/" + f + n + "/" + t, apply_delta<fourierft_u>);
  add("fourierft_materialize/" + f + n, materialize_delta<fourierft_u>);
  add("c3a_apply/" + f + b + "/" + t, apply_sum<c3a_u>);
  add("c3a_delta/" + f + b + "/" + t, apply_delta<c3a_u>);
  add("c3a_materialize/" + f + b, materialize_delta<c3a_u>);
  add("waveft_apply/" + f + "/n" + std::to_string(waveft_n) + "/" + t, apply_sum<waveft_u>);
  add("waveft_delta/" + f + "/n" + std::to_string(waveft_n) + "/" + t, apply_delta<waveft_u>);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
