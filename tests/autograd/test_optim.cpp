// Optimisers and schedules against the update rules written out in double.
#include <deltaw/optim/optim.hpp>

#include "grad_util.hpp"

using namespace dwag;
namespace op = deltaw::optim;

TEST_CASE("AdamW matches the written-out rule over several steps") {
  P p("p", dwt::random<MatD>(3, 4, 1));
  MatD ref = p.value(), m = MatD::Zero(3, 4), v = MatD::Zero(3, 4);
  const op::adamw_options o{0.01, 0.9, 0.99, 1e-8, 0.1};
  op::adamw<double> opt({&p}, o);
  for (int t = 1; t <= 5; ++t) {
    const MatD g = dwt::random<MatD>(3, 4, 10 + t);
    p.grad() = g;
    const double f = 0.5 + 0.1 * t;  // a schedule factor
    opt.step(f);
    const double lr = o.lr * f;
    ref *= 1 - lr * o.weight_decay;
    m = o.beta1 * m + (1 - o.beta1) * g;
    v = o.beta2 * v + (1 - o.beta2) * g.cwiseProduct(g);
    const MatD mh = m / (1 - std::pow(o.beta1, t));
    const MatD vh = v / (1 - std::pow(o.beta2, t));
    ref -= lr * mh.cwiseQuotient((vh.cwiseSqrt().array() + o.eps).matrix());
  }
  CHECK(dwt::rel_err(p.value(), ref) < 1e-13);
}

TEST_CASE("SGD with momentum, dampening and weight decay; Nesterov") {
  for (bool nesterov : {false, true}) {
    P p("p", dwt::random<MatD>(2, 3, 1));
    MatD ref = p.value(), buf;
    const op::sgd_options o{0.1, 0.9, nesterov ? 0.0 : 0.2, 0.01, nesterov};
    op::sgd<double> opt({&p}, o);
    for (int t = 0; t < 4; ++t) {
      const MatD g0 = dwt::random<MatD>(2, 3, 20 + t);
      p.grad() = g0;
      opt.step();
      MatD g = g0 + o.weight_decay * ref;
      buf = t == 0 ? g : MatD(o.momentum * buf + (1 - o.dampening) * g);
      ref -= o.lr * (nesterov ? MatD(g + o.momentum * buf) : buf);
    }
    CHECK(dwt::rel_err(p.value(), ref) < 1e-14);
  }
}

TEST_CASE("gradient clipping by global norm") {
  P a("a", MatD::Zero(1, 2)), b("b", MatD::Zero(2, 1));
  a.grad() << 3, 0;
  b.grad() << 0, 4;
  CHECK(op::clip_grad_norm<double>({&a, &b}, 1.0) == doctest::Approx(5.0));
  CHECK(std::sqrt(a.grad().squaredNorm() + b.grad().squaredNorm()) == doctest::Approx(1.0).epsilon(1e-5));
  CHECK(op::clip_grad_norm<double>({&a, &b}, 10.0) == doctest::Approx(1.0).epsilon(1e-5));  // untouched below the limit
  dwt::check_throws_with<deltaw::argument_error>([&] { op::clip_grad_norm<double>({&a}, -1.0); }, {"max_norm"});
}

TEST_CASE("warmup + cosine schedule") {
  const op::warmup_cosine s(4, 14, 0.1);
  CHECK(s(0) == doctest::Approx(0.25));
  CHECK(s(3) == doctest::Approx(1.0));
  CHECK(s(4) == doctest::Approx(1.0));
  CHECK(s(9) == doctest::Approx(0.1 + 0.9 * 0.5));
  CHECK(s(14) == doctest::Approx(0.1));
  for (int t = 5; t < 14; ++t) CHECK(s(t) < s(t - 1));
  dwt::check_throws_with<deltaw::argument_error>([] { op::warmup_cosine(5, 3); }, {"warmup"});
}

TEST_CASE("training a LoRA on a frozen layer reduces the loss (float tape)") {
  using Pf = ag::parameter<float>;
  const dwt::MatF W = dwt::random<dwt::MatF>(16, 12, 1), X = dwt::random<dwt::MatF>(32, 12, 2);
  const dwt::MatF Bt = dwt::random<dwt::MatF>(16, 2, 3), At = dwt::random<dwt::MatF>(2, 12, 4);
  const dwt::MatF Y = X * (W + Bt * At).transpose();  // reachable by a rank-2 adapter
  Pf B("B", dwt::MatF::Zero(16, 2)), A("A", dwt::random<dwt::MatF>(2, 12, 5) * 0.3f);
  op::adamw<float> opt({&B, &A}, {0.05, 0.9, 0.999, 1e-8, 0.0});
  float first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    ag::tape<float> t;
    const auto loss = ag::mse(ag::lora_linear(t.frozen(X), deltaw::view(W), t.param(B), t.param(A), 1.0), t.frozen(Y));
    t.backward(loss);
    opt.step();
    opt.zero_grad();
    (step == 0 ? first : last) = loss.value()(0, 0);
  }
  INFO("first " << first << " last " << last);
  CHECK(last < 0.01f * first);
}
