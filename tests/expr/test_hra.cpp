// SPDX-License-Identifier: MIT
// HRA (issue 16) against dense references in double built here from PEFT's get_delta_weight
// loops (never from deltaw's own materialize): apply, apply_transposed, materialize, merge /
// unmerge round trip, merge_checked, frobenius_norm, in a lazy sum with LoRA, plain and
// Gram–Schmidt, odd shapes, r = 1 and r = in, empty token batches, float; the errors; the
// largest allocation of apply / merge below one out × in (or in × in) matrix.
#include <deltaw/deltaw.hpp>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

/// PEFT's get_delta_weight (HRA), loop for loop: H [in, in]; reverse = the unmerge product.
MatD hra_ref(const MatD& U, bool gs, bool reverse = false) {
  const auto in = U.rows(), r = U.cols();
  const MatD I = MatD::Identity(in, in);
  if (gs) {
    MatD Q(in, r);
    Q.col(0) = U.col(0) / U.col(0).norm();
    for (Eigen::Index i = 1; i < r; ++i) {
      Eigen::VectorXd ui = U.col(i);
      for (Eigen::Index j = 0; j < i; ++j) ui -= Q.col(j).dot(ui) * Q.col(j);
      Q.col(i) = ui / ui.norm();
    }
    return I - 2 * Q * Q.transpose();
  }
  MatD H = I;
  for (Eigen::Index k = 0; k < r; ++k) {
    const Eigen::Index i = reverse ? r - 1 - k : k;
    const Eigen::VectorXd n = U.col(i) / U.col(i).norm();
    H = H - 2 * (H * n) * n.transpose();
  }
  return H;
}

}  // namespace

TEST_CASE("HRA: W' = W·H, H = Π (I − 2·n_i·n_iᵀ) or I − 2·Q·Qᵀ (Gram–Schmidt), every operation against dense") {
  std::mt19937_64 g(1616);
  for (int trial = 0; trial < 12; ++trial) {
    const bool gs = trial % 2 == 1;
    const auto out = std::uniform_int_distribution<int>(1, 9)(g), in = std::uniform_int_distribution<int>(1, 11)(g);
    const auto r = trial < 2 ? 1 : trial < 4 ? in : std::uniform_int_distribution<int>(1, int(in))(g);
    MatD W = dwt::random<MatD>(out, in, 10 + trial);
    const MatD U = dwt::random<MatD>(in, r, 20 + trial);
    const MatD H = hra_ref(U, gs);
    INFO("trial " << trial << (gs ? " gram-schmidt" : " plain") << " out " << out << " in " << in << " r " << r);
    CHECK((H * H.transpose() - MatD::Identity(in, in)).norm() < 1e-12);
    if (!gs) CHECK((hra_ref(U, false, true) * H - MatD::Identity(in, in)).norm() < 1e-12);
    const MatD Wp = W * H, dW = Wp - W;
    auto u = dw::hra(W, U, dw::hra_options{gs});
    CHECK(u.rank() == r);
    CHECK(u.parameter_count() == in * r);
    dwt::check_update_ops(u, dW, 30 + trial);
    // Over W, in a lazy sum with a LoRA, merge / unmerge (unmerge by Hᵀ: PEFT's reverse
    // product), merge_checked; merges only into its own weight.
    dwt::check_update_over_weight(u, W, dW, 50 + trial, {.reads_weight = "HRA"});
  }
  // float U and W: within float rounding of the double reference.
  const dwt::MatF Wf = dwt::random<dwt::MatF>(6, 10, 90), Uf = dwt::random<dwt::MatF>(10, 4, 91);
  const dwt::MatF Xf = dwt::random<dwt::MatF>(3, 10, 92);
  const MatD ref = Xf.cast<double>() * (Wf.cast<double>() * hra_ref(Uf.cast<double>(), false)).transpose();
  CHECK(dwt::rel_err(dw::apply(dw::view(Wf) + dw::hra(Wf, Uf), Xf).cast<double>(), ref) < 1e-5);
}

TEST_CASE("HRA: errors") {
  const MatD W = dwt::random<MatD>(3, 6, 1);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::hra(W, dwt::random<MatD>(5, 2, 2)); }, {"[in, r]", "U [5, 2]"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::hra(W, MatD(6, 0)); }, {"r ≥ 1"});
  MatD U = dwt::random<MatD>(6, 3, 3);
  U.col(1).setZero();
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::hra(W, U); }, {"column 1", "zero"});
  U.col(1) = 2 * U.col(0);  // dependent: fine for the plain product, not for Gram–Schmidt
  (void)dw::hra(W, U);
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::hra(W, U, dw::hra_options{true}); },
                                             {"column 1", "span of the earlier columns"});
  U(0, 2) = std::nan("");
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::hra(W, U); }, {"column 2", "not finite"});
}

TEST_CASE("HRA: no apply, merge or norm allocates out × in or in × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, r = 8, T = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);  // < in × in
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3), U = dwt::random<Mat>(in, r, 4);
  Mat Y(T, out), O(T, in);
  for (bool gs : {false, true}) {
    INFO((gs ? "gram-schmidt" : "plain"));
    auto u = dw::hra(W, U, dw::hra_options{gs});
    CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply(u, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(dw::view(W) + u, G, O); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
    // The control: materialize forms ΔW and the counter sees it.
    CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
  }
}
