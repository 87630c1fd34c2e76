// DESIGN.md principles 1 and 5 for the random-basis updates: apply, apply_transposed,
// merge, unmerge and frobenius_norm of NOLA, VeRA and RandLoRA never allocate an out × in
// block. For RandLoRA this is the claim that U [max_dim, N·r] and V [N·r, min_dim], each
// as large as W, are drawn in tiles and never formed whole. The executable replaces
// malloc and friends (glibc) to record the largest single allocation; materialize is the
// control that shows the counter sees an out × in allocation.
#include "alloc_counter.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::largest_allocation;
using Mat = dwt::RowMat<float>;


template <class U>
void check_no_dense(const U& u, Eigen::Index tokens) {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  const std::size_t dense_bytes = std::size_t(u.rows()) * std::size_t(u.cols()) * sizeof(float);
  Mat W = dwt::random<Mat>(u.rows(), u.cols(), 1);
  const Mat X = dwt::random<Mat>(tokens, u.cols(), 2), G = dwt::random<Mat>(tokens, u.rows(), 3);
  Mat Y(tokens, u.rows()), O(tokens, u.cols());
  const auto e = dw::view(W) + u;
  const std::size_t a = largest_allocation([&] { dw::apply(e, X, Y); });
  MESSAGE("largest allocation in apply: " << a << " B; out x in is " << dense_bytes << " B");
  CHECK(a < dense_bytes);
  CHECK(largest_allocation([&] { dw::apply_transposed(e, G, O); }) < dense_bytes);
  CHECK(largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  CHECK(largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
  CHECK(largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  CHECK(largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);  // the control
}
}  // namespace

TEST_CASE("RandLoRA never forms U or V whole (out > in, out < in)") {
  for (auto [out, in] : {std::pair<Eigen::Index, Eigen::Index>{1024, 768}, {768, 1024}}) {
    const auto basis = dw::randlora_shared_basis(3, 8, 1024, 1024);
    const Eigen::Index n = std::min(out, in), N = n / 8;
    const Mat lam = dwt::random<Mat>(8, N, 4), gam = dwt::random<Mat>(N, n, 5);
    check_no_dense(dw::randlora(basis, out, in, lam, gam, dw::alpha(640)), 64);
  }
}

TEST_CASE("VeRA and NOLA never allocate out x in") {
  const auto vb = dw::vera_shared_basis(1, 256, 1024, 1024);
  const Eigen::VectorXf ld = Eigen::VectorXf::Constant(256, 0.1f), lb = dwt::random<Mat>(768, 1, 2).col(0);
  check_no_dense(dw::vera(vb, 768, 1024, ld, lb), 64);
  const Eigen::VectorXf a = dwt::random<Mat>(64, 1, 3).col(0), b = dwt::random<Mat>(32, 1, 4).col(0);
  check_no_dense(dw::nola(768, 1024, 8, 5, a, b, dw::alpha(16)), 64);
}
