// LaMDA's gradual freezing (train/lamda.hpp) and IncreLoRA's rank growth
// (train/increlora.hpp): frozen columns observed bit for bit over a run, the score against
// the dense formula (without copying or stacking the batches), the output at the moment
// of growth, the optimiser moments kept across growth, the budget over many events.
#include <deltaw/train/increlora.hpp>
#include <deltaw/train/lamda.hpp>
#include <deltaw/train/loop.hpp>

#include <functional>
#include <memory>
#include <vector>

#include "../alloc_counter.hpp"
#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace op = deltaw::optim;
namespace tr = deltaw::train;
using deltaw::index_t;
using dwt::MatF;

namespace {
struct watcher : tr::method<double> {
  std::function<void(const tr::step_context&)> f;
  std::string name() const override { return "watch"; }
  void after_step(const tr::step_context& c) override { f(c); }
};
}  // namespace

TEST_CASE("LaMDA schedule: non-decreasing, none frozen before start, all but min_trainable from end on") {
  for (auto shape : {tr::lamda_shape::geometric, tr::lamda_shape::linear, tr::lamda_shape::cubic}) {
    tr::lamda_options o;
    o.shape = shape;
    o.start = 0.2;
    o.end = 0.7;
    for (index_t r : {1, 4, 8, 16}) {
      index_t prev = 0, changes = 0;
      for (index_t d = 0; d <= 100; ++d) {
        const index_t k = tr::lamda_frozen_count(o, r, d, 100);
        CHECK(k >= prev);
        if (d < 20) CHECK(k == 0);
        if (d >= 70) CHECK(k == r);
        changes += k != prev ? 1 : 0;
        prev = k;
      }
      if (r >= 8) CHECK(changes >= 3);  // gradual, not one jump
    }
    o.min_trainable = 3;
    CHECK(tr::lamda_frozen_count(o, 8, 100, 100) == 5);
  }
}

TEST_CASE("LaMDA adapter: gradients of B, R and x match central differences; A gets none") {
  const MatD W = dwt::random<MatD>(6, 5, 1);
  std::mt19937_64 g(2);
  tr::lamda_adapter<double> a("q", deltaw::view(W), 3, 6.0, g);
  a.B().value() = dwt::random<MatD>(6, 3, 3);
  a.R().value() = dwt::random<MatD>(3, 3, 4);
  auto x = param("x", 4, 5, 5);
  check("lamda_adapter", [&](ag::tape<double>& t) { return a.forward(t.param(*x)); }, {&a.B(), &a.R(), x.get()}, 6);
  CHECK(a.A().grad().norm() == 0.0);
  // The output against the dense W + s·B·R·A.
  ag::tape<double> t;
  const MatD X = x->value();
  const MatD y = a.forward(t.frozen(X)).value();
  const MatD Wd = W + 2.0 * a.B().value() * a.R().value() * a.A().value();
  CHECK(dwt::rel_err(y, MatD(X * Wd.transpose())) < 1e-14);
}

TEST_CASE("LaMDA in fit: a frozen column of B never changes again, the others and R change every step") {
  const index_t out = 10, in = 12, r = 6, tokens = 24, steps = 60;
  const MatD W = dwt::random<MatD>(out, in, 11), X = dwt::random<MatD>(tokens, in, 12);
  const MatD target = X * (W + 0.5 * dwt::random<MatD>(out, in, 13)).transpose();
  std::mt19937_64 g(14);
  tr::lamda_adapter<double> a("proj", deltaw::view(W), r, 12.0, g);
  const MatD A0 = a.A().value();
  // Decoupled weight decay and momentum: both would move a column whose gradient is merely zeroed.
  op::adamw<double> opt(a.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.1});
  tr::lamda<double> freeze;  // geometric, rate 0.3, complete at 80% of the steps
  freeze.add(a);
  std::vector<MatD> Bs, Rs;
  watcher w;
  w.f = [&](const tr::step_context&) {
    Bs.push_back(a.B().value());
    Rs.push_back(a.R().value());
  };
  tr::fit_options fo;
  fo.steps = steps;
  fo.log_every = 0;
  const auto res = tr::fit<double>(
      [&](ag::tape<double>& t, index_t) { return ag::mse(a.forward(t.frozen(X)), t.frozen(target)); }, opt,
      {&freeze, &w}, fo);
  REQUIRE(index_t(Bs.size()) == steps);
  index_t distinct_events = 0, last = -1;
  for (index_t c = 0; c < r; ++c) {
    const index_t f = freeze.freeze_step(0, c);  // steps taken when it froze
    REQUIRE(f >= 1);
    REQUIRE(f <= steps);
    if (f != last) ++distinct_events;
    last = f;
    // Bs[k] is B after k + 1 steps: from Bs[f − 1] on the column is bit-identical.
    for (index_t k = f; k < steps; ++k) CHECK((Bs[std::size_t(k)].col(c).array() == Bs[std::size_t(f - 1)].col(c).array()).all());
    // Before it froze, every step changed it.
    for (index_t k = 1; k < f; ++k) CHECK((Bs[std::size_t(k)].col(c).array() != Bs[std::size_t(k - 1)].col(c).array()).any());
  }
  CHECK(distinct_events >= 4);  // gradual
  for (index_t k = 1; k < steps; ++k) CHECK((Rs[std::size_t(k)].array() != Rs[std::size_t(k - 1)].array()).any());
  CHECK(a.A().value() == A0);
  CHECK_FALSE(a.B().trainable());
  CHECK(a.R().trainable());
  CHECK(res.final_loss < 0.5 * res.first_loss);
  std::printf("LaMDA fit: loss %.4f -> %.4f, B columns froze after steps", res.first_loss, res.final_loss);
  for (index_t c = 0; c < r; ++c) std::printf(" %td", freeze.freeze_step(0, c));
  std::printf("\n");
}

TEST_CASE("IncreLoRA adapter: gradients of B, e, A and x match central differences; output matches dense") {
  const MatD W = dwt::random<MatD>(7, 5, 21);
  tr::increlora_adapter<double> a("v", deltaw::view(W), 3, 4.0, 22);
  a.e().value() = dwt::random<MatD>(1, 3, 23);
  auto x = param("x", 4, 5, 24);
  check("increlora_adapter", [&](ag::tape<double>& t) { return a.forward(t.param(*x)); }, {&a.B(), &a.e(), &a.A(), x.get()},
        25);
  ag::tape<double> t;
  const MatD X = x->value();
  const MatD y = a.forward(t.frozen(X)).value();
  const MatD Wd = W + a.scale() * a.B().value() * a.e().value().row(0).asDiagonal() * a.A().value();
  CHECK(a.scale() == 4.0 / 3.0);
  CHECK(dwt::rel_err(y, MatD(X * Wd.transpose())) < 1e-14);
}

TEST_CASE("IncreLoRA score: equals Σ|ΔW ⊙ ∂L/∂ΔW|/√numel with ΔW and ∂L/∂ΔW formed densely") {
  const index_t out = 7, in = 9;
  const MatD W = dwt::random<MatD>(out, in, 31);
  tr::increlora_adapter<double> a("o", deltaw::view(W), 4, 8.0, 32);
  a.e().value() = dwt::random<MatD>(1, 4, 33);
  const MatD X1 = dwt::random<MatD>(5, in, 34), X2 = dwt::random<MatD>(3, in, 35);
  const MatD C1 = dwt::random<MatD>(5, out, 36), C2 = dwt::random<MatD>(3, out, 37);
  const MatD dW = a.scale() * a.B().value() * a.e().value().row(0).asDiagonal() * a.A().value();
  auto dense_score = [&](const MatD& G) { return dW.cwiseProduct(G).cwiseAbs().sum() / std::sqrt(double(out * in)); };
  for (index_t chunk : {1, 3, 64}) {
    // One call: L = Σ y ⊙ C, so ∂L/∂ΔW = Cᵀ·X.
    a.set_capturing(true);
    {
      ag::tape<double> t;
      t.backward(ag::weighted_sum(a.forward(t.frozen(X1)), C1));
    }
    a.set_capturing(false);
    const double s1 = a.take_score(chunk);
    CHECK(std::abs(s1 - dense_score(C1.transpose() * X1)) < 1e-13 * s1);
    // Two calls on one tape (a shared module): ∂L/∂ΔW = C1ᵀ·X1 + C2ᵀ·X2.
    a.set_capturing(true);
    {
      ag::tape<double> t;
      auto l = ag::add(ag::weighted_sum(a.forward(t.frozen(X1)), C1), ag::weighted_sum(a.forward(t.frozen(X2)), C2));
      t.backward(l);
    }
    a.set_capturing(false);
    const MatD G2 = C1.transpose() * X1 + C2.transpose() * X2;
    const double s2 = a.take_score(chunk);
    CHECK(std::abs(s2 - dense_score(G2)) < 1e-13 * s2);
    CHECK(s2 > 0);
  }
  for (auto* p : a.parameters()) p->zero_grad();
}

TEST_CASE("IncreLoRA growth: new components start at zero contribution, the output is unchanged, s = α/r") {
  const MatD W = dwt::random<MatD>(8, 6, 41), X = dwt::random<MatD>(5, 6, 42);
  tr::increlora_adapter<double> a("k", deltaw::view(W), 2, 16.0, 43, 2);
  a.e().value() = dwt::random<MatD>(1, 2, 44);
  auto out = [&] {
    ag::tape<double> t;
    ag::no_grad<double> ng(t);
    return MatD(a.forward(t.frozen(X)).value());
  };
  auto delta = [&] {
    return MatD(a.scale() * a.B().value() * a.e().value().row(0).asDiagonal() * a.A().value());
  };
  const MatD y0 = out(), d0 = delta();
  const MatD B0 = a.B().value(), A0 = a.A().value(), rA = a.reserve_A(), rB = a.reserve_B();
  a.grow(3);  // more than the reserve of 2: one is drawn on demand
  CHECK(a.rank() == 5);
  CHECK(a.scale() == 16.0 / 5.0);
  CHECK(dwt::rel_err(out(), y0) < 1e-14);
  CHECK(dwt::rel_err(delta(), d0) < 1e-14);
  CHECK(a.e().value().rightCols(3).cwiseAbs().maxCoeff() == 0.0);
  CHECK(a.B().value().leftCols(2) == B0);
  CHECK(a.A().value().topRows(2) == A0);
  CHECK(a.A().value().middleRows(2, 2) == rA);  // the reserve came first
  CHECK(a.B().value().middleCols(2, 2) == rB);
  CHECK(a.A().value().row(4).norm() > 0);
  CHECK(a.B().value().col(4).norm() > 0);
  CHECK(a.reserve_A().rows() == 2);
  CHECK(a.e().grad().cols() == 5);
  // A new component learns at once: ∂L/∂e of it is not zero (its A and B are not).
  ag::tape<double> t;
  t.backward(ag::weighted_sum(a.forward(t.frozen(X)), dwt::random<MatD>(5, 8, 45)));
  CHECK(a.e().grad().rightCols(3).cwiseAbs().minCoeff() > 0);
}

TEST_CASE("IncreLoRA in fit: total rank never exceeds the budget over many growth events; it reaches it") {
  const int n = 5;
  const index_t out = 8, in = 10, tokens = 20, budget = 25;
  std::vector<MatD> W, X;
  std::vector<std::unique_ptr<tr::increlora_adapter<double>>> ad;
  std::vector<P*> params;
  MatD target = MatD::Zero(tokens, out);
  for (int i = 0; i < n; ++i) {
    W.push_back(dwt::random<MatD>(out, in, 50 + std::uint64_t(i)));
    X.push_back(dwt::random<MatD>(tokens, in, 60 + std::uint64_t(i)));
    target += X.back() * (W.back() + 0.3 * double(i + 1) * dwt::random<MatD>(out, in, 70 + std::uint64_t(i))).transpose();
  }
  for (int i = 0; i < n; ++i) {
    ad.push_back(std::make_unique<tr::increlora_adapter<double>>("m" + std::to_string(i), deltaw::view(W[std::size_t(i)]),
                                                                  1, 2.0, 80 + std::uint64_t(i)));
    for (auto* p : ad.back()->parameters()) params.push_back(p);
  }
  op::adamw<double> opt(params, {1e-2, 0.9, 0.999, 1e-8, 0.0});
  tr::increlora_options o;
  o.budget = budget;
  o.interval = 3;
  o.modules_per_event = 3;  // 20 ranks to add, 3 per event: the 7th event is cut to 2 by the budget
  tr::increlora<double> inc(o, opt);  // growth keeps the old components' moments
  for (auto& a : ad) inc.add(a.get());
  CHECK(inc.total_rank() == n);
  index_t max_seen = 0, grew_steps = 0, prev_total = n, checked_events = 0;
  // Before IncreLoRA's after_step (listed first): recompute the EMAs from the raw score
  // and remember Ī·Ū and the ranks, to check which modules the next growth picks.
  std::vector<double> Ibar(n, 0.0), Ubar(n, 0.0), score_before(n);
  std::vector<index_t> rank_before(n);
  watcher pre;
  pre.f = [&](const tr::step_context&) {
    for (int i = 0; i < n; ++i) {
      const double I = inc.importance(i);
      Ibar[std::size_t(i)] = 0.85 * Ibar[std::size_t(i)] + 0.15 * I;
      Ubar[std::size_t(i)] = 0.85 * Ubar[std::size_t(i)] + 0.15 * std::abs(I - Ibar[std::size_t(i)]);
      CHECK(inc.importance_ema(i) == doctest::Approx(Ibar[std::size_t(i)]).epsilon(1e-12));
      CHECK(inc.uncertainty_ema(i) == doctest::Approx(Ubar[std::size_t(i)]).epsilon(1e-12));
      score_before[std::size_t(i)] = Ibar[std::size_t(i)] * Ubar[std::size_t(i)];
      rank_before[std::size_t(i)] = ad[std::size_t(i)]->rank();
    }
  };
  watcher w;
  w.f = [&](const tr::step_context&) {
    const index_t tot = inc.total_rank();
    max_seen = std::max(max_seen, tot);
    CHECK(tot <= budget);
    if (tot > prev_total) {
      ++grew_steps;
      // The grown modules are the top ones by Ī·Ū: every grown score ≥ every other.
      double min_grown = 1e300, max_other = -1;
      index_t grown = 0;
      for (int i = 0; i < n; ++i) {
        const index_t d = ad[std::size_t(i)]->rank() - rank_before[std::size_t(i)];
        CHECK(d >= 0);
        CHECK(d <= 1);
        if (d > 0) {
          ++grown;
          min_grown = std::min(min_grown, score_before[std::size_t(i)]);
        } else {
          max_other = std::max(max_other, score_before[std::size_t(i)]);
        }
      }
      CHECK(grown == std::min<index_t>(3, budget - prev_total));
      CHECK(min_grown >= max_other);
      ++checked_events;
    }
    prev_total = tot;
    for (auto& a : ad) {  // the optimiser's moments follow the grown shapes
      CHECK(opt.first_moment(&a->A()).rows() == a->rank());
      CHECK(a->scale() == doctest::Approx(2.0 / double(a->rank())).epsilon(1e-15));
    }
  };
  tr::fit_options fo;
  fo.steps = 60;
  fo.log_every = 0;
  const auto res = tr::fit<double>(
      [&](ag::tape<double>& t, index_t) {
        ag::var<double> y;
        for (int i = 0; i < n; ++i) {
          auto yi = ad[std::size_t(i)]->forward(t.frozen(X[std::size_t(i)]));
          y = i == 0 ? yi : ag::add(y, yi);
        }
        return ag::mse(y, t.frozen(target));
      },
      opt, {&pre, &inc, &w}, fo);
  CHECK(max_seen == budget);
  CHECK(checked_events == 7);
  CHECK(inc.total_rank() == budget);
  CHECK(inc.growth_events() == 7);
  CHECK(grew_steps == 7);
  for (int i = 0; i < n; ++i) CHECK(inc.importance(i) > 0);
  CHECK(res.final_loss < 0.5 * res.first_loss);
  std::printf("IncreLoRA fit: loss %.4f -> %.4f, ranks", res.first_loss, res.final_loss);
  for (auto& a : ad) std::printf(" %td", a->rank());
  std::printf(" (budget %td, %td events)\n", budget, inc.growth_events());
  dwt::check_throws_with<deltaw::rank_error>(
      [&] {
        tr::increlora<double> small({.budget = 3}, nullptr);
        for (auto& a : ad) small.add(a.get());
      },
      {"budget 3"});
}

TEST_CASE("IncreLoRA score over batches: equals the dense double score; no tokens×in or out×in allocation") {
  const index_t out = 40, in = 48, r = 4, tokens = 70;
  const MatD B = dwt::random<MatD>(out, r, 201), e = dwt::random<MatD>(1, r, 202), A = dwt::random<MatD>(r, in, 203);
  const double s = 0.75;
  std::vector<MatD> Xs, Ds;
  for (std::uint64_t k = 0; k < 3; ++k) {
    Xs.push_back(dwt::random<MatD>(tokens, in, 210 + k));
    Ds.push_back(dwt::random<MatD>(tokens, out, 220 + k));
  }
  // The dense reference: ΔW and ∂L/∂ΔW = Σ dYₖᵀ·Xₖ formed here only.
  const MatD dW = s * B * e.row(0).asDiagonal() * A;
  auto dense_score = [&](const MatD& G) { return dW.cwiseProduct(G).cwiseAbs().sum() / std::sqrt(double(out * in)); };
  const double one = dense_score(Ds[0].transpose() * Xs[0]);
  MatD G = MatD::Zero(out, in);
  for (std::size_t k = 0; k < 3; ++k) G += Ds[k].transpose() * Xs[k];
  const double all = dense_score(G);
  for (index_t chunk : {1, 7, 64, 1000}) {
    CHECK(std::abs(tr::increlora_score(B, e.row(0), A, s, Xs[0], Ds[0], chunk) - one) < 1e-12 * one);
    CHECK(std::abs(tr::increlora_score(B, e.row(0), A, s, Xs, Ds, chunk) - all) < 1e-12 * all);
  }
  // float batches: cast block by block, accumulated in double.
  std::vector<MatF> Xf, Df;
  for (std::size_t k = 0; k < 3; ++k) {
    Xf.push_back(Xs[k].cast<float>());
    Df.push_back(Ds[k].cast<float>());
  }
  const MatF Bf = B.cast<float>(), ef = e.cast<float>(), Af = A.cast<float>();
  CHECK(std::abs(tr::increlora_score(Bf, ef.row(0), Af, s, Xf, Df, 8) - all) < 1e-6 * all);

  // Through the adapter: one application is scored inside its backward (nothing copied);
  // keep_batches copies each call's X and dY, and the score reads them without stacking.
  const MatD W = dwt::random<MatD>(out, in, 230);
  tr::increlora_adapter<double> a("q", deltaw::view(W), r, 3.0, 231);
  a.B().value() = B;
  a.e().value() = e;
  a.A().value() = A;
  REQUIRE(a.scale() == s);
  a.set_score_chunk(8);
  auto backward = [&](std::size_t k) {
    ag::tape<double> t;
    t.backward(ag::weighted_sum(a.forward(t.frozen(Xs[k])), Ds[k]));  // ∂L/∂y = Dₖ
  };
  a.set_capturing(true);
  backward(0);
  a.set_capturing(false);
  CHECK(a.has_capture());
  CHECK(a.captured_batches() == 0);
  CHECK(std::abs(a.take_score() - one) < 1e-12 * one);
  // Gradient accumulation over several tapes under the automatic policy: the second
  // forward refuses, since the first batch was scored and not kept.
  a.set_capturing(true);
  backward(0);
  dwt::check_throws_with<deltaw::argument_error>([&] { backward(1); }, {"increlora_adapter(q)", "keep_batches"});
  a.clear_capture();
  a.set_capture_policy(tr::capture_policy::keep_batches);
  for (std::size_t k = 0; k < 3; ++k) backward(k);
  a.set_capturing(false);
  CHECK(a.captured_batches() == 3);
  double got = 0;
  const std::size_t dense_bytes = std::size_t(out * in) * sizeof(double);
  const std::size_t batch_bytes = std::size_t(tokens * in) * sizeof(double);
  const std::size_t big = dwt::largest_allocation([&] { got = a.take_score(8); });
  CHECK(std::abs(got - all) < 1e-12 * all);
  const std::size_t big_free = dwt::largest_allocation([&] { got = tr::increlora_score(B, e.row(0), A, s, Xs, Ds, 8); });
  const std::size_t big_float = dwt::largest_allocation([&] { got = tr::increlora_score(Bf, ef.row(0), Af, s, Xf, Df, 8); });
  MESSAGE("largest allocation while scoring: " << big << " B (adapter), " << big_free << " B, " << big_float
                                               << " B (float); out x in is " << dense_bytes << " B, one batch's X "
                                               << batch_bytes << " B");
  if (dwt::allocation_counting_available()) {
    CHECK(big < dense_bytes / 2);
    CHECK(big_free < dense_bytes / 2);
    CHECK(big_float < dense_bytes / 4);  // below out × in in float too
    // The control: the counter sees a stacked copy of the batches.
    CHECK(dwt::largest_allocation([&] { MatD st(3 * tokens, in); st.setZero(); }) >= batch_bytes);
  }
}

TEST_CASE("IncreLoRA growth keeps AdamW's moments of the old components; their next step is the one without growth") {
  const index_t out = 9, in = 7, tokens = 12;
  const MatD W = dwt::random<MatD>(out, in, 301), X = dwt::random<MatD>(tokens, in, 302);
  const MatD target = X * (W + 0.5 * dwt::random<MatD>(out, in, 303)).transpose();
  const op::adamw_options ao{1e-2, 0.9, 0.999, 1e-8, 0.05};
  auto make = [&] {
    auto a = std::make_unique<tr::increlora_adapter<double>>("m", deltaw::view(W), 2, 4.0, 304);
    a->e().value() = dwt::random<MatD>(1, 2, 305);  // every gradient non-zero from the start
    return a;
  };
  auto ga = make(), na = make(), ra = make();  // grown (resize), never grown, grown (reset)
  op::adamw<double> gopt(ga->parameters(), ao), nopt(na->parameters(), ao), ropt(ra->parameters(), ao);
  auto step = [&](tr::increlora_adapter<double>& a, op::adamw<double>& o) {
    ag::tape<double> t;
    t.backward(ag::mse(a.forward(t.frozen(X)), t.frozen(target)));
    o.step();
    o.zero_grad();
  };
  for (int k = 0; k < 5; ++k) {
    step(*ga, gopt);
    step(*na, nopt);
    step(*ra, ropt);
  }
  REQUIRE(ga->A().value() == na->A().value());
  tr::increlora_options io;
  io.budget = 8;
  io.components = 2;  // rank 2 → 4: s halves and the old e double, both exact
  tr::increlora<double> inc(io, gopt);  // the optimiser constructor: resize_state
  tr::increlora<double> rinc(io, tr::increlora<double>::resetter(ropt));
  inc.add(ga.get());
  rinc.add(ra.get());
  std::vector<MatD> m0, v0;
  for (auto* p : ga->parameters()) {
    m0.push_back(gopt.first_moment(p));
    v0.push_back(gopt.second_moment(p));
  }
  REQUIRE(inc.grow_now() == 2);
  REQUIRE(rinc.grow_now() == 2);
  CHECK(ga->rank() == 4);
  // Old block (B: left columns, e: left columns, A: top rows) bit for bit; new block zero.
  const auto ps = ga->parameters();  // B, e, A
  for (std::size_t i = 0; i < 3; ++i) {
    const MatD &m = gopt.first_moment(ps[i]), &v = gopt.second_moment(ps[i]);
    CHECK(m.rows() == ps[i]->rows());
    CHECK(m.cols() == ps[i]->cols());
    const bool rows = i == 2;
    const MatD mo = rows ? MatD(m.topRows(2)) : MatD(m.leftCols(2)), vo = rows ? MatD(v.topRows(2)) : MatD(v.leftCols(2));
    const MatD mn = rows ? MatD(m.bottomRows(2)) : MatD(m.rightCols(2)), vn = rows ? MatD(v.bottomRows(2)) : MatD(v.rightCols(2));
    CHECK(mo == m0[i]);
    CHECK(vo == v0[i]);
    CHECK(mn.cwiseAbs().maxCoeff() == 0.0);
    CHECK(vn.cwiseAbs().maxCoeff() == 0.0);
    CHECK(gopt.state_steps(ps[i]) == 5);  // bias correction continues
    CHECK(ropt.state_steps(ra->parameters()[i]) == 0);
  }
  // The next step: A's old rows and B's old columns move exactly as without growth.
  const MatD A5 = ga->A().value().topRows(2), B5 = ga->B().value().leftCols(2);
  step(*ga, gopt);
  step(*na, nopt);
  step(*ra, ropt);
  const double eA = dwt::rel_err(MatD(ga->A().value().topRows(2) - A5), MatD(na->A().value() - A5));
  const double eB = dwt::rel_err(MatD(ga->B().value().leftCols(2) - B5), MatD(na->B().value() - B5));
  const double eM = dwt::rel_err(MatD(gopt.first_moment(&ga->A()).topRows(2)), nopt.first_moment(&na->A()));
  // The control: resetting the state changes the old components' step.
  const double eR = dwt::rel_err(MatD(ra->A().value().topRows(2) - A5), MatD(na->A().value() - A5));
  std::printf("IncreLoRA growth with kept moments: next step of old A rows vs no growth %.2e, B columns %.2e, "
              "A's first moment %.2e; with reset_state %.2e\n",
              eA, eB, eM, eR);
  CHECK(eA < 1e-13);
  CHECK(eB < 1e-13);
  CHECK(eM < 1e-13);
  CHECK(eR > 1e-3);
  // The new components moved (zero moments, bias-corrected with the count 6).
  CHECK(ga->A().value().bottomRows(2).cwiseAbs().maxCoeff() > 0);

  // SGD with momentum: the old entries keep their buffer, the new ones start from zero.
  ag::parameter<double> P("p", dwt::random<MatD>(2, 3, 310)), Q("q", P.value());
  op::sgd<double> sp({&P}, {0.1, 0.9, 0.0, 0.0, false}), sq({&Q}, {0.1, 0.9, 0.0, 0.0, false});
  const MatD g0 = dwt::random<MatD>(2, 3, 311), g1 = dwt::random<MatD>(3, 3, 312);
  P.grad() = g0;
  Q.grad() = g0;
  sp.step();
  sq.step();
  MatD grown(3, 3);
  grown.topRows(2) = P.value();
  grown.row(2) = dwt::random<MatD>(1, 3, 313);
  const MatD before = grown;
  P.value() = grown;
  P.zero_grad();
  sp.resize_state(&P);
  P.grad() = g1;
  Q.grad() = g1.topRows(2);
  const MatD Q0 = Q.value();
  sp.step();
  sq.step();
  CHECK(dwt::rel_err(MatD(P.value().topRows(2)), Q.value()) < 1e-15);  // momentum kept: −lr·(μ·g0 + g1)
  CHECK(dwt::rel_err(MatD(Q.value() - Q0), MatD(-0.1 * (0.9 * g0 + g1.topRows(2)))) < 1e-15);
  CHECK(dwt::rel_err(MatD(P.value().row(2) - before.row(2)), MatD(-0.1 * g1.row(2))) < 1e-15);  // zero buffer
}
