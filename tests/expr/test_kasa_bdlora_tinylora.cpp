// SPDX-License-Identifier: MIT
// KaSA, BD-LoRA and TinyLoRA (issue 16) against dense references in double built here from
// PEFT's definitions: KaSA's s·B·diag(ΔΣ)·A and its base-weight truncation (checked against a
// Jacobi SVD, an algorithm independent of the one deltaw uses); BD-LoRA's block-diagonal
// factors assembled with zeros (A side, B side, both, one block); TinyLoRA's core Σ vᵢPᵢ.
// Every operation of check_update_ops / check_update_over_weight (apply, apply_transposed,
// materialize, norm, merge / unmerge / merge_checked), float, the errors; the largest
// allocation of apply / merge below one out × in.
#include <deltaw/deltaw.hpp>
#include <deltaw/init/kasa.hpp>

#include <Eigen/SVD>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

/// The dense block-diagonal matrix [p, q] of a factor stored [p, q/nb] (PEFT's BlockDiagonalLinear).
MatD block_diagonal(const MatD& M, Eigen::Index nb) {
  const Eigen::Index pb = M.rows() / nb, qb = M.cols();
  MatD F = MatD::Zero(M.rows(), qb * nb);
  for (Eigen::Index i = 0; i < nb; ++i) F.block(i * pb, i * qb, pb, qb) = M.middleRows(i * pb, pb);
  return F;
}
}  // namespace

TEST_CASE("KaSA: ΔW = s·B·diag(ΔΣ)·A, every operation against dense") {
  std::mt19937_64 g(2412);
  for (int trial = 0; trial < 8; ++trial) {
    const Eigen::Index out = trial == 7 ? 300 : std::uniform_int_distribution<int>(2, 9)(g);
    const Eigen::Index in = std::uniform_int_distribution<int>(2, 11)(g), r = trial < 2 ? 1 : std::uniform_int_distribution<int>(1, 4)(g);
    MatD W = dwt::random<MatD>(out, in, 10 + trial);
    const MatD B = dwt::random<MatD>(out, r, 20 + trial), A = dwt::random<MatD>(r, in, 30 + trial);
    const Eigen::VectorXd d = dwt::random<MatD>(r, 1, 40 + trial).col(0);
    const double alpha = 3.0 + trial;
    const bool rs = trial % 2 == 1;
    const double s = rs ? alpha / std::sqrt(double(r)) : alpha / double(r);
    const MatD dW = s * B * d.asDiagonal() * A;
    INFO("trial " << trial << " out " << out << " in " << in << " r " << r);
    auto u = dw::kasa(B, d, A, dw::alpha(alpha), rs);
    CHECK(u.rank() == r);
    CHECK(u.scale() == doctest::Approx(s).epsilon(1e-15));
    dwt::check_update_ops(u, dW, 50 + trial);
    dwt::check_update_over_weight(u, W, dW, 60 + trial);
  }
  dwt::check_throws_with<dw::shape_error>(
      [] { (void)dw::kasa(MatD(MatD::Ones(3, 2)), Eigen::VectorXd(Eigen::VectorXd::Ones(3)), MatD(MatD::Ones(2, 4))); },
      {"deltaw::adalora", "E [3]"});
}

TEST_CASE("KaSA: the base-weight truncation drops the r smallest singular directions") {
  for (auto [out, in, r] : {std::tuple{7, 5, 2}, {5, 9, 1}, {12, 12, 11}, {300, 17, 4}}) {
    CAPTURE(out);
    CAPTURE(in);
    CAPTURE(r);
    MatD W = dwt::random<MatD>(out, in, 100 + out);
    const Eigen::JacobiSVD<Eigen::MatrixXd> svd(W, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Eigen::Index k = std::min(out, in);
    const Eigen::MatrixXd kept = svd.matrixU().leftCols(k - r) * svd.singularValues().head(k - r).asDiagonal() *
                                 svd.matrixV().leftCols(k - r).transpose();
    const MatD W0 = W;
    const auto dropped = dw::kasa_truncate_base_dense(W, r);
    CHECK(dwt::rel_err(W, MatD(kept)) < 1e-11);
    CHECK((dropped.S - svd.singularValues().tail(r)).norm() < 1e-11 * svd.singularValues()(0));
    const MatD back = W + dropped.U * dropped.S.asDiagonal() * dropped.V.transpose();
    CHECK(dwt::rel_err(back, W0) < 1e-12);
    // float weight: the same truncation, rounded once.
    dwt::MatF Wf = W0.cast<float>();
    dw::kasa_truncate_base_dense(Wf, r);
    CHECK(dwt::rel_err(Wf.cast<double>(), MatD(kept)) < 1e-5);
  }
  MatD W = dwt::random<MatD>(4, 6, 1);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::kasa_truncate_base_dense(W, 4); },
                                         {"kasa_truncate_base_dense", "[1, 3]", "[4, 6]", "r = 4"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::kasa_truncate_base_dense(W, 0); }, {"r = 0"});
}

TEST_CASE("BD-LoRA: block-diagonal A or B (or both), every operation against dense") {
  std::mt19937_64 g(2511);
  struct shape { Eigen::Index out, in, r, na, nb; };
  // One-block cases are plain LoRA; 300 rows cross merge panels and cut a block of B.
  const std::vector<shape> shapes{{21, 15, 6, 3, 1}, {9, 21, 6, 1, 3}, {6, 9, 6, 3, 1}, {8, 12, 4, 2, 2},
                                  {5, 7, 3, 1, 1},  {300, 10, 4, 2, 1}, {300, 10, 6, 1, 3}, {7, 14, 7, 7, 1},
                                  {3, 3, 3, 3, 3}};
  int trial = 0;
  for (const auto& sh : shapes) {
    ++trial;
    INFO("out " << sh.out << " in " << sh.in << " r " << sh.r << " nA " << sh.na << " nB " << sh.nb);
    MatD W = dwt::random<MatD>(sh.out, sh.in, 200 + trial);
    const MatD B = dwt::random<MatD>(sh.out, sh.r / sh.nb, 210 + trial), A = dwt::random<MatD>(sh.r, sh.in / sh.na, 220 + trial);
    const double s = 0.5 + trial;
    const MatD dW = s * block_diagonal(B, sh.nb) * block_diagonal(A, sh.na);
    const auto u = dw::detail::make_bd_lora(B, sh.nb, A, sh.na, s);
    CHECK(u.rows() == sh.out);
    CHECK(u.cols() == sh.in);
    CHECK(u.parameter_count() == B.size() + A.size());
    dwt::check_update_ops(u, dW, 230 + trial, {0, 1, 5});
    dwt::check_update_over_weight(u, W, dW, 240 + trial);
  }
  // PEFT's factories: one side block-diagonal, scale α/r or α/√r.
  const MatD B = dwt::random<MatD>(9, 2, 1), A = dwt::random<MatD>(6, 21, 2);
  const auto ub = dw::bd_lora(B, A, dw::bd_side::B, 3, dw::alpha(5));
  CHECK(ub.b_blocks() == 3);
  CHECK(ub.a_blocks() == 1);
  CHECK(ub.scale() == doctest::Approx(5.0 / 6));
  CHECK(dwt::rel_err(dw::materialize(ub), MatD(5.0 / 6 * block_diagonal(B, 3) * A)) < 1e-13);
  const MatD A2 = dwt::random<MatD>(6, 5, 3), B2 = dwt::random<MatD>(21, 6, 4);
  const auto ua = dw::bd_lora(B2, A2, dw::bd_side::A, 3, dw::alpha(5), true);
  CHECK(ua.cols() == 15);
  CHECK(dwt::rel_err(dw::materialize(ua), MatD(5.0 / std::sqrt(6.0) * B2 * block_diagonal(A2, 3))) < 1e-13);
  // float
  const dwt::MatF Bf = B.cast<float>(), Af = A.cast<float>(), Xf = dwt::random<dwt::MatF>(4, 21, 5);
  CHECK(dwt::rel_err(dw::apply(dw::bd_lora(Bf, Af, dw::bd_side::B, 3, dw::scale(0.7)), Xf).cast<double>(),
                     MatD(Xf.cast<double>() * (0.7 * block_diagonal(B, 3) * A).transpose())) < 1e-5);
}

TEST_CASE("BD-LoRA: errors") {
  const MatD B = MatD::Ones(9, 2), A = MatD::Ones(6, 21);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::bd_lora(B, A, dw::bd_side::B, 2); },
                                          {"deltaw::bd_lora", "B [9, 2] with 2 block(s)", "A [6, 21]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::bd_lora(MatD(MatD::Ones(9, 6)), A, dw::bd_side::A, 4); },
                                          {"divisible", "A [6, 21] with 4 block(s)"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::bd_lora(MatD(MatD::Ones(9, 5)), A, dw::bd_side::A, 3); },
                                          {"share r"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::bd_lora(B, A, dw::bd_side::B, 0); }, {"at least 1"});
}

TEST_CASE("TinyLoRA: ΔW = s·B·(Σ vᵢPᵢ)·A, every operation against dense") {
  std::mt19937_64 g(2602);
  for (int trial = 0; trial < 8; ++trial) {
    const Eigen::Index out = trial == 7 ? 300 : std::uniform_int_distribution<int>(1, 9)(g);
    const Eigen::Index in = std::uniform_int_distribution<int>(1, 11)(g), r = trial < 2 ? 1 : std::uniform_int_distribution<int>(1, 3)(g);
    const Eigen::Index nu = std::uniform_int_distribution<int>(1, 6)(g);
    MatD W = dwt::random<MatD>(out, in, 300 + trial);
    const MatD B = dwt::random<MatD>(out, r, 310 + trial), A = dwt::random<MatD>(r, in, 320 + trial);
    const MatD P = dwt::random<MatD>(nu, r * r, 330 + trial);
    const Eigen::VectorXd v = dwt::random<MatD>(nu, 1, 340 + trial).col(0);
    MatD R = MatD::Zero(r, r);
    for (Eigen::Index i = 0; i < nu; ++i)
      for (Eigen::Index j = 0; j < r; ++j)
        for (Eigen::Index k = 0; k < r; ++k) R(j, k) += v(i) * P(i, j * r + k);
    const double s = trial == 3 ? 1.7 : 1.0;
    const MatD dW = s * B * R * A;
    INFO("trial " << trial << " out " << out << " in " << in << " r " << r << " u " << nu);
    auto u = dw::tinylora(B, v, P, A, dw::scale(s));
    CHECK(u.vector_size() == nu);
    CHECK(u.parameter_count() == nu);
    dwt::check_update_ops(u, dW, 350 + trial);
    dwt::check_update_over_weight(u, W, dW, 360 + trial);
  }
  dwt::check_throws_with<dw::shape_error>(
      [] {
        (void)dw::tinylora(MatD(MatD::Ones(3, 2)), Eigen::VectorXd(Eigen::VectorXd::Ones(5)), MatD(MatD::Ones(5, 3)),
                           MatD(MatD::Ones(2, 4)));
      },
      {"deltaw::tinylora", "P [5, 3]", "v [5]", "B [3, 2]"});
}

TEST_CASE("KaSA, BD-LoRA, TinyLoRA: no apply, merge or norm allocates out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, r = 8;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat B = dwt::random<Mat>(out, r, 2), A = dwt::random<Mat>(r, in, 3);
  const Mat Bb = dwt::random<Mat>(out, r / 4, 4), Ab = dwt::random<Mat>(r, in / 4, 5);
  const Mat P = dwt::random<Mat>(13, r * r, 6);
  const Eigen::VectorXf d = Eigen::VectorXf::Ones(r), v = Eigen::VectorXf::Ones(13);
  auto run = [&](const auto& u) {
    for (Eigen::Index T : {Eigen::Index(1), Eigen::Index(64)}) {
      const Mat X = dwt::random<Mat>(T, in, 7), G = dwt::random<Mat>(T, out, 8);
      Mat Y(T, out), O(T, in);
      CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
      CHECK(dwt::largest_allocation([&] { dw::apply(u, X, Y); }) < dense_bytes);
      CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
    }
    CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
  };
  run(dw::kasa(B, d, A, dw::alpha(16)));
  run(dw::bd_lora(Bb, A, dw::bd_side::B, 4, dw::alpha(16)));
  run(dw::bd_lora(B, Ab, dw::bd_side::A, 4, dw::alpha(16)));
  run(dw::tinylora(B, v, P, A));
}
