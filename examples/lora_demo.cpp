// SPDX-License-Identifier: MIT
// deltaw's main demo: a frozen 2048 x 2048 layer with a rank-16 LoRA, applied lazily,
// checked against the dense result, timed against the base GEMM and against forming ΔW
// first; merged and unmerged in place; DoRA; and what a mistake looks like.
#include <deltaw/deltaw.hpp>

#include <chrono>
#include <cstdio>

namespace dw = deltaw;
using Mat = dw::dense<float>;

template <class F>
double best_ms(F&& f, int reps = 5) {
  double best = 1e300;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

int main() {
  const int out = 2048, in = 2048, r = 16, tokens = 256;
  Mat W = Mat::Random(out, in), B = Mat::Random(out, r) * 0.01f, A = Mat::Random(r, in), X = Mat::Random(tokens, in);
  Mat Y(tokens, out);

  auto lora = dw::lora(B, A, dw::alpha(32));  // s = 32 / 16
  auto layer = dw::view(W) + lora;            // lazy: W + s·B·A is never formed
  std::printf("deltaw %s: W [%d, %d], LoRA r = %d (s = %.1f), X [%d, %d]\n", DELTAW_VERSION_STRING, out, in, r,
              lora.scale(), tokens, in);
  std::printf("  trainable parameters %lld (%.2f%% of W), extra apply flops %.2f%%\n",
              (long long)dw::parameter_count(lora), 100.0 * double(dw::parameter_count(lora)) / (double(out) * in),
              100.0 * double(dw::flop_count(lora, tokens)) / (2.0 * tokens * out * in));

  dw::apply(layer, X, Y);
  const Mat dense = (W.cast<double>() + lora.scale() * B.cast<double>() * A.cast<double>()).cast<float>();
  const Mat ref = X * dense.transpose();
  std::printf("  apply vs dense reference: max abs error %.2e\n", double((Y - ref).cwiseAbs().maxCoeff()));

  const double t_base = best_ms([&] { dw::apply(dw::view(W), X, Y); });
  const double t_lora = best_ms([&] { dw::apply(layer, X, Y); });
  const double t_mat = best_ms([&] {
    Mat merged = W + dw::materialize(lora);
    Y.noalias() = X * merged.transpose();
  });
  std::printf("  time: base GEMM %.1f ms | lazy LoRA %.1f ms (%.3fx) | materialise then GEMM %.1f ms (%.3fx)\n",
              t_base, t_lora, t_lora / t_base, t_mat, t_mat / t_base);

  const Mat W0 = W;
  dw::merge(W, lora);
  dw::unmerge(W, lora);
  std::printf("  merge + unmerge drift: max |W - W0| = %.2e\n", double((W - W0).cwiseAbs().maxCoeff()));

  Eigen::VectorXf m = dw::dora_magnitude(W, lora);  // DoRA starts at the row norms of W + s·B·A
  auto dora = dw::dora(W, lora, m);
  dw::apply(dw::view(W) + dora, X, Y);
  std::printf("  DoRA at init equals LoRA: max abs difference %.2e\n", double((Y - ref).cwiseAbs().maxCoeff()));

  try {
    Mat wrong = Mat::Random(tokens, in + 1);
    dw::apply(layer, wrong, Y);
  } catch (const dw::shape_error& e) {
    std::printf("  a shape mistake reads: %s\n", e.what());
  }
  return 0;
}
