// SPDX-License-Identifier: MIT
// BOFT and AdaLoRA (issue 16) at in = out = 4096, tokens = 512, fp32, one thread, against the
// base GEMM and against PEFT's strategy, in one program and one run (docs/benchmarks.md,
// "PEFT methods at 4096"); the sizes are bench/compare/peft_forward.py's METHODS entries
// "boft" and "adalora":
//
//   base_gemm               Y = X·Wᵀ
//   boft_apply              Y = ((X·R)·Wᵀ)·diag(s): b = 4 (PEFT's default boft_block_size), m = 1
//                           (what PEFT runs on a CPU), one blockwise rotation of X
//   boft_peft_strategy      PEFT's BOFT forward: the dense block-diagonal BD [in, in], the dense
//                           permutation products P·BD·Pᵀ (two in × in × in bmm), X·R, the base
//                           GEMM and the output scale
//   boft_m2_apply           deltaw with m = 2 butterfly factors of b = 4 (PEFT needs its CUDA
//                           extension for m > 1; no CPU peer)
//   adalora_apply           Y = X·Wᵀ + s·((X·Aᵀ)·diag(E))·Bᵀ, r = 12 (PEFT's init_r)
//   adalora_peft_strategy   PEFT's SVDLinear forward: A ⊙ E formed, X·(A⊙E)ᵀ·Bᵀ·scaling/ranknum
//
// Times to read are real_time; each benchmark runs 3 repetitions, the median is reported.
// Before timing, each deltaw apply is checked against its PEFT-strategy result on 16 tokens.

#include <benchmark/benchmark.h>

#include "bench_util.hpp"

#include <Eigen/Core>
#include <Eigen/LU>
#include <cmath>
#include <cstdio>
#include <deltaw/deltaw.hpp>
#include <string>
#include <utility>
#include <vector>

namespace dw = deltaw;

namespace {

using namespace deltaw_bench;

using mat = dw::dense<float>;

constexpr int features = 4096;  // in = out
constexpr int tokens = 512;
constexpr int boft_b = 4;       // PEFT's BOFTConfig default boft_block_size
constexpr int adalora_r = 12;   // PEFT's AdaLoraConfig default init_r

struct operands {
  mat W, X, Y, R1, R2, A, B;
  Eigen::VectorXf s, E;
  operands() {
    std::srand(20240612);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    R1 = mat::Random(features, boft_b) * 0.1f;
    R2 = mat::Random(2 * features, boft_b) * 0.1f;
    s = Eigen::VectorXf::Ones(features) + 0.1f * Eigen::VectorXf::Random(features);
    A = mat::Random(adalora_r, features) * 0.02f;
    B = mat::Random(features, adalora_r) * 0.02f;
    E = Eigen::VectorXf::Random(adalora_r);
  }
};

operands& data() {
  static operands d;
  return d;
}

const auto& boft1() {
  static const auto u = dw::boft(dw::view(std::as_const(data().W)), dw::view(std::as_const(data().R1)),
                                 dw::vview(std::as_const(data().s)));
  return u;
}
const auto& boft2() {
  static const auto u = dw::boft(dw::view(std::as_const(data().W)), dw::view(std::as_const(data().R2)),
                                 dw::vview(std::as_const(data().s)));
  return u;
}
const auto& ada() {
  static const auto u = dw::adalora(dw::view(std::as_const(data().B)), dw::vview(std::as_const(data().E)),
                                    dw::view(std::as_const(data().A)), dw::alpha(8), adalora_r);
  return u;
}

void base_gemm(benchmark::State& state) {
  run(state, data(), [](operands& d) { dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}

void boft_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + boft1();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(boft1().flop_count(tokens)));
}
void boft_m2_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + boft2();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(boft2().flop_count(tokens)));
}
/// PEFT's BOFT forward for m = 1 (Linear.forward): Cayley blocks (torch.linalg.solve), the
/// dense block_diag, the dense permutation P (the identity for m = 1, still a dense in × in
/// matrix), bmm(BD, Pᵀ), bmm(P, ·), x @ R, the base layer, the scale.
void boft_peft_into(operands& d, mat& Y) {
  const int nb = features / boft_b;
  mat BD = mat::Zero(features, features);
  for (int k = 0; k < nb; ++k) {
    const mat P = d.R1.middleRows(k * boft_b, boft_b);
    const mat S = 0.5f * (P - P.transpose());
    const mat I = mat::Identity(boft_b, boft_b);
    const mat Rk = (I + S).transpose().partialPivLu().solve((I - S).transpose()).transpose();
    BD.block(k * boft_b, k * boft_b, boft_b, boft_b) = Rk;
  }
  const mat Pm = mat::Identity(features, features);
  mat T(features, features), R(features, features);
  T.noalias() = BD * Pm.transpose();
  R.noalias() = Pm * T;
  mat Xr(tokens, features);
  Xr.noalias() = d.X * R;
  Y.noalias() = Xr * d.W.transpose();
  Y = Y * d.s.asDiagonal();
}
void boft_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { boft_peft_into(d, d.Y); });
  set_flop_counter(state, 2 * gemm_flop(features, features, features) + 2 * gemm_flop(tokens, features, features));
}

void adalora_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + ada();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(ada().flop_count(tokens)));
}
/// PEFT's SVDLinear.forward: result = base(x); result += (x @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5).
void adalora_peft_into(operands& d, mat& Y) {
  Y.noalias() = d.X * d.W.transpose();
  const mat AE = d.E.asDiagonal() * d.A;
  mat Z(tokens, adalora_r);
  Z.noalias() = d.X * AE.transpose();
  Y.noalias() += (Z * d.B.transpose()) * float(8.0 / (adalora_r + 1e-5));
}
void adalora_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { adalora_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(ada().flop_count(tokens)));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  single_thread();
  if (!errors_below("bench_boft_adalora", {
      {"boft_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + boft1(), boft_peft_into)},
      {"adalora_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + ada(), adalora_peft_into)},
  })) return 1;
  const std::string f = std::to_string(features), t = std::to_string(tokens);
  add("base_gemm/" + f + "/" + t, base_gemm);
  add("boft_apply/" + f + "/b4/m1/" + t, boft_apply);
  add("boft_m2_apply/" + f + "/b4/m2/" + t, boft_m2_apply);
  add("boft_peft_strategy/" + f + "/b4/m1/" + t, boft_peft_strategy);
  add("adalora_apply/" + f + "/r12/" + t, adalora_apply);
  add("adalora_peft_strategy/" + f + "/r12/" + t, adalora_peft_strategy);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
