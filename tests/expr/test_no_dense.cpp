// Principle 1 of DESIGN.md: no hidden dense ΔW. alloc_counter.cpp replaces malloc and
// friends (glibc) to record the largest single allocation made during each operation, and
// fails if apply, apply_transposed, merge, unmerge, frobenius_norm or the DoRA norms
// allocate out × in elements or more. materialize, which must, is the control that shows
// the counter works.
#include "alloc_counter.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::largest_allocation;
using Mat = dwt::RowMat<float>;

constexpr Eigen::Index out = 768, in = 1024, r = 16, tokens = 64;
const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
}  // namespace

TEST_CASE("no operation but materialize allocates an out x in matrix") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat B = dwt::random<Mat>(out, r, 2), A = dwt::random<Mat>(r, in, 3);
  const Mat X = dwt::random<Mat>(tokens, in, 4), G = dwt::random<Mat>(tokens, out, 5);
  Mat Y(tokens, out), O(tokens, in);
  auto l = dw::lora(B, A, dw::alpha(32));
  auto e = dw::view(W) + l;

  const std::size_t base = largest_allocation([&] { dw::apply(dw::view(W), X, Y); });
  MESSAGE("largest allocation: base GEMM " << base << " B, out x in is " << dense_bytes << " B");
  CHECK(base < dense_bytes);

  const std::size_t a = largest_allocation([&] { dw::apply(e, X, Y); });
  CHECK(a < dense_bytes);
  CHECK(largest_allocation([&] { (void)dw::apply(e, X); }) < dense_bytes);
  CHECK(largest_allocation([&] { dw::apply_transposed(e, G, O); }) < dense_bytes);
  CHECK(largest_allocation([&] { dw::merge(W, l); }) < dense_bytes);
  CHECK(largest_allocation([&] { dw::unmerge(W, l); }) < dense_bytes);
  CHECK(largest_allocation([&] { dw::merge_checked(W, l); }) < dense_bytes);
  dw::unmerge(W, l);
  CHECK(largest_allocation([&] { (void)dw::frobenius_norm(l); }) < dense_bytes);

  Eigen::VectorXf m;
  CHECK(largest_allocation([&] { m = dw::dora_magnitude(W, l); }) < dense_bytes);
  CHECK(largest_allocation([&] {
          auto d = dw::dora(W, l, m);
          dw::apply(dw::view(W) + d, X, Y);
        }) < dense_bytes);

  // The control: materialize forms ΔW, and the counter sees it.
  CHECK(largest_allocation([&] { (void)dw::materialize(l); }) >= dense_bytes);
}

TEST_CASE("bf16 weights are converted in bounded panels, never whole") {
  if (!dwt::allocation_counting_available()) return;
  using MatB = dwt::RowMat<Eigen::bfloat16>;
  MatB W = dwt::random<Mat>(out, in, 1).cast<Eigen::bfloat16>();
  const MatB B = dwt::random<Mat>(out, r, 2).cast<Eigen::bfloat16>();
  const MatB A = dwt::random<Mat>(r, in, 3).cast<Eigen::bfloat16>();
  const Mat X = dwt::random<Mat>(tokens, in, 4);
  Mat Y(tokens, out);
  auto l = dw::lora(B, A, dw::alpha(32));
  const std::size_t fp32_dense = std::size_t(out) * in * sizeof(float);
  CHECK(largest_allocation([&] { dw::apply(dw::view(W) + l, X, Y); }) < fp32_dense / 2);
  CHECK(largest_allocation([&] { dw::merge(W, l); }) < fp32_dense / 2);
}
