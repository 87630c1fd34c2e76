// Spectrum of a factored update s·B·A without the dense matrix, against the dense SVD of
// the materialised ΔW; effective rank.
#include "linalg/spectrum_util.hpp"

#include <deltaw/spectral/factored_spectrum.hpp>

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
