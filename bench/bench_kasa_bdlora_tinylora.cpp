// SPDX-License-Identifier: MIT
// KaSA, BD-LoRA and TinyLoRA (issue 16) at in = out = 4096, tokens = 512, fp32, one thread,
// against the base GEMM and against PEFT's forward strategy written in Eigen, in one program
// and one run (docs/benchmarks.md, "PEFT methods at 4096"); the sizes are
// bench/compare/peft_forward.py's METHODS entries "kasa", "bdlora_a", "bdlora_b", "tinylora":
//
//   base_gemm                 Y = X·Wᵀ
//   kasa_apply                Y = X·Wᵀ + s·((X·Aᵀ)·diag(ΔΣ))·Bᵀ, r = 8
//   kasa_peft_strategy        PEFT's KasaLinearVariant.forward: lora_A(x) * diag, lora_B(·)·scaling
//   bdlora_a_apply            r = 16, A block-diagonal with 4 blocks, applied block by block
//   bdlora_b_apply            r = 16, B block-diagonal with 4 blocks
//   bdlora_a_dense_strategy   the same with BD(A) assembled dense [r, in] once per call (what
//                             PEFT's merge / delta weight does; PEFT's forward is blockwise)
//   tinylora_apply            Y = X·Wᵀ + ((X·Aᵀ)·Rᵀ)·Bᵀ, R = Σ vᵢPᵢ, r = 2, u = 64 (PEFT's defaults)
//   tinylora_peft_strategy    PEFT's forward: R by einsum, then three F.linear
//
// Times to read are real_time; each benchmark runs 3 repetitions, the median is reported.
// Before timing, each deltaw apply is checked against its PEFT-strategy result on 16 tokens.

#include <benchmark/benchmark.h>

#include "bench_util.hpp"

#include <Eigen/Core>
#include <cmath>
#include <cstdio>
#include <deltaw/deltaw.hpp>
#include <string>
#include <utility>

namespace dw = deltaw;

namespace {

using namespace deltaw_bench;

using mat = dw::dense<float>;

constexpr int features = 4096;  // in = out
constexpr int tokens = 512;
constexpr int kasa_r = 8;       // PEFT's LoraConfig default r
constexpr int bd_r = 16, bd_n = 4;
constexpr int tiny_r = 2, tiny_u = 64;  // PEFT's TinyLoraConfig defaults

struct operands {
  mat W, X, Y, A, B, Ab, Bb, Abd, Bbd, At, Bt, P;
  Eigen::VectorXf d, v;
  operands() {
    std::srand(20241207);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    A = mat::Random(kasa_r, features) * 0.02f;
    B = mat::Random(features, kasa_r) * 0.02f;
    d = Eigen::VectorXf::Random(kasa_r);
    Abd = mat::Random(bd_r, features / bd_n) * 0.02f;  // block-diagonal A, stored
    Bb = mat::Random(features, bd_r) * 0.02f;
    Ab = mat::Random(bd_r, features) * 0.02f;
    Bbd = mat::Random(features, bd_r / bd_n) * 0.02f;  // block-diagonal B, stored
    At = mat::Random(tiny_r, features) * 0.02f;
    Bt = mat::Random(features, tiny_r) * 0.02f;
    P = mat::Random(tiny_u, tiny_r * tiny_r);
    v = Eigen::VectorXf::Random(tiny_u) * 0.02f;
  }
};

operands& data() {
  static operands d;
  return d;
}

const auto& kasa_u() {
  static const auto u = dw::kasa(dw::view(std::as_const(data().B)), dw::vview(std::as_const(data().d)),
                                 dw::view(std::as_const(data().A)), dw::alpha(16));
  return u;
}
const auto& bd_a() {
  static const auto u = dw::bd_lora(dw::view(std::as_const(data().Bb)), dw::view(std::as_const(data().Abd)),
                                    dw::bd_side::A, bd_n, dw::alpha(32));
  return u;
}
const auto& bd_b() {
  static const auto u = dw::bd_lora(dw::view(std::as_const(data().Bbd)), dw::view(std::as_const(data().Ab)),
                                    dw::bd_side::B, bd_n, dw::alpha(32));
  return u;
}
const auto& tiny() {
  static const auto u = dw::tinylora(dw::view(std::as_const(data().Bt)), dw::vview(std::as_const(data().v)),
                                     dw::view(std::as_const(data().P)), dw::view(std::as_const(data().At)));
  return u;
}

template <class U>
void apply_bench(benchmark::State& state, const U& u) {
  const auto e = dw::view(std::as_const(data().W)) + u;
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(u.flop_count(tokens)));
}

void base_gemm(benchmark::State& state) {
  run(state, data(), [](operands& d) { dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}
void kasa_apply(benchmark::State& state) { apply_bench(state, kasa_u()); }
void bdlora_a_apply(benchmark::State& state) { apply_bench(state, bd_a()); }
void bdlora_b_apply(benchmark::State& state) { apply_bench(state, bd_b()); }
void tinylora_apply(benchmark::State& state) { apply_bench(state, tiny()); }

void kasa_peft_into(operands& d, mat& Y) {
  Y.noalias() = d.X * d.W.transpose();
  mat Z(tokens, kasa_r);
  Z.noalias() = d.X * d.A.transpose();
  Z = Z * d.d.asDiagonal();
  Y.noalias() += (Z * d.B.transpose()) * float(16.0 / kasa_r);
}
void kasa_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { kasa_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(kasa_u().flop_count(tokens)));
}
void bdlora_a_dense_into(operands& d, mat& Y) {
  const int pb = bd_r / bd_n, qb = features / bd_n;
  mat Af = mat::Zero(bd_r, features);
  for (int i = 0; i < bd_n; ++i) Af.block(i * pb, i * qb, pb, qb) = d.Abd.middleRows(i * pb, pb);
  Y.noalias() = d.X * d.W.transpose();
  mat Z(tokens, bd_r);
  Z.noalias() = d.X * Af.transpose();
  Y.noalias() += (Z * d.Bb.transpose()) * float(32.0 / bd_r);
}
void bdlora_a_dense_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { bdlora_a_dense_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + 2.0 * tokens * bd_r * 2.0 * features);
}
void tinylora_peft_into(operands& d, mat& Y) {
  Eigen::RowVectorXf rv = d.v.transpose() * d.P;
  const mat R = Eigen::Map<const mat>(rv.data(), tiny_r, tiny_r);
  Y.noalias() = d.X * d.W.transpose();
  mat Z(tokens, tiny_r), Z2(tokens, tiny_r);
  Z.noalias() = d.X * d.At.transpose();
  Z2.noalias() = Z * R.transpose();
  Y.noalias() += Z2 * d.Bt.transpose();
}
void tinylora_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { tinylora_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(tiny().flop_count(tokens)));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  single_thread();
  const auto W = dw::view(std::as_const(data().W));
  if (!errors_below("bench_kasa_bdlora_tinylora", {
      {"kasa_rel_err", strategy_error(data(), W + kasa_u(), kasa_peft_into)},
      {"bdlora_a_rel_err", strategy_error(data(), W + bd_a(), bdlora_a_dense_into)},
      {"tinylora_rel_err", strategy_error(data(), W + tiny(), tinylora_peft_into)},
  })) return 1;
  const std::string f = std::to_string(features), t = std::to_string(tokens);
  add("base_gemm/" + f + "/" + t, base_gemm);
  add("kasa_apply/" + f + "/r8/" + t, kasa_apply);
  add("kasa_peft_strategy/" + f + "/r8/" + t, kasa_peft_strategy);
  add("bdlora_a_apply/" + f + "/r16/n4/" + t, bdlora_a_apply);
  add("bdlora_a_dense_strategy/" + f + "/r16/n4/" + t, bdlora_a_dense_strategy);
  add("bdlora_b_apply/" + f + "/r16/n4/" + t, bdlora_b_apply);
  add("tinylora_apply/" + f + "/r2/u64/" + t, tinylora_apply);
  add("tinylora_peft_strategy/" + f + "/r2/u64/" + t, tinylora_peft_strategy);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
