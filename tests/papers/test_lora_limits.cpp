// SPDX-License-Identifier: MIT
// Computational limits of LoRA: the layer norms against dense double computations, the
// monitor, the exact LoRA gradient of attention against central differences, the chained
// low-rank gradient against the same formula with the approximate attention formed
// densely, and its error against the exact gradient below and above the threshold.
#include <deltaw/papers/lora_limits.hpp>

#include <doctest/doctest.h>

#include <Eigen/SVD>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../test_util.hpp"

namespace lora_limits_test {
namespace ll = deltaw::papers::lora_limits;
using deltaw::index_t;
using Mat = deltaw::dense<double>;

/// The matrices behind an attention_layer (views into these).
struct layer_data {
  Mat W[3], B[3], A[3];
  double s = 0.5;
  layer_data(index_t d_in, index_t d, index_t dv, index_t r, double w_scale, std::uint64_t seed) {
    const index_t outs[3] = {d, d, dv};
    for (int i = 0; i < 3; ++i) {
      W[i] = w_scale * dwt::random(outs[i], d_in, seed + 10 * std::uint64_t(i));
      B[i] = w_scale * dwt::random(outs[i], r, seed + 10 * std::uint64_t(i) + 1);
      A[i] = dwt::random(r, d_in, seed + 10 * std::uint64_t(i) + 2);
    }
  }
  ll::attention_layer<double> layer() const {
    ll::attention_layer<double> L;
    ll::lora_projection<double>* ps[3] = {&L.q, &L.k, &L.v};
    for (int i = 0; i < 3; ++i) *ps[i] = {deltaw::view(W[i]), deltaw::view(B[i]), deltaw::view(A[i]), s};
    return L;
  }
  Mat wstar(int i) const { return W[i] + s * B[i] * A[i]; }
};

double binom(int n, int k) {
  double r = 1;
  for (int i = 1; i <= k; ++i) r = r * double(n - k + i) / double(i);
  return r;
}
}  // namespace lora_limits_test

TEST_CASE("lora_limits: polynomial features give the truncated exponential series") {
  using namespace lora_limits_test;
  for (int d : {1, 3, 5})
    for (int g : {0, 1, 2, 3}) {
      const auto f = ll::make_polynomial_features(d, g);
      CHECK(double(f.size()) == binom(d + g, g));
      const Mat q = 0.7 * dwt::random(1, d, 1 + std::uint64_t(d)), k = 0.7 * dwt::random(1, d, 2 + std::uint64_t(d));
      const Mat fq = ll::feature_map(f, q, 1.0), fk = ll::feature_map(f, k, 1.0);
      const double x = q.row(0).dot(k.row(0));
      double series = 0, term = 1;
      for (int m = 0; m <= g; ++m) {
        series += term;
        term *= x / double(m + 1);
      }
      CHECK(fq.row(0).dot(fk.row(0)) == doctest::Approx(series).epsilon(1e-13));
    }
  CHECK_THROWS_AS(ll::make_polynomial_features(0, 2), deltaw::argument_error);
}

TEST_CASE("lora_limits: the layer norms against dense double computations; the monitor") {
  using namespace lora_limits_test;
  const index_t n = 24, d_in = 10, d = 4;
  const layer_data ld(d_in, d, 3, 2, 0.4, 7);
  const Mat X = dwt::random(n, d_in, 3);
  const auto L = ld.layer();
  ll::threshold_options o;
  o.power_iterations = 200;
  const auto r = ll::measure(X, L, o);
  CHECK(r.n == n);
  CHECK(r.d == d);
  CHECK(r.beta == doctest::Approx(0.5));
  CHECK(r.x_max == doctest::Approx(X.cwiseAbs().maxCoeff()));
  double xrow = 0;
  for (index_t i = 0; i < n; ++i) xrow = std::max(xrow, X.row(i).norm());
  CHECK(r.x_row == doctest::Approx(xrow));
  Mat Z[3];
  for (int i = 0; i < 3; ++i) {
    const Mat Ws = ld.wstar(i);
    Z[i] = X * Ws.transpose();
    CHECK(r.out_max[i] == doctest::Approx(Z[i].cwiseAbs().maxCoeff()).epsilon(1e-12));
    const Eigen::JacobiSVD<Mat> svs(Ws), svw(ld.W[i]), svd(Mat(ld.s * ld.B[i] * ld.A[i]));
    CHECK(r.wstar_spec[i] == doctest::Approx(svs.singularValues()[0]).epsilon(1e-6));
    CHECK(r.w_spec[i] == doctest::Approx(svw.singularValues()[0]).epsilon(1e-6));
    CHECK(r.delta_spec[i] == doctest::Approx(svd.singularValues()[0]).epsilon(1e-6));
  }
  const Mat S = 0.5 * Z[0] * Z[1].transpose();
  CHECK(r.logit_bound >= S.cwiseAbs().maxCoeff());
  CHECK(r.gamma == doctest::Approx(std::sqrt(0.5) * std::max(r.out_max[0], r.out_max[1])));
  CHECK(r.threshold == doctest::Approx(std::sqrt(std::log(double(n)))));
  CHECK(r.below == (r.gamma < r.threshold));
  o.kind = ll::gamma_kind::norm_product;
  o.kappa = 2.0;
  const auto r2 = ll::measure(X, L, o);
  CHECK(r2.gamma == doctest::Approx(std::sqrt(0.5) * xrow * std::max(r.wstar_spec[0], r.wstar_spec[1])).epsilon(1e-6));
  CHECK(r2.gamma >= r.gamma);  // an upper bound of the entries' version
  CHECK(r2.threshold == doctest::Approx(2.0 * std::sqrt(std::log(double(n)))));
  // The monitor: growing inputs cross the threshold at the step where Γ passes it.
  ll::norm_monitor mon;
  std::int64_t expect = -1;
  for (int step = 0; step < 8; ++step) {
    const Mat Xs = (0.25 * std::pow(2.0, step)) * X;
    const auto& m = mon(step, Xs, L);
    if (!m.below && expect < 0) expect = step;
  }
  CHECK(mon.records().size() == 8);
  CHECK(mon.records().front().norms.below);
  CHECK(!mon.records().back().norms.below);
  CHECK(mon.first_crossing() == expect);
  // Shapes are named.
  const Mat Xbad = dwt::random(4, d_in + 1, 1);
  CHECK_THROWS_AS(ll::measure(Xbad, L), deltaw::shape_error);
}

TEST_CASE("lora_limits: the exact LoRA gradient of attention against central differences") {
  using namespace lora_limits_test;
  const index_t n = 7, d_in = 5, d = 3, dv = 2, r = 2;
  layer_data ld(d_in, d, dv, r, 0.8, 21);
  const Mat X = dwt::random(n, d_in, 5), Y = dwt::random(n, dv, 6);
  ll::gradient_options o;
  o.full = true;
  const auto g = ll::attention_lora_grad_dense(X, Y, ld.layer(), o);
  CHECK(g.loss == doctest::Approx(ll::attention_lora_loss_dense(X, Y, ld.layer())).epsilon(1e-14));
  const double h = 1e-6;
  double worst = 0;
  for (int i = 0; i < 3; ++i)
    for (int which = 0; which < 2; ++which) {
      Mat& P = which == 0 ? ld.B[i] : ld.A[i];
      const Mat& an = which == 0 ? g.dB[i] : g.dA[i];
      REQUIRE(an.rows() == P.rows());
      REQUIRE(an.cols() == P.cols());
      Mat num(P.rows(), P.cols());
      for (index_t k = 0; k < P.size(); ++k) {
        const double v = P.data()[k];
        P.data()[k] = v + h;
        const double fp = ll::attention_lora_loss_dense(X, Y, ld.layer());
        P.data()[k] = v - h;
        const double fm = ll::attention_lora_loss_dense(X, Y, ld.layer());
        P.data()[k] = v;
        num.data()[k] = (fp - fm) / (2 * h);
      }
      CHECK(num.norm() > 1e-3);
      worst = std::max(worst, (num - an).norm() / num.norm());
    }
  CHECK(worst < 1e-7);
  // Partial mode leaves K's factors without gradient.
  const auto gp = ll::attention_lora_grad_dense(X, Y, ld.layer());
  CHECK(gp.dB[1].size() == 0);
  CHECK((gp.dB[0] - g.dB[0]).norm() == 0.0);
}

TEST_CASE("lora_limits: the chained low-rank gradient equals the approximate formula formed densely") {
  using namespace lora_limits_test;
  const index_t n = 40, d_in = 9, d = 4, dv = 3, r = 3;
  const layer_data ld(d_in, d, dv, r, 0.3, 31);
  const Mat X = dwt::random(n, d_in, 8), Y = dwt::random(n, dv, 9);
  for (bool full : {false, true})
    for (int deg : {1, 2, 3}) {
      ll::gradient_options o;
      o.full = full;
      o.degree = deg;
      const auto a = ll::attention_lora_grad_chained(X, Y, ld.layer(), o);
      const auto b = ll::attention_lora_grad_dense(X, Y, ld.layer(), o, /*taylor=*/true);
      INFO("full " << full << " degree " << deg);
      CHECK(ll::gradient_rel_error(a, b) < 1e-11);
      CHECK(a.loss == doctest::Approx(b.loss).epsilon(1e-12));
      CHECK((a.O - b.O).norm() < 1e-12 * b.O.norm());
      CHECK((a.dB[1].size() > 0) == full);
    }
}

TEST_CASE("lora_limits: the approximation error falls with the degree below the threshold and not above it") {
  using namespace lora_limits_test;
  const index_t n = 64, d_in = 8, d = 4, dv = 4, r = 2;
  const Mat X = dwt::random(n, d_in, 12), Y = dwt::random(n, dv, 13);
  ll::gradient_options o;
  o.full = true;
  // Small entries: below the threshold.
  const layer_data small(d_in, d, dv, r, 0.15, 41);
  const auto ms = ll::measure(X, small.layer());
  CHECK(ms.below);
  const auto exact = ll::attention_lora_grad_dense(X, Y, small.layer(), o);
  double prev = 1e300;
  std::vector<double> errs;
  for (int deg : {1, 2, 3, 4}) {
    o.degree = deg;
    const double e = ll::gradient_rel_error(ll::attention_lora_grad_chained(X, Y, small.layer(), o), exact);
    errs.push_back(e);
    CHECK(e < prev);
    prev = e;
  }
  MESSAGE("below the threshold (Γ = " << ms.gamma << " < " << ms.threshold << "): rel. error by degree 1..4: " << errs[0]
                                      << " " << errs[1] << " " << errs[2] << " " << errs[3]);
  CHECK(errs[3] < 1e-4);
  // Large entries: far above it, the same degree is useless (or the kernel breaks down).
  const layer_data big(d_in, d, dv, r, 1.5, 41);
  const auto mb = ll::measure(X, big.layer());
  CHECK(!mb.below);
  o.degree = 2;
  const auto exact_b = ll::attention_lora_grad_dense(X, Y, big.layer(), o);
  double eb = 0;
  try {
    eb = ll::gradient_rel_error(ll::attention_lora_grad_chained(X, Y, big.layer(), o), exact_b);
  } catch (const deltaw::argument_error&) {
    eb = 1e300;  // a non-positive kernel row sum: the breakdown itself
  }
  MESSAGE("above the threshold (Γ = " << mb.gamma << " ≥ " << mb.threshold << "): degree-2 rel. error " << eb);
  CHECK(eb > 100 * errs[1]);
}
