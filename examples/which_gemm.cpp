// SPDX-License-Identifier: MIT
// Which product is faster on this machine: Eigen's own (deltaw's default) or OpenBLAS's
// (deltaw built with DELTAW_USE_BLAS)? It depends on the CPU and on the OpenBLAS build (an
// old OpenBLAS may fall back to older kernels on a new CPU), so measure rather than guess.
//
//   which_gemm [d=4096] [tokens=512] [rank=16] [threads=Eigen's]
//
// Times, in fp32 with the same thread count for both, the products of one LoRA layer's
// training step at d×d weights: the base product X·Wᵀ ([tokens, d]·[d, d]) and the two rank
// products X·Aᵀ and (X·Aᵀ)·Bᵀ, then prints GFLOP/s for each and which build to choose.
#include <deltaw/kernels/gemm.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <utility>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void openblas_set_num_threads(int n);
char* openblas_get_config(void);
}

namespace {
struct shape { const char* what; int m, n, k; double weight; };

template <class F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Best of 7 runs of each, interleaved so that a burst of load elsewhere hits both alike.
template <class F, class G>
std::pair<double, double> best_seconds(F&& f, G&& g) {
  f();  // warm-up (page faults, thread start-up)
  g();
  double bf = 1e30, bg = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    bf = std::min(bf, seconds(f));
    bg = std::min(bg, seconds(g));
  }
  return {bf, bg};
}
}  // namespace

int main(int argc, char** argv) {
  namespace dw = deltaw;
  const int d = argc > 1 ? std::atoi(argv[1]) : 4096, tokens = argc > 2 ? std::atoi(argv[2]) : 512,
            rank = argc > 3 ? std::atoi(argv[3]) : 16;
  const int threads = argc > 4 ? std::atoi(argv[4]) : Eigen::nbThreads();
  if (d <= 0 || tokens <= 0 || rank <= 0 || threads <= 0) {
    std::fprintf(stderr, "usage: which_gemm [d>0] [tokens>0] [rank>0] [threads>0]\n");
    return 2;
  }
  Eigen::setNbThreads(threads);
  openblas_set_num_threads(threads);
  // Row-major X [tokens, d] times Wᵀ: in column-major terms C [d, tokens] = W·Xᵀ, which is
  // what deltaw's apply hands to the product. Weights: how often a training step runs each
  // (forward: base + both rank products; backward: dX through W, and the rank products of
  // dX, dA and dB).
  const shape shapes[] = {{"base  X*W^T      ", d, tokens, d, 2.0},
                          {"down  X*A^T      ", rank, tokens, d, 3.0},
                          {"up    (X*A^T)*B^T", d, tokens, rank, 3.0}};
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::printf("which_gemm: d=%d tokens=%d rank=%d threads=%d\nOpenBLAS: %s\n\n", d, tokens, rank, threads,
              openblas_get_config());
  std::printf("%-20s %12s %12s %8s\n", "product", "Eigen GF/s", "OpenBLAS GF/s", "ratio");
  double t_eigen = 0, t_blas = 0;
  for (const auto& s : shapes) {
    std::vector<float> a(std::size_t(s.m) * s.k), b(std::size_t(s.k) * s.n), c(std::size_t(s.m) * s.n);
    for (auto& x : a) x = u(gen);
    for (auto& x : b) x = u(gen);
    const dw::matrix_view<const float> A(a.data(), s.m, s.k, 1, s.m);  // column-major
    const dw::matrix_view<const float> B(b.data(), s.k, s.n, 1, s.k);
    const dw::matrix_view<float> C(c.data(), s.m, s.n, 1, s.m);
    dw::kernels::cpu_context ctx;
    const auto [te, tb] = best_seconds(
        [&] { dw::kernels::gemm<float>(ctx, 1.f, A, dw::kernels::op::none, B, dw::kernels::op::none, 0.f, C); },
        [&] {
          const float one = 1.f, zero = 0.f;
          sgemm_("N", "N", &s.m, &s.n, &s.k, &one, a.data(), &s.m, b.data(), &s.k, &zero, c.data(), &s.m);
        });
    const double gflop = 2.0 * s.m * s.n * s.k * 1e-9;
    std::printf("%-20s %12.1f %12.1f %8.2f\n", s.what, gflop / te, gflop / tb, tb / te);
    t_eigen += s.weight * te;
    t_blas += s.weight * tb;
  }
  double load[1] = {0};
  if (getloadavg(load, 1) == 1 && load[0] > double(std::thread::hardware_concurrency()) - threads + 0.5)
    std::printf("\nwarning: load average %.2f on %u cores: other work shared the cores, so these figures (Eigen's\n"
                "OpenMP threads suffer most) may not hold on an idle machine; rerun when it is quiet\n",
                load[0], std::thread::hardware_concurrency());
  std::printf("\none training step's products: Eigen %.2f ms, OpenBLAS %.2f ms\n", 1e3 * t_eigen, 1e3 * t_blas);
  if (t_blas < 0.95 * t_eigen)
    std::printf("choose: -DDELTAW_USE_BLAS=ON (OpenBLAS is %.2fx faster here)\n", t_eigen / t_blas);
  else if (t_eigen < 0.95 * t_blas)
    std::printf("choose: the default build, Eigen's product (%.2fx faster than OpenBLAS here)\n", t_blas / t_eigen);
  else
    std::printf("choose: either (within 5%%); the default build has one dependency less\n");
  return 0;
}
