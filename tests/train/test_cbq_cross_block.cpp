// CBQ completed (train/cbq_cross_block.hpp): learnable step sizes and cross-block windows.
// The op's gradients w.r.t. the step parameter and the rounding factors against central
// differences (the frozen-base estimator on the op itself; the LSQ straight-through
// estimator against central differences of its surrogate, the fraction held fixed, written
// out here), the window objective of a 3-block GELU/residual stack against a dense double
// recomputation and its gradient by central differences, the sliding windows, learned steps
// beating fixed steps on a seeded problem (errors recomputed here from the returned codes and
// steps), and the errors for bad options. Double throughout.
#include <deltaw/autograd/gradcheck.hpp>
#include <deltaw/train/cbq_cross_block.hpp>
#include "../test_util.hpp"
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace cbq_cross_test {

namespace ag = deltaw::autograd;
namespace tr = deltaw::train;
using Mat = deltaw::dense<double>;
using Par = ag::parameter<double>;
using deltaw::index_t;

inline Mat uniform(index_t r, index_t c, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  Mat m(r, c);
  for (index_t k = 0; k < m.size(); ++k) m.data()[k] = u(g);
  return m;
}
// The formulas, written out independently of the library.
inline double h_of(double v) { return std::min(1.0, std::max(0.0, 1.2 / (1.0 + std::exp(-v)) - 0.1)); }
inline double gelu_of(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }
inline double sym_step(const Mat& W, index_t i, int bits) {
  return W.row(i).cwiseAbs().maxCoeff() / double((1 << (bits - 1)) - 1);
}
/// Soft weight with symmetric steps s = s₀·exp(θ) (log) and base ⌊W/s⌋ (lsq) or ⌊W/s₀⌋;
/// phi (optional): the fractions held fixed (the LSQ surrogate: base = W/s − φ).
inline Mat soft_weight(const Mat& W, const Mat& V, const Mat& s, int bits, bool lsq, const Mat* phi = nullptr) {
  const double qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
  Mat Wh(W.rows(), W.cols());
  for (index_t i = 0; i < W.rows(); ++i) {
    const double s0 = sym_step(W, i, bits);
    for (index_t j = 0; j < W.cols(); ++j) {
      if (s0 == 0) {
        Wh(i, j) = 0;
        continue;
      }
      const double r = W(i, j) / s(i, 0);
      const double b = phi ? r - (*phi)(i, j) : (lsq ? std::floor(r) : std::floor(W(i, j) / s0));
      Wh(i, j) = s(i, 0) * std::clamp(b + h_of(V(i, j)), qmin, qmax);
    }
  }
  return Wh;
}
inline Mat log_steps(const Mat& W, const Mat& theta, int bits) {
  Mat s(W.rows(), 1);
  for (index_t i = 0; i < W.rows(); ++i) s(i, 0) = (sym_step(W, i, bits) == 0 ? 1.0 : sym_step(W, i, bits)) * std::exp(theta(i, 0));
  return s;
}

// A 3-block stack: 8 → 12 (GELU, bias), 12 → 12 (GELU, residual, bias), 12 → 6 (linear).
struct stack_data {
  Mat W0 = uniform(12, 8, 401), W1 = 0.6 * uniform(12, 12, 402), W2 = uniform(6, 12, 403);
  Mat b0 = uniform(1, 12, 404, 0.2), b1 = uniform(1, 12, 405, 0.2);
  std::vector<tr::cbq_block<double>> blocks() const {
    return {{deltaw::view(W0), b0, tr::cbq_activation::gelu, false},
            {deltaw::view(W1), b1, tr::cbq_activation::gelu, true},
            {deltaw::view(W2), Mat(), tr::cbq_activation::none, false}};
  }
  const Mat& W(index_t l) const { return l == 0 ? W0 : (l == 1 ? W1 : W2); }
};
/// The stack's blocks [first, last] in dense double with the given per-layer weights.
inline Mat dense_forward(const stack_data& d, const std::vector<Mat>& Wq, const Mat& x, index_t first, index_t last) {
  Mat h = x;
  for (index_t l = first; l <= last; ++l) {
    Mat y = h * Wq[std::size_t(l)].transpose();
    if (l == 0) y.rowwise() += d.b0.row(0);
    if (l == 1) y.rowwise() += d.b1.row(0);
    if (l < 2) y = y.unaryExpr([](double v) { return gelu_of(v); });
    if (l == 1) y += h;
    h = y;
  }
  return h;
}

/// The window tests' options: 3 bits, rank 3, two initialisation iterations.
inline tr::cbq_cross_block_options window_options(tr::cbq_step_grad grad) {
  tr::cbq_cross_block_options o;
  o.bits = 3;
  o.rank = 3;
  o.step.grad = grad;
  o.init_iters = 2;
  return o;
}
/// Random A1, A2 (scale 0.3) and steps (0.08) for the three blocks of st; seeds seed + l,
/// seed + 10 + l, seed + 20 + l.
inline void randomize_blocks(tr::cbq_stack<double>& st, std::uint64_t seed) {
  for (index_t l = 0; l < 3; ++l) {
    const auto& q = st.quantizer(l);
    st.A1(l).value() = uniform(q.rows(), 3, seed + std::uint64_t(l), 0.3);
    st.A2(l).value() = uniform(3, q.cols(), seed + 10 + std::uint64_t(l), 0.3);
    st.step_parameter(l).value() = uniform(q.rows(), 1, seed + 20 + std::uint64_t(l), 0.08);
  }
}
}  // namespace cbq_cross_test

TEST_CASE("cbq cross-block: cbq_linear_lsq gradients w.r.t. steps and rounding factors by central differences") {
  namespace ct = cbq_cross_test;
  namespace ag = deltaw::autograd;
  namespace tr = deltaw::train;
  using ct::Mat;
  using deltaw::index_t;
  // 3 bits, row 2 zero (degenerate); A's entries in (−0.3, 0.3), r = 3, so |V| < 0.27: h is
  // smooth and never 0 or 1, so b + h crosses no integer under a 1e-6 perturbation.
  Mat W = ct::uniform(7, 10, 411);
  W.row(2).setZero();
  for (bool sym : {true, false})
    for (auto grad : {tr::cbq_step_grad::frozen_base, tr::cbq_step_grad::lsq})
      for (auto param : {tr::cbq_step_param::log, tr::cbq_step_param::clamped}) {
        const tr::cbq_quantizer<double> q(deltaw::view(W), {3, sym});
        tr::cbq_step_options so;
        so.grad = grad;
        so.param = param;
        // θ away from the init so that no W/s sits on an integer (the max-abs entry does at s₀)
        Mat th0 = tr::cbq_step_init(q, so) + ct::uniform(7, 1, 412, 0.08);
        ct::Par A1("A1", ct::uniform(7, 3, 413, 0.3)), A2("A2", ct::uniform(3, 10, 414, 0.3)),
            X("X", ct::uniform(5, 10, 415)), TH("theta", th0);
        const Mat R = ct::uniform(5, 7, 416);
        auto loss = [&](ag::tape<double>& t) {
          return ag::weighted_sum(tr::cbq_linear_lsq(t.param(X), t.param(A1), t.param(A2), t.param(TH), q, so, 3), R);
        };
        // value: X·Ŵᵀ with Ŵ from the formula (symmetric, log: the reference helpers above)
        const Mat s = tr::cbq_steps(q, TH.value(), so);
        if (sym && param == tr::cbq_step_param::log) {
          const Mat sref = ct::log_steps(W, TH.value(), 3);
          CHECK((s - sref).cwiseAbs().maxCoeff() < 1e-15);
          const Mat Wh = ct::soft_weight(W, A1.value() * A2.value(), sref, 3, grad == tr::cbq_step_grad::lsq);
          ag::tape<double> t;
          auto y = tr::cbq_linear_lsq(t.param(X), t.param(A1), t.param(A2), t.param(TH), q, so, 3);
          CHECK((Mat(y.value()) - X.value() * Wh.transpose()).cwiseAbs().maxCoeff() < 1e-13);
        }
        const std::string tag = std::string(sym ? "sym " : "asym") +
                                (grad == tr::cbq_step_grad::lsq ? " lsq   " : " frozen") +
                                (param == tr::cbq_step_param::log ? " log" : " clamped");
        if (grad == tr::cbq_step_grad::frozen_base) {
          // the objective is differentiable in θ: central differences of the op itself
          const auto rep = ag::gradcheck(loss, {&X, &A1, &A2, &TH});
          std::printf("gradcheck cbq_linear_lsq %s: entries %3td max rel err %.2e (%s)\n", tag.c_str(), rep.entries,
                      rep.max_rel_error, rep.worst.c_str());
          CHECK(rep.max_rel_error < 1e-6);
          CHECK(rep.min_grad_norm > 0);
        } else {
          // A₁, A₂, X: the floor does not depend on them, central differences of the op
          const auto rep = ag::gradcheck(loss, {&X, &A1, &A2});
          CHECK(rep.max_rel_error < 1e-6);
          CHECK(rep.min_grad_norm > 0);
          // θ: the STE gradient is the derivative of the surrogate with the fraction φ fixed;
          // central differences of that surrogate, recomputed here in dense double.
          const Mat s0v = tr::cbq_steps(q, TH.value(), so);
          Mat phi(W.rows(), W.cols());
          for (index_t i = 0; i < W.rows(); ++i)
            for (index_t j = 0; j < W.cols(); ++j) {
              const double r = W(i, j) / s0v(i, 0);
              phi(i, j) = r - std::floor(r);
            }
          const Mat V = A1.value() * A2.value();
          auto surrogate = [&](const Mat& th) {
            const Mat sv = tr::cbq_steps(q, th, so);
            Mat Wh(W.rows(), W.cols());
            for (index_t i = 0; i < W.rows(); ++i)
              for (index_t j = 0; j < W.cols(); ++j) {
                const double z = q.zero_points()(i, 0);
                const double u = W(i, j) / sv(i, 0) - phi(i, j) + z + ct::h_of(V(i, j));
                Wh(i, j) = q.degenerate(i) ? 0.0 : sv(i, 0) * (std::clamp(u, double(q.qmin()), double(q.qmax())) - z);
              }
            return (X.value() * Wh.transpose()).cwiseProduct(R).sum();
          };
          Mat num(7, 1);
          for (index_t i = 0; i < 7; ++i) {
            Mat tp = TH.value(), tm = TH.value();
            tp(i, 0) += 1e-6;
            tm(i, 0) -= 1e-6;
            num(i, 0) = (surrogate(tp) - surrogate(tm)) / 2e-6;
          }
          // the surrogate equals the op's value at θ
          {
            ag::tape<double> t;
            CHECK(loss(t).value()(0, 0) == doctest::Approx(surrogate(TH.value())).epsilon(1e-12));
          }
          const double err = (TH.grad() - num).norm() / num.norm();
          std::printf("gradcheck cbq_linear_lsq %s: theta vs surrogate  max rel err %.2e; dA max rel err %.2e\n",
                      tag.c_str(), err, rep.max_rel_error);
          CHECK(num.norm() > 0);
          CHECK(err < 1e-6);
        }
        CHECK(TH.grad()(2, 0) == 0.0);  // the zero channel's step gets no gradient
        CHECK(A1.grad().row(2).norm() == 0.0);
      }
}

TEST_CASE("cbq cross-block: the window objective against a dense double recomputation; its gradient; windows") {
  namespace ct = cbq_cross_test;
  namespace ag = deltaw::autograd;
  namespace tr = deltaw::train;
  using ct::Mat;
  using deltaw::index_t;
  const ct::stack_data d;
  for (auto grad : {tr::cbq_step_grad::frozen_base, tr::cbq_step_grad::lsq}) {
    auto o = ct::window_options(grad);
    o.lambda = 0.05;
    tr::cbq_stack<double> st(d.blocks(), o);
    REQUIRE(st.size() == 3);
    ct::randomize_blocks(st, 420);
    const Mat x = ct::uniform(9, 8, 450), x1 = ct::uniform(9, 12, 451);
    const Mat y01 = ct::uniform(9, 12, 452), y12 = ct::uniform(9, 6, 453);
    const bool lsq = grad == tr::cbq_step_grad::lsq;
    // dense recomputation
    std::vector<Mat> Wq;
    for (index_t l = 0; l < 3; ++l)
      Wq.push_back(ct::soft_weight(d.W(l), st.A1(l).value() * st.A2(l).value(),
                                   ct::log_steps(d.W(l), st.step_parameter(l).value(), 3), 3, lsq));
    auto reg_ref = [&](index_t l, double beta) {
      const Mat V = st.A1(l).value() * st.A2(l).value();
      double acc = 0;
      for (index_t k = 0; k < V.size(); ++k) acc += 1 - std::pow(std::abs(2 * ct::h_of(V.data()[k]) - 1), beta);
      return acc;
    };
    for (double beta : {0.0, 3.0}) {
      const double ref01 = (ct::dense_forward(d, Wq, x, 0, 1) - y01).squaredNorm() / 9.0 +
                           (beta > 0 ? o.lambda * (reg_ref(0, beta) + reg_ref(1, beta)) : 0.0);
      const double ref12 = (ct::dense_forward(d, Wq, x1, 1, 2) - y12).squaredNorm() / 9.0 +
                           (beta > 0 ? o.lambda * (reg_ref(1, beta) + reg_ref(2, beta)) : 0.0);
      ag::tape<double> t;
      const double v01 = st.window_objective(t, x, y01, 0, 1, beta).value()(0, 0);
      const double v12 = st.window_objective(t, x1, y12, 1, 2, beta).value()(0, 0);
      std::printf("cbq window objective (%s, beta %.0f): [0,1] %.12f vs dense %.12f; [1,2] %.12f vs dense %.12f\n",
                  lsq ? "lsq" : "frozen", beta, v01, ref01, v12, ref12);
      CHECK(v01 == doctest::Approx(ref01).epsilon(1e-12));
      CHECK(v12 == doctest::Approx(ref12).epsilon(1e-12));
    }
    // dense forwards of the stack: full precision and hard against the formulas
    {
      std::vector<Mat> Wfp{d.W0, d.W1, d.W2};
      CHECK((st.forward_full_precision(x, 0, 2) - ct::dense_forward(d, Wfp, x, 0, 2)).cwiseAbs().maxCoeff() < 1e-13);
      std::vector<Mat> Wh;
      for (index_t l = 0; l < 3; ++l) {
        const auto c = st.codes_dense(l);
        const Mat s = st.steps(l);
        Wh.push_back(Mat(c.cast<double>().array().colwise() * s.col(0).array()));
      }
      CHECK((st.forward_hard(x, 0, 2) - ct::dense_forward(d, Wh, x, 0, 2)).cwiseAbs().maxCoeff() < 1e-13);
      CHECK((st.forward_hard(x, 0, -1) - x).norm() == 0.0);  // an empty span is the identity
    }
    // gradient of the window objective over both layers' factors and steps (frozen base;
    // with lsq, the factors only: the floor moves with s)
    std::vector<ct::Par*> ps{&st.A1(0), &st.A2(0), &st.A1(1), &st.A2(1)};
    if (!lsq) {
      ps.push_back(&st.step_parameter(0));
      ps.push_back(&st.step_parameter(1));
    }
    for (index_t l = 0; l < 3; ++l) {
      st.A1(l).zero_grad();
      st.step_parameter(l).zero_grad();
    }
    auto obj = [&](ag::tape<double>& t) { return st.window_objective(t, x, y01, 0, 1, 3.0); };
    const auto rep = ag::gradcheck(obj, ps);
    std::printf("gradcheck cbq window [0,1] (%s): entries %3td max rel err %.2e (%s)\n", lsq ? "lsq" : "frozen",
                rep.entries, rep.max_rel_error, rep.worst.c_str());
    CHECK(rep.max_rel_error < 1e-6);
    CHECK(rep.min_grad_norm > 0);
    CHECK(st.A1(2).grad().norm() == 0.0);  // outside the window
    CHECK(st.step_parameter(2).grad().norm() == 0.0);
  }
  // windows
  using W = std::vector<std::pair<index_t, index_t>>;
  CHECK(tr::cbq_windows(4, 2, 1) == W{{0, 1}, {1, 2}, {2, 3}});
  CHECK(tr::cbq_windows(5, 3, 1) == W{{0, 2}, {2, 4}});
  CHECK(tr::cbq_windows(3, 2, 0) == W{{0, 1}, {2, 2}});
  CHECK(tr::cbq_windows(2, 5, 2) == W{{0, 1}});
  CHECK(tr::cbq_windows(3, 1, 0) == W{{0, 0}, {1, 1}, {2, 2}});
}

TEST_CASE("cbq cross-block: learned steps lower the error vs fixed steps; results recomputed from the codes") {
  namespace ct = cbq_cross_test;
  namespace tr = deltaw::train;
  using ct::Mat;
  using deltaw::index_t;
  const ct::stack_data d;
  // correlated calibration inputs (a common factor plus noise), as in test_cbq_rounding.cpp
  const Mat c = ct::uniform(192, 1, 460), e = ct::uniform(192, 8, 461);
  const Mat X = c.replicate(1, 8) + 0.3 * e;
  std::vector<Mat> Wfp{d.W0, d.W1, d.W2};
  const Mat Yfp = ct::dense_forward(d, Wfp, X, 0, 2);
  tr::cbq_cross_block_options o;
  o.bits = 3;
  o.rank = 4;
  o.steps = 250;
  o.lr = 2e-2;
  o.lambda = 1e-2;
  auto run = [&](std::uint64_t seed, bool learn, index_t window, index_t overlap,
                 tr::cbq_step_grad grad = tr::cbq_step_grad::frozen_base,
                 tr::cbq_window_input input = tr::cbq_window_input::quantized) {
    auto oo = o;
    oo.seed = seed;
    oo.step.learn = learn;
    oo.step.grad = grad;
    oo.input = input;
    oo.window = window;
    oo.overlap = overlap;
    const auto r = tr::cbq_reconstruct_blocks<double>(d.blocks(), deltaw::view(X), oo);
    // recompute the hard stack from the returned codes and steps
    std::vector<Mat> Wh, Wr;
    int off = 0;
    for (index_t l = 0; l < 3; ++l) {
      const auto& b = r.blocks[std::size_t(l)];
      Wh.push_back(Mat(b.codes.cast<double>().array().colwise() * b.scales.col(0).array()));
      Mat wr(d.W(l).rows(), d.W(l).cols());
      for (index_t i = 0; i < wr.rows(); ++i)
        for (index_t j = 0; j < wr.cols(); ++j) {
          const double s0 = ct::sym_step(d.W(l), i, 3), s = b.scales(i, 0);
          CHECK(b.initial_scales(i, 0) == doctest::Approx(s0).epsilon(1e-15));
          wr(i, j) = s0 * std::clamp(std::nearbyint(d.W(l)(i, j) / s0), -4.0, 3.0);
          // codes are ⌊W/s⌋ (lsq) or ⌊W/s₀⌋ (frozen base) or one more, clamped
          const double f = std::floor(d.W(l)(i, j) / (grad == tr::cbq_step_grad::lsq ? s : s0));
          const int code = b.codes(i, j);
          if (code < -4 || code > 3 || (code != std::clamp(f, -4.0, 3.0) && code != std::clamp(f + 1, -4.0, 3.0))) ++off;
        }
      Wr.push_back(wr);
      if (!learn) CHECK((b.scales - b.initial_scales).norm() == 0.0);
    }
    CHECK(off == 0);
    const double err = (ct::dense_forward(d, Wh, X, 0, 2) - Yfp).squaredNorm() / double(X.rows());
    const double rtn = (ct::dense_forward(d, Wr, X, 0, 2) - Yfp).squaredNorm() / double(X.rows());
    CHECK(r.error == doctest::Approx(err).epsilon(1e-10));
    CHECK(r.rtn_error == doctest::Approx(rtn).epsilon(1e-10));
    CHECK(r.windows == tr::cbq_windows(3, window, overlap));
    CHECK(r.window_loss_first.size() == r.windows.size());
    CHECK(r.window_loss_last.size() == r.windows.size());
    return r;
  };
  // fixed vs learned steps (frozen base, the default; and lsq) on three seeds; K = 2, overlap 1
  double sum_fixed = 0, sum_learned = 0;
  std::printf("cbq 3 blocks 8-12-12-6, 3-bit, r=4, 250 steps/window, lambda 1e-2: ||f(X)-f^(X)||^2/n (rtn at s0: %.4f)\n",
              run(1, false, 2, 1).rtn_error);
  std::printf("  seed  fixed s  learned(frozen base)  learned(lsq)  learned K=1  learned, fp inputs\n");
  for (std::uint64_t seed : {1, 2, 3}) {
    const auto fixed = run(seed, false, 2, 1);
    const auto learned = run(seed, true, 2, 1);
    const auto lsq = run(seed, true, 2, 1, tr::cbq_step_grad::lsq);
    const auto k1 = run(seed, true, 1, 0);
    const auto fpin = run(seed, true, 2, 1, tr::cbq_step_grad::frozen_base, tr::cbq_window_input::full_precision);
    std::printf("  %4d  %7.4f  %20.4f  %12.4f  %11.4f  %18.4f\n", int(seed), fixed.error, learned.error, lsq.error,
                k1.error, fpin.error);
    CHECK(fixed.error < fixed.rtn_error);
    CHECK(learned.error < fixed.error);
    for (const auto* r : {&lsq, &k1, &fpin}) CHECK(r->error < r->rtn_error);
    sum_fixed += fixed.error;
    sum_learned += learned.error;
    if (seed == 1) {  // reproducible from the seed
      const auto again = run(seed, true, 2, 1);
      for (std::size_t l = 0; l < 3; ++l) {
        CHECK((again.blocks[l].codes.array() == learned.blocks[l].codes.array()).all());
        CHECK((again.blocks[l].scales.array() == learned.blocks[l].scales.array()).all());
      }
      CHECK((learned.blocks[0].scales - learned.blocks[0].initial_scales).norm() > 0);
    }
  }
  CHECK(sum_learned < 0.6 * sum_fixed);
}

TEST_CASE("cbq cross-block: bad options and shapes give specific errors") {
  namespace ct = cbq_cross_test;
  namespace ag = deltaw::autograd;
  namespace tr = deltaw::train;
  using ct::Mat;
  using deltaw::index_t;
  const ct::stack_data d;
  const Mat X = ct::uniform(6, 8, 470);
  auto with = [&](auto f) {
    tr::cbq_cross_block_options o;
    o.steps = 2;
    f(o);
    return o;
  };
  auto rec = [&](const tr::cbq_cross_block_options& o) {
    return [&d, &X, o] { tr::cbq_reconstruct_blocks<double>(d.blocks(), deltaw::view(X), o); };
  };
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.window = 0; })), {"window must be ≥ 1; got 0"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.overlap = 2; })),
                                      {"overlap must lie in [0, window) = [0, 2); got 2"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.overlap = -1; })), {"got -1"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.bits = 1; })), {"bits must lie in [2, 16]; got 1"});
  dwt::check_throws_with<deltaw::rank_error>(rec(with([](auto& o) { o.rank = 0; })), {"rank must be ≥ 1; got 0"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.lr = 0; })), {"lr must be finite and > 0"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.step.min_ratio = 0; })),
                                      {"step.min_ratio must lie in (0, 1]"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.step.min_ratio = 2; })), {"step.min_ratio"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.step.lr_scale = 0; })),
                                      {"step.lr_scale must be finite and > 0"});
  dwt::check_throws_with<deltaw::argument_error>(rec(with([](auto& o) { o.beta_end = 0.5; })), {"the betas ≥ 1"});
  const auto ok = with([](auto&) {});
  const Mat X7 = ct::uniform(6, 7, 471);
  dwt::check_throws_with<deltaw::shape_error>(
      [&] { tr::cbq_reconstruct_blocks<double>(d.blocks(), deltaw::view(X7), ok); },
      {"cbq_reconstruct_blocks: X is [6, 7] but the first block takes 8 features"});
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { tr::cbq_reconstruct_blocks<double>(std::vector<tr::cbq_block<double>>{}, deltaw::view(X), ok); },
      {"there must be at least one block"});
  {
    auto b = d.blocks();
    std::swap(b[1], b[2]);
    b[2].residual = false;
    dwt::check_throws_with<deltaw::shape_error>([&] { (void)tr::cbq_stack<double>(b, ok); },
                                     {"block 2 has W [12, 12] but block 1 outputs 6 features"});
  }
  {
    auto b = d.blocks();
    b[0].residual = true;
    dwt::check_throws_with<deltaw::shape_error>([&] { (void)tr::cbq_stack<double>(b, ok); },
                                     {"block 0 is residual but W is [12, 8]; a residual block needs out == in"});
  }
  {
    auto b = d.blocks();
    b[1].bias = Mat::Zero(1, 5);
    dwt::check_throws_with<deltaw::shape_error>([&] { (void)tr::cbq_stack<double>(b, ok); }, {"block 1: the bias is [1, 5]; expected [1, 12]"});
  }
  // the op and the stack's objective
  tr::cbq_stack<double> st(d.blocks(), ok);
  const auto& q = st.quantizer(0);
  ag::tape<double> t;
  ct::Par th_bad("th", Mat::Zero(12, 2)), th_big("th", Mat::Constant(12, 1, 1e4));
  auto x = t.frozen(X);
  auto a1 = t.param(st.A1(0)), a2 = t.param(st.A2(0));
  dwt::check_throws_with<deltaw::shape_error>([&] { tr::cbq_linear_lsq(x, a1, a2, t.param(th_bad), q); },
                                   {"cbq_linear_lsq: the step parameter θ is [12, 2]; expected [12, 1]"});
  dwt::check_throws_with<deltaw::non_finite_error>([&] { tr::cbq_linear_lsq(x, a1, a2, t.param(th_big), q); },
                                        {"the step of channel 0 is inf"});
  dwt::check_throws_with<deltaw::argument_error>([&] { st.window_objective(t, X, Mat::Zero(6, 12), 1, 0, 0.0); },
                                      {"blocks [1, 0] are not a range of the 3 blocks"});
  dwt::check_throws_with<deltaw::argument_error>([&] { st.window_objective(t, X, Mat::Zero(6, 12), 0, 3, 0.0); },
                                      {"blocks [0, 3] are not a range of the 3 blocks"});
  dwt::check_throws_with<deltaw::shape_error>([&] { st.window_objective(t, X, Mat::Zero(6, 6), 0, 1, 0.0); },
                                   {"x is [6, 8] and y is [6, 6]; expected [n ≥ 1, 8] and [n, 12]"});
  dwt::check_throws_with<deltaw::argument_error>([&] { st.window_objective(t, X, Mat::Zero(6, 12), 0, 1, 0.5); },
                                      {"beta must be 0 (off) or ≥ 1; got 0.5"});
  dwt::check_throws_with<deltaw::shape_error>([&] { (void)st.forward_hard(Mat::Zero(6, 12), 0, 1); },
                                   {"forward_hard: x is [6, 12] but block 0 takes 8 features"});
}

TEST_CASE("cbq cross-block: the KL term of the window objective and CFP's outlier truncation") {
  namespace ct = cbq_cross_test;
  namespace ag = deltaw::autograd;
  namespace tr = deltaw::train;
  using ct::Mat;
  using deltaw::index_t;
  const ct::stack_data d;
  // KL term: the objective with κ, τ minus the objective without is κ·τ²·mean KL of the
  // row softmaxes of the window's output and its target, the output recomputed densely.
  const auto o = ct::window_options(tr::cbq_step_grad::frozen_base);
  tr::cbq_cross_block_options ok = o;
  ok.kl_weight = 0.5;
  ok.kl_temperature = 2.0;
  tr::cbq_stack<double> plain(d.blocks(), o), kl(d.blocks(), ok);
  for (auto* st : {&plain, &kl}) ct::randomize_blocks(*st, 520);
  const Mat x = ct::uniform(9, 8, 550), y = ct::uniform(9, 12, 552);
  std::vector<Mat> Wq;
  for (index_t l = 0; l < 3; ++l)
    Wq.push_back(ct::soft_weight(d.W(l), kl.A1(l).value() * kl.A2(l).value(),
                                 ct::log_steps(d.W(l), kl.step_parameter(l).value(), 3), 3, false));
  const Mat h = ct::dense_forward(d, Wq, x, 0, 1);
  double kl_ref = 0;
  for (index_t i = 0; i < h.rows(); ++i) {
    const Eigen::RowVectorXd p = (y.row(i) / 2.0).array().exp() / (y.row(i) / 2.0).array().exp().sum();
    const Eigen::RowVectorXd q = (h.row(i) / 2.0).array().exp() / (h.row(i) / 2.0).array().exp().sum();
    kl_ref += (p.array() * (p.array().log() - q.array().log())).sum();
  }
  kl_ref *= 4.0 / double(h.rows());  // τ² / n
  {
    ag::tape<double> t;
    const double with = kl.window_objective(t, x, y, 0, 1, 3.0).value()(0, 0);
    const double without = plain.window_objective(t, x, y, 0, 1, 3.0).value()(0, 0);
    std::printf("cbq window objective KL term: %.12f vs formula %.12f\n", with - without, 0.5 * kl_ref);
    CHECK(with - without == doctest::Approx(0.5 * kl_ref).epsilon(1e-10));
  }
  std::vector<ct::Par*> ps{&kl.A1(0), &kl.A2(0), &kl.step_parameter(0), &kl.A1(1), &kl.A2(1), &kl.step_parameter(1)};
  const auto rep = ag::gradcheck([&](ag::tape<double>& t) { return kl.window_objective(t, x, y, 0, 1, 3.0); }, ps);
  std::printf("gradcheck cbq window with KL: entries %3td max rel err %.2e (%s)\n", rep.entries, rep.max_rel_error,
              rep.worst.c_str());
  CHECK(rep.max_rel_error < 1e-6);
  CHECK(rep.min_grad_norm > 0);

  // CFP on a weight with known outliers. Row 0: magnitudes 0.1 … 1.0 and two outliers 8, −9
  // (coarse bound Q3 + 1.5·IQR = 1.75; the two-means split keeps 0.1 … 1.0): both become
  // ±1.0. Row 1: 0.1 … 1.2 evenly, no candidate: unchanged. Row 2: 0.1 … 1.1 and 3: 3 → 1.1.
  Mat W(3, 12);
  for (index_t j = 0; j < 10; ++j) W(0, j) = (j % 2 ? -1.0 : 1.0) * 0.1 * double(j + 1);
  W(0, 10) = 8.0;
  W(0, 11) = -9.0;
  for (index_t j = 0; j < 12; ++j) W(1, j) = (j % 3 ? 1.0 : -1.0) * 0.1 * double(j + 1);
  for (index_t j = 0; j < 11; ++j) W(2, j) = (j % 2 ? 1.0 : -1.0) * 0.1 * double(j + 1);
  W(2, 11) = 3.0;
  Mat expect = W;
  expect(0, 10) = 1.0;
  expect(0, 11) = -1.0;
  expect(2, 11) = 1.1;
  const Mat Wt = tr::cbq_cfp_truncate(deltaw::matrix_view<const double>(deltaw::view(W)));
  CHECK((Wt - expect).cwiseAbs().maxCoeff() < 1e-15);
  dwt::check_throws_with<deltaw::argument_error>([&] { (void)tr::cbq_cfp_truncate(deltaw::matrix_view<const double>(deltaw::view(W)), 0.0); },
                                                 {"IQR factor must be finite and > 0"});

  // In a stack: the quantiser sees the truncated weight (smaller scales where a channel had
  // outliers), the full-precision target does not.
  tr::cbq_cross_block_options oc = o;
  oc.cfp = true;
  oc.cfp_iqr_factor = 0.5;
  tr::cbq_stack<double> with_cfp(d.blocks(), oc);
  bool smaller = false;
  for (index_t l = 0; l < 3; ++l) {
    const Mat Wl = tr::cbq_cfp_truncate(deltaw::matrix_view<const double>(deltaw::view(d.W(l))), 0.5);
    const tr::cbq_quantizer<double> ref(deltaw::view(Wl), {3, true});
    CHECK((with_cfp.quantizer(l).scales() - ref.scales()).cwiseAbs().maxCoeff() == 0.0);
    CHECK((with_cfp.quantizer(l).scales().array() <= plain.quantizer(l).scales().array()).all());
    smaller = smaller || (with_cfp.quantizer(l).scales().array() < plain.quantizer(l).scales().array()).any();
  }
  CHECK(smaller);  // the stack's weights have channels that CFP truncates at k = 0.5
  CHECK((with_cfp.forward_full_precision(x, 0, 2) - plain.forward_full_precision(x, 0, 2)).norm() == 0.0);
  oc.cfp_iqr_factor = -1;
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::cbq_stack<double> bad(d.blocks(), oc); },
                                                 {"cfp_iqr_factor must be finite and > 0"});
}
