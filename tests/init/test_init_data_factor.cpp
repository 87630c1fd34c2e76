// Factorisation-based initialisations with a residual: LoLDU (pivoted LU) and CorDA (SVD of
// W·C). The references are independent: P·L·D·U rebuilt entry by entry from the returned
// factors, and Eigen's JacobiSVD of W·C̃ with C̃ formed from the raw calibration data.
#include "linalg/spectrum_util.hpp"

#include <Eigen/SVD>
#include <deltaw/init/corda.hpp>
#include <deltaw/init/loldu.hpp>

#include <limits>
#include <random>

namespace dw = deltaw;
using dwt::ColD;
using dwt::MatD;
using dw::index_t;
using dwt::MatF;

namespace {
/// P·L_r·diag(d)·U_r from an ldu update's factors (row o of P·L is row perm[o] of L).
template <class U>
MatD pldu(const U& u, const Eigen::VectorXd& d) {
  const Eigen::Index m = u.rows(), n = u.cols(), r = u.rank();
  MatD out = MatD::Zero(m, n);
  for (Eigen::Index o = 0; o < m; ++o)
    for (Eigen::Index k = 0; k < r; ++k)
      for (Eigen::Index j = 0; j < n; ++j)
        out(o, j) += double(u.L()(u.perm()[o], k)) * d(k) * double(u.U()(k, j));
  return out;
}
template <class U>
Eigen::VectorXd z_of(const U& u) {
  Eigen::VectorXd z(u.rank());
  for (Eigen::Index k = 0; k < u.rank(); ++k) z(k) = double(u.z()[k]);
  return z;
}
}  // namespace

TEST_CASE("loldu_residual: full rank gives P·L·diag(D)·U = W with L unit lower, U unit upper") {
  struct shape {
    Eigen::Index m, n;
  };
  for (const shape sh : {shape{9, 9}, shape{12, 7}, shape{6, 11}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    const Eigen::Index r = std::min(sh.m, sh.n);
    const MatD W0 = dwt::random(sh.m, sh.n, 80 + sh.m);
    MatD W = W0;
    const auto u = dw::loldu_residual(W, r, dw::alpha(double(r)));  // σ = α/r = 1
    CHECK(u.sigma() == 1.0);
    // L [m, r] unit lower-trapezoidal with |L| ≤ 1 (partial pivoting), U [r, n] unit upper.
    for (Eigen::Index i = 0; i < sh.m; ++i)
      for (Eigen::Index k = 0; k < r; ++k) {
        if (i == k) CHECK(u.L()(i, k) == 1.0);
        if (i < k) CHECK(u.L()(i, k) == 0.0);
        CHECK(std::abs(u.L()(i, k)) <= 1.0);
      }
    for (Eigen::Index k = 0; k < r; ++k)
      for (Eigen::Index j = 0; j < sh.n; ++j) {
        if (j == k) CHECK(u.U()(k, j) == 1.0);
        if (j < k) CHECK(u.U()(k, j) == 0.0);
      }
    const double e = dwt::rel_err(pldu(u, z_of(u)), W0);
    MESSAGE("LoLDU full rank ", sh.m, "x", sh.n, ": rel err of P·L·diag(D)·U vs W = ", e);
    CHECK(e < 1e-13);
    // The residual of a full factorisation vanishes; W_res + ΔW = W.
    CHECK(W.cwiseAbs().maxCoeff() < 1e-13);
    CHECK(dwt::rel_err(MatD(W + dw::materialize(u)), W0) < 1e-13);
  }
}

TEST_CASE("loldu_residual: W_res + ΔW = W, the residual is the Schur complement, same LU as loldu") {
  const Eigen::Index m = 20, n = 14, r = 5;
  const MatD W0 = dwt::random(m, n, 91);
  {
    // σ = 1: in pivoted row order, the first r rows and columns of W_res vanish.
    MatD W = W0;
    const auto u = dw::loldu_residual(W, r, dw::alpha(double(r)));
    std::vector<Eigen::Index> row_at(static_cast<std::size_t>(m));  // pivoted position i holds row row_at[i] of W
    for (Eigen::Index o = 0; o < m; ++o) row_at[std::size_t(u.perm()[o])] = o;
    double worst = 0.0;
    for (Eigen::Index i = 0; i < m; ++i)
      for (Eigen::Index j = 0; j < n; ++j)
        if (i < r || j < r) worst = std::max(worst, std::abs(W(row_at[std::size_t(i)], j)));
    MESSAGE("LoLDU r = 5: max |W_res| over the eliminated rows and columns = ", worst);
    CHECK(worst < 1e-13);
    CHECK(W.cwiseAbs().maxCoeff() > 1e-2);  // the Schur complement itself is not zero
  }
  for (const double a : {1.0, 3.0}) {
    CAPTURE(a);
    MatD W = W0;
    const auto u = dw::loldu_residual(W, r, dw::alpha(a));
    CHECK(u.sigma() == doctest::Approx(a / double(r)));
    // ΔW relative to W_res: σ·P·L_r·diag(z)·U_r with z = D_r, z₀ = 0.
    CHECK(dwt::rel_err(MatD(dw::materialize(u)), MatD(u.sigma() * pldu(u, z_of(u)))) < 1e-14);
    const MatD X = dwt::random(4, n, 92);
    const MatD Y = dw::apply(dw::view(W) + u, X);
    CHECK(dwt::rel_err(Y, MatD(X * W0.transpose())) < 1e-13);
    // The same factorisation as the residual-free loldu (which leaves W alone, ΔW = 0).
    const auto v = dw::loldu(W0, r, dw::alpha(a));
    CHECK(dw::frobenius_norm(v) == 0.0);
    for (Eigen::Index o = 0; o < m; ++o) CHECK(v.perm()[o] == u.perm()[o]);
    CHECK(dwt::rel_err(MatD(Eigen::Map<const MatD>(v.L().data(), m, r)), MatD(Eigen::Map<const MatD>(u.L().data(), m, r))) == 0.0);
    for (Eigen::Index k = 0; k < r; ++k) CHECK(v.z0()[k] == u.z()[k]);
  }
  {
    // Float weight: one rounding of W_res.
    MatF W = W0.cast<float>();
    const auto u = dw::loldu_residual(W, r);
    static_assert(std::is_same_v<std::remove_cvref_t<decltype(u.z()[0])>, float>);
    const MatD back = W.cast<double>() + MatD(dw::materialize(u).cast<double>());
    CHECK(dwt::rel_err(back, MatD(W0.cast<float>().cast<double>())) < 8 * std::numeric_limits<float>::epsilon());
  }
  MatD W = W0;
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::loldu_residual(W, 15); }, {"deltaw::loldu_residual", "15"});
}

TEST_CASE("corda: W_res + s·B·A = W, and (s·B·A)·C̃ is the top (IPM) or bottom (KPM) rank-r part of W·C̃") {
  const Eigen::Index m = 24, n = 30, r = 4, N = 500;
  // Calibration inputs with an anisotropic covariance (feature scales 0.2 … 3).
  std::mt19937_64 g(7);
  std::normal_distribution<double> nd;
  MatD Z(N, n);
  for (Eigen::Index i = 0; i < N; ++i)
    for (Eigen::Index j = 0; j < n; ++j) Z(i, j) = nd(g);
  const MatD mix = dwt::random(n, n, 8);
  Eigen::VectorXd scales(n);
  for (Eigen::Index j = 0; j < n; ++j) scales(j) = 0.2 + 2.8 * double(j) / double(n - 1);
  const MatD X = Z * scales.asDiagonal() * mix;
  dw::corda_covariance acc(n);
  acc.add(X.topRows(200));
  acc.add(X.bottomRows(N - 200));
  CHECK(acc.samples() == N);
  const MatD C_ref = X.transpose() * X / double(N);
  const Eigen::MatrixXd C = acc.covariance();
  CHECK(dwt::rel_err(MatD(C), C_ref) < 1e-13);
  const double damp = 0.01;
  const MatD Ct = C_ref + damp * C_ref.diagonal().mean() * MatD::Identity(n, n);
  const MatD W0 = dwt::random(m, n, 9);
  Eigen::JacobiSVD<ColD> ref(ColD(W0 * Ct), Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::Index k = ref.singularValues().size();
  for (const auto method : {dw::corda_method::ipm, dw::corda_method::kpm}) {
    CAPTURE(int(method));
    const double s = 2.0;
    MatD W = W0;
    const auto f = dw::corda(W, C, r, s, dw::corda_options{.method = method, .damp = damp});
    const double e = dwt::rel_err(MatD(W + s * f.B * f.A), W0);
    MESSAGE("corda ", method == dw::corda_method::ipm ? "IPM" : "KPM", ": rel err of W_res + s·B·A vs W = ", e);
    CHECK(e < 1e-13);
    const Eigen::Index first = method == dw::corda_method::ipm ? 0 : k - r;
    const MatD part = ref.matrixU().middleCols(first, r) * ref.singularValues().segment(first, r).asDiagonal() *
                      ref.matrixV().middleCols(first, r).transpose();
    const double ep = dwt::rel_err(MatD(s * f.B * f.A * Ct), part) ;
    MESSAGE("corda: rel err of (s·B·A)·C̃ vs the dense SVD's selected part = ", ep);
    CHECK(ep < 1e-9);
    // B's columns are orthogonal with squared norms S_sel/s.
    const ColD BtB = f.B.transpose() * f.B;
    for (Eigen::Index i = 0; i < r; ++i) CHECK(BtB(i, i) == doctest::Approx(ref.singularValues()(first + i) / s).epsilon(1e-10));
    // The residual keeps the complementary part: W_res·C̃ has the other singular values.
    Eigen::JacobiSVD<ColD> rs(ColD(W * Ct));
    const Eigen::VectorXd other = method == dw::corda_method::ipm ? Eigen::VectorXd(ref.singularValues().segment(r, k - r))
                                                                  : Eigen::VectorXd(ref.singularValues().head(k - r));
    CHECK(dwt::max_rel_diff(rs.singularValues(), other, k - r) < 1e-9);
  }
  // Float weight.
  MatF Wf = W0.cast<float>();
  const auto ff = dw::corda(Wf, C, r, 1.0);
  CHECK(dwt::rel_err(MatD(Wf.cast<double>() + ff.B.cast<double>() * ff.A.cast<double>()),
                     MatD(W0.cast<float>().cast<double>())) < 4 * std::numeric_limits<float>::epsilon());
  MatD W = W0;
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::corda(W, MatD(C.topLeftCorner(5, 5)), r, 1.0); },
                                          {"deltaw::corda", "[5, 5]", "[24, 30]"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)dw::corda(W, MatD(-MatD::Identity(n, n)), r, 1.0); }, {"deltaw::corda", "positive definite"});
}
