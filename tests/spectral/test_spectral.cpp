// Spectrum of a factored update s·B·A without the dense matrix, against the dense SVD of
// the materialised ΔW; effective rank.
#include "linalg/spectrum_util.hpp"

#include <deltaw/spectral/factored_spectrum.hpp>
#include <deltaw/spectral/intruder.hpp>

namespace dw = deltaw;
using dwt::ColD;
using dwt::MatD;

TEST_CASE("factored_svd: equals the dense SVD of the materialised s·B·A") {
  struct shape {
    Eigen::Index m, n, r;
    double s;
  };
  double worst = 0.0;
  for (const shape sh : {shape{70, 50, 6, 2.0}, shape{33, 90, 1, 0.5}, shape{20, 20, 20, 1.0}, shape{12, 40, 16, -1.5},
                         shape{40, 7, 9, 0.25}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    CAPTURE(sh.r);
    const MatD B = dwt::random(sh.m, sh.r, 100 + sh.r), A = dwt::random(sh.r, sh.n, 200 + sh.r);
    const auto lo = dw::lora(B, A, dw::scale(sh.s));
    const MatD D = dw::materialize(lo);
    const Eigen::Index t = std::min({sh.m, sh.n, sh.r});
    const auto ref = dw::truncated_svd(D, t);
    const auto f = dw::factored_svd(lo);
    REQUIRE(f.S.size() == t);
    REQUIRE(f.U.rows() == sh.m);
    REQUIRE(f.U.cols() == t);
    REQUIRE(f.V.rows() == sh.n);
    REQUIRE(f.V.cols() == t);
    const double e = dwt::max_rel_diff(f.S, ref.S, t);
    worst = std::max(worst, e);
    CHECK(e < 1e-10);
    // The factors reproduce ΔW (this checks the vectors and the sign of s), and are orthonormal.
    CHECK(dwt::rel_err(MatD(f.U * f.S.asDiagonal() * f.V.transpose()), D) < 1e-12);
    CHECK((f.U.transpose() * f.U - ColD::Identity(t, t)).cwiseAbs().maxCoeff() < 1e-12);
    CHECK((f.V.transpose() * f.V - ColD::Identity(t, t)).cwiseAbs().maxCoeff() < 1e-12);
    // factored_spectrum on Eigen factors (float factors, double arithmetic).
    const dwt::MatF Bf = B.cast<float>(), Af = A.cast<float>();
    const auto sf = dw::factored_spectrum(Bf, Af, sh.s);
    CHECK(dwt::max_rel_diff(sf, ref.S, t) < 1e-5);
  }
  MESSAGE("factored_svd: max rel error of sigma vs dense BDCSVD = ", worst);
}

TEST_CASE("factored_svd: rank-deficient factors and shape errors") {
  // B has two equal columns: rank r − 1; the last singular value is 0.
  MatD B = dwt::random(30, 5, 1), A = dwt::random(5, 25, 2);
  B.col(4) = B.col(3);
  A.row(4) = A.row(3);
  const auto S = dw::factored_spectrum(B, A, 1.0);
  const auto ref = dw::truncated_svd(MatD(B * A), 5);
  CHECK(dwt::max_rel_diff(S, ref.S, 4) < 1e-10);
  CHECK(S(4) < 1e-12 * S(0));
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::factored_spectrum(B, dwt::random(4, 25, 3), 1.0); },
                                          {"deltaw::factored_svd", "[30, 5]", "[4, 25]"});
}

TEST_CASE("effective_rank (Roy & Vetterli)") {
  Eigen::VectorXd flat = Eigen::VectorXd::Constant(7, 2.5);
  CHECK(dw::effective_rank(flat) == doctest::Approx(7.0).epsilon(1e-12));
  Eigen::VectorXd one = Eigen::VectorXd::Zero(5);
  one(0) = 3.0;
  CHECK(dw::effective_rank(one) == doctest::Approx(1.0).epsilon(1e-12));
  CHECK(dw::effective_rank(Eigen::VectorXd::Zero(4)) == 0.0);
  // Against the definition computed here: p = σ/Σσ, exp(−Σ p log p).
  const Eigen::VectorXd s = dwt::geometric_spectrum(10, 1.0, 0.5);
  double h = 0.0;
  for (Eigen::Index i = 0; i < s.size(); ++i) {
    const double p = s(i) / s.sum();
    h -= p * std::log(p);
  }
  CHECK(dw::effective_rank(s) == doctest::Approx(std::exp(h)).epsilon(1e-12));
  CHECK(dw::effective_rank(s) > 1.0);
  CHECK(dw::effective_rank(s) < 10.0);
  Eigen::VectorXd bad = s;
  bad(2) = -1.0;
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::effective_rank(bad); }, {"deltaw::effective_rank"});
}

TEST_CASE("intruder_dimensions: planted intruders are found, W0's own vectors are not") {
  // W0 = U·diag(σ)·Vᵀ with a large head (20 values) and a tiny tail (40 values). The planted
  // update lives in the tail's left and right subspaces, so W0 + ΔW is block diagonal in
  // (head, tail): its head vectors are exactly W0's, and its two new top vectors are the
  // planted x₁, x₂, spread evenly over 40 of W0's vectors (overlap 1/√40 ≈ 0.158 each).
  const Eigen::Index m = 60, n = 60, head = 20, tail = 40;
  const ColD U = dwt::random_orthonormal(m, m, 1), V = dwt::random_orthonormal(n, n, 2);
  Eigen::VectorXd sigma(m);
  sigma.head(head) = dwt::geometric_spectrum(head, 1.0, 0.85);
  sigma.tail(tail) = dwt::geometric_spectrum(tail, 1e-3, 0.95);
  const MatD W0 = U * sigma.asDiagonal() * V.transpose();
  Eigen::VectorXd c1 = Eigen::VectorXd::Ones(tail), c2(tail);
  for (Eigen::Index i = 0; i < tail; ++i) c2(i) = (i % 2 == 0) ? 1.0 : -1.0;
  c1 /= std::sqrt(double(tail));
  c2 /= std::sqrt(double(tail));
  MatD B(m, 2), A(2, n);
  B.col(0) = U.rightCols(tail) * c1;
  B.col(1) = U.rightCols(tail) * c2;
  A.row(0) = (V.rightCols(tail) * c2).transpose();
  A.row(1) = (V.rightCols(tail) * c1).transpose();
  B.col(0) *= 1.5;
  B.col(1) *= 1.2;
  const auto lo = dw::lora(B, A);
  const auto rep = dw::intruder_dimensions(W0, dw::view(W0) + lo);  // k = 10, ε = 0.5
  REQUIRE(rep.similarity.size() == 10);
  CHECK(rep.count() == 2);
  CHECK(rep.intruders == std::vector<dw::index_t>{0, 1});
  CHECK(rep.singular_values(0) == doctest::Approx(1.5).epsilon(1e-4));
  CHECK(rep.singular_values(1) == doctest::Approx(1.2).epsilon(1e-4));
  for (int j = 0; j < 2; ++j) CHECK(rep.similarity(j) == doctest::Approx(1.0 / std::sqrt(double(tail))).epsilon(1e-2));
  for (int j = 2; j < 10; ++j) CHECK(rep.similarity(j) == doctest::Approx(1.0).epsilon(1e-10));
  MESSAGE("intruders: c = ", rep.similarity.transpose());
  // The same with the fine-tuned weight given dense.
  const MatD Wft = W0 + B * A;
  CHECK(dw::intruder_dimensions(W0, Wft).intruders == rep.intruders);
  // Mitigation: the intruders' singular values scaled by λ = 0.75, then re-factored to rank
  // 2. The planted update is (up to W0's 1e-3 tail, which the intruders mix with) the two
  // intruders, so the mitigated update is ≈ 0.75·B·A.
  const auto mit = dw::mitigate_intruders(W0, dw::view(W0) + lo, 2, 0.5);
  REQUIRE(mit.B.rows() == m);
  REQUIRE(mit.B.cols() == 2);
  REQUIRE(mit.A.rows() == 2);
  REQUIRE(mit.A.cols() == n);
  CHECK(mit.s == 0.5);
  const double em = dwt::rel_err(MatD(0.5 * mit.B * mit.A), MatD(0.75 * B * A));
  MESSAGE("mitigate_intruders: rel diff of s·B'·A' vs 0.75·B·A = ", em);
  CHECK(em < 1e-3);
  // With no intruder flagged (ε = 0), re-factoring the rank-2 update to rank 2 is exact.
  const auto same = dw::mitigate_intruders(W0, Wft, 2, 2.0, {.k = 10, .epsilon = 0.0});
  CHECK(dwt::rel_err(MatD(2.0 * same.B * same.A), MatD(B * A)) < 1e-12);
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::mitigate_intruders(W0, Wft, 2, 0.0); },
                                             {"deltaw::mitigate_intruders"});
  // W0 against itself: no intruders, c_j = 1.
  const auto self = dw::intruder_dimensions(W0, W0, {.k = 20});
  CHECK(self.count() == 0);
  CHECK((self.similarity.array() - 1.0).abs().maxCoeff() < 1e-10);
}

TEST_CASE("intruder_dimensions: rotation within W0's own top subspace gives no intruders") {
  // W_ft = (U·G)·Σ·Vᵀ with G Givens rotations by θ in the pairs (0,1), (2,3), …, (8,9): its
  // top-10 left vectors stay in W0's top-10 subspace, each with overlaps cos θ and sin θ.
  const Eigen::Index m = 40, n = 30;
  const ColD U = dwt::random_orthonormal(m, n, 5), V = dwt::random_orthonormal(n, n, 6);
  const Eigen::VectorXd sigma = dwt::geometric_spectrum(n, 2.0, 0.8);
  const MatD W0 = U * sigma.asDiagonal() * V.transpose();
  for (const double theta : {0.6, 0.9}) {
    CAPTURE(theta);
    ColD G = ColD::Identity(n, n);
    for (Eigen::Index p = 0; p < 10; p += 2) {
      G(p, p) = std::cos(theta);
      G(p + 1, p + 1) = std::cos(theta);
      G(p, p + 1) = -std::sin(theta);
      G(p + 1, p) = std::sin(theta);
    }
    const MatD Wft = U * G * sigma.asDiagonal() * V.transpose();
    const auto rep = dw::intruder_dimensions(W0, Wft);
    const double expect = std::max(std::abs(std::cos(theta)), std::abs(std::sin(theta)));
    CHECK(rep.count() == 0);
    CHECK((rep.similarity.array() - expect).abs().maxCoeff() < 1e-10);
    CHECK(dwt::max_rel_diff(rep.singular_values, sigma, 10) < 1e-12);
  }
  // A threshold above cos θ flags them all: ε is the caller's.
  const auto strict = dw::intruder_dimensions(W0, W0, {.k = 3, .epsilon = 1.5});
  CHECK(strict.count() == 3);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::intruder_dimensions(W0, W0, {.k = 31}); },
                                         {"deltaw::intruder_dimensions", "k = 31"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::intruder_dimensions(W0, MatD(W0.leftCols(20))); },
                                          {"deltaw::intruder_dimensions", "[40, 30]", "[40, 20]"});
}
