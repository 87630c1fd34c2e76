// The training loop (train/loop.hpp), the optimisers' per-parameter learning-rate scale
// and state reset, and full fine-tuning of the tiny transformer.
#include <deltaw/nn/layers.hpp>
#include <deltaw/train/loop.hpp>

#include <string>
#include <vector>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;
namespace op = deltaw::optim;
namespace tr = deltaw::train;

namespace {
// Records the order in which fit calls the hooks, and adds c·Σθ to the loss.
struct recorder : tr::method<double> {
  std::vector<std::string> calls;
  P* p = nullptr;
  double c = 0;
  std::string name() const override { return "recorder"; }
  void before_forward(const tr::step_context& s) override { calls.push_back("before" + std::to_string(s.step)); }
  ag::var<double> add_to_loss(const tr::step_context&, ag::tape<double>& t, const ag::var<double>& loss) override {
    calls.push_back("loss");
    return c == 0 ? loss : ag::add(loss, ag::scale(ag::sum(t.param(*p)), c));
  }
  void after_backward(const tr::step_context&) override {
    calls.push_back(p->grad().norm() > 0 ? "backward(grad)" : "backward(no grad)");
  }
  void after_step(const tr::step_context&) override {
    calls.push_back(p->grad().norm() == 0 ? "step(zeroed)" : "step(grad left)");
  }
};
}  // namespace

TEST_CASE("fit: SGD on a quadratic follows the closed form; hooks run in order; target and stop") {
  // loss = mean((θ − y)²) over n entries: SGD gives θ_k − y = (1 − 2·lr/n)^k (θ_0 − y).
  const MatD y = dwt::random<MatD>(2, 3, 1), th0 = dwt::random<MatD>(2, 3, 2);
  P p("theta", th0);
  op::sgd<double> opt({&p}, {0.6, 0, 0, 0, false});
  recorder rec;
  rec.p = &p;
  tr::fit_options o;
  o.steps = 12;
  o.log_every = 0;
  o.smoothing = 0;
  const auto r = tr::fit<double>([&](ag::tape<double>& t, deltaw::index_t) { return ag::mse(t.param(p), t.frozen(y)); },
                                 opt, {&rec}, o);
  const double q = 1 - 2 * 0.6 / 6.0;
  CHECK(r.steps_run == 12);
  for (int k = 0; k < 12; ++k) {
    const double want = std::pow(q, 2 * k) * (th0 - y).squaredNorm() / 6.0;
    CHECK(r.losses[std::size_t(k)] == doctest::Approx(want).epsilon(1e-12));
  }
  CHECK(dwt::rel_err(MatD(p.value() - y), MatD(std::pow(q, 12) * (th0 - y))) < 1e-12);
  REQUIRE(rec.calls.size() >= 4u);
  CHECK(rec.calls[0] == "before0");
  CHECK(rec.calls[1] == "loss");
  CHECK(rec.calls[2] == "backward(grad)");
  CHECK(rec.calls[3] == "step(zeroed)");

  // The first step at which the loss is ≤ target, computed from the closed form.
  P p2("theta", th0);
  op::sgd<double> opt2({&p2}, {0.6, 0, 0, 0, false});
  const double target = 1e-3 * (th0 - y).squaredNorm() / 6.0;
  int want_step = 0;
  while (std::pow(q, 2 * want_step) > 1e-3) ++want_step;
  o.steps = 100;
  o.target_loss = target;
  o.stop_at_target = true;
  const auto r2 =
      tr::fit<double>([&](ag::tape<double>& t, deltaw::index_t) { return ag::mse(t.param(p2), t.frozen(y)); }, opt2, {}, o);
  CHECK(r2.steps_to_target == want_step + 1);
  CHECK(r2.steps_run == want_step + 1);
}

TEST_CASE("fit: a method's extra loss term reaches the gradient; a non-finite loss names the step") {
  const MatD y = dwt::random<MatD>(1, 4, 3);
  P p("theta", MatD::Zero(1, 4));
  op::sgd<double> opt({&p}, {0.1, 0, 0, 0, false});
  recorder rec;
  rec.p = &p;
  rec.c = 0.5;
  tr::fit_options o;
  o.steps = 1;
  o.log_every = 0;
  tr::fit<double>([&](ag::tape<double>& t, deltaw::index_t) { return ag::mse(t.param(p), t.frozen(y)); }, opt, {&rec}, o);
  // ∂/∂θ [mean((θ − y)²) + 0.5·Σθ] at θ = 0 is −2y/4 + 0.5.
  const MatD want = -0.1 * (-0.5 * y + MatD::Constant(1, 4, 0.5));
  CHECK(dwt::rel_err(p.value(), want) < 1e-14);

  MatD bad = y;
  bad(0, 2) = std::numeric_limits<double>::infinity();
  o.steps = 3;
  dwt::check_throws_with<deltaw::non_finite_error>(
      [&] {
        tr::fit<double>([&](ag::tape<double>& t, deltaw::index_t s) { return ag::mse(t.param(p), t.frozen(s == 1 ? bad : y)); },
                        opt, {}, o);
      },
      {"deltaw::train::fit", "step 1"});
  o.smoothing = 1.0;
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { tr::fit<double>([&](ag::tape<double>& t, deltaw::index_t) { return ag::sum(t.param(p)); }, opt, {}, o); },
      {"smoothing"});
}

TEST_CASE("AdamW and SGD: per-parameter learning-rate scale and state reset") {
  // AdamW's first step moves each entry by lr·g/(|g| + ε) (bias-corrected moments): with
  // a scale λ on one parameter that parameter moves λ times as far.
  P a("a", dwt::random<MatD>(2, 2, 4)), b("b", dwt::random<MatD>(2, 2, 5));
  const MatD a0 = a.value(), b0 = b.value();
  op::adamw<double> opt({&a, &b}, {0.01, 0.9, 0.999, 1e-12, 0.0});
  opt.set_lr_scale(&b, 16.0);
  a.grad() = dwt::random<MatD>(2, 2, 6);
  b.grad() = dwt::random<MatD>(2, 2, 7);
  const MatD ga = a.grad(), gb = b.grad();
  opt.step();
  CHECK(dwt::rel_err(MatD(a.value() - a0), MatD(-0.01 * ga.array().sign().matrix())) < 1e-8);
  CHECK(dwt::rel_err(MatD(b.value() - b0), MatD(-0.16 * gb.array().sign().matrix())) < 1e-8);
  // After a reset, the next step of b is again a first step (|Δ| = λ·lr), while a's is not.
  opt.reset_state(&b);
  CHECK(opt.first_moment(&b).norm() == 0);
  const MatD b1 = b.value();
  b.grad() = -gb;  // opposite direction: a continuing Adam would move less than lr·λ
  a.grad() = -ga;
  opt.step();
  CHECK(dwt::rel_err(MatD(b.value() - b1), MatD(0.16 * gb.array().sign().matrix())) < 1e-8);
  P stranger("x", MatD::Zero(1, 1));
  dwt::check_throws_with<deltaw::argument_error>([&] { opt.reset_state(&stranger); }, {"reset_state", "'x'"});
  // A parameter whose shape changed needs a reset; after it, AdamW accepts the new shape.
  b.value() = MatD::Zero(3, 2);
  b.grad() = MatD::Ones(3, 2);
  dwt::check_throws_with<deltaw::shape_error>([&] { opt.step(); }, {"'b'", "reset_state"});
  opt.reset_state(&b);
  opt.step();
  CHECK(b.value()(2, 1) == doctest::Approx(-0.16).epsilon(1e-8));

  P s("s", MatD::Ones(1, 3));
  op::sgd<double> sg({&s}, {0.1, 0.9, 0, 0, false});
  sg.set_lr_scale(&s, 2.0);
  s.grad() = MatD::Ones(1, 3);
  sg.step();
  CHECK(s.value()(0, 0) == doctest::Approx(1 - 0.2));
}

TEST_CASE("tiny transformer, full fine-tuning: every weight trainable, end-to-end gradient check") {
  nn::transformer_config c{5, 3, 4, 2, 6, 1, 3};
  nn::tiny_transformer<double> model(c);
  CHECK(model.trainable_parameters().empty());
  model.make_fully_trainable();
  auto params = model.trainable_parameters();
  // tok, pos; per block: ln1 (2), ln2 (2), six projection weights; final norm (2), head.
  CHECK(params.size() == 2u + 10u + 2u + 1u);
  const auto g = model.groups();
  CHECK(g.embedding.size() == 2u);
  REQUIRE(g.blocks.size() == 1u);
  CHECK(g.blocks[0].size() == 10u);
  CHECK(g.head.size() == 3u);
  const std::vector<std::int64_t> ids{1, 4, 0, 3, 2, 2}, labels{4, 0, ag::ignore_label, 2, 2, 1};
  const auto rep = ag::gradcheck([&](auto& t) { return ag::cross_entropy(model(t, ids, 2), labels); }, params);
  std::printf("gradcheck tiny transformer (full fine-tuning): %td entries, max rel err %.2e\n", rep.entries,
              rep.max_rel_error);
  CHECK(rep.max_rel_error < 1e-6);
  CHECK(rep.min_grad_norm > 0);
  // A frozen group drops out of trainable_parameters but stays in groups().
  for (auto* p : g.blocks[0]) p->set_trainable(false);
  CHECK(model.trainable_parameters().size() == 5u);
  CHECK(model.groups().blocks[0].size() == 10u);
}
