// The four methods of train/{lamda,increlora,diffora,o3}.hpp in float (the training type):
// they compile for it and keep their defining properties at float precision.
#include <deltaw/train/diffora.hpp>
#include <deltaw/train/increlora.hpp>
#include <deltaw/train/lamda.hpp>
#include <deltaw/train/loop.hpp>
#include <deltaw/train/o3.hpp>

#include <memory>
#include <vector>

#include "test_util.hpp"

namespace ag = deltaw::autograd;
namespace op = deltaw::optim;
namespace tr = deltaw::train;
using deltaw::index_t;
using dwt::MatD;
using dwt::MatF;

TEST_CASE("float: LaMDA freezes bit-exactly, IncreLoRA grows within budget and keeps its output, O3 and DiffoRA") {
  const index_t out = 8, in = 10, tokens = 16;
  const MatF W = dwt::random<MatF>(out, in, 1), X = dwt::random<MatF>(tokens, in, 2);
  const MatF target = X * (W + 0.5f * dwt::random<MatF>(out, in, 3)).transpose();
  tr::fit_options fo;
  fo.steps = 30;
  fo.log_every = 0;

  // LaMDA: B's columns, once frozen, never change.
  std::mt19937_64 g(4);
  tr::lamda_adapter<float> la("l", deltaw::view(W), 4, 8.0, g);
  op::adamw<float> o1(la.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.1});
  tr::lamda<float> fr;
  fr.add(la);
  std::vector<MatF> Bs;
  struct watch : tr::method<float> {
    std::function<void()> f;
    std::string name() const override { return "watch"; }
    void after_step(const tr::step_context&) override { f(); }
  } w;
  w.f = [&] { Bs.push_back(la.B().value()); };
  tr::fit<float>([&](ag::tape<float>& t, index_t) { return ag::mse(la.forward(t.frozen(X)), t.frozen(target)); }, o1,
                 {&fr, &w}, fo);
  for (index_t c = 0; c < 4; ++c) {
    const index_t f = fr.freeze_step(0, c);
    REQUIRE(f >= 1);
    for (index_t k = f; k < 30; ++k) CHECK((Bs[std::size_t(k)].col(c).array() == Bs[std::size_t(f - 1)].col(c).array()).all());
  }

  // IncreLoRA: output unchanged by growth (float rounding), budget respected in a run.
  tr::increlora_adapter<float> ia("i", deltaw::view(W), 1, 4.0, 5);
  op::adamw<float> o2(ia.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.0});
  tr::increlora_options io;
  io.budget = 4;
  io.interval = 5;
  tr::increlora<float> inc(io, o2);  // resize_state: old moments kept
  inc.add(&ia);
  tr::fit<float>([&](ag::tape<float>& t, index_t) { return ag::mse(ia.forward(t.frozen(X)), t.frozen(target)); }, o2,
                 {&inc}, fo);
  CHECK(ia.rank() == 4);
  auto y = [&] {
    ag::tape<float> t;
    return MatF(ia.forward(t.frozen(X)).value());
  };
  const MatF y0 = y();
  ia.grow(2);
  CHECK(dwt::rel_err(y(), y0) < 1e-6);

  // O3 against a dense double sum.
  const MatF A = dwt::random<MatF>(3, in, 6), Pm = dwt::random<MatF>(2, in, 7);
  ag::parameter<float> Ap("A", A);
  ag::tape<float> t;
  const double got = ag::o3_penalty(t.param(Ap), {deltaw::view(Pm)}, 0.1).value()(0, 0);
  const double want = 0.1 * (Pm.cast<double>() * A.cast<double>().transpose()).squaredNorm();
  CHECK(std::abs(got - want) < 1e-6 * want);

  // DiffoRA: a dropped module is the frozen layer exactly.
  tr::diffora<float> gates;
  gates.add_module("a");
  gates.add_module("b");
  gates.logit(1).value()(0, 0) = 1.0f;
  CHECK(gates.binarise(1) == std::vector<index_t>{1});
  ag::tape<float> t2;
  auto x = t2.frozen(X);
  MatF base(tokens, out);
  deltaw::apply(deltaw::view(W), X, base);
  auto y0g = gates.forward(0, t2, ag::linear(x, deltaw::view(W)), [&]() -> ag::var<float> {
    FAIL("a dropped adapter was evaluated");
    return x;
  });
  CHECK(MatF(y0g.value()) == base);
}

TEST_CASE("growth and gate methods: misuse throws the specific error, naming the operation and the values") {
  using dwt::check_throws_with;
  tr::lamda_options lo;
  lo.start = 0.9;
  lo.end = 0.5;
  check_throws_with<deltaw::argument_error>([&] { tr::lamda<float> l(lo); }, {"deltaw::train::lamda", "start", "end"});
  {
    ag::parameter<float> B("B", MatF::Zero(3, 2));
    tr::lamda<float> l;
    l.add(&B);
    check_throws_with<deltaw::argument_error>([&] { l.after_step({}); }, {"lamda", "total_steps"});
  }
  check_throws_with<deltaw::argument_error>([] { tr::increlora<float>(tr::increlora_options{}, nullptr); },
                                            {"increlora", "budget", "got 0"});
  {
    const MatD B = MatD::Ones(4, 2), e = MatD::Ones(1, 2), A = MatD::Ones(2, 3), X = MatD::Ones(5, 3), dY = MatD::Ones(5, 3);
    check_throws_with<deltaw::shape_error>([&] { tr::increlora_score(B, e.row(0), A, 1.0, X, dY); },
                                           {"increlora_score", "dY [5, 3]", "do not chain"});
  }
  {
    const MatF W = MatF::Ones(3, 4);
    check_throws_with<deltaw::rank_error>([&] { tr::increlora_adapter<float> a("x", deltaw::view(W), 0, 1.0, 1); },
                                          {"increlora_adapter(x)", "at least 1"});
  }
  {
    tr::diffora<float> d;
    d.add_module("m");
    check_throws_with<deltaw::argument_error>([&] { d.binarise(2); }, {"binarise", "[0, 1]", "got 2"});
    ag::tape<float> t;
    const MatF x = MatF::Ones(2, 2), z = MatF::Ones(1, 2);
    check_throws_with<deltaw::shape_error>([&] { ag::sigmoid_gate(t.frozen(x), t.frozen(z)); },
                                           {"sigmoid_gate", "[1, 2]", "[1, 1]"});
  }
  {
    ag::parameter<float> A("A", MatF::Ones(2, 5));
    tr::o3<float> o;
    o.add_module(&A);
    check_throws_with<deltaw::shape_error>([&] { o.add_previous(0, MatF::Ones(2, 4)); }, {"add_previous", "[2, 4]"});
  }
}
