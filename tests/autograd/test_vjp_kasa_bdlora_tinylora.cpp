// SPDX-License-Identifier: MIT
// The VJPs of KaSA (B, ΔΣ, A through adalora_update's VJP with LoRA's scale), BD-LoRA (block-
// diagonal A, block-diagonal B, both; gradients in the stored block layout) and TinyLoRA (the
// trained vector v through R = Σ vᵢPᵢ, and B, A) against central differences in double through
// autograd::adapted_linear, odd shapes; KaSA's regulariser (train::kasa_regularizer) against
// central differences of its own value; the backward's largest allocation below out × in.
#include <deltaw/backend/cpu/adalora_vjp.hpp>
#include <deltaw/backend/cpu/bd_lora_vjp.hpp>
#include <deltaw/backend/cpu/tinylora_vjp.hpp>
#include <deltaw/expr/kasa.hpp>
#include <deltaw/train/kasa.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

namespace {
dw::vector_view<const double> vec_of(const dw::matrix_view<const double>& m) {
  return dw::vector_view<const double>(m.data(), m.rows() == 1 ? m.cols() : m.rows(),
                                       m.rows() == 1 ? m.col_stride() : m.row_stride());
}
}  // namespace

TEST_CASE("VJP of KaSA: gradients of B, ΔΣ, A and x") {
  std::mt19937_64 g(2412);
  for (int trial = 0; trial < 5; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4), r = trial < 2 ? 1 : dim(g, 2, 4);
    const MatD W = dwt::random<MatD>(out, in, 700 + trial);
    auto x = param("x", T, in, 710 + trial);
    auto B = param("B", out, r, 720 + trial), A = param("A", r, in, 730 + trial);
    auto d = trial % 2 ? param("diag", r, 1, 740 + trial) : param("diag", 1, r, 740 + trial);
    const double alpha = 2 + trial;
    const bool rs = trial == 3;
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 3>(t.param(*x), dw::view(W), {t.param(*B), t.param(*d), t.param(*A)},
                                           [alpha, rs](const auto& v) {
                                             return dw::kasa(v[0], vec_of(v[1]), v[2], dw::alpha(alpha), rs);
                                           });
    };
    check("kasa " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r), run,
          {x.get(), B.get(), d.get(), A.get()}, 750 + trial);
  }
}

TEST_CASE("VJP of BD-LoRA: gradients of the stored blocks of B and A, and x") {
  struct shape { Eigen::Index out, in, r, na, nb; };
  const std::vector<shape> shapes{{9, 15, 6, 3, 1}, {9, 7, 6, 1, 3}, {8, 12, 4, 2, 2}, {5, 5, 5, 5, 1}, {4, 3, 2, 1, 1}};
  int trial = 0;
  for (const auto& sh : shapes) {
    ++trial;
    const MatD W = dwt::random<MatD>(sh.out, sh.in, 800 + trial);
    auto x = param("x", 3, sh.in, 810 + trial);
    auto B = param("B", sh.out, sh.r / sh.nb, 820 + trial), A = param("A", sh.r, sh.in / sh.na, 830 + trial);
    const double s = 0.3 * trial;
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 2>(t.param(*x), dw::view(W), {t.param(*B), t.param(*A)},
                                           [&sh, s](const auto& v) { return dw::detail::make_bd_lora(v[0], sh.nb, v[1], sh.na, s); });
    };
    check("bd_lora " + std::to_string(sh.out) + "x" + std::to_string(sh.in) + " nA" + std::to_string(sh.na) + " nB" +
              std::to_string(sh.nb),
          run, {x.get(), B.get(), A.get()}, 840 + trial);
  }
}

TEST_CASE("VJP of TinyLoRA: gradients of v (through Σ vᵢPᵢ), B, A and x") {
  std::mt19937_64 g(2602);
  for (int trial = 0; trial < 5; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4), r = trial < 2 ? 1 : dim(g, 2, 3), nu = dim(g, 1, 5);
    const MatD W = dwt::random<MatD>(out, in, 900 + trial), P = dwt::random<MatD>(nu, r * r, 901 + trial);
    auto x = param("x", T, in, 910 + trial);
    auto B = param("B", out, r, 920 + trial), A = param("A", r, in, 930 + trial);
    auto v = trial % 2 ? param("v", nu, 1, 940 + trial) : param("v", 1, nu, 940 + trial);
    const double s = trial == 2 ? 1.5 : 1.0;
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 3>(t.param(*x), dw::view(W), {t.param(*B), t.param(*v), t.param(*A)},
                                           [&P, s](const auto& f) {
                                             return dw::tinylora(f[0], vec_of(f[1]), dw::view(P), f[2], dw::scale(s));
                                           });
    };
    check("tinylora " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r) + " u" +
              std::to_string(nu),
          run, {x.get(), B.get(), v.get(), A.get()}, 950 + trial);
  }
}

TEST_CASE("KaSA regulariser: value and gradients against central differences") {
  for (auto [out, in, r] : {std::tuple{7, 5, 3}, {4, 9, 1}, {6, 6, 6}}) {
    CAPTURE(r);
    MatD B = dwt::random<MatD>(out, r, 1000 + out), A = dwt::random<MatD>(r, in, 1010 + in);
    Eigen::VectorXd d = dwt::random<MatD>(r, 1, 1020 + r).col(0);
    const dw::train::kasa_options o{.beta = 0.7, .gamma = 1.3};
    // The value from its definition.
    const MatD I = MatD::Identity(r, r);
    const double want = o.beta * d.squaredNorm() + o.gamma * ((B.transpose() * B - I).norm() + (A * A.transpose() - I).norm());
    MatD gB = MatD::Zero(out, r), gA = MatD::Zero(r, in), gd = MatD::Zero(r, 1);
    const auto L = dw::train::kasa_regularizer(B, d, A, o, dw::view(gB), dw::view(gd), dw::view(gA));
    CHECK(L.value == doctest::Approx(want).epsilon(1e-12));
    CHECK(L.l2 == doctest::Approx(d.squaredNorm()).epsilon(1e-12));
    auto f = [&] { return dw::train::kasa_regularizer(B, d, A, o).value; };
    const double h = 1e-6;
    double worst = 0;
    auto fd = [&](double& e, double g_an) {
      const double e0 = e;
      e = e0 + h;
      const double fp = f();
      e = e0 - h;
      const double fm = f();
      e = e0;
      const double num = (fp - fm) / (2 * h);
      worst = std::max(worst, std::abs(num - g_an) / std::max(1.0, std::abs(num)));
    };
    for (Eigen::Index i = 0; i < B.size(); ++i) fd(B.data()[i], gB.data()[i]);
    for (Eigen::Index i = 0; i < A.size(); ++i) fd(A.data()[i], gA.data()[i]);
    for (Eigen::Index i = 0; i < r; ++i) fd(d(i), gd(i, 0));
    INFO("max relative error " << worst);
    CHECK(worst < 1e-7);
    CHECK(gB.norm() > 0);
    CHECK(gA.norm() > 0);
  }
  // Exactly orthonormal factors: the norm terms vanish and contribute no gradient.
  const MatD Q = MatD::Identity(4, 2);
  MatD gB = MatD::Zero(4, 2);
  const auto L = dw::train::kasa_regularizer(Q, Eigen::VectorXd(Eigen::VectorXd::Zero(2)), MatD(Q.transpose()), {},
                                             dw::view(gB));
  CHECK(L.value == 0);
  CHECK(gB.norm() == 0);
  dwt::check_throws_with<dw::shape_error>(
      [] { (void)dw::train::kasa_regularizer(MatD(MatD::Ones(3, 2)), Eigen::VectorXd(Eigen::VectorXd::Ones(3)), MatD(MatD::Ones(2, 4))); },
      {"kasa_regularizer", "diag [3]"});
  dwt::check_throws_with<dw::argument_error>(
      [] {
        (void)dw::train::kasa_regularizer(MatD(MatD::Ones(3, 2)), Eigen::VectorXd(Eigen::VectorXd::Ones(2)),
                                          MatD(MatD::Ones(2, 4)), {.beta = -1});
      },
      {"non-negative"});
}

TEST_CASE("KaSA, BD-LoRA and TinyLoRA backward passes allocate nothing of the size of out × in") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 768, in = 512, T = 16, r = 8;
  const MatD W = dwt::random<MatD>(out, in, 1), X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const MatD B = dwt::random<MatD>(out, r, 4), A = dwt::random<MatD>(r, in, 5), Ab = dwt::random<MatD>(r, in / 4, 6);
  const MatD P = dwt::random<MatD>(5, r * r, 7);
  const Eigen::VectorXd d = Eigen::VectorXd::Ones(r), v = Eigen::VectorXd::Ones(5);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  MatD dX = MatD::Zero(T, in), gB = MatD::Zero(out, r), gA = MatD::Zero(r, in), gAb = MatD::Zero(r, in / 4);
  MatD gd = MatD::Zero(r, 1), gv = MatD::Zero(5, 1);
  {
    auto u = dw::kasa(B, d, A, dw::alpha(16));
    std::array<dw::dense<double>*, 3> gsl{&gB, &gd, &gA};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
          dense_bytes);
  }
  {
    auto u = dw::bd_lora(B, Ab, dw::bd_side::A, 4, dw::alpha(16));
    std::array<dw::dense<double>*, 2> gsl{&gB, &gAb};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
          dense_bytes);
    CHECK(gAb.norm() > 0);
  }
  {
    auto u = dw::tinylora(B, v, P, A);
    std::array<dw::dense<double>*, 3> gsl{nullptr, &gv, nullptr};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
          dense_bytes);
    CHECK(gv.norm() > 0);
  }
}
