// Randomized truncated SVD (Halko–Martinsson–Tropp) against Eigen's dense BDCSVD, on
// matrices built with a known decaying spectrum, and on lazy expressions W + s·B·A.
#include "linalg/spectrum_util.hpp"

#include <deltaw/linalg/randomized_svd.hpp>

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <functional>

namespace dw = deltaw;
using dwt::ColD;
using dwt::MatD;
using dwt::MatF;

TEST_CASE("randomized_svd: top-k singular values and vectors of a dense matrix with a decaying spectrum") {
  struct shape {
    Eigen::Index m, n, k;
    double decay;
  };
  for (const shape sh : {shape{120, 80, 10, 0.8}, shape{64, 200, 8, 0.7}, shape{37, 37, 1, 0.5}, shape{50, 13, 13, 0.8}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    CAPTURE(sh.k);
    const auto sigma = dwt::geometric_spectrum(std::min(sh.m, sh.n), 3.0, sh.decay);
    const MatD W = dwt::with_spectrum(sh.m, sh.n, sigma, 11 + sh.m);
    const auto ref = dw::truncated_svd(W, sh.k);  // dense BDCSVD
    // The reference recovers the planted spectrum (so the test matrix is what it claims).
    CHECK(dwt::max_rel_diff(ref.S, sigma, sh.k) < 1e-12);

    const auto r = dw::randomized_svd(W, sh.k, {.oversampling = 10, .power_iterations = 2, .seed = 7});
    REQUIRE(r.U.rows() == sh.m);
    REQUIRE(r.U.cols() == sh.k);
    REQUIRE(r.V.rows() == sh.n);
    REQUIRE(r.V.cols() == sh.k);
    REQUIRE(r.S.size() == sh.k);
    const double es = dwt::max_rel_diff(r.S, ref.S, sh.k);
    MESSAGE("randomized_svd double ", sh.m, "x", sh.n, " k=", sh.k, ": max rel error of sigma = ", es);
    CHECK(es < 1e-4);
    // Orthonormal factors, and the same dominant subspaces as the dense SVD.
    CHECK((r.U.transpose() * r.U - ColD::Identity(sh.k, sh.k)).cwiseAbs().maxCoeff() < 1e-12);
    CHECK((r.V.transpose() * r.V - ColD::Identity(sh.k, sh.k)).cwiseAbs().maxCoeff() < 1e-12);
    CHECK(dwt::subspace_diff(r.U, ref.U) < 1e-3);
    CHECK(dwt::subspace_diff(r.V, ref.V) < 1e-3);
    // Uᵀ·W·V = diag(S): the factors belong to W, not just the values.
    const ColD core = r.U.transpose() * W * r.V;
    CHECK((core - ColD(r.S.asDiagonal())).cwiseAbs().maxCoeff() < 1e-4 * sigma(0));
  }
}

TEST_CASE("randomized_svd: float matrices, and more power iterations sharpen a slow decay") {
  const auto sigma = dwt::geometric_spectrum(90, 2.0, 0.85);
  const MatD W = dwt::with_spectrum(150, 90, sigma, 5);
  const MatF Wf = W.cast<float>();
  const auto ref = dw::truncated_svd(Wf, 12);  // the float matrix's own spectrum, in double
  const auto r = dw::randomized_svd(Wf, 12, {.oversampling = 12, .power_iterations = 3, .seed = 1});
  static_assert(std::is_same_v<decltype(r.S)::Scalar, float>);
  const double ef = dwt::max_rel_diff(r.S, ref.S, 12);
  MESSAGE("randomized_svd float 150x90 k=12: max rel error of sigma = ", ef);
  CHECK(ef < 1e-4);
  // Computing a float matrix's SVD in double.
  const auto rd = dw::randomized_svd<double>(Wf, 12, {.oversampling = 12, .power_iterations = 3, .seed = 1});
  static_assert(std::is_same_v<decltype(rd.S)::Scalar, double>);
  CHECK(dwt::max_rel_diff(rd.S, ref.S, 12) < 1e-5);

  // q = 0 is the plain range finder: worse than q = 3 on the same sketch.
  const auto r0 = dw::randomized_svd(W, 12, {.oversampling = 4, .power_iterations = 0, .seed = 3});
  const auto r3 = dw::randomized_svd(W, 12, {.oversampling = 4, .power_iterations = 3, .seed = 3});
  const auto refd = dw::truncated_svd(W, 12);
  CHECK(dwt::max_rel_diff(r3.S, refd.S, 12) < dwt::max_rel_diff(r0.S, refd.S, 12));
  CHECK(dwt::max_rel_diff(r3.S, refd.S, 12) < 1e-4);
}

TEST_CASE("randomized_svd: deterministic per seed") {
  const MatD W = dwt::with_spectrum(40, 30, dwt::geometric_spectrum(30, 1.0, 0.6), 2);
  const auto a = dw::randomized_svd(W, 5, {.seed = 42});
  const auto b = dw::randomized_svd(W, 5, {.seed = 42});
  CHECK(a.S == b.S);
  CHECK(a.U == b.U);
  CHECK(a.V == b.V);
  const auto c = dw::randomized_svd(W, 5, {.seed = 43});
  CHECK(dwt::max_rel_diff(c.S, a.S, 5) < 1e-6);
}

TEST_CASE("randomized_svd: a lazy W + s·B·A as an operator equals the dense form") {
  const Eigen::Index m = 96, n = 72, r = 4, k = 8;
  const MatD W = dwt::with_spectrum(m, n, dwt::geometric_spectrum(n, 4.0, 0.75), 21);
  const MatD B = dwt::random(m, r, 22), A = dwt::random(r, n, 23);
  const auto lo = dw::lora(B, A, dw::alpha(0.5));
  const auto expr = dw::view(W) + lo;
  const MatD Wsum = dw::materialize(expr);  // reference only
  CHECK(dwt::rel_err(Wsum, MatD(W + lo.scale() * B * A)) < 1e-14);

  const dw::rsvd_options opt{.oversampling = 10, .power_iterations = 3, .seed = 9};
  const auto lazy = dw::randomized_svd(expr, k, opt);
  const auto dense = dw::randomized_svd(Wsum, k, opt);
  const auto ref = dw::truncated_svd(Wsum, k);
  const double e_ops = dwt::max_rel_diff(lazy.S, dense.S, k);
  const double e_ref = dwt::max_rel_diff(lazy.S, ref.S, k);
  MESSAGE("randomized_svd on view(W) + lora: rel diff vs dense form = ", e_ops, ", vs BDCSVD = ", e_ref);
  CHECK(e_ops < 1e-12);
  CHECK(dwt::subspace_diff(lazy.U, dense.U) < 1e-10);
  CHECK(dwt::subspace_diff(lazy.V, dense.V) < 1e-10);
  CHECK(e_ref < 1e-4);

  // The update alone is an operator too: its top-r spectrum is that of s·B·A.
  const auto upd = dw::randomized_svd(lo, r, opt);
  const MatD D = lo.scale() * B * A;
  const auto refu = dw::truncated_svd(D, r);
  CHECK(dwt::max_rel_diff(upd.S, refu.S, r) < 1e-10);
  CHECK(dwt::subspace_diff(upd.U, refu.U) < 1e-8);
}

TEST_CASE("randomized_svd: sketch wider than the matrix, and argument errors") {
  // k + p > min(m, n): the sketch is capped and the result is exact.
  const MatD W = dwt::random(9, 20, 4);
  const auto r = dw::randomized_svd(W, 9, {.oversampling = 10, .power_iterations = 1});
  const auto ref = dw::truncated_svd(W, 9);
  CHECK(dwt::max_rel_diff(r.S, ref.S, 9) < 1e-10);

  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::randomized_svd(W, 0); },
                                         {"deltaw::randomized_svd", "[9, 20]", "k = 0"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::randomized_svd(W, 10); }, {"deltaw::randomized_svd", "k = 10"});
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)dw::randomized_svd(W, 3, {.oversampling = -1}); }, {"deltaw::randomized_svd", "p = -1"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::truncated_svd(W, 11); }, {"deltaw::truncated_svd"});
}

TEST_CASE("randomized_svd: slow (harmonic) decay needs the power iterations") {
  // σᵢ = 1/(1 + i): σ_{k+p}/σ_k ≈ 0.5, so the plain range finder is visibly off and q
  // power iterations bring the error down by about that ratio to the power 2q.
  const Eigen::Index m = 200, n = 150, k = 10;
  Eigen::VectorXd sigma(n);
  for (Eigen::Index i = 0; i < n; ++i) sigma(i) = 1.0 / double(1 + i);
  const MatD W = dwt::with_spectrum(m, n, sigma, 99);
  double prev = 1.0;
  for (const dw::index_t q : {0, 2, 6}) {
    const auto r = dw::randomized_svd(W, k, {.oversampling = 10, .power_iterations = q, .seed = 4});
    const double e = dwt::max_rel_diff(r.S, sigma, k);
    MESSAGE("randomized_svd harmonic 200x150 k=10 p=10 q=", q, ": max rel error of sigma = ", e);
    CHECK(e < prev);
    prev = e;
  }
  CHECK(prev < 1e-4);
}

TEST_CASE("randomized_svd: an update too large to materialise, against its factored spectrum") {
  // ΔW = s·B·A with out = in = 50000: the dense matrix would take 20 GB in double, so this
  // only passes if the randomized SVD works through apply. Reference, independent of both
  // SVD routines: σ² are the eigenvalues of s²·(BᵀB)·(A·Aᵀ) (3 × 3).
  const Eigen::Index big = 50000, r = 3;
  const MatD B = dwt::random(big, r, 71), A = dwt::random(r, big, 72);
  const auto lo = dw::lora(B, A, dw::scale(0.5));
  const auto rs = dw::randomized_svd(lo, r, {.oversampling = 10, .power_iterations = 1, .seed = 2});
  const ColD G = 0.25 * (B.transpose() * B) * (A * A.transpose());
  Eigen::VectorXd ev = G.eigenvalues().real();
  std::sort(ev.data(), ev.data() + ev.size(), std::greater<double>());
  const Eigen::VectorXd ref = ev.cwiseSqrt();
  const double e = dwt::max_rel_diff(rs.S, ref, r);
  MESSAGE("randomized_svd on a 50000x50000 rank-3 LoRA: max rel error of sigma = ", e);
  CHECK(e < 1e-10);
}
