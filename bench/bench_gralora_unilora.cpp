// SPDX-License-Identifier: MIT
// GraLoRA and UniLoRA (issue 16) at in = out = 4096, tokens = 512, fp32, one thread, against the
// base GEMM and against PEFT's strategy, in one program and one run (docs/benchmarks.md,
// "GraLoRA and UniLoRA at 4096"); the sizes are bench/compare/peft_forward.py's METHODS entries:
//
//   base_gemm              Y = X·Wᵀ
//   gralora_apply          Y = X·Wᵀ + the k×k grid applied block-wise (never ΔW), k = 2,
//                          r = 32 (PEFT's defaults) plus a hybrid LoRA of rank 8
//   gralora_peft_strategy  PEFT's GraLoRA forward: base(x); einsum of x viewed [T, k, in/k]
//                          with gralora_A, the permuted copy [T, k, r], einsum with gralora_B,
//                          scaling·output (a new tensor) added; the hybrid
//                          gralora_B_general(gralora_A_general(x)) likewise
//   unilora_apply          Y = X·Wᵀ + (X·Aᵀ)·Bᵀ with A, B gathered from θ, r = 4, d = 256
//                          (PEFT's defaults)
//   unilora_peft_strategy  PEFT's UniLoRA forward: A = θ[idx_A]·σ_A, B = θ[idx_B]·σ_B (new
//                          tensors), F.linear(F.linear(x, A), B) and result + that (out of place)
//
// PEFT is not dense for either method: both strategies do the same flops as deltaw's apply;
// the rows show what deltaw's apply costs over the base GEMM, not a dense-versus-lazy gap.
// Times to read are real_time; each benchmark runs 3 repetitions, the median is reported.
// Before timing, each deltaw apply is checked against its PEFT-strategy result on the first
// 16 tokens (the tests check every path against independent double references).

#include <benchmark/benchmark.h>

#include "bench_util.hpp"

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <deltaw/deltaw.hpp>
#include <deltaw/backend/cpu/gralora.hpp>
#include <deltaw/backend/cpu/unilora.hpp>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace dw = deltaw;

namespace {

using namespace deltaw_bench;

using mat = dw::dense<float>;

constexpr int features = 4096;  // in = out
constexpr int tokens = 512;
constexpr int gra_r = 32;       // GraloraConfig defaults: r = 32, gralora_k = 2, alpha = 64
constexpr int gra_k = 2;
constexpr int gra_hr = 8;       // hybrid_r (PEFT's default is 0; 8 exercises the hybrid path)
constexpr int uni_r = 4;        // UniLoraConfig defaults: r = 4, theta_d_length = 256
constexpr int uni_d = 256;

struct operands {
  mat W, X, Y;
  mat gA, gB, gAh, gBh;  // gralora_A [in, r], gralora_B [k·r, out/k], hybrid [hr, in], [out, hr]
  Eigen::VectorXf theta;
  std::vector<std::int64_t> ia, ib;
  std::vector<float> sa, sb;
  operands() {
    std::srand(20261207);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    gA = mat::Random(features, gra_r) * 0.02f;
    gB = mat::Random(gra_k * gra_r, features / gra_k) * 0.02f;
    gAh = mat::Random(gra_hr, features) * 0.02f;
    gBh = mat::Random(features, gra_hr) * 0.02f;
    theta = Eigen::VectorXf::Random(uni_d);
    // PEFT's balanced assignment: each θ index ⌊D/d⌋ or ⌈D/d⌉ times, shuffled.
    const std::size_t na = std::size_t(uni_r) * features, nb = std::size_t(features) * uni_r;
    std::vector<std::int64_t> all(na + nb);
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = std::int64_t(i % uni_d);
    std::shuffle(all.begin(), all.end(), std::mt19937_64(5));
    ia.assign(all.begin(), all.begin() + std::ptrdiff_t(na));
    ib.assign(all.begin() + std::ptrdiff_t(na), all.end());
    std::vector<double> cnt(uni_d, 0.0);
    for (auto v : all) cnt[std::size_t(v)] += 1;
    for (auto v : ia) sa.push_back(float(1.0 / std::sqrt(cnt[std::size_t(v)])));
    for (auto v : ib) sb.push_back(float(1.0 / std::sqrt(cnt[std::size_t(v)])));
  }
};

operands& data() {
  static operands d;
  return d;
}

constexpr double gra_scale = 64.0 / (gra_r + gra_hr);

auto gralora_u() { return dw::gralora(data().gA, data().gB, gra_k, data().gAh, data().gBh, dw::scale(gra_scale)); }
const dw::unilora_update<float>& unilora_u() {
  static const auto u = dw::unilora(features, features, uni_r, std::span<const std::int64_t>(data().ia),
                                    std::span<const std::int64_t>(data().ib), std::span<const float>(data().sa),
                                    std::span<const float>(data().sb), dw::vview(data().theta));
  return u;
}

void base_gemm(benchmark::State& state) {
  run(state, data(), [](operands& d) { dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}

void gralora_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + gralora_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(gralora_u().flop_count(tokens)));
}
/// PEFT's GraLoRA forward (layer.py): base(x); Z = einsum("blni,nir->blnr") (k GEMMs);
/// the view/permute/reshape to [T, k, k·q] (a copy); einsum("bljr,jro->bljo") (k GEMMs);
/// result += scaling·output; the hybrid part through two Linear layers, added likewise.
void gralora_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  const int ib = features / gra_k, ob = features / gra_k, q = gra_r / gra_k;
  mat Z(tokens, gra_k * gra_r);
  for (int n = 0; n < gra_k; ++n) Z.middleCols(n * gra_r, gra_r).noalias() = d.X.middleCols(n * ib, ib) * d.gA.middleRows(n * ib, ib);
  mat P(tokens, gra_k * gra_r);  // [T, j, n, q] from [T, n, j, q]
  for (int j = 0; j < gra_k; ++j)
    for (int n = 0; n < gra_k; ++n) P.middleCols(j * gra_r + n * q, q) = Z.middleCols(n * gra_r + j * q, q);
  mat O(tokens, features);
  for (int j = 0; j < gra_k; ++j) O.middleCols(j * ob, ob).noalias() = P.middleCols(j * gra_r, gra_r) * d.gB.middleRows(j * gra_r, gra_r);
  Y += (float(gra_scale) * O).eval();
  const mat H = d.X * d.gAh.transpose();
  const mat Hy = H * d.gBh.transpose();
  Y += (float(gra_scale) * Hy).eval();
}
void gralora_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { gralora_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(gralora_u().flop_count(tokens)));
}

void unilora_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + unilora_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(unilora_u().flop_count(tokens)));
}
/// PEFT's UniLoRA forward: A = θ[idx_A]·σ_A, B = θ[idx_B]·σ_B; result + linear(linear(x, A), B).
void unilora_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  mat A(uni_r, features), B(features, uni_r);
  for (int i = 0; i < uni_r; ++i)
    for (int j = 0; j < features; ++j) {
      const std::size_t k = std::size_t(i) * features + std::size_t(j);
      A(i, j) = d.theta[d.ia[k]] * d.sa[k];
    }
  for (int o = 0; o < features; ++o)
    for (int i = 0; i < uni_r; ++i) {
      const std::size_t k = std::size_t(o) * uni_r + std::size_t(i);
      B(o, i) = d.theta[d.ib[k]] * d.sb[k];
    }
  const mat H = d.X * A.transpose();
  const mat add = H * B.transpose();
  const mat res = Y + add;
  Y = res;
}
void unilora_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { unilora_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(unilora_u().flop_count(tokens)));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  single_thread();
  if (!errors_below("bench_gralora_unilora", {
      {"gralora_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + gralora_u(), gralora_peft_into)},
      {"unilora_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + unilora_u(), unilora_peft_into)},
  })) return 1;
  const std::string f = std::to_string(features), t = std::to_string(tokens);
  const std::string g = "/k" + std::to_string(gra_k) + "/r" + std::to_string(gra_r) + "/hr" + std::to_string(gra_hr) + "/";
  const std::string u = "/r" + std::to_string(uni_r) + "/d" + std::to_string(uni_d) + "/";
  add("base_gemm/" + f + "/" + t, base_gemm);
  add("gralora_apply/" + f + g + t, gralora_apply);
  add("gralora_peft_strategy/" + f + g + t, gralora_peft_strategy);
  add("unilora_apply/" + f + u + t, unilora_apply);
  add("unilora_peft_strategy/" + f + u + t, unilora_peft_strategy);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
