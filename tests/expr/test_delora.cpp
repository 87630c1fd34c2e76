// SPDX-License-Identifier: MIT
// DeLoRA (issue 16) against dense references in double built here as PEFT's _compute_delta
// does (B·diag(λ/r/(‖A_i‖·‖B^i‖))·A, times the weight norms per input column, norms clamped
// at 1e-4): apply, apply_transposed, materialize, merge / unmerge, frobenius_norm, a lazy sum
// with LoRA, the clamp, delora_weight_norms, float; the errors; no out × in allocation.
#include <deltaw/deltaw.hpp>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

MatD delora_ref(const MatD& B, const MatD& A, double lambda, const Eigen::VectorXd& w) {
  const Eigen::Index r = A.rows();
  Eigen::VectorXd d(r);
  for (Eigen::Index i = 0; i < r; ++i) d[i] = lambda / double(r) / (std::max(A.row(i).norm(), 1e-4) * std::max(B.col(i).norm(), 1e-4));
  return (B * d.asDiagonal() * A) * w.asDiagonal();
}

}  // namespace

TEST_CASE("DeLoRA: ΔW = B·diag(λ/(r·‖A_i‖·‖B^i‖))·A·diag(w), every operation against dense") {
  std::mt19937_64 g(2020);
  for (int trial = 0; trial < 10; ++trial) {
    const Eigen::Index out = std::uniform_int_distribution<int>(1, 9)(g), in = std::uniform_int_distribution<int>(1, 11)(g);
    const Eigen::Index r = trial < 2 ? 1 : std::uniform_int_distribution<int>(1, 4)(g);
    MatD W = dwt::random<MatD>(out, in, 10 + trial);
    MatD B = dwt::random<MatD>(out, r, 20 + trial), A = dwt::random<MatD>(r, in, 30 + trial);
    if (trial == 3) A.row(0) *= 1e-6;  // below the clamp
    const Eigen::VectorXd lam = Eigen::VectorXd::Constant(1, 0.5 + trial);
    const Eigen::VectorXd w = dw::delora_weight_norms(W);
    CHECK(dwt::rel_err(MatD(w.transpose()), MatD(W.colwise().norm())) < 1e-14);
    const MatD dW = delora_ref(B, A, lam[0], w);
    INFO("trial " << trial << " out " << out << " in " << in << " r " << r);
    auto u = dw::delora(B, A, lam, w);
    CHECK(u.parameter_count() == r * (out + in) + 1);
    dwt::check_update_ops(u, dW, 40 + trial, {0, 1, 6});
    // ‖ΔW‖ ≤ λ·max(w) (DeLoRA's boundary; each normalised rank-one term has norm ≤ λ/r·max w).
    CHECK(dW.norm() <= lam[0] * w.maxCoeff() * (1 + 1e-12));
    dwt::check_update_over_weight(u, W, dW, 60 + trial, {.tokens = {0, 1, 6}, .unmerge_tol = 1e-13});
  }
  const dwt::MatF Bf = dwt::random<dwt::MatF>(6, 3, 91), Af = dwt::random<dwt::MatF>(3, 10, 92), Xf = dwt::random<dwt::MatF>(5, 10, 93);
  const Eigen::VectorXf lf = Eigen::VectorXf::Constant(1, 2.5f), wf = dwt::random<dwt::MatF>(10, 1, 94).col(0).cwiseAbs();
  const MatD ref = Xf.cast<double>() * delora_ref(Bf.cast<double>(), Af.cast<double>(), 2.5, wf.cast<double>()).transpose();
  CHECK(dwt::rel_err(dw::apply(dw::delora(Bf, Af, lf, wf), Xf).cast<double>(), ref) < 1e-5);
}

TEST_CASE("DeLoRA: errors") {
  const MatD B = dwt::random<MatD>(4, 2, 1), A = dwt::random<MatD>(2, 5, 2);
  const Eigen::VectorXd l1 = Eigen::VectorXd::Ones(1), l2 = Eigen::VectorXd::Ones(2), w5 = Eigen::VectorXd::Ones(5),
                        w4 = Eigen::VectorXd::Ones(4);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::delora(B, MatD(dwt::random<MatD>(3, 5, 3)), l1, w5); },
                                          {"B [4, 2]", "A [3, 5]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::delora(B, A, l2, w5); }, {"λ", "2 entries"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::delora(B, A, l1, w4); }, {"delora_w_norm", "4 entries"});
}

TEST_CASE("DeLoRA: no apply, merge or norm allocates out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, r = 8, T = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3), B = dwt::random<Mat>(out, r, 4),
            A = dwt::random<Mat>(r, in, 5);
  const Eigen::VectorXf l = Eigen::VectorXf::Ones(1), w = dw::delora_weight_norms(W).cast<float>();
  Mat Y(T, out), O(T, in);
  auto u = dw::delora(B, A, l, w);
  CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
}
