// SPDX-License-Identifier: MIT
// Helpers of the CUDA benchmarks: device buffers of random values and timing with CUDA
// events on a context's stream.
#pragma once

#include <benchmark/benchmark.h>

#include <deltaw/cuda/cuda.hpp>

#include <functional>
#include <random>
#include <vector>

namespace dwbench {

/// n values uniform in [−scale, scale] on the device, stored as T.
template <class T>
deltaw::cuda::buffer<T> random_buffer(std::size_t n, unsigned seed, float scale = 0.05f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<T> h(n);
  for (auto& v : h) v = deltaw::convert<T>(u(g));
  return deltaw::cuda::buffer<T>(h);
}

/// Times run() on ctx's stream with CUDA events, after three warm-up calls (cuBLAS
/// heuristics, scratch growth); the benchmark must use manual time.
inline void time_on_stream(benchmark::State& st, deltaw::cuda::context& ctx, const std::function<void()>& run) {
  cudaEvent_t e0, e1;
  DELTAW_CUDA_CHECK(cudaEventCreate(&e0));
  DELTAW_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) run();
  ctx.synchronize();
  for (auto _ : st) {
    DELTAW_CUDA_CHECK(cudaEventRecord(e0, ctx.stream()));
    run();
    DELTAW_CUDA_CHECK(cudaEventRecord(e1, ctx.stream()));
    DELTAW_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    DELTAW_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    st.SetIterationTime(double(ms) * 1e-3);
  }
  DELTAW_CUDA_CHECK(cudaEventDestroy(e0));
  DELTAW_CUDA_CHECK(cudaEventDestroy(e1));
}

}  // namespace dwbench
