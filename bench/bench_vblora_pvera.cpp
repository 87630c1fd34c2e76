// SPDX-License-Identifier: MIT
// VB-LoRA and PVeRA (issue 16) at in = out = 4096, tokens = 512, fp32, one thread, against the
// base GEMM and against PEFT's strategy, in one program and one run (docs/benchmarks.md,
// "VB-LoRA and PVeRA at 4096"); the sizes are bench/compare/peft_forward.py's METHODS entries
// (PEFT's defaults):
//
//   base_gemm             Y = X·Wᵀ
//   vblora_apply          Y = X·Wᵀ + (X·Aᵀ)·Bᵀ, A and B mixed from the bank per call (top-k
//                         selection and softmax over r·(in + out)/L logit rows); r = 4, 256 bank
//                         vectors of length 256, topk 2
//   vblora_peft_strategy  PEFT's VB-LoRA forward: base(x); per factor topk + softmax, the gather
//                         bank[indices] (a new [rows, k, L] tensor), the weighted sum, B's
//                         transpose/reshape copy; linear(linear(x, A), B), added out of place
//   pvera_apply           Y = X·Wᵀ + deterministic PVeRA (VeRA's evaluator on λ_d's mean half),
//                         r = 256; the bases drawn from the seed in tiles on every call
//   pvera_peft_strategy   PEFT's PVeRA forward in eval: base(x); λ_d ⊙ linear(x, A₂) over all
//                         2r rows (mean and log-variance; the bases resident), chunk, linear(μ, B),
//                         ⊙ λ_b, added out of place
//
// Times to read are real_time; each benchmark runs 3 repetitions, the median is reported.
// Before timing, each deltaw apply is checked against its PEFT-strategy result on the first
// 16 tokens (the tests check every path against independent double references).

#include <benchmark/benchmark.h>

#include "bench_util.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deltaw/deltaw.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace dw = deltaw;

namespace {

using namespace deltaw_bench;

using mat = dw::dense<float>;

constexpr int features = 4096;  // in = out
constexpr int tokens = 512;
constexpr int vb_r = 4, vb_n = 256, vb_len = 256, vb_k = 2;  // VBLoRAConfig defaults
constexpr int pv_r = 256;                                     // PveraConfig default

struct operands {
  mat W, X, Y;
  mat la, lb, bank;      // logits [r·in/L, n], [out/L·r, n]; bank [n, L]
  mat pA, pB;            // PVeRA's stored bases for the PEFT strategy: A₂ [2r, in], B [out, r]
  Eigen::VectorXf ld, lbv;
  operands() {
    std::srand(20261207);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    la = mat::Random(vb_r * features / vb_len, vb_n);
    lb = mat::Random(features / vb_len * vb_r, vb_n);
    bank = mat::Random(vb_n, vb_len) * 0.02f;
    ld = Eigen::VectorXf::Random(2 * pv_r) * 0.1f;
    lbv = Eigen::VectorXf::Random(features) * 0.1f;
    // The same bases deltaw draws (PEFT holds its torch draws resident; the values do not
    // change the timing, and equal values let the check compare the two).
    const auto b = dw::pvera_shared_basis(3, pv_r, features, features);
    pA.resize(2 * pv_r, features);
    pB.resize(features, pv_r);
    dw::fill_entries(b.A(), 0, std::uint64_t(pA.size()), pA.data());
    dw::fill_entries(b.B(), 0, std::uint64_t(pB.size()), pB.data());
  }
};

operands& data() {
  static operands d;
  return d;
}

auto vblora_u() { return dw::vblora(dw::view(std::as_const(data().la)), dw::view(std::as_const(data().lb)),
                                     dw::view(std::as_const(data().bank)), vb_r, vb_k); }
auto pvera_u() {
  return dw::pvera(dw::pvera_shared_basis(3, pv_r, features, features), features, features, dw::vview(std::as_const(data().ld)),
                   dw::vview(std::as_const(data().lbv)));
}

void base_gemm(benchmark::State& state) {
  run(state, data(), [](operands& d) { dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}

void vblora_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + vblora_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(vblora_u().flop_count(tokens)));
}

/// torch's topk + softmax + bank[indices] gather (a [rows, k, L] tensor) + weighted sum.
mat peft_mix(const mat& logits, const mat& bank) {
  const Eigen::Index rows = logits.rows();
  std::vector<int> idx(std::size_t(rows) * vb_k);
  std::vector<float> w(std::size_t(rows) * vb_k);
  std::vector<int> order(vb_n);
  for (Eigen::Index q = 0; q < rows; ++q) {
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + vb_k, order.end(),
                      [&](int a, int b) { return logits(q, a) > logits(q, b); });
    float mx = logits(q, order[0]), s = 0;
    for (int j = 0; j < vb_k; ++j) s += w[std::size_t(q * vb_k + j)] = std::exp(logits(q, order[std::size_t(j)]) - mx);
    for (int j = 0; j < vb_k; ++j) {
      w[std::size_t(q * vb_k + j)] /= s;
      idx[std::size_t(q * vb_k + j)] = order[std::size_t(j)];
    }
  }
  mat G(rows * vb_k, vb_len);  // bank[indices]
  for (Eigen::Index q = 0; q < rows * vb_k; ++q) G.row(q) = bank.row(idx[std::size_t(q)]);
  mat M = mat::Zero(rows, vb_len);
  for (Eigen::Index q = 0; q < rows; ++q)
    for (int j = 0; j < vb_k; ++j) M.row(q) += w[std::size_t(q * vb_k + j)] * G.row(q * vb_k + j);
  return M;
}
void vblora_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  const mat Ma = peft_mix(d.la, d.bank);  // [r·in/L, L] → A [r, in] (a view in torch)
  const Eigen::Map<const mat> A(Ma.data(), vb_r, features);
  const mat Mb = peft_mix(d.lb, d.bank);  // [out/L·r, L] → [out/L, r, L] → transpose(1, 2) → B [out, r] (a copy)
  mat B(features, vb_r);
  const int to = features / vb_len;
  for (int t = 0; t < to; ++t)
    for (int i = 0; i < vb_r; ++i)
      for (int l = 0; l < vb_len; ++l) B(t * vb_len + l, i) = Mb(t * vb_r + i, l);
  const mat H = d.X * A.transpose();
  const mat add = H * B.transpose();
  const mat res = Y + add;
  Y = res;
}
void vblora_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { vblora_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(vblora_u().flop_count(tokens)));
}

void pvera_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + pvera_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(pvera_u().flop_count(tokens)));
}
void pvera_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  mat H = d.X * d.pA.transpose();  // [T, 2r]: mean and log-variance
  H = (H.array().rowwise() * d.ld.transpose().array()).matrix().eval();
  mat Z = H.leftCols(pv_r) * d.pB.transpose();  // linear(μ, B)
  Z = (Z.array().rowwise() * d.lbv.transpose().array()).matrix().eval();
  const mat res = Y + Z;
  Y = res;
}
void pvera_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { pvera_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + 2.0 * gemm_flop(tokens, 2 * pv_r, features));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  single_thread();
  if (!errors_below("bench_vblora_pvera", {
      {"vblora_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + vblora_u(), vblora_peft_into)},
      {"pvera_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + pvera_u(), pvera_peft_into)},
  })) return 1;
  const std::string f = std::to_string(features), t = std::to_string(tokens);
  const std::string v = "/r" + std::to_string(vb_r) + "/n" + std::to_string(vb_n) + "/L" + std::to_string(vb_len) + "/k" +
                        std::to_string(vb_k) + "/";
  const std::string p = "/r" + std::to_string(pv_r) + "/";
  add("base_gemm/" + f + "/" + t, base_gemm);
  add("vblora_apply/" + f + v + t, vblora_apply);
  add("vblora_peft_strategy/" + f + v + t, vblora_peft_strategy);
  add("pvera_apply/" + f + p + t, pvera_apply);
  add("pvera_peft_strategy/" + f + p + t, pvera_peft_strategy);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
