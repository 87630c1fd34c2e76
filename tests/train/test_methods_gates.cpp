// O3's orthogonality regulariser (train/o3.hpp) and DiffoRA's module gates
// (train/diffora.hpp): values against dense loops, gradients against central differences,
// binarisation against an independent top-k, and a removed module's exact absence.
#include <deltaw/train/diffora.hpp>
#include <deltaw/train/loop.hpp>
#include <deltaw/train/o3.hpp>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace op = deltaw::optim;
namespace tr = deltaw::train;
using deltaw::index_t;

namespace {
// Σ_prev ‖P·Aᵀ‖_F² by explicit loops.
double o3_dense(const MatD& A, const std::vector<MatD>& prev) {
  double v = 0;
  for (const auto& P : prev)
    for (index_t i = 0; i < P.rows(); ++i)
      for (index_t j = 0; j < A.rows(); ++j) {
        double d = 0;
        for (index_t k = 0; k < A.cols(); ++k) d += P(i, k) * A(j, k);
        v += d * d;
      }
  return v;
}
std::vector<deltaw::matrix_view<const double>> views(const std::vector<MatD>& ms) {
  std::vector<deltaw::matrix_view<const double>> v;
  for (const auto& m : ms) v.push_back(deltaw::view(m));
  return v;
}
}  // namespace

TEST_CASE("O3: the penalty equals λ·Σ‖A_prev·A_curᵀ‖² computed densely; its gradient matches central differences") {
  const std::vector<MatD> prev{dwt::random<MatD>(2, 7, 11), dwt::random<MatD>(4, 7, 12), dwt::random<MatD>(3, 7, 13)};
  auto A = param("A_cur", 3, 7, 14);
  {
    ag::tape<double> t;
    const auto p = ag::o3_penalty(t.param(*A), views(prev), 0.1);
    const double want = 0.1 * o3_dense(A->value(), prev);
    CHECK(std::abs(p.value()(0, 0) - want) <= 1e-13 * want);
    CHECK(want > 0.1);
  }
  // The analytic gradient against differences of the dense formula itself (no tape).
  {
    ag::tape<double> t;
    t.backward(ag::o3_penalty(t.param(*A), views(prev), 0.1));
    MatD num(3, 7);
    const double h = 1e-6;
    for (index_t i = 0; i < A->size(); ++i) {
      MatD a = A->value();
      a.data()[i] += h;
      const double fp = 0.1 * o3_dense(a, prev);
      a.data()[i] -= 2 * h;
      const double fm = 0.1 * o3_dense(a, prev);
      num.data()[i] = (fp - fm) / (2 * h);
    }
    const double err = (A->grad() - num).norm() / num.norm();
    std::printf("O3 gradient vs central differences of the dense formula: rel err %.2e\n", err);
    CHECK(err < 1e-8);
    A->zero_grad();
  }
  // And through the tape's generic gradient check, the penalty composed with other ops.
  auto x = param("x", 5, 7, 15);
  check(
      "o3_penalty in a loss",
      [&](ag::tape<double>& t) {
        auto a = t.param(*A);
        return ag::add(ag::sum(ag::matmul_nt(t.param(*x), a)), ag::o3_penalty(a, views(prev), 0.1));
      },
      {A.get(), x.get()}, 16);
  dwt::check_throws_with<deltaw::shape_error>(
      [&] {
        ag::tape<double> t;
        const MatD bad = dwt::random<MatD>(2, 6, 1);
        ag::o3_penalty(t.param(*A), {deltaw::view(bad)}, 0.1);
      },
      {"o3_penalty", "[2, 6]", "7 columns"});
}

TEST_CASE("O3 method: adds λ·penalty to the loss; training on it alone removes exactly the overlap with A_prev") {
  auto A = param("A", 3, 9, 21);
  const MatD A0 = A->value();
  tr::o3<double> o3;
  o3.add_module(A.get());
  const MatD P = dwt::random<MatD>(2, 9, 22);
  o3.add_previous(0, P);
  {
    ag::tape<double> t;
    const MatD tgt = dwt::random<MatD>(3, 9, 23);
    auto loss = ag::mse(t.param(*A), t.frozen(tgt));
    const double l0 = loss.value()(0, 0);
    auto l1 = o3.add_to_loss({}, t, loss);
    CHECK(std::abs(l1.value()(0, 0) - (l0 + 0.1 * o3_dense(A->value(), {P}))) < 1e-13);
  }
  // Loss = penalty only: SGD moves A only inside span(rows of P) (the gradient 2λ·Mᵀ·P
  // lies there), so the part of A orthogonal to that span is kept and the overlap vanishes.
  op::sgd<double> opt({A.get()}, {0.5, 0, 0, 0, false});
  tr::fit_options fo;
  fo.steps = 400;
  fo.log_every = 0;
  const MatD zero = MatD::Zero(3, 9);
  tr::fit<double>([&](ag::tape<double>& t, index_t) { return ag::weighted_sum(t.param(*A), zero); }, opt, {&o3}, fo);
  const MatD proj = P.transpose() * (P * P.transpose()).inverse() * P;  // projector onto span(rows of P)
  const MatD I = MatD::Identity(9, 9);
  CHECK((P * A->value().transpose()).norm() < 1e-8);
  CHECK(dwt::rel_err(MatD(A->value() * (I - proj)), MatD(A0 * (I - proj))) < 1e-10);
  CHECK((A->value() - A0).norm() > 1e-2);
  o3.finish_task();
  REQUIRE(o3.previous(0).size() == 2u);
  CHECK(o3.previous(0)[1] == A->value());
}

TEST_CASE("DiffoRA: gate_mul and sigmoid_gate gradients match central differences") {
  auto x = param("x", 4, 5, 31);
  auto g = param("g", 1, 1, 32);
  auto z = param("z", 1, 1, 33);
  check("gate_mul", [&](ag::tape<double>& t) { return ag::gate_mul(t.param(*x), t.param(*g)); }, {x.get(), g.get()}, 34);
  check(
      "sigmoid_gate tau 0.7", [&](ag::tape<double>& t) { return ag::sigmoid_gate(t.param(*x), t.param(*z), 0.7); },
      {x.get(), z.get()}, 35);
  // A gated LoRA delta added to a frozen base, all factors and the logit at once.
  const MatD W = dwt::random<MatD>(6, 5, 36);
  auto B = param("B", 6, 2, 37), A = param("A", 2, 5, 38);
  check(
      "base + sigmoid_gate(lora_delta)",
      [&](ag::tape<double>& t) {
        auto xv = t.param(*x);
        return ag::add(ag::linear(xv, deltaw::view(W)),
                       ag::sigmoid_gate(ag::lora_delta(xv, t.param(*B), t.param(*A), 1.5), t.param(*z)));
      },
      {x.get(), z.get(), B.get(), A.get()}, 39);
  // A gate of exactly 0 gives exactly zero.
  ag::tape<double> t;
  const MatD zero = MatD::Zero(1, 1);
  auto y = ag::gate_mul(t.param(*x), t.frozen(zero));
  CHECK(MatD(y.value()).cwiseAbs().maxCoeff() == 0.0);
}

TEST_CASE("DiffoRA: binarisation keeps exactly the top-k gates; a dropped module contributes exactly nothing") {
  const int n = 7;
  tr::diffora<double> gates;
  std::vector<std::unique_ptr<P>> adapter;
  for (int i = 0; i < n; ++i) {
    adapter.push_back(param("B" + std::to_string(i), 3, 2, 40 + std::uint64_t(i)));
    gates.add_module("m" + std::to_string(i), {adapter.back().get()});
  }
  const MatD logits = dwt::random<MatD>(1, n, 47) * 4.0;
  for (int i = 0; i < n; ++i) gates.logit(i).value()(0, 0) = logits(0, i);
  // The top 3 by σ(z) computed here, independently of the method.
  std::vector<double> sig(n);
  for (int i = 0; i < n; ++i) sig[std::size_t(i)] = 1 / (1 + std::exp(-logits(0, i)));
  std::vector<index_t> idx(n);
  std::iota(idx.begin(), idx.end(), index_t(0));
  std::sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return sig[std::size_t(a)] > sig[std::size_t(b)]; });
  std::vector<index_t> want(idx.begin(), idx.begin() + 3);
  std::sort(want.begin(), want.end());
  for (int i = 0; i < n; ++i) CHECK(gates.gate_value(i) == doctest::Approx(sig[std::size_t(i)]).epsilon(1e-14));

  const auto kept = gates.binarise(3);
  CHECK(kept == want);
  for (int i = 0; i < n; ++i) {
    const bool k = std::find(want.begin(), want.end(), index_t(i)) != want.end();
    CHECK(gates.kept(i) == k);
    CHECK(gates.gate_value(i) == (k ? 1.0 : 0.0));
    CHECK(adapter[std::size_t(i)]->trainable() == k);
    CHECK_FALSE(gates.logit(i).trainable());
  }

  // Dropped: the output is the frozen layer's, bit for bit, and the adapter is never run.
  const MatD W = dwt::random<MatD>(3, 5, 48), X = dwt::random<MatD>(4, 5, 49);
  auto A = param("A", 2, 5, 50);
  MatD base(4, 3);
  deltaw::apply(deltaw::view(W), X, base);
  const index_t dropped = idx[3], kept0 = want[0];
  int calls = 0;
  ag::tape<double> t;
  auto x = t.frozen(X);
  auto delta = [&](index_t i) {
    return [&, i] {
      ++calls;
      return ag::lora_delta(x, t.param(*adapter[std::size_t(i)]), t.param(*A), 2.0);
    };
  };
  auto yd = gates.forward(dropped, t, ag::linear(x, deltaw::view(W)), delta(dropped));
  CHECK(calls == 0);
  CHECK(MatD(yd.value()) == base);
  CHECK(MatD(gates.gate(dropped, t, delta(dropped)()).value()).cwiseAbs().maxCoeff() == 0.0);
  // Kept with gate 1: base + Δ exactly as without a gate.
  calls = 0;
  auto yk = gates.forward(kept0, t, ag::linear(x, deltaw::view(W)), delta(kept0));
  CHECK(calls == 1);
  const MatD dense_delta = 2.0 * (X * A->value().transpose()) * adapter[std::size_t(kept0)]->value().transpose();
  CHECK(dwt::rel_err(MatD(yk.value()), MatD(base + dense_delta)) < 1e-14);
  dwt::check_throws_with<deltaw::argument_error>([&] { gates.binarise(2); }, {"binarise", "already"});
}

TEST_CASE("DiffoRA in fit: the gates of the modules the task needs win; dropped adapters stay frozen") {
  // y = Σ_i x_i·(W_i + g_i·s·B_i·A_i)ᵀ; the target moves only modules 0 and 2.
  const int n = 4, out = 5, in = 6, tokens = 32;
  std::vector<MatD> W, X;
  for (int i = 0; i < n; ++i) {
    W.push_back(dwt::random<MatD>(out, in, 60 + std::uint64_t(i)));
    X.push_back(dwt::random<MatD>(tokens, in, 70 + std::uint64_t(i)));
  }
  MatD target = MatD::Zero(tokens, out);
  for (int i = 0; i < n; ++i) {
    MatD Wt = W[std::size_t(i)];
    // A rank-2 change, which the rank-3 adapters of modules 0 and 2 can represent exactly.
    if (i == 0 || i == 2) Wt += 0.8 * dwt::random<MatD>(out, 2, 80 + std::uint64_t(i)) * dwt::random<MatD>(2, in, 85 + std::uint64_t(i));
    target += X[std::size_t(i)] * Wt.transpose();
  }
  tr::diffora_options o;
  o.keep = 2;
  o.binarise_at = 0.5;
  tr::diffora<double> gates(o);
  std::vector<std::unique_ptr<P>> Bs, As;
  std::vector<P*> params;
  for (int i = 0; i < n; ++i) {
    Bs.push_back(std::make_unique<P>("B" + std::to_string(i), MatD::Zero(out, 3)));
    As.push_back(param("A" + std::to_string(i), 3, in, 90 + std::uint64_t(i), 0.4));
    gates.add_module("m" + std::to_string(i), {Bs.back().get(), As.back().get()});
    params.push_back(Bs.back().get());
    params.push_back(As.back().get());
  }
  for (auto* g : gates.gate_parameters()) params.push_back(g);
  op::adamw<double> opt(params, {2e-2, 0.9, 0.999, 1e-8, 0.0});
  std::vector<MatD> at_binarise;
  struct watcher : tr::method<double> {
    std::function<void(const tr::step_context&)> f;
    std::string name() const override { return "watch"; }
    void after_step(const tr::step_context& c) override { f(c); }
  } w;
  w.f = [&](const tr::step_context& c) {
    if (c.step + 1 == 100)
      for (int i = 0; i < n; ++i) {
        at_binarise.push_back(Bs[std::size_t(i)]->value());
        at_binarise.push_back(As[std::size_t(i)]->value());
      }
  };
  tr::fit_options fo;
  fo.steps = 200;
  fo.log_every = 0;
  const auto r = tr::fit<double>(
      [&](ag::tape<double>& t, index_t) {
        ag::var<double> y;
        for (int i = 0; i < n; ++i) {
          auto x = t.frozen(X[std::size_t(i)]);
          const MatD& Wi = W[std::size_t(i)];
          auto yi = gates.forward(i, t, ag::linear(x, deltaw::view(Wi)), [&] {
            return ag::lora_delta(x, t.param(*Bs[std::size_t(i)]), t.param(*As[std::size_t(i)]), 1.0);
          });
          y = i == 0 ? yi : ag::add(y, yi);
        }
        return ag::mse(y, t.frozen(target));
      },
      opt, {&gates, &w}, fo);
  REQUIRE(gates.binarised());
  CHECK(gates.kept(0));
  CHECK(gates.kept(2));
  CHECK_FALSE(gates.kept(1));
  CHECK_FALSE(gates.kept(3));
  REQUIRE(at_binarise.size() == 8u);
  for (int i : {1, 3}) {
    CHECK(Bs[std::size_t(i)]->value() == at_binarise[std::size_t(2 * i)]);
    CHECK(As[std::size_t(i)]->value() == at_binarise[std::size_t(2 * i + 1)]);
  }
  CHECK(Bs[0]->value() != at_binarise[0]);
  CHECK(r.final_loss < 0.2 * r.first_loss);
  std::printf("DiffoRA fit: loss %.4f -> %.4f, kept {0, 2}\n", r.first_loss, r.final_loss);
}
