// PiSSA and OLoRA initialisations: the model is unchanged at initialisation, the adapter
// holds what the method says (the best rank-r part of W; the first r columns of a QR), and
// the conversion to a plain rank-2r LoRA on the original W reproduces the fine-tuned weight.
#include "linalg/spectrum_util.hpp"

#include <deltaw/init/olora.hpp>
#include <deltaw/init/pissa.hpp>

namespace dw = deltaw;
using dwt::ColD;
using dwt::MatD;
using dwt::MatF;

namespace {
/// A pretend training run: perturbs both factors.
template <class T>
dw::lora_factors<T> perturbed(const dw::lora_factors<T>& f, std::uint64_t seed) {
  dw::lora_factors<T> g = f;
  g.B += T(0.1) * dwt::random<dwt::RowMat<T>>(f.B.rows(), f.B.cols(), seed);
  g.A += T(0.1) * dwt::random<dwt::RowMat<T>>(f.A.rows(), f.A.cols(), seed + 1);
  return g;
}
}  // namespace

TEST_CASE("pissa (exact SVD): W_res + s·B·A = W, and s·B·A is the best rank-r approximation") {
  struct shape {
    Eigen::Index m, n, r;
    double s;
  };
  for (const shape sh : {shape{60, 40, 8, 2.0}, shape{25, 70, 1, 0.5}, shape{30, 30, 30, 1.0}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    CAPTURE(sh.r);
    const MatD W0 = dwt::random(sh.m, sh.n, 31 + sh.r);
    MatD W = W0;
    const auto f = dw::pissa(W, sh.r, sh.s);
    REQUIRE(f.B.rows() == sh.m);
    REQUIRE(f.B.cols() == sh.r);
    REQUIRE(f.A.rows() == sh.r);
    REQUIRE(f.A.cols() == sh.n);
    CHECK(f.s == sh.s);
    const MatD back = W + sh.s * f.B * f.A;
    const double e = dwt::rel_err(back, W0);
    MESSAGE("pissa double ", sh.m, "x", sh.n, " r=", sh.r, ": rel err of W_res + s·B·A vs W = ", e);
    CHECK(e < 1e-12);
    // The adapter is the dense SVD's rank-r truncation; W_res carries the remaining spectrum.
    const auto full = dw::truncated_svd(W0, std::min(sh.m, sh.n));
    const MatD best = full.U.leftCols(sh.r) * full.S.head(sh.r).asDiagonal() * full.V.leftCols(sh.r).transpose();
    CHECK(dwt::rel_err(MatD(sh.s * f.B * f.A), best) < 1e-10);
    // B's columns are orthogonal with squared norms S_r/s; A's rows likewise.
    const ColD BtB = f.B.transpose() * f.B;
    CHECK((BtB - ColD((full.S.head(sh.r) / sh.s).asDiagonal())).cwiseAbs().maxCoeff() < 1e-10 * full.S(0));
    if (sh.r < std::min(sh.m, sh.n)) {
      const auto res = dw::truncated_svd(W, 1);
      CHECK(res.S(0) == doctest::Approx(full.S(sh.r)).epsilon(1e-10));
    }
    // The model's output is unchanged: X·(W_res + s·B·A)ᵀ = X·Wᵀ.
    const MatD X = dwt::random(5, sh.n, 7);
    const MatD Y = dw::apply(dw::view(W) + f.adapter(), X);
    CHECK(dwt::rel_err(Y, MatD(X * W0.transpose())) < 1e-12);
  }
}

TEST_CASE("pissa in float: W_res + s·B·A = W to fp32 rounding") {
  const MatF W0 = dwt::random<MatF>(48, 64, 3);
  MatF W = W0;
  const auto f = dw::pissa(W, 6, 1.5);
  static_assert(std::is_same_v<decltype(f.B)::Scalar, float>);
  const MatD back = W.cast<double>() + 1.5 * f.B.cast<double>() * f.A.cast<double>();
  const double e = dwt::rel_err(back, W0);
  MESSAGE("pissa float 48x64 r=6: rel err of W_res + s·B·A vs W = ", e);
  CHECK(e < 4 * std::numeric_limits<float>::epsilon());
  // The float apply on the lazy sum: fp32 arithmetic.
  const MatF X = dwt::random<MatF>(4, 64, 8);
  const MatF Y = dw::apply(dw::view(W) + f.adapter(), X);
  CHECK(dwt::rel_err(Y, MatD(X.cast<double>() * W0.cast<double>().transpose())) < 1e-5);
}

TEST_CASE("pissa (randomized, niter): close to the exact factors, exact residual") {
  const MatD W0 = dwt::with_spectrum(80, 60, dwt::geometric_spectrum(60, 5.0, 0.7), 17);
  MatD We = W0, Wr = W0;
  const auto fe = dw::pissa(We, 6, 2.0);
  const auto fr = dw::pissa(Wr, 6, 2.0, {.power_iterations = 4, .seed = 5});
  CHECK(dwt::rel_err(MatD(Wr + 2.0 * fr.B * fr.A), W0) < 1e-12);
  const double e = dwt::rel_err(MatD(fr.B * fr.A), MatD(fe.B * fe.A));
  MESSAGE("pissa niter=4 vs exact: rel diff of B·A = ", e);
  CHECK(e < 1e-6);
  CHECK(dwt::rel_err(Wr, We) < 1e-6);
}

TEST_CASE("pissa (randomized in fp32, weight_type_arithmetic): fp32-close to the exact factors, residual to fp32 rounding") {
  const MatD W0d = dwt::with_spectrum(80, 60, dwt::geometric_spectrum(60, 5.0, 0.7), 17);
  const MatF W0 = W0d.cast<float>();
  MatD We = W0.cast<double>();
  MatF Wr = W0;
  const auto fe = dw::pissa(We, 6, 2.0);
  const auto fr = dw::pissa(Wr, 6, 2.0, {.power_iterations = 4, .seed = 5, .weight_type_arithmetic = true});
  static_assert(std::is_same_v<decltype(fr.B)::Scalar, float>);
  const double back = dwt::rel_err(MatD(Wr.cast<double>() + 2.0 * fr.B.cast<double>() * fr.A.cast<double>()),
                                   MatD(W0.cast<double>()));
  const double e = dwt::rel_err(MatD(fr.B.cast<double>() * fr.A.cast<double>()), MatD(fe.B * fe.A));
  MESSAGE("pissa fp32 niter=4: residual rel err ", back, ", B·A vs exact (double) ", e);
  CHECK(back < 8 * std::numeric_limits<float>::epsilon());
  CHECK(e < 1e-5);
}

TEST_CASE("olora: W_res + s·B·A = W; B orthonormal, A upper trapezoidal, first r columns in the adapter") {
  struct shape {
    Eigen::Index m, n, r;
    double s;
  };
  for (const shape sh : {shape{50, 30, 5, 1.0}, shape{20, 45, 3, 0.5}, shape{16, 16, 16, 2.0}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    CAPTURE(sh.r);
    const MatD W0 = dwt::random(sh.m, sh.n, 77 + sh.r);
    MatD W = W0;
    const auto f = dw::olora(W, sh.r, sh.s);
    REQUIRE(f.B.rows() == sh.m);
    REQUIRE(f.B.cols() == sh.r);
    REQUIRE(f.A.rows() == sh.r);
    REQUIRE(f.A.cols() == sh.n);
    const double e = dwt::rel_err(MatD(W + sh.s * f.B * f.A), W0);
    MESSAGE("olora double ", sh.m, "x", sh.n, " r=", sh.r, ": rel err of W_res + s·B·A vs W = ", e);
    CHECK(e < 1e-12);
    CHECK((f.B.transpose() * f.B - MatD::Identity(sh.r, sh.r)).cwiseAbs().maxCoeff() < 1e-12);
    for (Eigen::Index i = 0; i < sh.r; ++i)
      for (Eigen::Index j = 0; j < std::min(i, sh.n); ++j) CHECK(f.A(i, j) == 0.0);
    // W = Q·R with R upper triangular: column j < r of W is (Q_r·R_r) column j, so
    // W_res[:, :r] = (1 − s)·W[:, :r].
    CHECK(dwt::rel_err(MatD(W.leftCols(sh.r)), MatD((1.0 - sh.s) * W0.leftCols(sh.r))) < 1e-12);
    // B's columns span W's first r columns.
    const MatD P = f.B * f.B.transpose();
    CHECK(dwt::rel_err(MatD(P * W0.leftCols(sh.r)), MatD(W0.leftCols(sh.r))) < 1e-12);
  }
}

TEST_CASE("to_plain_lora: the rank-2r LoRA on the original W reproduces the fine-tuned weight") {
  SUBCASE("pissa, double") {
    const MatD W0 = dwt::random(40, 36, 51);
    MatD Wres = W0;
    const auto init = dw::pissa(Wres, 4, 2.0);
    const auto trained = perturbed(init, 60);
    const MatD finetuned = Wres + 2.0 * trained.B * trained.A;  // what the trained model computes
    const auto plain = dw::to_plain_lora(trained, init);
    REQUIRE(plain.B.rows() == 40);
    REQUIRE(plain.B.cols() == 8);
    REQUIRE(plain.A.rows() == 8);
    REQUIRE(plain.A.cols() == 36);
    const MatD merged = dw::materialize(dw::view(W0) + plain.adapter());
    const double e = dwt::rel_err(merged, finetuned);
    MESSAGE("to_plain_lora (pissa, double): rel err of W + s·B'·A' vs fine-tuned = ", e);
    CHECK(e < 1e-12);
    const MatD X = dwt::random(3, 36, 9);
    CHECK(dwt::rel_err(dw::apply(dw::view(W0) + plain.adapter(), X), MatD(X * finetuned.transpose())) < 1e-12);
  }
  SUBCASE("olora, double") {
    const MatD W0 = dwt::random(30, 50, 52);
    MatD Wres = W0;
    const auto init = dw::olora(Wres, 6, 0.5);
    const auto trained = perturbed(init, 61);
    const MatD finetuned = Wres + 0.5 * trained.B * trained.A;
    const MatD merged = dw::materialize(dw::view(W0) + dw::to_plain_lora(trained, init).adapter());
    CHECK(dwt::rel_err(merged, finetuned) < 1e-12);
  }
  SUBCASE("pissa, float: to fp32 rounding") {
    const MatF W0 = dwt::random<MatF>(32, 24, 53);
    MatF Wres = W0;
    const auto init = dw::pissa(Wres, 3, 1.0);
    const auto trained = perturbed(init, 62);
    const MatD finetuned = Wres.cast<double>() + trained.B.cast<double>() * trained.A.cast<double>();
    const auto plain = dw::to_plain_lora(trained, init);
    MatF merged = W0;
    dw::merge(merged, plain.adapter());
    const double e = dwt::rel_err(merged, finetuned);
    MESSAGE("to_plain_lora (pissa, float): rel err of merged W vs fine-tuned = ", e);
    CHECK(e < 1e-5);
  }
  SUBCASE("errors") {
    MatD W = dwt::random(10, 12, 1);
    const auto a = dw::pissa(W, 2, 1.0);
    MatD W2 = dwt::random(10, 13, 2);
    const auto b = dw::pissa(W2, 2, 1.0);
    dwt::check_throws_with<dw::shape_error>([&] { (void)dw::to_plain_lora(a, b); },
                                            {"deltaw::to_plain_lora", "[2, 12]", "[2, 13]"});
    auto c = a;
    c.s = 2.0;
    dwt::check_throws_with<dw::argument_error>([&] { (void)dw::to_plain_lora(c, a); }, {"deltaw::to_plain_lora"});
  }
}

TEST_CASE("pissa and olora: argument errors") {
  MatD W = dwt::random(8, 6, 1);
  const MatD W0 = W;
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::pissa(W, 7, 1.0); }, {"deltaw::pissa", "[8, 6]", "r = 7"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::olora(W, 0, 1.0); }, {"deltaw::olora", "r = 0"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::pissa(W, 2, -1.0); }, {"deltaw::pissa", "positive"});
  CHECK(W == W0);  // a rejected call leaves W untouched
}
