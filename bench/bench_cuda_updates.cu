// SPDX-License-Identifier: MIT
// The structured update types and heterogeneous batches on CUDA against the base GEMM,
// timed with CUDA events on the context's stream (issue 15 item 6, issue 17): at
// in = out = 4096 and 512 / 8192 tokens, Y = X·(W + ΔW)ᵀ for LoKr (a = 64: w1 64 × 64,
// w2 64 × 64), RandLoRA (r = 32), MiSS (r = 64), VeRA (r = 256) and LoRA (r = 16) beside
// X·Wᵀ alone; merge + unmerge of each; and cuda::serve::apply_lora_batch over 64 adapters of
// ranks {8, 16, 32, 64} for decode (64 requests × 1 token) and prefill (8 × 64 tokens)
// beside the base GEMM of the same tokens. Ratios come from the rows' times in one run
// (tools/bench_ratios.py). Exits 77 (after saying why) without a CUDA device.
#include <benchmark/benchmark.h>

#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/serve.cuh>

#include "cuda_bench_util.cuh"

#include <cstdio>
#include <string>
#include <vector>

namespace dw = deltaw;

namespace {

using dw::index_t;

using dwbench::time_on_stream;
dw::cuda::buffer<float> random_buffer(std::size_t n, unsigned seed) { return dwbench::random_buffer<float>(n, seed); }

enum class kind { base, lora, lokr, randlora, miss, vera };
enum class op { apply, merge_unmerge };

constexpr index_t n = 4096;

template <kind K, op O>
void bm_update(benchmark::State& st) {
  const index_t tokens = st.range(0);
  auto& ctx = dw::cuda::default_context();
  auto W = random_buffer(std::size_t(n * n), 1), X = random_buffer(std::size_t(tokens * n), 2);
  dw::cuda::buffer<float> Y(std::size_t(tokens * n));
  const auto Wv = W.view(n, n);
  const auto Xv = X.view(tokens, n);
  const auto Yv = Y.view(tokens, n);
  auto go = [&](const auto& u) {
    time_on_stream(st, ctx, [&] {
      if constexpr (O == op::apply) {
        dw::apply(ctx, Wv + u, Xv, Yv);
      } else {
        dw::merge(ctx, Wv, u);
        dw::unmerge(ctx, Wv, u);
      }
    });
    st.counters["params"] = double(u.parameter_count());
  };
  if constexpr (K == kind::base) {
    time_on_stream(st, ctx, [&] { dw::apply(ctx, Wv, Xv, Yv); });
  } else if constexpr (K == kind::lora) {
    auto B = random_buffer(std::size_t(n * 16), 3), A = random_buffer(std::size_t(16 * n), 4);
    go(dw::lora(B.view(n, 16), A.view(16, n), dw::alpha(16)));
  } else if constexpr (K == kind::lokr) {
    auto w1 = random_buffer(64 * 64, 3), w2 = random_buffer(64 * 64, 4);
    go(dw::kron(w1.view(64, 64), w2.view(64, 64), dw::scale(1.0)));
  } else if constexpr (K == kind::randlora) {
    const index_t r = 32, N = (n + r - 1) / r;
    const auto basis = dw::randlora_shared_basis(7, r, n, n, dw::randlora_kind::dense);
    auto lam = random_buffer(std::size_t(r * N), 3), gam = random_buffer(std::size_t(N * n), 4);
    go(dw::randlora(basis, n, n, lam.view(r, N), gam.view(N, n), dw::alpha(64)));
  } else if constexpr (K == kind::miss) {
    auto D = random_buffer(std::size_t(64 * n), 3);
    go(dw::miss(D.view(64, n), n));
  } else {
    const index_t r = 256;
    const auto basis = dw::vera_shared_basis(7, r, n, n);
    auto ld = random_buffer(std::size_t(r), 3), lb = random_buffer(std::size_t(n), 4);
    go(dw::vera(basis, n, n, dw::vector_view<const float, dw::device::cuda>(ld.data(), r),
                dw::vector_view<const float, dw::device::cuda>(lb.data(), n)));
  }
}

void apply_shapes(benchmark::internal::Benchmark* b) {
  for (auto tokens : {512, 8192}) b->Args({tokens});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}
void merge_shape(benchmark::internal::Benchmark* b) { b->Args({1})->UseManualTime()->Unit(benchmark::kMicrosecond); }

BENCHMARK(bm_update<kind::base, op::apply>)->Apply(apply_shapes);
BENCHMARK(bm_update<kind::lora, op::apply>)->Apply(apply_shapes);
BENCHMARK(bm_update<kind::lokr, op::apply>)->Apply(apply_shapes);
BENCHMARK(bm_update<kind::randlora, op::apply>)->Apply(apply_shapes);
BENCHMARK(bm_update<kind::miss, op::apply>)->Apply(apply_shapes);
BENCHMARK(bm_update<kind::vera, op::apply>)->Apply(apply_shapes);
BENCHMARK(bm_update<kind::lora, op::merge_unmerge>)->Apply(merge_shape);
BENCHMARK(bm_update<kind::lokr, op::merge_unmerge>)->Apply(merge_shape);
BENCHMARK(bm_update<kind::randlora, op::merge_unmerge>)->Apply(merge_shape);
BENCHMARK(bm_update<kind::miss, op::merge_unmerge>)->Apply(merge_shape);
BENCHMARK(bm_update<kind::vera, op::merge_unmerge>)->Apply(merge_shape);

/// Heterogeneous batch: 64 adapters of ranks {8, 16, 32, 64}; Args: requests, tokens per
/// request, strategy (0 base GEMM only, 1 automatic, 2 segments, 3 gather).
void bm_serve(benchmark::State& st) {
  const index_t requests = st.range(0), per = st.range(1), tokens = requests * per;
  auto& ctx = dw::cuda::default_context();
  auto W = random_buffer(std::size_t(n * n), 1), X = random_buffer(std::size_t(tokens * n), 2);
  dw::cuda::buffer<float> Y(std::size_t(tokens * n));
  std::vector<dw::cuda::buffer<float>> Bs, As;
  std::vector<dw::low_rank<float, dw::device::cuda>> adapters;
  const index_t ranks[] = {8, 16, 32, 64};
  for (index_t a = 0; a < 64; ++a) {
    const index_t r = ranks[a % 4];
    Bs.push_back(random_buffer(std::size_t(n * r), unsigned(10 + 2 * a)));
    As.push_back(random_buffer(std::size_t(r * n), unsigned(11 + 2 * a)));
    adapters.push_back(dw::lora(Bs.back().view(n, r), As.back().view(r, n), dw::alpha(double(r))));
  }
  std::vector<index_t> aot(static_cast<std::size_t>(tokens));
  for (index_t t = 0; t < tokens; ++t) aot[std::size_t(t)] = (t / per) % 64;  // request i → adapter i mod 64
  dw::serve::batch_options o;
  const int s = int(st.range(2));
  o.how = s == 2 ? dw::serve::strategy::segments : s == 3 ? dw::serve::strategy::gather : dw::serve::strategy::automatic;
  time_on_stream(st, ctx, [&] {
    if (s == 0) dw::apply(ctx, W.view(n, n), X.view(tokens, n), Y.view(tokens, n));
    else dw::cuda::serve::apply_lora_batch(ctx, W.view(n, n), adapters, aot, X.view(tokens, n), Y.view(tokens, n), o);
  });
  st.counters["tokens"] = double(tokens);
}
BENCHMARK(bm_serve)
    ->ArgsProduct({{64}, {1}, {0, 1, 2, 3}})
    ->ArgsProduct({{8}, {64}, {0, 1, 2, 3}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  std::string why;
  if (dw::cuda::device_count(&why) == 0) {
    std::printf("bench_cuda_updates: no usable CUDA device (%s); nothing measured\n", why.c_str());
    return 77;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
