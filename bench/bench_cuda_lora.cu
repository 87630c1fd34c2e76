// SPDX-License-Identifier: MIT
// CUDA LoRA apply against the base GEMM alone, timed with CUDA events on the context's
// stream. The headline figure is the ratio unmerged/base; the ideal is
// 1 + r·(in + out)/(in·out). Exits 77 (after saying why) without a CUDA device.
#include <benchmark/benchmark.h>

#include <deltaw/cuda/cuda.hpp>

#include "cuda_bench_util.cuh"

#include <cstdio>
#include <string>
#include <vector>

namespace dw = deltaw;

namespace {

using dwbench::random_buffer;

enum class mode { base, lora_unmerged, merge_unmerge };

/// Args: tokens, in = out, r.
template <class T, mode M>
void bm_apply(benchmark::State& st) {
  const dw::index_t tokens = st.range(0), n = st.range(1), r = st.range(2);
  auto& ctx = dw::cuda::default_context();
  auto W = random_buffer<T>(std::size_t(n * n), 1), B = random_buffer<T>(std::size_t(n * r), 2),
       A = random_buffer<T>(std::size_t(r * n), 3), X = random_buffer<T>(std::size_t(tokens * n), 4);
  dw::cuda::buffer<dw::accum_t<T>> Y(std::size_t(tokens * n));
  const auto Wv = W.view(n, n);
  const auto l = dw::lora(B.view(n, r), A.view(r, n), dw::alpha(double(r)));
  auto run = [&] {
    if constexpr (M == mode::base) dw::apply(ctx, Wv, X.view(tokens, n), Y.view(tokens, n));
    else if constexpr (M == mode::lora_unmerged) dw::apply(ctx, Wv + l, X.view(tokens, n), Y.view(tokens, n));
    else {
      dw::merge(ctx, Wv, l);
      dw::unmerge(ctx, Wv, l);
    }
  };
  dwbench::time_on_stream(st, ctx, run);
  const double flops = M == mode::base            ? 2.0 * double(tokens) * double(n) * double(n)
                       : M == mode::lora_unmerged ? 2.0 * double(tokens) * double(n) * double(n) +
                                                        double(l.flop_count(tokens))
                                                  : 2.0 * 2.0 * double(n) * double(n) * double(r);
  st.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["ideal_ratio"] = 1.0 + double(r) * 2.0 * double(n) / (double(n) * double(n));
}

void shapes(benchmark::internal::Benchmark* b) {
  for (auto tokens : {1, 512, 4096}) b->Args({tokens, 4096, 16});
  b->Args({512, 8192, 64});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(bm_apply<float, mode::base>)->Apply(shapes);
BENCHMARK(bm_apply<float, mode::lora_unmerged>)->Apply(shapes);
BENCHMARK(bm_apply<dw::bf16, mode::base>)->Apply(shapes);
BENCHMARK(bm_apply<dw::bf16, mode::lora_unmerged>)->Apply(shapes);
BENCHMARK(bm_apply<float, mode::merge_unmerge>)->Args({1, 4096, 16})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_apply<dw::bf16, mode::merge_unmerge>)->Args({1, 4096, 16})->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  std::string why;
  if (dw::cuda::device_count(&why) == 0) {
    std::printf("bench_cuda_lora: no usable CUDA device (%s); nothing measured\n", why.c_str());
    return 77;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
