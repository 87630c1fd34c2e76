// SPDX-License-Identifier: MIT
// The VJPs of VB-LoRA (logits_A, logits_B, the bank, x; the top-k selection held fixed as in
// PEFT) and PVeRA's deterministic path (λ_d [2r] — its log-variance half gets zero — λ_b, x)
// against central differences in double through autograd::adapted_linear, odd shapes, r = 1,
// k = 1 and k = n; the backward's largest allocation below one out × in matrix.
#include <deltaw/backend/cpu/pvera_vjp.hpp>
#include <deltaw/backend/cpu/vblora_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

TEST_CASE("VJP of VB-LoRA: gradients of logits_A, logits_B, bank and x") {
  std::mt19937_64 g(515);
  for (int trial = 0; trial < 8; ++trial) {
    const Eigen::Index L = dim(g, 1, 4), ti = dim(g, 1, 3), to = dim(g, 1, 3), T = dim(g, 1, 4);
    const Eigen::Index r = trial < 2 ? 1 : dim(g, 1, 3), n = dim(g, 2, 7);
    const Eigen::Index k = trial == 2 ? 1 : trial == 3 ? n : dim(g, 1, int(std::min<Eigen::Index>(n, 3)));
    const Eigen::Index out = to * L, in = ti * L;
    const MatD W = dwt::random<MatD>(out, in, 1000 + trial);
    // Logits spread over [−3, 3]: neighbours in a row are ≫ the finite-difference step apart,
    // so the perturbation never changes the selection.
    auto x = param("x", T, in, 1010 + trial), la = param("logits_A", r * ti, n, 1020 + trial, 3.0),
         lb = param("logits_B", to * r, n, 1030 + trial, 3.0), bank = param("bank", n, L, 1040 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 3>(t.param(*x), dw::view(W), {t.param(*la), t.param(*lb), t.param(*bank)},
                                           [&](const auto& v) { return dw::vblora(v[0], v[1], v[2], r, k); });
    };
    // With k = 1 the softmax weight is 1 and the logits get exactly zero gradient: check x
    // and the bank only.
    std::vector<P*> ps{x.get(), bank.get()};
    if (k > 1) ps = {x.get(), la.get(), lb.get(), bank.get()};
    check("vblora " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r) + " k" + std::to_string(k),
          run, ps, 1050 + trial);
  }
}

TEST_CASE("VJP of PVeRA: gradients of lambda_d (mean half; log-variance half zero), lambda_b and x") {
  std::mt19937_64 g(616);
  for (int trial = 0; trial < 6; ++trial) {
    const Eigen::Index out = dim(g, 1, 9), in = dim(g, 1, 9), T = dim(g, 1, 4), r = trial == 0 ? 1 : dim(g, 1, 5);
    const MatD W = dwt::random<MatD>(out, in, 2000 + trial);
    const auto basis = dw::pvera_shared_basis(3000 + trial, r, out + trial % 2, in + trial % 3);
    const auto proto = dw::pvera(basis, out, in, Eigen::VectorXd(Eigen::VectorXd::Zero(2 * r)),
                                 Eigen::VectorXd(Eigen::VectorXd::Zero(out)));
    auto x = param("x", T, in, 2010 + trial), ld = param("lambda_d", 1, 2 * r, 2020 + trial),
         lb = param("lambda_b", 1, out, 2030 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 2>(t.param(*x), dw::view(W), {t.param(*ld), t.param(*lb)}, [&](const auto& v) {
        return dw::cpu::vjp<decltype(proto)>::rebind(proto, v);
      });
    };
    check("pvera " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r), run,
          {x.get(), ld.get(), lb.get()}, 2050 + trial);
  }
  // The log-variance half's gradient is exactly zero; the mean half's is not.
  const auto basis = dw::pvera_shared_basis(1, 3, 6, 5);
  const Eigen::VectorXd ld = Eigen::VectorXd::LinSpaced(6, 0.5, 1.5), lb = Eigen::VectorXd::LinSpaced(6, -1, 1);
  const auto u = dw::pvera(basis, 6, 5, ld, lb);
  const MatD X = dwt::random<MatD>(4, 5, 1), dY = dwt::random<MatD>(4, 6, 2);
  MatD gd = MatD::Zero(1, 6), gb = MatD::Zero(1, 6), dX = MatD::Zero(4, 5);
  std::array<dw::dense<double>*, 2> gs{&gd, &gb};
  dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX);
  CHECK(gd.leftCols(3).norm() > 0);
  CHECK(gd.rightCols(3).norm() == 0);
}

TEST_CASE("VB-LoRA and PVeRA backward allocate nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16, r = 8, L = 64, n = 16;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  const MatD X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  MatD dX = MatD::Zero(T, in);
  {
    const MatD la = dwt::random<MatD>(r * in / L, n, 4), lb = dwt::random<MatD>(out / L * r, n, 5),
               bank = dwt::random<MatD>(n, L, 6);
    const auto u = dw::vblora(la, lb, bank, r, 2);
    MatD ga = MatD::Zero(la.rows(), n), gb = MatD::Zero(lb.rows(), n), gv = MatD::Zero(n, L);
    std::array<dw::dense<double>*, 3> gs{&ga, &gb, &gv};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX); }) <
          dense_bytes);
    CHECK(ga.norm() > 0);
    CHECK(gv.norm() > 0);
  }
  {
    const Eigen::VectorXd ld = Eigen::VectorXd::Constant(2 * 64, 0.1), lbv = Eigen::VectorXd::Constant(out, 0.3);
    const auto u = dw::pvera(dw::pvera_shared_basis(2, 64, out, in), out, in, ld, lbv);
    MatD gd = MatD::Zero(1, 2 * 64), gb = MatD::Zero(1, out);
    std::array<dw::dense<double>*, 2> gs{&gd, &gb};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX); }) <
          dense_bytes);
    CHECK(gb.norm() > 0);
  }
}
