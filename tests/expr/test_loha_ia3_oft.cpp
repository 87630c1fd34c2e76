// SPDX-License-Identifier: MIT
// LoHa, IA³ and OFT (issue 16) against dense references in double built here from the
// definitions (never from deltaw's own materialize): apply, apply_transposed, materialize,
// merge / unmerge round trip, merge_checked, frobenius_norm, in a lazy sum with LoRA, odd
// shapes, rank 1, empty token batches, bf16 weights; the errors; the largest allocation of
// apply / merge below one out × in (or in × in) matrix.
#include <cmath>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;
using dwt::MatF;

/// Skew matrix of row q of Q (strict upper triangle, row-major).
MatD skew_ref(const MatD& Q, Eigen::Index q, Eigen::Index b) {
  MatD S = MatD::Zero(b, b);
  Eigen::Index k = 0;
  for (Eigen::Index i = 0; i < b; ++i)
    for (Eigen::Index j = i + 1; j < b; ++j, ++k) {
      S(i, j) = Q(q, k);
      S(j, i) = -Q(q, k);
    }
  return S;
}
/// PEFT's _cayley_batch, transcribed loop for loop.
MatD rotation_ref(const MatD& S, bool neumann, int terms) {
  const auto b = S.rows();
  const MatD I = MatD::Identity(b, b);
  if (!neumann) return (I - S) * (I + S).inverse();
  MatD R = I;
  if (terms > 1) {
    R += 2 * S;
    if (terms > 2) {
      MatD Q2 = S * S;
      R += 2 * Q2;
      MatD P = Q2;
      for (int t = 3; t < terms - 1; ++t) {
        P = P * S;
        R += 2 * P;
      }
      P = P * S;
      R += P;
    }
  }
  return R;
}
/// The dense block-diagonal R [in, in] (test-only).
MatD block_rotation_ref(const MatD& Q, Eigen::Index in, bool neumann, int terms) {
  const Eigen::Index n = Q.cols();
  Eigen::Index b = 1;
  while (b * (b - 1) / 2 < n) ++b;
  MatD R = MatD::Zero(in, in);
  for (Eigen::Index k = 0; k < in / b; ++k)
    R.block(k * b, k * b, b, b) = rotation_ref(skew_ref(Q, Q.rows() == 1 ? 0 : k, b), neumann, terms);
  return R;
}

/// The checks every type gets, against the dense ΔW in double.
template <class U>
void check_against_dense(const U& u, const MatD& dW, std::uint64_t seed, const char* what) {
  INFO(what);
  dwt::check_update_ops(u, dW, seed);
}

}  // namespace

TEST_CASE("LoHa: ΔW = s·(B1·A1) ⊙ (B2·A2) through Khatri–Rao factors, every operation against dense") {
  std::mt19937_64 g(16);
  for (int trial = 0; trial < 10; ++trial) {
    const auto out = std::uniform_int_distribution<int>(1, 9)(g), in = std::uniform_int_distribution<int>(1, 11)(g);
    const auto r1 = trial < 3 ? 1 : std::uniform_int_distribution<int>(1, 4)(g);
    const auto r2 = trial < 5 ? r1 : std::uniform_int_distribution<int>(1, 4)(g);
    const MatD B1 = dwt::random<MatD>(out, r1, 10 + trial), A1 = dwt::random<MatD>(r1, in, 20 + trial);
    const MatD B2 = dwt::random<MatD>(out, r2, 30 + trial), A2 = dwt::random<MatD>(r2, in, 40 + trial);
    const double alpha = 1.5 + trial;
    auto u = dw::loha(B1, A1, B2, A2, dw::alpha(alpha));
    const MatD dW = (alpha / double(r1)) * (B1 * A1).cwiseProduct(B2 * A2);
    MatD W = dwt::random<MatD>(out, in, 50 + trial);
    check_against_dense(u, dW, 60 + trial, "loha");
    CHECK(u.parameter_count() == (r1 + r2) * (out + in));
    // In a lazy sum with a LoRA, and merge / unmerge.
    const MatD Bl = dwt::random<MatD>(out, 2, 70 + trial), Al = dwt::random<MatD>(2, in, 80 + trial);
    const MatD X = dwt::random<MatD>(4, in, 90 + trial);
    const MatD ref = X * (W + dW + 0.5 * Bl * Al).transpose();
    CHECK(dwt::rel_err(dw::apply(dw::view(W) + u + dw::lora(Bl, Al, dw::scale(0.5)), X), ref) < 1e-12);
    const MatD W0 = W;
    dw::merge(W, u);
    CHECK(dwt::rel_err(W, W0 + dW) < 1e-12);
    dw::unmerge(W, u);
    CHECK(dwt::rel_err(W, W0) < 1e-12);
    dw::merge_checked(W, u);
    CHECK(dwt::rel_err(W, W0 + dW) < 1e-12);
  }
  // Float factors, bf16 weight in the sum.
  const MatF B1 = dwt::random<MatF>(7, 3, 1), A1 = dwt::random<MatF>(3, 13, 2), B2 = dwt::random<MatF>(7, 3, 3),
             A2 = dwt::random<MatF>(3, 13, 4);
  const dwt::RowMat<Eigen::bfloat16> Wb = dwt::random<MatF>(7, 13, 5).cast<Eigen::bfloat16>();
  const MatF X = dwt::random<MatF>(3, 13, 6);
  const MatD dW = (2.0 / 3.0) * (B1.cast<double>() * A1.cast<double>()).cwiseProduct(B2.cast<double>() * A2.cast<double>());
  const auto Y = dw::apply(dw::view(Wb) + dw::loha(B1, A1, B2, A2, dw::alpha(2)), X);
  CHECK(dwt::rel_err(Y, X.cast<double>() * (Wb.cast<double>() + dW).transpose()) < 1e-5);
}

TEST_CASE("LoHa: shape and rank errors name the factors") {
  const MatD B = dwt::random<MatD>(4, 2, 1), A = dwt::random<MatD>(2, 5, 2), A3 = dwt::random<MatD>(3, 5, 3),
             B6 = dwt::random<MatD>(6, 2, 4);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::loha(B, A3, B, A); }, {"deltaw::loha", "B1 [4, 2]", "A1 [3, 5]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::loha(B, A, B6, A); }, {"same shape", "B2 [6, 2]"});
  const MatD B0(4, 0), A0(0, 5);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::loha(B0, A0, B, A); }, {"at least 1"});
}

TEST_CASE("IA³: output and input scaling as updates over their own W") {
  std::mt19937_64 g(3);
  for (int trial = 0; trial < 8; ++trial) {
    const auto out = std::uniform_int_distribution<int>(1, 9)(g), in = std::uniform_int_distribution<int>(1, 11)(g);
    const auto side = trial % 2 ? dw::ia3_side::input : dw::ia3_side::output;
    const bool input = side == dw::ia3_side::input;
    MatD W = dwt::random<MatD>(out, in, 100 + trial);
    const Eigen::VectorXd l = Eigen::VectorXd::Ones(input ? in : out) + 0.5 * dwt::random<MatD>(input ? in : out, 1, 110 + trial);
    const MatD Wp = input ? MatD(W * l.asDiagonal()) : MatD(l.asDiagonal() * W);
    const MatD dW = Wp - W;
    {
      auto u = dw::ia3(W, l, side);
      check_against_dense(u, dW, 120 + trial, input ? "ia3 input" : "ia3 output");
      const MatD X = dwt::random<MatD>(5, in, 130 + trial), G = dwt::random<MatD>(5, out, 140 + trial);
      // Over its own W the sum replaces the base product; with a LoRA added.
      const MatD Bl = dwt::random<MatD>(out, 2, 150 + trial), Al = dwt::random<MatD>(2, in, 160 + trial);
      CHECK(dwt::rel_err(dw::apply(dw::view(W) + u, X), X * Wp.transpose()) < 1e-12);
      CHECK(dwt::rel_err(dw::apply_transposed(dw::view(W) + u, G), G * Wp) < 1e-12);
      CHECK(dwt::rel_err(dw::apply(dw::view(W) + u + dw::lora(Bl, Al), X), X * (Wp + Bl * Al).transpose()) < 1e-12);
      CHECK(u.parameter_count() == l.size());
    }
    const MatD W0 = W;
    auto u = dw::ia3(W, l, side);
    dw::merge(W, u);
    CHECK(dwt::rel_err(W, Wp) < 1e-14);
    dw::unmerge(W, u);
    CHECK(dwt::rel_err(W, W0) < 1e-14);
    dw::merge_checked(W, u);
    CHECK(dwt::rel_err(W, Wp) < 1e-14);
    MatD other = W0;
    dwt::check_throws_with<dw::argument_error>([&] { dw::merge(other, u); }, {"IA³", "merges only into the weight"});
  }
  MatD W = dwt::random<MatD>(3, 4, 1);
  const Eigen::VectorXd l3 = Eigen::VectorXd::Ones(3);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::ia3(W, l3, dw::ia3_side::input); }, {"input", "4 entries", "got 3"});
  Eigen::VectorXd lz = Eigen::VectorXd::Ones(3);
  lz(1) = 0;
  auto z = dw::ia3(W, lz, dw::ia3_side::output);
  dw::merge(W, z);
  const MatD Wm = W;
  dwt::check_throws_with<dw::argument_error>([&] { dw::unmerge(W, z); }, {"l[1] = 0"});
  CHECK(W == Wm);
}

TEST_CASE("OFT: blockwise Cayley / Cayley–Neumann rotation of the input, W' = W·Rᵀ") {
  struct Case {
    Eigen::Index out, b, blocks, nq;
    bool neumann;
    int terms;
  };
  const Case cases[] = {{5, 3, 4, 4, true, 5},  {7, 4, 3, 1, true, 5},  {3, 2, 5, 5, false, 5}, {6, 5, 2, 2, false, 5},
                        {4, 3, 3, 3, true, 3},  {4, 3, 3, 3, true, 4},  {4, 4, 2, 2, true, 7},  {3, 3, 2, 1, false, 5},
                        {2, 1, 6, 6, true, 5},  {5, 6, 1, 1, true, 2},  {5, 3, 2, 2, true, 1}};
  int trial = 0;
  for (const auto& c : cases) {
    ++trial;
    const auto in = c.b * c.blocks;
    MatD W = dwt::random<MatD>(c.out, in, 200 + trial);
    const MatD Q = 0.4 * dwt::random<MatD>(c.nq, c.b * (c.b - 1) / 2, 210 + trial);
    const dw::oft_options o{c.neumann, c.terms};
    const MatD R = block_rotation_ref(Q, in, c.neumann, c.terms);
    const MatD Wp = W * R.transpose();
    const MatD dW = Wp - W;
    {
      auto u = dw::oft(W, Q, o);
      CHECK(u.block() == c.b);
      CHECK(u.blocks() == c.blocks);
      CHECK(u.shared() == (c.nq == 1 && c.blocks > 1));
      check_against_dense(u, dW, 220 + trial, "oft");
      const MatD X = dwt::random<MatD>(5, in, 230 + trial), G = dwt::random<MatD>(5, c.out, 240 + trial);
      CHECK(dwt::rel_err(dw::apply(dw::view(W) + u, X), X * Wp.transpose()) < 1e-12);
      CHECK(dwt::rel_err(dw::apply(dw::view(W) + u, X), (X * R) * W.transpose()) < 1e-12);
      CHECK(dwt::rel_err(dw::apply_transposed(dw::view(W) + u, G), G * Wp) < 1e-12);
    }
    const MatD W0 = W;
    auto u = dw::oft(W, Q, o);
    dw::merge(W, u);
    CHECK(dwt::rel_err(W, Wp) < 1e-12);
    dw::unmerge(W, u);
    CHECK(dwt::rel_err(W, W0) < 1e-10);
    dw::merge_checked(W, u);
    CHECK(dwt::rel_err(W, Wp) < 1e-12);
  }
  // Cayley is orthogonal.
  const MatD Q = dwt::random<MatD>(2, 6, 9);
  const MatD R = block_rotation_ref(Q, 8, false, 0);
  CHECK((R * R.transpose() - MatD::Identity(8, 8)).norm() < 1e-12);
  // COFT's projection: rows above eps/√nq are scaled onto that radius, the others kept.
  MatD Qc(2, 3);
  Qc << 1e-4, 0, 0, 3, 4, 0;
  const MatD P = dw::oft_coft_project(Qc, 1e-2);
  CHECK(P.row(0) == Qc.row(0));
  CHECK(std::abs(std::sqrt(2.0) * P.row(1).norm() - 1e-2 / std::sqrt(2.0)) < 1e-15);
}

TEST_CASE("OFT: shape errors") {
  const MatD W = dwt::random<MatD>(3, 8, 1);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::oft(W, dwt::random<MatD>(2, 4, 2)); }, {"b(b − 1)/2"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::oft(W, dwt::random<MatD>(3, 3, 2)); },
                                          {"blocks × b", "block size b = 3"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::oft(W, dwt::random<MatD>(1, 3, 2)); }, {"blocks × b"});
}

TEST_CASE("LoHa, IA³, OFT: no apply, merge or norm allocates out × in or in × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, r = 8, T = 64, b = 32;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);  // < in × in
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3);
  Mat Y(T, out), O(T, in);
  const Mat B1 = dwt::random<Mat>(out, r, 4), A1 = dwt::random<Mat>(r, in, 5), B2 = dwt::random<Mat>(out, r, 6),
            A2 = dwt::random<Mat>(r, in, 7);
  auto h = dw::loha(B1, A1, B2, A2, dw::alpha(8));
  const Eigen::VectorXf lo = Eigen::VectorXf::Constant(out, 1.1f), li = Eigen::VectorXf::Constant(in, 0.9f);
  auto io = dw::ia3(W, lo, dw::ia3_side::output);
  auto ii = dw::ia3(W, li, dw::ia3_side::input);
  const Mat Q = 0.1f * dwt::random<Mat>(in / b, b * (b - 1) / 2, 8);
  auto o = dw::oft(W, Q);
  auto all = [&](const auto& u, const char* what) {
    INFO(what);
    CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply(u, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(dw::view(W) + u, G, O); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  };
  all(h, "loha");
  all(io, "ia3 output");
  all(ii, "ia3 input");
  all(o, "oft");
  // The control: materialize forms ΔW and the counter sees it.
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(o); }) >= dense_bytes);
}
