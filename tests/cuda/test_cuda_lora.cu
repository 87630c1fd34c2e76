// SPDX-License-Identifier: MIT
// CUDA LoRA against the CPU backend and a dense double reference: apply (W + ΔW, ΔW
// alone, W alone), merge and unmerge, for float, double, bf16/fp16 storage and mixed
// storage, over odd shapes, r = 1, tokens = 0 and empty dimensions, in row- and
// column-major layouts. Skipped (exit code 77) where no CUDA device is usable.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/deltaw.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "cuda_test_util.cuh"
#include "test_util.hpp"

namespace dw = deltaw;
using dw::index_t;
using dwt::MatD;

namespace {

// Runs before doctest's main: without a device there is nothing to test, and saying so
// with exit code 77 makes CTest report "Skipped" instead of a silent pass.
const bool device_present = [] {
  std::string why;
  if (dw::cuda::device_count(&why) == 0) {
    std::printf("test_cuda_lora: SKIPPED, no usable CUDA device (%s)\n", why.c_str());
    std::fflush(stdout);
    std::exit(77);
  }
  return true;
}();

using dwcuda::nan_output;
using dwcuda::twin;

struct shape {
  index_t tokens, out, in, r;
};
const shape shapes[] = {{5, 7, 3, 1},    {0, 4, 6, 2},     {17, 33, 65, 4}, {64, 96, 128, 16}, {1, 1, 1, 1},
                        {3, 5, 2, 5},    {4, 0, 3, 2},     {4, 3, 0, 2},    {129, 31, 257, 8}};

std::string describe(const shape& s, bool cm) {
  return "tokens=" + std::to_string(s.tokens) + " out=" + std::to_string(s.out) + " in=" + std::to_string(s.in) +
         " r=" + std::to_string(s.r) + (cm ? " column-major" : " row-major");
}

template <class T>
constexpr double apply_tol() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  else return 1e-5;  // fp32 accumulation over k <= 257 of U(-1, 1) values: errors ~1e-7 relative
}

/// Spacing of 16-bit floats at |x| (floored at |x| = 1e-2, where cancellation leaves a
/// result dominated by fp32 rounding of terms ~10, about 1e-6).
template <class T>
double ulp16(double x) {
  const int mant = std::is_same_v<T, dw::bf16> ? 7 : 10;
  const double a = std::max(std::abs(x), 1e-2);
  return std::ldexp(1.0, int(std::floor(std::log2(a))) - mant);
}

}  // namespace

TEST_CASE_TEMPLATE("cuda: LoRA apply, merge, unmerge match the CPU and the dense double result", T, float, double) {
  dw::cuda::context ctx;
  std::uint64_t seed = 100;
  for (const shape& s : shapes) {
    for (bool cm : {false, true}) {
      CAPTURE(describe(s, cm));
      const MatD Wd = dwt::random(s.out, s.in, ++seed), Bd = dwt::random(s.out, s.r, ++seed),
                 Ad = dwt::random(s.r, s.in, ++seed), Xd = dwt::random(s.tokens, s.in, ++seed);
      twin<T> W(Wd, cm), B(Bd), A(Ad, cm), X(Xd, cm);
      const double scale = 16.0 / double(s.r);
      // The reference from the values actually stored (rounded to T).
      const MatD W0 = W.host_d(), D = scale * B.host_d() * A.host_d();
      const MatD ref = X.host_d() * (W0 + D).transpose();

      auto lg = dw::lora(B.gpu(), A.gpu(), dw::alpha(16));
      static_assert(std::is_same_v<decltype(lg), dw::low_rank<T, dw::device::cuda>>);
      auto lc = dw::lora(B.cpu(), A.cpu(), dw::alpha(16));

      // W + ΔW, explicit context; the CPU backend on the same data.
      auto Yg = nan_output<T>(s.tokens, s.out, cm);
      auto Yc = nan_output<T>(s.tokens, s.out, cm);
      dw::apply(ctx, W.gpu() + lg, X.gpu(), Yg.gpu());
      dw::apply(W.cpu() + lc, X.cpu(), Yc.cpu());
      CHECK(dwt::rel_err(Yc.host_d(), ref) <= apply_tol<T>());
      CHECK(dwt::rel_err(Yg.dev_d(), ref) <= apply_tol<T>());
      CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= apply_tol<T>());

      // ΔW alone and W alone, default context.
      auto Yu = nan_output<T>(s.tokens, s.out, !cm);
      dw::apply(lg, X.gpu(), Yu.gpu());
      CHECK(dwt::rel_err(Yu.dev_d(), MatD(X.host_d() * D.transpose())) <= apply_tol<T>());
      auto Yw = nan_output<T>(s.tokens, s.out, !cm);
      dw::apply(W.gpu(), X.gpu(), Yw.gpu());
      CHECK(dwt::rel_err(Yw.dev_d(), MatD(X.host_d() * W0.transpose())) <= apply_tol<T>());

      // merge, then unmerge, in place; the CPU backend alongside.
      dw::merge(ctx, W.gpu(), lg);
      dw::merge(W.cpu(), lc);
      CHECK(dwt::rel_err(W.dev_d(), MatD(W0 + D)) <= apply_tol<T>());
      CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= apply_tol<T>());
      dw::unmerge(W.gpu(), lg);
      CHECK(dwt::rel_err(W.dev_d(), W0) <= apply_tol<T>());
    }
  }
}

TEST_CASE_TEMPLATE("cuda: W + two LoRAs over 16-bit storage, fp32 compute", T, dw::bf16, dw::fp16) {
  dw::cuda::context ctx;
  std::uint64_t seed = 500;
  const shape cases[] = {{33, 40, 72, 4}, {0, 8, 8, 1}, {7, 129, 65, 1}, {256, 256, 512, 16}};
  for (const shape& s : cases) {
    for (bool cm : {false, true}) {
      CAPTURE(describe(s, cm));
      const MatD Wd = dwt::random(s.out, s.in, ++seed), Xd = dwt::random(s.tokens, s.in, ++seed);
      twin<T> W(Wd, cm), X(Xd, cm);
      twin<T> B1(dwt::random(s.out, s.r, ++seed)), A1(dwt::random(s.r, s.in, ++seed), cm);
      twin<T> B2(dwt::random(s.out, 1, ++seed)), A2(dwt::random(1, s.in, ++seed));
      const double s1 = 16.0 / double(s.r), s2 = 8.0 / std::sqrt(1.0);
      const MatD W0 = W.host_d();
      const MatD D1 = s1 * B1.host_d() * A1.host_d(), D2 = s2 * B2.host_d() * A2.host_d();
      const MatD ref = X.host_d() * (W0 + D1 + D2).transpose();

      auto l1 = dw::lora(B1.gpu(), A1.gpu(), dw::alpha(16));
      auto l2 = dw::rslora(B2.gpu(), A2.gpu(), dw::alpha(8));
      auto Yg = nan_output<float>(s.tokens, s.out, !cm);
      dw::apply(ctx, W.gpu() + l1 + l2, X.gpu(), Yg.gpu());
      auto Yc = nan_output<float>(s.tokens, s.out, !cm);
      dw::apply(W.cpu() + dw::lora(B1.cpu(), A1.cpu(), dw::alpha(16)) + dw::rslora(B2.cpu(), A2.cpu(), dw::alpha(8)),
                X.cpu(), Yc.cpu());
      // Inputs are exact in fp32 and products of 16-bit values are exact in fp32, so only
      // fp32 accumulation separates the results from the double reference (tensor cores
      // may truncate rather than round while accumulating: 1e-4 on the GPU, 1e-5 on the CPU).
      CHECK(dwt::rel_err(Yg.dev_d(), ref) <= 1e-4);
      CHECK(dwt::rel_err(Yc.host_d(), ref) <= 1e-5);

      // merge rounds W + ΔW to the 16-bit storage once (≤ 1/2 spacing, 1 allowed);
      // unmerge comes back within the spacing at the larger of |W|, |W + ΔW|.
      dw::merge(ctx, W.gpu(), l1);
      const MatD W1 = W.dev_d(), exact = W0 + D1;
      int bad_merge = 0, bad_unmerge = 0;
      for (index_t i = 0; i < W1.rows(); ++i)
        for (index_t j = 0; j < W1.cols(); ++j)
          if (std::abs(W1(i, j) - exact(i, j)) > ulp16<T>(exact(i, j))) ++bad_merge;
      dw::unmerge(ctx, W.gpu(), l1);
      const MatD W2 = W.dev_d();
      for (index_t i = 0; i < W2.rows(); ++i)
        for (index_t j = 0; j < W2.cols(); ++j)
          if (std::abs(W2(i, j) - W0(i, j)) > ulp16<T>(2 * std::max(std::abs(W0(i, j)), std::abs(W1(i, j)))))
            ++bad_unmerge;
      CHECK(bad_merge == 0);
      CHECK(bad_unmerge == 0);
    }
  }
}

TEST_CASE("cuda: mixed storage converts the small operands and panels the large ones") {
  dw::cuda::context ctx;
  const shape s{19, 45, 70, 3};
  const MatD Wd = dwt::random(s.out, s.in, 1), Xd = dwt::random(s.tokens, s.in, 2), Bd = dwt::random(s.out, s.r, 3),
             Ad = dwt::random(s.r, s.in, 4);
  const double scale = 2.0;

  SUBCASE("bf16 W, float X and factors: float output") {
    twin<dw::bf16> W(Wd);
    twin<float> X(Xd), B(Bd), A(Ad, true);
    auto l = dw::lora(B.gpu(), A.gpu(), dw::scale(scale));
    const MatD D = scale * B.host_d() * A.host_d();
    auto Y = nan_output<float>(s.tokens, s.out, false);
    dw::apply(ctx, W.gpu() + l, X.gpu(), Y.gpu());
    CHECK(dwt::rel_err(Y.dev_d(), MatD(X.host_d() * (W.host_d() + D).transpose())) <= 1e-5);
    // merge into the bf16 weight: computed in fp32 panels, rounded once.
    const MatD W0 = W.host_d(), exact = W0 + D;
    dw::merge(ctx, W.gpu(), l);
    const MatD W1 = W.dev_d();
    int bad = 0;
    for (index_t i = 0; i < W1.rows(); ++i)
      for (index_t j = 0; j < W1.cols(); ++j)
        if (std::abs(W1(i, j) - exact(i, j)) > ulp16<dw::bf16>(exact(i, j))) ++bad;
    CHECK(bad == 0);
  }
  SUBCASE("float W, bf16 X and factors") {
    twin<float> W(Wd, true);
    twin<dw::bf16> X(Xd), B(Bd), A(Ad);
    auto l = dw::lora(B.gpu(), A.gpu(), dw::scale(scale));
    const MatD D = scale * B.host_d() * A.host_d();
    auto Y = nan_output<float>(s.tokens, s.out, true);
    dw::apply(ctx, W.gpu() + l, X.gpu(), Y.gpu());
    CHECK(dwt::rel_err(Y.dev_d(), MatD(X.host_d() * (W.host_d() + D).transpose())) <= 1e-5);
    const MatD W0 = W.host_d();
    dw::merge(ctx, W.gpu(), l);
    CHECK(dwt::rel_err(W.dev_d(), MatD(W0 + D)) <= 1e-5);
    dw::unmerge(ctx, W.gpu(), l);
    CHECK(dwt::rel_err(W.dev_d(), W0) <= 1e-5);
  }
  SUBCASE("double W, float X and factors: double output") {
    twin<double> W(Wd);
    twin<float> X(Xd, true), B(Bd), A(Ad);
    auto l = dw::lora(B.gpu(), A.gpu(), dw::scale(scale));
    const MatD D = scale * B.host_d() * A.host_d();
    auto Y = nan_output<double>(s.tokens, s.out, false);
    dw::apply(ctx, W.gpu() + l, X.gpu(), Y.gpu());
    CHECK(dwt::rel_err(Y.dev_d(), MatD(X.host_d() * (W.host_d() + D).transpose())) <= 1e-12);
  }
}

TEST_CASE("cuda: errors name the operation, the shapes and the failing call") {
  const MatD Wd = dwt::random(6, 5, 1), Bd = dwt::random(6, 2, 2), Ad = dwt::random(2, 5, 3);
  twin<float> W(Wd), B(Bd), A(Ad), X(dwt::random(4, 5, 4)), Xbad(dwt::random(4, 3, 5));
  auto l = dw::lora(B.gpu(), A.gpu(), dw::alpha(4));
  dw::cuda::buffer<float> y(24);

  dwt::check_throws_with<dw::shape_error>([&] { dw::apply(W.gpu() + l, Xbad.gpu(), y.view(4, 6)); },
                                          {"deltaw::apply", "[4, 3]", "[6, 5]"});
  dwt::check_throws_with<dw::shape_error>([&] { dw::apply(W.gpu() + l, X.gpu(), y.view(3, 6)); },
                                          {"deltaw::apply", "[3, 6]", "[4, 6]"});
  // A view with no unit stride (every other element of a row-major [4, 10] buffer).
  dw::cuda::buffer<float> xs(40);
  dwt::check_throws_with<dw::layout_error>(
      [&] { dw::apply(W.gpu() + l, xs.view(4, 5, 10, 2), y.view(4, 6)); }, {"deltaw::apply", "X [4, 5]", "(10, 2)", "unit stride"});
  dwt::check_throws_with<dw::shape_error>([&] { dw::merge(X.gpu(), l); }, {"deltaw::merge", "[4, 5]", "[6, 5]"});
  dwt::check_throws_with<dw::cuda::cuda_error>([] { DELTAW_CUDA_CHECK(cudaSetDevice(1 << 20)); },
                                               {"cudaSetDevice", "cudaErrorInvalidDevice"});
  dwt::check_throws_with<dw::cuda::cuda_error>(
      [] {
        const float one = 1.0f;  // m = -1 is rejected before any pointer is read
        DELTAW_CUDA_CHECK(cublasSgemm(dw::cuda::default_context().cublas(), CUBLAS_OP_N, CUBLAS_OP_N, -1, 1, 1, &one,
                                      nullptr, 1, nullptr, 1, &one, nullptr, 1));
      },
      {"cublasSgemm", "CUBLAS_STATUS_INVALID_VALUE"});
  static_assert(std::is_base_of_v<dw::error, dw::cuda::cuda_error>);
}

TEST_CASE("cuda: contexts: default per thread, borrowed streams, scratch reuse") {
  dw::cuda::context& a = dw::cuda::default_context();
  CHECK(&a == &dw::cuda::default_context());
  dw::cuda::context* other = nullptr;
  std::thread t([&] { other = &dw::cuda::default_context(); });
  t.join();
  CHECK(other != &a);
  CHECK(a.cusolver() != nullptr);

  cudaStream_t st = nullptr;
  DELTAW_CUDA_CHECK(cudaStreamCreate(&st));
  {
    dw::cuda::context borrowed(a.device(), st);
    CHECK(borrowed.stream() == st);
    const MatD Wd = dwt::random(70, 50, 7), Bd = dwt::random(70, 8, 8), Ad = dwt::random(8, 50, 9);
    twin<double> W(Wd), B(Bd), A(Ad);
    auto l = dw::lora(B.gpu(), A.gpu(), dw::alpha(8));
    // float X under a double expression is converted in scratch (tokens·in doubles): the
    // 3000-token call outgrows the first 1 MiB chunk, the next call folds the chunks.
    for (index_t tokens : {1, 300, 3000, 5}) {
      twin<float> X(dwt::random(tokens, 50, std::uint64_t(tokens)));
      auto Y = nan_output<double>(tokens, 70, false);
      dw::apply(borrowed, W.gpu() + l, X.gpu(), Y.gpu());
      borrowed.synchronize();
      CHECK(dwt::rel_err(Y.dev_d(), MatD(X.host_d() * (Wd + Bd * Ad).transpose())) <= 1e-12);
    }
    CHECK(borrowed.workspace_bytes() >= std::size_t(3000 * 50 * sizeof(double)));
  }
  DELTAW_CUDA_CHECK(cudaStreamDestroy(st));
}
