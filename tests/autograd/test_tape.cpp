// Tape semantics: accumulation and zeroing, retained graphs, no-grad evaluation, and the
// errors for misuse (each a specific deltaw exception with a readable message).
#include <deltaw/nn/layers.hpp>

#include "grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;

TEST_CASE("tape: gradients accumulate across backward passes until zeroed") {
  P w("w", dwt::random<MatD>(3, 2, 1));
  const MatD X = dwt::random<MatD>(4, 3, 2), R = dwt::random<MatD>(4, 2, 3);
  auto run = [&] {
    ag::tape<double> t;
    t.backward(ag::weighted_sum(ag::matmul(t.frozen(X), t.param(w)), R));
  };
  run();
  const MatD g1 = w.grad();
  CHECK(dwt::rel_err(g1, MatD(X.transpose() * R)) < 1e-14);
  run();
  CHECK(dwt::rel_err(w.grad(), MatD(2 * g1)) < 1e-14);
  w.zero_grad();
  CHECK(w.grad().norm() == 0.0);
}

TEST_CASE("tape: retain_graph allows a second backward; a parameter used twice sums its gradients") {
  P w("w", dwt::random<MatD>(2, 2, 1));
  ag::tape<double> t;
  const auto a = t.param(w);
  const auto y = ag::sum(ag::add(a, ag::matmul(a, a)));
  t.backward(y, true);
  const MatD g1 = w.grad();
  // d/dW Σ(W + W·W) = 1 + 1·Wᵀ + Wᵀ·1
  const MatD ones = MatD::Ones(2, 2);
  CHECK(dwt::rel_err(g1, MatD(ones + ones * w.value().transpose() + w.value().transpose() * ones)) < 1e-14);
  t.backward(y);
  CHECK(dwt::rel_err(w.grad(), MatD(2 * g1)) < 1e-14);
}

TEST_CASE("tape: no_grad evaluates values without recording") {
  P w("w", dwt::random<MatD>(2, 3, 1));
  ag::tape<double> t;
  {
    ag::no_grad<double> ng(t);
    const auto y = ag::sum(ag::gelu(t.param(w)));
    CHECK_FALSE(t.requires_grad(y));
    dwt::check_throws_with<ag::autograd_error>([&] { t.backward(y); }, {"backward", "does not depend"});
  }
  CHECK(t.grad_enabled());
  const auto y = ag::sum(t.param(w));
  CHECK(t.requires_grad(y));
}

TEST_CASE("tape: input leaves view caller memory and receive a gradient") {
  const MatD X = dwt::random<MatD>(3, 2, 1), R = dwt::random<MatD>(3, 2, 2);
  ag::tape<double> t;
  const auto x = t.input(X);
  CHECK(x.value().data() == X.data());
  t.backward(ag::weighted_sum(ag::scale(x, 3.0), R));
  CHECK(dwt::rel_err(t.grad(x), MatD(3 * R)) < 1e-15);
}

TEST_CASE("errors: backward twice without retaining") {
  P w("w", dwt::random<MatD>(2, 2, 1));
  ag::tape<double> t;
  const auto y = ag::sum(t.param(w));
  t.backward(y);
  dwt::check_throws_with<ag::autograd_error>([&] { t.backward(y); },
                                             {"deltaw::autograd::backward", "already consumed", "retain_graph"});
}

TEST_CASE("errors: the gradient of a frozen view") {
  const MatD W = dwt::random<MatD>(2, 2, 1);
  P w("w", dwt::random<MatD>(2, 2, 2));
  ag::tape<double> t;
  const auto f = t.frozen(W, "W_frozen");
  t.backward(ag::sum(ag::matmul(f, t.param(w))));
  dwt::check_throws_with<ag::autograd_error>([&] { (void)t.grad(f); }, {"deltaw::autograd::grad", "W_frozen", "frozen view"});
  // and of a frozen parameter
  P fz("fz", dwt::random<MatD>(2, 2, 3));
  fz.set_trainable(false);
  ag::tape<double> t2;
  const auto vf = t2.param(fz);
  t2.backward(ag::sum(ag::matmul(vf, t2.param(w))));
  dwt::check_throws_with<ag::autograd_error>([&] { (void)t2.grad(vf); }, {"does not require a gradient"});
  CHECK(fz.grad().norm() == 0.0);
}

TEST_CASE("errors: shape-mismatched losses and a non-scalar backward") {
  ag::tape<double> t;
  P a("a", dwt::random<MatD>(3, 2, 1));
  const MatD b = dwt::random<MatD>(2, 3, 2);
  dwt::check_throws_with<deltaw::shape_error>([&] { (void)ag::mse(t.param(a), t.frozen(b)); },
                                              {"deltaw::autograd::mse", "[3, 2]", "[2, 3]"});
  dwt::check_throws_with<deltaw::shape_error>(
      [&] { (void)ag::cross_entropy(t.param(a), std::vector<std::int64_t>{0, 1}); },
      {"deltaw::autograd::cross_entropy", "[3, 2]", "2 labels"});
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { (void)ag::cross_entropy(t.param(a), std::vector<std::int64_t>{0, 5, 1}); },
      {"cross_entropy", "label 5", "row 1"});
  dwt::check_throws_with<deltaw::shape_error>([&] { t.backward(t.param(a)); },
                                              {"deltaw::autograd::backward", "scalar [1, 1]", "[3, 2]"});
  dwt::check_throws_with<deltaw::shape_error>([&] { (void)ag::weighted_sum(t.param(a), b); }, {"weighted_sum", "[3, 2]"});
  dwt::check_throws_with<deltaw::shape_error>(
      [&] { (void)ag::lora_linear(t.param(a), deltaw::view(b), t.param(a), t.param(a), 1.0); },
      {"lora_linear", "[3, 2]"});
  ag::tape<double> other;
  dwt::check_throws_with<ag::autograd_error>([&] { (void)ag::add(t.param(a), other.param(a)); }, {"different tapes"});
}

TEST_CASE("tape: release_values frees activations during backward without changing any gradient") {
  nn::transformer_config c{7, 4, 8, 2, 12, 2, 5};
  nn::tiny_transformer<double> model(c);
  model.attach(nn::adapter_kind::lora, 2, 4.0);
  auto params = model.trainable_parameters();
  std::uint64_t seed = 1;
  for (auto* p : params)
    if (p->name().find("lora_B") != std::string::npos) p->value() = 0.3 * dwt::random<MatD>(p->rows(), p->cols(), seed++);
  const std::vector<std::int64_t> ids{1, 4, 6, 0, 2, 2, 3, 5}, labels{4, 6, 1, ag::ignore_label, 2, 5, 0, 1};
  std::vector<MatD> want;
  double want_loss = 0;
  for (bool release : {false, true}) {
    for (auto* p : params) p->zero_grad();
    ag::tape<double> t;
    t.set_release_values(release);
    const auto logits = model(t, ids, 2);
    const auto loss = ag::cross_entropy(logits, labels);
    t.backward(loss);
    CHECK(loss.value()(0, 0) > 0);  // the loss keeps its value
    if (!release) {
      want_loss = loss.value()(0, 0);
      for (auto* p : params) want.push_back(p->grad());
      CHECK(logits.value().rows() == 8);
      continue;
    }
    CHECK(loss.value()(0, 0) == want_loss);
    for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i]->grad() == want[i]);  // bit for bit
    dwt::check_throws_with<ag::autograd_error>([&] { (void)logits.value(); }, {"value", "freed", "release_values"});
    CHECK(logits.rows() == 8);  // shapes stay known
  }
  // With retain_graph nothing is freed, so a second backward still works.
  ag::tape<double> t;
  t.set_release_values(true);
  const auto loss = ag::cross_entropy(model(t, ids, 2), labels);
  t.backward(loss, /*retain_graph=*/true);
  t.backward(loss);
}
