// SPDX-License-Identifier: MIT
// SHiRA, RoAd, HiRA and DeLoRA (issue 16) at in = out = 4096, tokens = 512, fp32, one thread, against the base
// GEMM and against PEFT's strategy, in one program and one run (docs/benchmarks.md, "PEFT
// methods at 4096"); the sizes are bench/compare/peft_forward.py's METHODS entries:
//
//   base_gemm             Y = X·Wᵀ
//   shira_apply           Y = X·Wᵀ + SpMM(X, ΔW), nnz = r·(out + in), r = 32 (PEFT's default)
//   shira_peft_strategy   PEFT's SHiRA forward: W' = W.clone() + ΔW (scatter of the sparse
//                         COO tensor), then one GEMM with W'
//   road_apply            Y = R(X·Wᵀ): the base GEMM and one pass over Y (road_1, group 64, PEFT's defaults)
//   road_peft_strategy    PEFT's RoAd forward: base(x), then first/second columns, the
//                         rotate-half tensor (a new tokens × out tensor) and x·f + rot·s
//   hira_apply            Y = X·(W ⊙ (1 + B·A))ᵀ in 256-row panels, r = 32 (PEFT's default)
//   hira_peft_strategy    PEFT's HiRA forward: base(x), then B·A formed densely [out, in],
//                         W ⊙ (B·A) (another out × in tensor) and a second GEMM
//   delora_apply          Y = X·Wᵀ + (((X·diag(w))·Aᵀ)·diag(c))·Bᵀ, r = 8 (PEFT's default)
//   delora_peft_strategy  PEFT's DeLoRA forward: base(x), x·w (a new tokens × in tensor),
//                         linear(A), the scaling, linear(B), added out of place
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
constexpr int shira_r = 32;     // PEFT's ShiraConfig default: nnz = r·(out + in)
constexpr int road_group = 64;  // PEFT's RoadConfig defaults: road_1, group_size 64
constexpr int hira_r = 32;      // PEFT's HiraConfig default
constexpr int delora_r = 8;     // PEFT's DeloraConfig default

struct operands {
  mat W, X, Y;
  std::vector<std::int32_t> rows, cols;
  Eigen::VectorXf v, theta, alpha, lambda, wn;
  mat hB, hA, dB, dA;
  operands() {
    std::srand(20240611);
    W = mat::Random(features, features) * (1.0f / std::sqrt(float(features)));
    X = mat::Random(tokens, features);
    Y = mat::Zero(tokens, features);
    // PEFT's random mask: nnz distinct positions, row-major order (torch.where).
    std::mt19937_64 g(7);
    std::vector<std::int64_t> all(std::size_t(features) * features);
    std::iota(all.begin(), all.end(), std::int64_t(0));
    const std::size_t nnz = std::size_t(shira_r) * 2 * features;
    for (std::size_t k = 0; k < nnz; ++k) std::swap(all[k], all[k + g() % (all.size() - k)]);
    all.resize(nnz);
    std::sort(all.begin(), all.end());
    for (auto p : all) {
      rows.push_back(std::int32_t(p / features));
      cols.push_back(std::int32_t(p % features));
    }
    v = Eigen::VectorXf::Random(Eigen::Index(nnz)) * 0.01f;
    theta = Eigen::VectorXf::Random(features / 2);
    alpha = Eigen::VectorXf::Ones(features / 2) + Eigen::VectorXf::Random(features / 2) * 0.1f;
    hB = mat::Random(features, hira_r) * 0.1f;
    hA = mat::Random(hira_r, features) * 0.1f;
    dB = mat::Random(features, delora_r);
    dA = mat::Random(delora_r, features);
    lambda = Eigen::VectorXf::Constant(1, 15.0f);
    wn = dw::delora_weight_norms(W).cast<float>();
  }
};

operands& data() {
  static operands d;
  return d;
}

const dw::shira_update<float>& shira_u() {
  static const auto u = dw::shira(features, features, std::span<const std::int32_t>(data().rows),
                                  std::span<const std::int32_t>(data().cols), dw::vector_view<const float>(data().v.data(), data().v.size()));
  return u;
}

void base_gemm(benchmark::State& state) {
  run(state, data(), [](operands& d) { dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}

void shira_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + shira_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(shira_u().flop_count(tokens)));
}
/// PEFT's SHiRA forward: new_weight = W.clone(); new_weight += sparse ΔW; F.linear(x, new_weight).
void shira_peft_into(operands& d, mat& Y) {
  mat Wp = d.W;
  for (std::size_t k = 0; k < d.rows.size(); ++k) Wp(d.rows[k], d.cols[k]) += d.v[Eigen::Index(k)];
  Y.noalias() = d.X * Wp.transpose();
}
void shira_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { shira_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features));
}

auto road_u() {
  return dw::road(data().W, dw::vview(data().theta), dw::vview(data().alpha), dw::road_variant::road_1, road_group);
}
auto hira_u() { return dw::hira(data().W, data().hB, data().hA); }
auto delora_u() { return dw::delora(data().dB, data().dA, dw::vview(data().lambda), dw::vview(data().wn)); }

void road_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + road_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(road_u().flop_count(tokens)));
}
/// PEFT's _apply_road on base(x): f, s per feature (repeat_interleave for road_1), the
/// rotate-half tensor stack((−x₂, x₁)) and x·f + rot·s, each a new tensor.
void road_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  const int h = road_group / 2;
  Eigen::RowVectorXf f(features), s(features);
  for (int o = 0; o < features; ++o) {
    const int i = (o / road_group) * h + (o % road_group) % h;
    f[o] = d.alpha[i] * std::cos(d.theta[i]);
    s[o] = d.alpha[i] * std::sin(d.theta[i]);
  }
  mat rot(tokens, features);
  for (int g0 = 0; g0 < features; g0 += road_group) {
    rot.middleCols(g0, h) = -Y.middleCols(g0 + h, h);
    rot.middleCols(g0 + h, h) = Y.middleCols(g0, h);
  }
  const mat res = (Y.array().rowwise() * f.array() + rot.array().rowwise() * s.array()).matrix();
  Y = res;
}
void road_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { road_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + 3.0 * tokens * features);
}

void hira_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + hira_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + gemm_flop(features, features, hira_r));
}
/// PEFT's HiRA forward: result = base(x) + F.linear(x, W * (A.T @ B.T).T).
void hira_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  const mat BA = d.hB * d.hA;
  const mat M = d.W.cwiseProduct(BA);
  Y.noalias() += d.X * M.transpose();
}
void hira_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { hira_peft_into(d, d.Y); });
  set_flop_counter(state, 2 * gemm_flop(tokens, features, features) + gemm_flop(features, features, hira_r));
}

void delora_apply(benchmark::State& state) {
  const auto e = dw::view(std::as_const(data().W)) + delora_u();
  run(state, data(), [&](operands& d) { dw::apply(e, d.X, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(delora_u().flop_count(tokens)));
}
/// PEFT's DeLoRA forward: base(x); h = linear(x·w, A)·scaling; add_out = linear(h, B); base + add.
void delora_peft_into(operands& d, mat& Y) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, Y);
  const mat xw = (d.X.array().rowwise() * d.wn.transpose().array()).matrix();
  mat h = xw * d.dA.transpose();
  for (int i = 0; i < delora_r; ++i)
    h.col(i) *= d.lambda[0] / float(delora_r) / (std::max(d.dA.row(i).norm(), 1e-4f) * std::max(d.dB.col(i).norm(), 1e-4f));
  const mat add = h * d.dB.transpose();
  const mat res = Y + add;
  Y = res;
}
void delora_peft_strategy(benchmark::State& state) {
  run(state, data(), [](operands& d) { delora_peft_into(d, d.Y); });
  set_flop_counter(state, gemm_flop(tokens, features, features) + double(delora_u().flop_count(tokens)));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  single_thread();
  if (!errors_below("bench_peftb", {
      {"shira_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + shira_u(), shira_peft_into)},
      {"road_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + road_u(), road_peft_into)},
      {"hira_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + hira_u(), hira_peft_into)},
      {"delora_rel_err", strategy_error(data(), dw::view(std::as_const(data().W)) + delora_u(), delora_peft_into)},
  })) return 1;
  const std::string f = std::to_string(features), t = std::to_string(tokens);
  add("base_gemm/" + f + "/" + t, base_gemm);
  add("shira_apply/" + f + "/r" + std::to_string(shira_r) + "/" + t, shira_apply);
  add("shira_peft_strategy/" + f + "/r" + std::to_string(shira_r) + "/" + t, shira_peft_strategy);
  add("road_apply/" + f + "/g" + std::to_string(road_group) + "/" + t, road_apply);
  add("road_peft_strategy/" + f + "/g" + std::to_string(road_group) + "/" + t, road_peft_strategy);
  add("hira_apply/" + f + "/r" + std::to_string(hira_r) + "/" + t, hira_apply);
  add("hira_peft_strategy/" + f + "/r" + std::to_string(hira_r) + "/" + t, hira_peft_strategy);
  add("delora_apply/" + f + "/r" + std::to_string(delora_r) + "/" + t, delora_apply);
  add("delora_peft_strategy/" + f + "/r" + std::to_string(delora_r) + "/" + t, delora_peft_strategy);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
