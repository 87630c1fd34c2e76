// CBQ LoRA-Rounding: the op's and the regulariser's gradients against central differences,
// the hard-rounded weight on the quantisation grid (checked entry by entry against ⌊W/s⌋
// computed here), the optimised rounding beating round-to-nearest on correlated inputs,
// reproducibility from the seed, and the errors for bad inputs. Double throughout.
#include <deltaw/autograd/gradcheck.hpp>
#include <deltaw/train/cbq_rounding.hpp>
#include <doctest/doctest.h>

#include <cstdio>
#include <random>

namespace ag = deltaw::autograd;
namespace tr = deltaw::train;
using MatD = deltaw::dense<double>;
using P = ag::parameter<double>;

namespace {
MatD uniform(Eigen::Index r, Eigen::Index c, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  MatD m(r, c);
  for (Eigen::Index k = 0; k < m.size(); ++k) m.data()[k] = u(g);
  return m;
}
// Independent reference: h and the per-channel scale, written out from the formulas.
double h_ref(double v) { return std::min(1.0, std::max(0.0, 1.2 / (1.0 + std::exp(-v)) - 0.1)); }
double sym_scale(const MatD& W, Eigen::Index i, int bits) {
  return W.row(i).cwiseAbs().maxCoeff() / double((1 << (bits - 1)) - 1);
}
template <class E, class F>
void throws_with(F&& f, const std::string& frag) {
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(frag) != std::string::npos);
  }
  CHECK_MESSAGE(thrown, "expected exception not thrown: " << frag);
}
}  // namespace

TEST_CASE("cbq: soft weight against a reference written out here; op and regulariser gradients by central differences") {
  // 3 bits so that the clamp at qmax is reached (the max-abs entry of each row sits at ±qmax);
  // row 2 is zero (a degenerate channel); A's entries in (−0.3, 0.3), r = 3, so |V| < 0.3,
  // far from the clip kinks |V| = ln 11 ≈ 2.40; ⌊W/s⌋ + h never crosses qmin/qmax except at
  // h = 0, which |V| < 2.4 excludes. So every entry is a smooth point.
  for (bool sym : {true, false}) {
    MatD W = uniform(7, 10, 11);
    W.row(2).setZero();
    const tr::cbq_quantizer<double> q(deltaw::view(W), {3, sym});
    CHECK(q.degenerate(2));
    CHECK(q.scales()(2, 0) == 1.0);
    if (sym)
      for (Eigen::Index i = 0; i < W.rows(); ++i)
        if (i != 2) CHECK(q.scales()(i, 0) == doctest::Approx(sym_scale(W, i, 3)).epsilon(1e-15));
    P A1("A1", uniform(7, 3, 12, 0.3)), A2("A2", uniform(3, 10, 13, 0.3)), X("X", uniform(5, 10, 14));
    // soft weight vs. the formula
    const MatD Wh = tr::cbq_soft_weight_dense(q, A1.value(), A2.value(), 3);
    const MatD V = A1.value() * A2.value();
    double maxdiff = 0;
    for (Eigen::Index i = 0; i < W.rows(); ++i)
      for (Eigen::Index j = 0; j < W.cols(); ++j) {
        const double s = q.scales()(i, 0), z = q.zero_points()(i, 0);
        const double ref = i == 2 ? 0.0
                                  : s * (std::clamp(std::floor(W(i, j) / s) + z + h_ref(V(i, j)), double(q.qmin()),
                                                    double(q.qmax())) - z);
        maxdiff = std::max(maxdiff, std::abs(Wh(i, j) - ref));
      }
    CHECK(maxdiff < 1e-14);
    // the op's value vs X·Ŵᵀ
    {
      ag::tape<double> t;
      auto y = tr::cbq_linear(t.param(X), t.param(A1), t.param(A2), q, 3);
      CHECK((MatD(y.value()) - X.value() * Wh.transpose()).cwiseAbs().maxCoeff() < 1e-13);
    }
    const MatD R = uniform(5, 7, 15);
    auto loss = [&](ag::tape<double>& t) {
      return ag::weighted_sum(tr::cbq_linear(t.param(X), t.param(A1), t.param(A2), q, 3), R);
    };
    const auto rep = ag::gradcheck(loss, {&X, &A1, &A2});
    std::printf("gradcheck cbq_linear (%s)      entries %3td max rel err %.2e (%s)\n", sym ? "sym " : "asym",
                rep.entries, rep.max_rel_error, rep.worst.c_str());
    CHECK(rep.max_rel_error < 1e-6);
    CHECK(rep.min_grad_norm > 0);
    // the degenerate row's A₁ row gets no gradient from the op
    CHECK(A1.grad().row(2).norm() == 0.0);
    // Larger logits for the regulariser (|V| < 3·0.75² ≈ 1.69, still inside the clip), so
    // that |2h − 1| is not tiny and its β-th power has a gradient well above the
    // central-difference noise of a sum of ~60 terms near 1.
    P B1("B1", uniform(7, 3, 16, 0.75)), B2("B2", uniform(3, 10, 17, 0.75));
    const MatD VB = B1.value() * B2.value();
    CHECK(VB.cwiseAbs().maxCoeff() < 2.3);
    for (double beta : {2.0, 7.5}) {
      auto reg = [&](ag::tape<double>& t) { return tr::cbq_rounding_regularizer(t.param(B1), t.param(B2), q, beta, 4); };
      // value against the formula
      double ref = 0;
      for (Eigen::Index i = 0; i < W.rows(); ++i)
        for (Eigen::Index j = 0; j < W.cols(); ++j)
          if (i != 2) ref += 1 - std::pow(std::abs(2 * h_ref(VB(i, j)) - 1), beta);
      {
        ag::tape<double> t;
        CHECK(reg(t).value()(0, 0) == doctest::Approx(ref).epsilon(1e-13));
      }
      const auto rr = ag::gradcheck(reg, {&B1, &B2});
      std::printf("gradcheck cbq_regularizer b=%.1f entries %3td max rel err %.2e (%s)\n", beta, rr.entries,
                  rr.max_rel_error, rr.worst.c_str());
      CHECK(rr.max_rel_error < 1e-6);
      CHECK(rr.min_grad_norm > 0);
      CHECK(B1.grad().row(2).norm() == 0.0);  // the zero channel is not regularised
    }
  }
}

namespace {
// Correlated calibration inputs: every feature carries one common factor (weight 1) plus
// its own noise (0.3), so errors of one output row add up along the common direction and
// rounding each weight to nearest is not optimal for the output.
MatD correlated_inputs(Eigen::Index n, Eigen::Index in, std::uint64_t seed) {
  const MatD c = uniform(n, 1, seed), e = uniform(n, in, seed + 1);
  return c.replicate(1, in) + 0.3 * e;
}
}  // namespace

TEST_CASE("cbq: reconstruction beats round-to-nearest on correlated inputs; codes on the grid; reproducible") {
  const MatD W = uniform(16, 32, 21);
  const MatD X = correlated_inputs(256, 32, 22);
  for (int bits : {3, 4}) {
  tr::cbq_reconstruct_options o;
  o.bits = bits;
  o.rank = 8;
  o.steps = 600;
  o.lr = 2e-2;
  o.lambda = 1e-3;
  o.batch_rows = 128;
  o.seed = 7;
  const auto r = tr::cbq_reconstruct<double>(deltaw::view(W), deltaw::view(X), o);
  // round-to-nearest, computed here from the formula
  const tr::cbq_quantizer<double> q(deltaw::view(W), {o.bits, o.symmetric});
  MatD Wr(W.rows(), W.cols()), Wc(W.rows(), W.cols());
  const MatD Wq = tr::cbq_quantized_weight_dense(q, r.codes);
  int off_grid = 0, not_floor_or_ceil = 0;
  for (Eigen::Index i = 0; i < W.rows(); ++i)
    for (Eigen::Index j = 0; j < W.cols(); ++j) {
      const double s = sym_scale(W, i, o.bits);
      CHECK(r.scales(i, 0) == doctest::Approx(s).epsilon(1e-15));
      const double f = std::floor(W(i, j) / r.scales(i, 0));
      Wr(i, j) = r.scales(i, 0) * std::clamp(std::nearbyint(W(i, j) / r.scales(i, 0)), double(r.qmin), double(r.qmax));
      const int c = r.codes(i, j);
      if (c < r.qmin || c > r.qmax || Wq(i, j) != r.scales(i, 0) * double(c)) ++off_grid;
      const double lo = std::clamp(f, double(r.qmin), double(r.qmax)), hi = std::clamp(f + 1, double(r.qmin), double(r.qmax));
      if (double(c) != lo && double(c) != hi) ++not_floor_or_ceil;
      Wc(i, j) = Wq(i, j);
    }
  CHECK(off_grid == 0);
  CHECK(not_floor_or_ceil == 0);
  const double n = double(X.rows());
  const double err_rtn = (X * (W - Wr).transpose()).squaredNorm() / n;
  const double err_cbq = (X * (W - Wc).transpose()).squaredNorm() / n;
  std::printf("cbq %d-bit, 16x32, r=8, 600 steps: ||X(W-What)^T||^2/n  rtn %.6f  cbq %.6f  (ratio %.3f, %td flips; "
              "returned %.6f / %.6f)\n",
              bits, err_rtn, err_cbq, err_cbq / err_rtn, r.flips, r.error, r.rtn_error);
  CHECK(r.error == doctest::Approx(err_cbq).epsilon(1e-10));
  CHECK(r.rtn_error == doctest::Approx(err_rtn).epsilon(1e-10));
  CHECK(err_cbq < 0.8 * err_rtn);
  // the optimisation, not the init, makes the difference: the init alone (0 steps) is no better than 0.8·RTN
  auto o0 = o;
  o0.steps = 0;
  const auto r0 = tr::cbq_reconstruct<double>(deltaw::view(W), deltaw::view(X), o0);
  std::printf("cbq %d-bit init only (0 steps): error %.6f, %td flips vs RTN\n", bits, r0.error, r0.flips);
  CHECK(r.error < r0.error);
  // reproducible from the seed: the same codes and error bit for bit
  const auto r2 = tr::cbq_reconstruct<double>(deltaw::view(W), deltaw::view(X), o);
  CHECK((r2.codes.array() == r.codes.array()).all());
  CHECK(r2.error == r.error);
  CHECK((r2.A1.array() == r.A1.array()).all());
  }
}

TEST_CASE("cbq: bad inputs give specific errors; a zero channel stays zero without NaN") {
  const MatD W = uniform(4, 6, 31), X = uniform(8, 6, 32), Xbad = uniform(8, 5, 33);
  for (int b : {1, 17})
    throws_with<deltaw::argument_error>([&] { tr::cbq_quantizer<double>(deltaw::view(W), {b, true}); },
                                        "bits must lie in [2, 16]; got " + std::to_string(b));
  tr::cbq_reconstruct_options o;
  o.steps = 5;
  o.rank = 0;
  throws_with<deltaw::rank_error>([&] { tr::cbq_reconstruct<double>(deltaw::view(W), deltaw::view(X), o); },
                                  "rank must lie in [1, min(out, in)] = [1, 4]; got 0");
  o.rank = 5;
  throws_with<deltaw::rank_error>([&] { tr::cbq_reconstruct<double>(deltaw::view(W), deltaw::view(X), o); },
                                  "got 5");
  o.rank = 2;
  MatD Wn = W;
  Wn(3, 4) = std::nan("");
  throws_with<deltaw::non_finite_error>([&] { tr::cbq_quantizer<double>(deltaw::view(Wn)); }, "W(3, 4) is not finite");
  throws_with<deltaw::shape_error>([&] { tr::cbq_reconstruct<double>(deltaw::view(W), deltaw::view(Xbad), o); },
                                   "X is [8, 5] but W is [4, 6]");
  const tr::cbq_quantizer<double> q(deltaw::view(W));
  P A1("A1", uniform(4, 2, 34)), A2("A2", uniform(2, 6, 35));
  {
    ag::tape<double> t;
    throws_with<deltaw::argument_error>(
        [&] { tr::cbq_rounding_regularizer(t.param(A1), t.param(A2), q, 0.5); }, "beta must be finite and ≥ 1");
    throws_with<deltaw::shape_error>([&] { tr::cbq_linear(t.frozen(Xbad), t.param(A1), t.param(A2), q); },
                                     "cbq_linear: X is [8, 5] but W is [4, 6]");
    P A2bad("A2bad", uniform(3, 6, 36));
    throws_with<deltaw::shape_error>([&] { tr::cbq_linear(t.frozen(X), t.param(A1), t.param(A2bad), q); },
                                     "A1 is [4, 2] and A2 is [3, 6]");
  }
  // zero channel: scale reported as 1, codes 0, Ŵ row 0, everything finite
  MatD Wz = W;
  Wz.row(1).setZero();
  for (bool sym : {true, false}) {
    o.symmetric = sym;
    o.steps = 20;
    const auto r = tr::cbq_reconstruct<double>(deltaw::view(Wz), deltaw::view(X), o);
    CHECK(r.scales(1, 0) == 1.0);
    CHECK((r.codes.row(1).array() == std::int32_t(r.zero_points(1, 0))).all());
    CHECK(r.zero_points(1, 0) == 0.0);
    CHECK(std::isfinite(r.error));
    CHECK(r.A1.allFinite());
    CHECK(r.A2.allFinite());
    const tr::cbq_quantizer<double> qz(deltaw::view(Wz), {4, sym});
    CHECK(tr::cbq_quantized_weight_dense(qz, r.codes).row(1).norm() == 0.0);
  }
}
