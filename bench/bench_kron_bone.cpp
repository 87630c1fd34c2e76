// SPDX-License-Identifier: MIT
// Kronecker (LoKr) and block-affine (Bone bat, MiSS) updates at in = out = 4096,
// tokens = 512, fp32, one thread, against the base GEMM and against PEFT's strategy for
// each method, in one program and one run (docs/benchmarks.md, "Kronecker and
// block-affine updates"):
//
//   base_gemm            Y = X·Wᵀ
//   kron_apply           Y = X·(W + w1 ⊗ w2)ᵀ lazily: X·Wᵀ + vec(w1·X_t·w2ᵀ), w1, w2 64 × 64
//   kron_peft_strategy   PEFT's LoKr forward: X·Wᵀ + X·ΔWᵀ with ΔW = kron(w1, w2)
//                        materialised on every call
//   bat_apply            Y = X·W'ᵀ, W' formed panel by panel (tokens 512 > r = 64)
//   bat_peft_strategy    PEFT's bat forward: clone W, ΔW = W_ij·b_i + b_i, W' = W + ΔW,
//                        one GEMM with W'
//   miss_apply           Y = X·Wᵀ + (Σ_j x_j)·D, r = 64
//   miss_peft_strategy   PEFT's MiSS forward: base(x), then a new tensor
//                        sum(x.reshape(…, in/r, r), -2) @ D added out of place
//   miss_materialized    for scale: ΔW = [Dᵀ … Dᵀ] materialised, then X·(W + ΔW)ᵀ
//
// Times to read are real_time; each benchmark runs 3 repetitions, the median is reported.
// Before timing, each deltaw apply is checked against its PEFT-strategy result on the
// first 16 tokens (the tests check every path against independent double references).

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
constexpr int kron_a = 64;      // w1 [64, 64], w2 [64, 64]
constexpr int block = 64;       // Bone / MiSS r (PEFT's default)

struct operands {
  mat W, X, Y, w1, w2, b, D;
  operands() {
    std::srand(20240611);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    w1 = mat::Random(kron_a, kron_a) * 0.01f;
    w2 = mat::Random(features / kron_a, features / kron_a) * 0.01f;
    b = mat::Random(features, block) * 0.01f;  // PEFT's [out/r, r, r] as [out, r]
    D = mat::Random(block, features) * 0.01f;
  }
};

operands& data() {
  static operands d;
  return d;
}

auto kron_update() { return dw::kron(data().w1, data().w2, dw::scale(0.5)); }
auto bat_update() { return dw::bone_bat(data().W, data().b); }
auto miss_update() { return dw::miss(data().D, features); }

void base_gemm(benchmark::State& state) {
  run(state, data(), [](operands& d) { dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}

void kron_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + kron_update();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(kron_update().flop_count(tokens)));
}

/// PEFT's LoKr forward on one batch: result = base(x) + F.linear(x, kron(w1, w2)·s).
void kron_peft_into(operands& d, mat& Y) {
  const mat dW = dw::materialize(kron_update());
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  Y.noalias() += d.X * dW.transpose();
}
void kron_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { kron_peft_into(d, d.Y); });
  set_flop_counter(state, 2 * gemm_flop(tokens, features, features) + double(features) * features);
}

void bat_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + bat_update();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(bat_update().flop_count(tokens)));
}

/// PEFT's bat forward: W' = W.clone() + ΔW (ΔW a new out × in tensor), then one GEMM.
void bat_peft_into(operands& d, mat& Y) {
  mat Wp = d.W;
  Wp += dw::materialize(bat_update());
  Y.noalias() = d.X * Wp.transpose();
}
void bat_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { bat_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + gemm_flop(features, features, block));
}

void miss_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + miss_update();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(miss_update().flop_count(tokens)));
}

/// PEFT's MiSS forward: result = base(x); result = result + sum(x blocks) @ D (new tensors).
void miss_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  mat S = mat::Zero(tokens, block);
  for (int j = 0; j < features / block; ++j) S += d.X.middleCols(j * block, block);
  const mat SD = S * d.D;
  const mat sum = Y + SD;
  Y = sum;
}
void miss_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { miss_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(miss_update().flop_count(tokens)));
}

void miss_materialized(benchmark::State& state) {
  run(state, data(), [](operands& d) {
    mat Wm = dw::materialize(miss_update());
    Wm += d.W;
    d.Y.noalias() = d.X * Wm.transpose();
  });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  single_thread();
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  if (!errors_below("bench_kron_bone", {
                                       {"kron_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + kron_update(), kron_peft_into)},
                                       {"bat_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + bat_update(), bat_peft_into)},
                                       {"miss_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + miss_update(), miss_peft_into)}}))
    return 1;
  const std::string f = std::to_string(features), t = std::to_string(tokens), a = std::to_string(kron_a),
                    r = std::to_string(block);
  const std::string names_[] = {"base_gemm/" + f + "/" + t,
                                "kron_apply/" + f + "/" + a + "/" + t,
                                "kron_peft_strategy/" + f + "/" + a + "/" + t,
                                "bat_apply/" + f + "/" + r + "/" + t,
                                "bat_peft_strategy/" + f + "/" + r + "/" + t,
                                "miss_apply/" + f + "/" + r + "/" + t,
                                "miss_peft_strategy/" + f + "/" + r + "/" + t,
                                "miss_materialized/" + f + "/" + r + "/" + t};
  void (*fns[])(benchmark::State&) = {base_gemm,  kron_apply,         kron_peft_strategy, bat_apply,
                                      bat_peft_strategy, miss_apply, miss_peft_strategy, miss_materialized};
  for (int i = 0; i < 8; ++i) add(names_[i].c_str(), fns[i]);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
