// SPDX-License-Identifier: MIT
// AdaLoRA's rank allocation (train/adalora.hpp): the budget schedule at hand-computed points
// of PEFT's cubic formula, the orthogonality regulariser's value and gradient (central
// differences), and a small regression with two layers of four triplets each where only two
// triplets per layer carry the target: the allocator must keep exactly those (budget 8 → 4),
// zero the pruned E entries, keep them zero after the final mask and still fit the teacher's ΔW.
#include <deltaw/backend/cpu/adalora_vjp.hpp>
#include <deltaw/train/adalora.hpp>
#include <deltaw/train/loop.hpp>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;
namespace tr = deltaw::train;
using deltaw::index_t;

TEST_CASE("AdaLoRA budget schedule: PEFT's warm-up, cubic decrease and final phase") {
  tr::adalora_options o;
  o.tinit = 2;
  o.tfinal = 3;
  o.total_step = 20;
  o.deltaT = 2;
  // b0 = 24, bT = 12, budgeting over steps 3 … 17 (15 steps).
  CHECK(tr::adalora_budget(o, 24, 12, 0) == std::pair<index_t, bool>(24, false));
  CHECK(tr::adalora_budget(o, 24, 12, 2) == std::pair<index_t, bool>(24, false));
  CHECK(tr::adalora_budget(o, 24, 12, 3) == std::pair<index_t, bool>(21, false));  // 12·(14/15)³ + 12 = 21.76
  CHECK(tr::adalora_budget(o, 24, 12, 4) == std::pair<index_t, bool>(19, true));   // 12·(13/15)³ + 12 = 19.81
  CHECK(tr::adalora_budget(o, 24, 12, 10) == std::pair<index_t, bool>(13, true));  // 12·(7/15)³ + 12 = 13.22
  CHECK(tr::adalora_budget(o, 24, 12, 17) == std::pair<index_t, bool>(12, false));
  CHECK(tr::adalora_budget(o, 24, 12, 18) == std::pair<index_t, bool>(12, true));
  tr::adalora_options bad = o;
  bad.tinit = 17;
  dwt::check_throws_with<dw::argument_error>([&] { tr::adalora<double> a(bad); }, {"no budgeting phase"});
}

TEST_CASE("AdaLoRA orthogonality regulariser: value and gradient") {
  auto A = param("A", 3, 7, 1, 0.5), B = param("B", 6, 3, 2, 0.5), A2 = param("A2", 2, 5, 3, 0.5);
  ag::tape<double> t;
  const auto v = ag::adalora_orth_penalty<double>({t.param(*A), t.param(*A2)}, {t.param(*B)}, 0.5);
  const MatD I3 = MatD::Identity(3, 3), I2 = MatD::Identity(2, 2);
  const double want = 0.5 / 3 *
                      ((A->value() * A->value().transpose() - I3).norm() + (A2->value() * A2->value().transpose() - I2).norm() +
                       (B->value().transpose() * B->value() - I3).norm());
  CHECK(t.value(v)(0, 0) == doctest::Approx(want).epsilon(1e-14));
  check("adalora_orth_penalty",
        [&](ag::tape<double>& tp) { return ag::adalora_orth_penalty<double>({tp.param(*A), tp.param(*A2)}, {tp.param(*B)}, 0.5); },
        {A.get(), B.get(), A2.get()}, 4);
}

TEST_CASE("AdaLoRA allocation prunes the triplets that do not carry the target") {
  constexpr index_t out = 7, in = 9, r = 4, T = 32;
  const double alpha = 4;
  struct layer {
    MatD W, X, Y, dW;  // dW: the teacher's ΔW
    std::unique_ptr<P> A, E, B;
  };
  const std::vector<std::vector<double>> teacher_E = {{2.0, 0.0, 1.5, 0.0}, {0.0, 1.8, 0.0, 1.2}};
  std::vector<layer> L(2);
  for (int l = 0; l < 2; ++l) {
    auto& y = L[std::size_t(l)];
    y.W = dwt::random<MatD>(out, in, 10 + l);
    const MatD A = dwt::random<MatD>(r, in, 20 + l), B = dwt::random<MatD>(out, r, 30 + l);
    Eigen::VectorXd Et(r);
    for (index_t i = 0; i < r; ++i) Et[i] = teacher_E[std::size_t(l)][std::size_t(i)];
    y.X = dwt::random<MatD>(T, in, 40 + l);
    const double s = alpha / (r + 1e-5);
    y.dW = s * B * Et.asDiagonal() * A;
    y.Y = y.X * (y.W + y.dW).transpose();
    // The student starts with the teacher's directions and a third of its values, plus noise.
    y.A = std::make_unique<P>("A", MatD(A + 0.01 * dwt::random<MatD>(r, in, 50 + l)));
    y.B = std::make_unique<P>("B", MatD(B + 0.01 * dwt::random<MatD>(out, r, 60 + l)));
    y.E = std::make_unique<P>("E", MatD(Et / 3 + 0.02 * dwt::random<MatD>(r, 1, 70 + l).col(0)));
  }
  tr::adalora_options o;
  o.target_r = 2;
  o.tinit = 3;
  o.tfinal = 6;
  o.total_step = 30;
  o.orth_reg_weight = 0;
  tr::adalora<double> m(o);
  m.add("l0", L[0].A.get(), L[0].E.get(), L[0].B.get());
  m.add("l1", L[1].A.get(), L[1].E.get(), L[1].B.get());
  CHECK(m.init_budget() == 8);
  CHECK(m.target_budget() == 4);
  std::vector<P*> ps;
  for (auto& y : L) ps.insert(ps.end(), {y.A.get(), y.E.get(), y.B.get()});
  dw::optim::sgd<double> opt(ps, {.lr = 0.02});
  auto loss_fn = [&](ag::tape<double>& t, index_t) {
    ag::var<double> total;
    for (std::size_t l = 0; l < L.size(); ++l) {
      auto& y = L[l];
      auto pred = ag::adapted_linear<double, 3>(t.input(y.X), dw::view(y.W), {t.param(*y.B), t.param(*y.E), t.param(*y.A)},
                                                [alpha](const auto& v) {
                                                  const auto& e = v[1];
                                                  return dw::adalora(v[0], dw::vector_view<const double>(e.data(), e.rows()), v[2],
                                                                     dw::alpha(alpha), r);
                                                });
      auto loss = ag::mse(pred, t.input(y.Y));
      total = l == 0 ? loss : ag::add(total, loss);
    }
    return total;
  };
  tr::fit_options fo;
  fo.steps = 400;
  fo.log_every = 0;
  const auto res = tr::fit<double>(loss_fn, opt, {&m}, fo);
  INFO("first loss " << res.first_loss << ", final " << res.final_loss);
  for (int l = 0; l < 2; ++l) {
    CAPTURE(l);
    for (index_t i = 0; i < r; ++i) {
      CAPTURE(i);
      const bool important = teacher_E[std::size_t(l)][std::size_t(i)] != 0;
      CHECK(m.mask(l)[std::size_t(i)] == important);
      if (!important) CHECK(L[std::size_t(l)].E->value()(i, 0) == 0.0);
    }
    CHECK(m.kept(l) == 2);
    // The kept triplets fit the teacher's ΔW (A, B and E all train: only the product is fixed).
    const auto& y = L[std::size_t(l)];
    const double s = alpha / (r + 1e-5);
    const MatD dW = s * y.B->value() * y.E->value().col(0).asDiagonal() * y.A->value();
    CHECK(dwt::rel_err(dW, y.dW) < 0.1);
  }
  const auto rp = m.rank_pattern();
  REQUIRE(rp.size() == 2);
  CHECK(rp[0].first == "l0.lora_E");
  CHECK(rp[1].second == std::vector<bool>{false, true, false, true});
  CHECK(res.final_loss < 1e-2 * res.first_loss);
}
