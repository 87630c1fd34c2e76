// SPDX-License-Identifier: MIT
// The random-basis updates (NOLA, VeRA, RandLoRA) at in = out = 4096, tokens = 512, fp32,
// against the base GEMM and against the strategies PEFT uses, in one program and one run.
//
//   base_gemm                 Y = X·Wᵀ alone (the reference for every ratio)
//   randlora_apply            deltaw: X·Wᵀ + s·(X·Vᵀ)·Uᵀ with U, V drawn in tiles, never whole
//   randlora_peft_strategy    what PEFT 0.21.2's forward runs: its randlora_A and randlora_B
//                             buffers are resident (drawn once at load, 64 MiB for B); each
//                             call forms V = λ∘A∘γ [N·r, 4096] element-wise from the resident A
//                             (UniqueBaseGrad), U is B flattened (no copy), then two GEMMs
//   randlora_regenerate_bases a seed-only strategy that materialises: U [4096, N·r] and
//                             V [N·r, 4096] drawn from the seed whole on every call, two GEMMs
//   vera_apply                deltaw, PEFT's default r = 256, A/B drawn in tiles
//   vera_peft_strategy        what PEFT's forward runs: A [r, in] and B [out, r] resident
//                             (its vera_A / vera_B buffers), λ_d and λ_b applied to the products
//   vera_regenerate_bases     A and B drawn whole from the seed per call, then the products
//   nola_apply                deltaw, r = 8, k = l = 512 bases: A, B summed from 1024 bases
//   nola_stored_factors       A and B formed once outside the loop: the LoRA cost that
//                             caching them would buy (NOLA is not in PEFT)
//   philox_fill               drawing 2^24 uniform floats (the generator's throughput)
//
// One thread (Eigen::setNbThreads(1)): the generator is single-threaded, and this machine's
// two cores are shared. Read real_time.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cmath>
#include <cstdio>
#include <deltaw/deltaw.hpp>
#include <string>
#include <utility>
#include <vector>

namespace dw = deltaw;

namespace {

using mat = dw::dense<float>;
using vec = Eigen::VectorXf;
using index_t = dw::index_t;

constexpr int out_features = 4096;
constexpr int in_features = 4096;
constexpr int tokens = 512;
constexpr int randlora_r = 32;
constexpr double randlora_alpha = 640;
constexpr int vera_r = 256;
constexpr int nola_r = 8;
constexpr int nola_k = 512;
constexpr int nola_l = 512;

struct operands {
  mat W, X, Y;
  dw::randlora_basis rl_basis;
  mat rl_lambda, rl_gamma;
  dw::vera_basis v_basis;
  vec v_ld, v_lb;
  vec n_a, n_b;
  operands() {
    std::srand(20250201);
    W = mat::Random(out_features, in_features) * (1.0f / std::sqrt(float(in_features)));
    X = mat::Random(tokens, in_features);
    Y = mat::Zero(tokens, out_features);
    rl_basis = dw::randlora_shared_basis(7, randlora_r, out_features, in_features);
    const int N = int(rl_basis.num_bases);
    rl_lambda = mat::Random(randlora_r, N) * 0.01f;
    rl_gamma = mat::Random(N, in_features) * (1.0f / float(in_features));
    v_basis = dw::vera_shared_basis(11, vera_r, out_features, in_features);
    v_ld = vec::Constant(vera_r, 0.1f);
    v_lb = vec::Random(out_features) * 0.01f;
    n_a = vec::Random(nola_k) * 0.01f;
    n_b = vec::Random(nola_l) * 0.01f;
  }
  auto randlora() const { return dw::randlora(rl_basis, out_features, in_features, rl_lambda, rl_gamma, dw::alpha(randlora_alpha)); }
  auto vera() const { return dw::vera(v_basis, out_features, in_features, v_ld, v_lb); }
  auto nola() const { return dw::nola(out_features, in_features, nola_r, 13, n_a, n_b, dw::alpha(16.0)); }
};

operands& data() {
  static operands d;
  return d;
}

double gemm_flop(double m, double n, double k) { return 2.0 * m * n * k; }

template <class F>
void timed(benchmark::State& state, F&& body, double flop) {
  Eigen::setNbThreads(1);
  auto& d = data();
  for (auto _ : state) {
    body();
    benchmark::DoNotOptimize(d.Y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP"] = benchmark::Counter(flop * 1e-9);
}

// ── PEFT's strategies, written with the bases' public entry laws ─────────────────────

/// U [max_dim, N·r]: row i is randlora_B[i, :N, :] flattened (PEFT's update_B).
mat randlora_U(const operands& d) {
  const auto& b = d.rl_basis;
  const index_t nr = b.num_bases * b.r;
  mat U(b.max_dim, nr);
  for (index_t i = 0; i < b.max_dim; ++i) dw::fill_entries<float>(b.B(), b.b_index(i, 0, 0), nr, U.row(i).data());
  return U;
}
/// randlora_A [r, min_dim] (PEFT's buffer, sliced).
mat randlora_A(const operands& d) {
  const auto& bs = d.rl_basis;
  mat A(bs.r, bs.min_dim);
  for (index_t k = 0; k < bs.r; ++k) dw::fill_entries<float>(bs.A(), bs.a_index(k, 0), bs.min_dim, A.row(k).data());
  return A;
}
/// V [N·r, min_dim] from A: row k·N + b is λ[k, b]·A[k]∘γ[b] (PEFT's UniqueBaseGrad, flattened).
mat randlora_V(const operands& d, const mat& A, float s) {
  const auto& bs = d.rl_basis;
  const index_t N = bs.num_bases, n = bs.min_dim;
  mat V(N * bs.r, n);
  for (index_t k = 0; k < bs.r; ++k)
    for (index_t b = 0; b < N; ++b)
      V.row(k * N + b) = (s * d.rl_lambda(k, b)) * A.row(k).cwiseProduct(d.rl_gamma.row(b));
  return V;
}
void randlora_peft_forward(operands& d, const mat& U, const mat& V) {
  dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y);
  const mat Z = d.X * V.transpose();
  d.Y.noalias() += Z * U.transpose();
}

/// VeRA's A [r, in] and B [out, r] slices, whole.
std::pair<mat, mat> vera_factors(const operands& d) {
  const auto& b = d.v_basis;
  mat A(b.r, in_features), B(out_features, b.r);
  for (index_t k = 0; k < b.r; ++k) dw::fill_entries<float>(b.A(), b.a_index(k, 0), in_features, A.row(k).data());
  dw::fill_entries<float>(b.B(), b.b_index(0, 0), std::uint64_t(out_features) * b.r, B.data());
  return {std::move(A), std::move(B)};
}
void vera_peft_forward(operands& d, const mat& A, const mat& B) {
  // PEFT: y = x·Wᵀ + λ_b ∘ ((λ_d ∘ (x·Aᵀ))·Bᵀ)
  dw::apply(dw::view(std::as_const(d.W)), d.X, d.Y);
  mat Z = d.X * A.transpose();
  Z = Z * d.v_ld.asDiagonal();
  mat T = Z * B.transpose();
  d.Y.noalias() += T * d.v_lb.asDiagonal();
}

// ── benchmarks ────────────────────────────────────────────────────────────────────────

const double base_flop = gemm_flop(tokens, out_features, in_features);

void base_gemm(benchmark::State& state) {
  auto& d = data();
  const auto Wv = dw::view(std::as_const(d.W));
  timed(state, [&] { dw::apply(Wv, d.X, d.Y); }, base_flop);
}

void randlora_apply(benchmark::State& state) {
  auto& d = data();
  const auto e = dw::view(std::as_const(d.W)) + d.randlora();
  timed(state, [&] { dw::apply(e, d.X, d.Y); }, base_flop + double(d.randlora().flop_count(tokens)));
}

void randlora_peft_strategy(benchmark::State& state) {
  auto& d = data();
  const float s = float(randlora_alpha / randlora_r);
  const mat U = randlora_U(d), A = randlora_A(d);
  timed(state, [&] {
    const mat V = randlora_V(d, A, s);
    randlora_peft_forward(d, U, V);
  }, base_flop + double(d.randlora().flop_count(tokens)));
}

void randlora_regenerate_bases(benchmark::State& state) {
  auto& d = data();
  const float s = float(randlora_alpha / randlora_r);
  timed(state, [&] {
    const mat U = randlora_U(d);
    const mat V = randlora_V(d, randlora_A(d), s);
    randlora_peft_forward(d, U, V);
  }, base_flop + double(d.randlora().flop_count(tokens)));
}

void vera_apply(benchmark::State& state) {
  auto& d = data();
  const auto e = dw::view(std::as_const(d.W)) + d.vera();
  timed(state, [&] { dw::apply(e, d.X, d.Y); }, base_flop + double(d.vera().flop_count(tokens)));
}

void vera_peft_strategy(benchmark::State& state) {
  auto& d = data();
  const auto [A, B] = vera_factors(d);
  timed(state, [&] { vera_peft_forward(d, A, B); }, base_flop + double(d.vera().flop_count(tokens)));
}

void vera_regenerate_bases(benchmark::State& state) {
  auto& d = data();
  timed(state, [&] {
    const auto [A, B] = vera_factors(d);
    vera_peft_forward(d, A, B);
  }, base_flop + double(d.vera().flop_count(tokens)));
}

void nola_apply(benchmark::State& state) {
  auto& d = data();
  const auto e = dw::view(std::as_const(d.W)) + d.nola();
  timed(state, [&] { dw::apply(e, d.X, d.Y); }, base_flop + double(d.nola().flop_count(tokens)));
}

void nola_stored_factors(benchmark::State& state) {
  auto& d = data();
  const auto u = d.nola();
  auto [B, A] = dw::nola_factors<float>(u);
  const auto e = dw::view(std::as_const(d.W)) + dw::lora(B, A, dw::scale(u.scale()));
  timed(state, [&] { dw::apply(e, d.X, d.Y); }, base_flop + 2.0 * tokens * nola_r * (in_features + out_features));
}

void philox_fill(benchmark::State& state) {
  const std::uint64_t n = std::uint64_t(1) << 24;
  std::vector<float> buf(n);
  const dw::basis_entries e{dw::random_stream{1, 2}, dw::basis_law::uniform, 1.0, 0.0};
  for (auto _ : state) {
    dw::fill_entries<float>(e, 0, n, buf.data());
    benchmark::DoNotOptimize(buf.data());
    benchmark::ClobberMemory();
  }
  state.counters["entries"] = benchmark::Counter(double(n));
}

// ── correctness before timing ────────────────────────────────────────────────────────

double rel(const mat& a, const mat& b) { return double((a - b).norm() / b.norm()); }

bool check_all() {
  Eigen::setNbThreads(1);
  auto& d = data();
  mat Y(tokens, out_features);
  char buf[64];
  bool ok = true;
  auto report = [&](const char* key, double err) {
    std::snprintf(buf, sizeof buf, "%.3e", err);
    benchmark::AddCustomContext(key, buf);
    if (!(err < 1e-4)) {
      std::fprintf(stderr, "bench_random_basis: %s = %s\n", key, buf);
      ok = false;
    }
  };
  dw::apply(dw::view(std::as_const(d.W)) + d.randlora(), d.X, Y);
  const float s = float(randlora_alpha / randlora_r);
  randlora_peft_forward(d, randlora_U(d), randlora_V(d, randlora_A(d), s));
  report("randlora_apply_vs_peft_rel_err", rel(Y, d.Y));
  dw::apply(dw::view(std::as_const(d.W)) + d.vera(), d.X, Y);
  const auto [A, B] = vera_factors(d);
  vera_peft_forward(d, A, B);
  report("vera_apply_vs_peft_rel_err", rel(Y, d.Y));
  return ok;
}

void register_all() {
  auto add = [](const std::string& name, void (*fn)(benchmark::State&)) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->Unit(benchmark::kMillisecond)->MinTime(2.0)->UseRealTime();
  };
  const std::string io = std::to_string(in_features), t = std::to_string(tokens);
  add("base_gemm/" + io + "/" + t, base_gemm);
  add("randlora_apply/" + io + "/32/" + t, randlora_apply);
  add("randlora_peft_strategy/" + io + "/32/" + t, randlora_peft_strategy);
  add("randlora_regenerate_bases/" + io + "/32/" + t, randlora_regenerate_bases);
  add("vera_apply/" + io + "/256/" + t, vera_apply);
  add("vera_peft_strategy/" + io + "/256/" + t, vera_peft_strategy);
  add("vera_regenerate_bases/" + io + "/256/" + t, vera_regenerate_bases);
  add("nola_apply/" + io + "/8/" + t, nola_apply);
  add("nola_stored_factors/" + io + "/8/" + t, nola_stored_factors);
  benchmark::RegisterBenchmark("philox_fill/16777216", philox_fill)->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  if (!check_all()) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
