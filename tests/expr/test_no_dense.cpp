// Principle 1 of DESIGN.md: no hidden dense ΔW. This executable interposes malloc and
// friends (glibc) to record the largest single allocation made during each operation, and
// fails if apply, apply_transposed, merge, unmerge, frobenius_norm or the DoRA norms
// allocate out × in elements or more. materialize, which must, is the control that shows
// the counter works.
#include <atomic>
#include <cstddef>
#include <cstdlib>

#include "test_util.hpp"

#ifndef DELTAW_TEST_SANITIZED
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {
std::atomic<bool> recording{false};
std::atomic<std::size_t> largest{0};
void record(std::size_t n) {
  if (!recording.load(std::memory_order_relaxed)) return;
  std::size_t cur = largest.load(std::memory_order_relaxed);
  while (n > cur && !largest.compare_exchange_weak(cur, n)) {
  }
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  record(n);
  return __libc_malloc(n);
}
void* calloc(std::size_t k, std::size_t n) {
  record(k * n);
  return __libc_calloc(k, n);
}
void* realloc(void* p, std::size_t n) {
  record(n);
  return __libc_realloc(p, n);
}
void* memalign(std::size_t a, std::size_t n) {
  record(n);
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  record(n);
  return __libc_memalign(a, n);
}
int posix_memalign(void** p, std::size_t a, std::size_t n) {
  record(n);
  *p = __libc_memalign(a, n);
  return *p ? 0 : 12;  // ENOMEM
}
}

namespace {
namespace dw = deltaw;
using Mat = dwt::RowMat<float>;

// Largest single allocation, in bytes, made while f runs.
template <class F>
std::size_t largest_allocation(F&& f) {
  largest = 0;
  recording = true;
  f();
  recording = false;
  return largest.load();
}

constexpr Eigen::Index out = 768, in = 1024, r = 16, tokens = 64;
const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
}  // namespace

TEST_CASE("no operation but materialize allocates an out x in matrix") {
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
#else
TEST_CASE("allocation counting is skipped under sanitizers (they own malloc)") { MESSAGE("skipped: sanitizer build"); }
#endif
