// SPDX-License-Identifier: MIT
// BOFT and AdaLoRA (issue 16) against dense references in double built here from PEFT's
// definitions (dense permutation matrices, dense block-diagonal rotations, dense B·diag(E)·A;
// never from deltaw's own materialize): apply, apply_transposed, materialize, merge / unmerge
// round trip, frobenius_norm, in a lazy sum; odd shapes, several butterfly factors, empty
// token batches; the errors; the largest allocation of apply / merge below one in × in matrix.
#include <cmath>
#include <numeric>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

/// PEFT's block_butterfly_perm(n, b, r, nbf) transcribed: the index list.
std::vector<Eigen::Index> butterfly_perm_ref(Eigen::Index n, Eigen::Index b, Eigen::Index r, Eigen::Index nbf) {
  std::vector<Eigen::Index> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  if (nbf == 0) return idx;
  const Eigen::Index block = n / b, step = block / r;
  std::vector<Eigen::Index> seq;
  for (Eigen::Index p = 0; p < step; p += 2) seq.push_back(p);
  for (Eigen::Index p = 1; p < step; p += 2) seq.push_back(p);
  std::vector<Eigen::Index> sorted(static_cast<std::size_t>(block));
  for (std::size_t i = 0; i < seq.size(); ++i)
    for (Eigen::Index t = 0; t < r; ++t) sorted[i * std::size_t(r) + std::size_t(t)] = seq[i] * r + t;
  std::vector<Eigen::Index> out = idx;
  for (Eigen::Index c = 0; c < n; c += block)
    for (Eigen::Index j = 0; j < block; ++j) out[std::size_t(c + j)] = idx[std::size_t(c + sorted[std::size_t(j)])];
  return out;
}
/// perm2mat: P[i, idx[i]] = 1.
MatD perm_matrix(const std::vector<Eigen::Index>& idx) {
  MatD P = MatD::Zero(Eigen::Index(idx.size()), Eigen::Index(idx.size()));
  for (std::size_t i = 0; i < idx.size(); ++i) P(Eigen::Index(i), idx[i]) = 1;
  return P;
}
/// The dense R [in, in] of PEFT's get_delta_weight: Cayley of the skew part of each block,
/// R = M_{m−1}⋯M_0 with M_i = P_i·blockdiag_i·P_iᵀ. Rp: [m·nb·b, b].
MatD boft_rotation_ref(const MatD& Rp, Eigen::Index in) {
  const Eigen::Index b = Rp.cols(), nb = in / b, m = Rp.rows() / in;
  MatD R = MatD::Identity(in, in);
  for (Eigen::Index i = 0; i < m; ++i) {
    MatD BD = MatD::Zero(in, in);
    for (Eigen::Index k = 0; k < nb; ++k) {
      const MatD Pk = Rp.block((i * nb + k) * b, 0, b, b);
      const MatD S = 0.5 * (Pk - Pk.transpose());
      const MatD I = MatD::Identity(b, b);
      BD.block(k * b, k * b, b, b) = (I - S) * (I + S).inverse();
    }
    const MatD P = perm_matrix(butterfly_perm_ref(in, nb >> i, b / 2, m - 1));
    R = (P * BD * P.transpose()) * R;
  }
  return R;
}

template <class U>
void boft_check_against_dense(const U& u, const MatD& dW, std::uint64_t seed, const char* what) {
  INFO(what);
  dwt::check_update_ops(u, dW, seed);
}

}  // namespace

TEST_CASE("BOFT: butterfly permutations as PEFT builds them") {
  // m = 1 (and factor 0 of any m with b even): the identity.
  CHECK(dw::detail::boft_permutation(12, 3, 4, 1, 0).empty());
  CHECK(dw::detail::boft_permutation(16, 8, 2, 3, 0).empty());
  for (Eigen::Index m : {2, 3}) {
    const Eigen::Index b = 2, nb = 8, in = 16;
    for (Eigen::Index i = 1; i < m; ++i) {
      const auto p = dw::detail::boft_permutation(in, nb, b, m, i);
      const auto ref = butterfly_perm_ref(in, nb >> i, b / 2, m - 1);
      REQUIRE(p.size() == ref.size());
      for (std::size_t j = 0; j < p.size(); ++j) CHECK(p[j] == ref[j]);
    }
  }
  // in = 16, nb = 4, b = 4, factor 1: groups of 8 columns, sub-blocks of 2 (0 2 1 3 order).
  const auto p = dw::detail::boft_permutation(16, 4, 4, 2, 1);
  const std::vector<Eigen::Index> want = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};
  REQUIRE(p.size() == want.size());
  for (std::size_t j = 0; j < p.size(); ++j) CHECK(p[j] == want[j]);
}

TEST_CASE("BOFT: W' = diag(s)·W·Rᵀ with m butterfly factors, every operation against dense") {
  struct Case {
    Eigen::Index out, b, nb, m;
  };
  const Case cases[] = {{5, 3, 4, 1}, {7, 4, 2, 2}, {3, 2, 8, 3}, {6, 2, 4, 2}, {4, 4, 4, 3},
                        {2, 1, 5, 1}, {9, 6, 2, 2}, {1, 2, 8, 4}, {3, 5, 1, 1}};
  int trial = 0;
  for (const auto& c : cases) {
    ++trial;
    INFO("case " << trial);
    const auto in = c.b * c.nb;
    MatD W = dwt::random<MatD>(c.out, in, 300 + trial);
    const MatD Rp = 0.5 * dwt::random<MatD>(c.m * c.nb * c.b, c.b, 310 + trial);
    const Eigen::VectorXd s = Eigen::VectorXd::Ones(c.out) + 0.3 * dwt::random<MatD>(c.out, 1, 320 + trial).col(0);
    const MatD R = boft_rotation_ref(Rp, in);
    CHECK((R * R.transpose() - MatD::Identity(in, in)).norm() < 1e-12);
    const MatD Wp = s.asDiagonal() * W * R.transpose();
    const MatD dW = Wp - W;
    {
      auto u = dw::boft(W, Rp, s);
      CHECK(u.block() == c.b);
      CHECK(u.blocks() == c.nb);
      CHECK(u.factors() == c.m);
      boft_check_against_dense(u, dW, 330 + trial, "boft");
      const MatD X = dwt::random<MatD>(5, in, 340 + trial), G = dwt::random<MatD>(5, c.out, 350 + trial);
      CHECK(dwt::rel_err(dw::apply(dw::view(W) + u, X), X * Wp.transpose()) < 1e-12);
      // PEFT's forward: (x @ R) through the layer, then the output scale.
      const MatD peft = ((X * R) * W.transpose()) * s.asDiagonal();
      CHECK(dwt::rel_err(dw::apply(dw::view(W) + u, X), peft) < 1e-12);
      CHECK(dwt::rel_err(dw::apply_transposed(dw::view(W) + u, G), G * Wp) < 1e-12);
    }
    const MatD W0 = W;
    auto u = dw::boft(W, Rp, s);
    dw::merge(W, u);
    CHECK(dwt::rel_err(W, Wp) < 1e-12);
    dw::unmerge(W, u);
    CHECK(dwt::rel_err(W, W0) < 1e-12);
    dw::merge_checked(W, u);
    CHECK(dwt::rel_err(W, Wp) < 1e-12);
  }
}

TEST_CASE("BOFT: float round trip and the Cayley–Neumann option") {
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(6, 16, 1);
  const Mat Rp = 0.2f * dwt::random<Mat>(2 * 16, 2, 2);
  const Eigen::VectorXf s = Eigen::VectorXf::Constant(6, 1.25f);
  const Mat W0 = W;
  auto u = dw::boft(W, Rp, s);
  dw::merge(W, u);
  dw::unmerge(W, u);
  CHECK(dwt::rel_err(MatD(W.cast<double>()), MatD(W0.cast<double>())) < 1e-6);
  // Neumann: R_k = I + 2S + 2S² + 2S³ + S⁴ for 5 terms (oft_options), not orthogonal.
  const MatD Wd = dwt::random<MatD>(3, 4, 3);
  const MatD Pd = 0.3 * dwt::random<MatD>(4, 4, 4);
  const Eigen::VectorXd one = Eigen::VectorXd::Ones(3);
  const MatD S = 0.5 * (Pd - Pd.transpose());
  const MatD I = MatD::Identity(4, 4);
  const MatD Rn = I + 2 * S + 2 * S * S + 2 * S * S * S + S * S * S * S;
  auto n = dw::boft(Wd, Pd, one, dw::oft_options{true, 5});
  CHECK(dwt::rel_err(dw::materialize(n), MatD(Wd * Rn.transpose() - Wd)) < 1e-12);
}

TEST_CASE("BOFT: errors") {
  const MatD W = dwt::random<MatD>(3, 8, 1);
  const Eigen::VectorXd s = Eigen::VectorXd::Ones(3);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::boft(W, dwt::random<MatD>(9, 3, 2), s); }, {"divide"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::boft(W, dwt::random<MatD>(12, 4, 2), s); }, {"[m·nb·b, b]"});
  const Eigen::VectorXd s2 = Eigen::VectorXd::Ones(2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::boft(W, dwt::random<MatD>(8, 4, 2), s2); }, {"boft_s"});
  // m = 3 with nb = 2: nb is not a multiple of 2^(m − 1).
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::boft(W, dwt::random<MatD>(24, 4, 2), s); }, {"2^(m − 1)"});
  MatD Wm = W;
  Eigen::VectorXd z = s;
  z[1] = 0;
  auto u = dw::boft(Wm, dwt::random<MatD>(8, 4, 3), z);
  dw::merge(Wm, u);
  dwt::check_throws_with<dw::argument_error>([&] { dw::unmerge(Wm, u); }, {"s[1] = 0"});
}

TEST_CASE("AdaLoRA: ΔW = s·B·diag(E)·A, every operation against dense") {
  std::mt19937_64 g(17);
  for (int trial = 0; trial < 8; ++trial) {
    const auto out = std::uniform_int_distribution<int>(1, 9)(g), in = std::uniform_int_distribution<int>(1, 11)(g),
               r = std::uniform_int_distribution<int>(0, 5)(g);
    INFO("out " << out << " in " << in << " r " << r);
    const MatD B = dwt::random<MatD>(out, r, 400 + trial), A = dwt::random<MatD>(r, in, 410 + trial);
    Eigen::VectorXd E = dwt::random<MatD>(r, 1, 420 + trial).col(0);
    if (r > 1) E[1] = 0;  // a pruned triplet
    const double alpha = 3 + trial, ranknum = r + 2;
    auto u = dw::adalora(B, E, A, dw::alpha(alpha), Eigen::Index(ranknum));
    const double s = alpha / (ranknum + 1e-5);
    CHECK(u.scale() == doctest::Approx(s).epsilon(1e-15));
    const MatD dW = s * B * E.asDiagonal() * A;
    boft_check_against_dense(u, dW, 430 + trial, "adalora");
    MatD W = dwt::random<MatD>(out, in, 440 + trial);
    const MatD W0 = W;
    dw::merge(W, u);
    CHECK(dwt::rel_err(W, MatD(W0 + dW)) < 1e-12);
    dw::unmerge(W, u);
    CHECK(dwt::rel_err(W, W0) < 1e-13);
    CHECK(u.parameter_count() == r * (out + in + 1));
  }
  // α = 0: PEFT's scaling falls back to r.
  const MatD B = dwt::random<MatD>(3, 2, 1), A = dwt::random<MatD>(2, 4, 2);
  const Eigen::VectorXd E = Eigen::VectorXd::Ones(2);
  CHECK(dw::adalora(B, E, A, dw::alpha(0), 4).scale() == doctest::Approx(2 / (4 + 1e-5)));
  const Eigen::VectorXd E3 = Eigen::VectorXd::Ones(3);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::adalora(B, E3, A); }, {"share r"});
}

TEST_CASE("BOFT, AdaLoRA: no apply, merge or norm allocates in × in or out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, T = 64, b = 8, m = 3, r = 8;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);  // < in × in
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3);
  Mat Y(T, out), O(T, in);
  const Mat Rp = 0.1f * dwt::random<Mat>(m * in, b, 4);
  const Eigen::VectorXf s = Eigen::VectorXf::Constant(out, 1.1f);
  auto bo = dw::boft(W, Rp, s);
  const Mat B = dwt::random<Mat>(out, r, 5), A = dwt::random<Mat>(r, in, 6);
  const Eigen::VectorXf E = Eigen::VectorXf::Constant(r, 0.5f);
  auto ad = dw::adalora(B, E, A, dw::alpha(8), r);
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
  all(bo, "boft");
  all(ad, "adalora");
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(bo); }) >= dense_bytes);
}
