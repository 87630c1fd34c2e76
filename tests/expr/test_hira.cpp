// SPDX-License-Identifier: MIT
// HiRA (issue 16) against dense references in double built here (ΔW = W ⊙ (B·A), PEFT's
// get_delta_weight times the base weight): apply and apply_transposed through both schedules
// (one token: the r products with W; more: the modulated panels, with more rows than one
// panel), materialize, merge / unmerge round trip, merge_checked, frobenius_norm, a lazy sum
// with LoRA, float; the errors; the largest allocation of apply / merge below one out × in.
#include <deltaw/deltaw.hpp>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;
}  // namespace

TEST_CASE("HiRA: ΔW = W ⊙ (B·A), both schedules, every operation against dense") {
  std::mt19937_64 g(1919);
  for (int trial = 0; trial < 10; ++trial) {
    const Eigen::Index out = trial == 9 ? 300 : std::uniform_int_distribution<int>(1, 9)(g);
    const Eigen::Index in = std::uniform_int_distribution<int>(1, 11)(g), r = trial < 2 ? 1 : std::uniform_int_distribution<int>(1, 4)(g);
    MatD W = dwt::random<MatD>(out, in, 10 + trial);
    const MatD B = dwt::random<MatD>(out, r, 20 + trial), A = dwt::random<MatD>(r, in, 30 + trial);
    const MatD dW = W.cwiseProduct(B * A);
    INFO("trial " << trial << " out " << out << " in " << in << " r " << r);
    auto u = dw::hira(W, B, A);
    CHECK(u.rank() == r);
    CHECK(u.parameter_count() == r * (out + in));
    // Token counts on both sides of the schedule switch (r products with W / W ⊙ (1 + B·A)).
    const std::vector<Eigen::Index> tokens{0, 1, 2, 7};
    dwt::check_update_ops(u, dW, 40 + trial, tokens);
    dwt::check_update_over_weight(u, W, dW, 60 + trial, {.tokens = tokens, .unmerge_tol = 1e-10, .reads_weight = "HiRA"});
  }
  const dwt::MatF Wf = dwt::random<dwt::MatF>(6, 10, 90), Bf = dwt::random<dwt::MatF>(6, 3, 91), Af = dwt::random<dwt::MatF>(3, 10, 92);
  const dwt::MatF Xf = dwt::random<dwt::MatF>(5, 10, 93);
  const MatD Wd = Wf.cast<double>();
  const MatD ref = Xf.cast<double>() * (Wd + Wd.cwiseProduct(Bf.cast<double>() * Af.cast<double>())).transpose();
  CHECK(dwt::rel_err(dw::apply(dw::view(Wf) + dw::hira(Wf, Bf, Af), Xf).cast<double>(), ref) < 1e-5);
}

TEST_CASE("HiRA: errors") {
  MatD W = dwt::random<MatD>(3, 4, 1);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::hira(W, MatD(dwt::random<MatD>(3, 2, 2)), MatD(dwt::random<MatD>(2, 5, 3))); },
                                          {"W [3, 4]", "A [2, 5]", "[out, r], [r, in]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::hira(W, MatD(dwt::random<MatD>(3, 2, 2)), MatD(dwt::random<MatD>(1, 4, 3))); },
                                          {"B [3, 2]"});
  // 1 + B·A = 0 somewhere: merge zeroes the entry, unmerge refuses.
  const MatD B = MatD::Constant(3, 1, -1.0), A = MatD::Constant(1, 4, 1.0);
  auto u = dw::hira(W, B, A);
  dw::merge(W, u);
  CHECK(W.norm() == 0);
  dwt::check_throws_with<dw::argument_error>([&] { dw::unmerge(W, u); }, {"HiRA", "cannot be unmerged"});
}

TEST_CASE("HiRA: no apply, merge or norm allocates out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, r = 4;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat B = dwt::random<Mat>(out, r, 2), A = dwt::random<Mat>(r, in, 3);
  auto u = dw::hira(W, B, A);
  for (Eigen::Index T : {Eigen::Index(1), Eigen::Index(64)}) {
    const Mat X = dwt::random<Mat>(T, in, 4), G = dwt::random<Mat>(T, out, 5);
    Mat Y(T, out), O(T, in);
    CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply(u, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(dw::view(W) + u, G, O); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
  }
  CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
}
