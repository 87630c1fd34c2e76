// SPDX-License-Identifier: MIT
// The VJPs of LoHa (four factors), IA³ (output and input scaling) and OFT (Cayley and
// Cayley–Neumann, block_share, block size 1): every factor's gradient and dX against
// central differences in double through autograd::adapted_linear, random odd shapes and
// rank 1; the backward's largest allocation below one out × in matrix.
#include <deltaw/backend/cpu/ia3_vjp.hpp>
#include <deltaw/backend/cpu/loha_vjp.hpp>
#include <deltaw/backend/cpu/oft_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

TEST_CASE("VJP of LoHa: gradients of B1, A1, B2, A2 and x") {
  std::mt19937_64 g(161);
  for (int trial = 0; trial < 8; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4);
    const auto r1 = trial < 2 ? 1 : dim(g, 1, 3), r2 = trial < 4 ? r1 : dim(g, 1, 3);
    const MatD W = dwt::random<MatD>(out, in, 300 + trial);
    auto x = param("x", T, in, 310 + trial);
    auto B1 = param("B1", out, r1, 320 + trial), A1 = param("A1", r1, in, 330 + trial);
    auto B2 = param("B2", out, r2, 340 + trial), A2 = param("A2", r2, in, 350 + trial);
    const double s = 0.5 + trial;
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 4>(t.param(*x), dw::view(W), {t.param(*B1), t.param(*A1), t.param(*B2), t.param(*A2)},
                                           [s](const auto& v) { return dw::loha(v[0], v[1], v[2], v[3], dw::scale(s)); });
    };
    check("loha " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r1) + "," + std::to_string(r2), run,
          {x.get(), B1.get(), A1.get(), B2.get(), A2.get()}, 360 + trial);
  }
}

TEST_CASE("VJP of IA³: gradient of l (output and input scaling) and x") {
  std::mt19937_64 g(162);
  for (int trial = 0; trial < 8; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4);
    const bool input = trial % 2 == 1;
    const MatD W = dwt::random<MatD>(out, in, 400 + trial);
    auto x = param("x", T, in, 410 + trial);
    const auto n = input ? in : out;
    auto l = trial % 4 < 2 ? param("l", 1, n, 420 + trial) : param("l", n, 1, 420 + trial);  // both slot layouts
    const auto side = input ? dw::ia3_side::input : dw::ia3_side::output;
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*l)}, [&W, side, n](const auto& v) {
        const auto& m = v[0];
        return dw::ia3(dw::view(W), dw::vector_view<const double>(m.data(), n, m.rows() == 1 ? m.col_stride() : m.row_stride()),
                       side);
      });
    };
    check(std::string("ia3 ") + (input ? "input " : "output ") + std::to_string(out) + "x" + std::to_string(in), run,
          {x.get(), l.get()}, 430 + trial);
  }
}

TEST_CASE("VJP of OFT: gradient of Q through Cayley and Cayley–Neumann, block_share, and x") {
  struct Case {
    Eigen::Index out, b, blocks, nq;
    bool neumann;
    int terms;
  };
  const Case cases[] = {{3, 3, 2, 2, true, 5}, {4, 4, 2, 1, true, 5}, {5, 3, 3, 3, false, 5}, {2, 2, 3, 1, false, 5},
                        {3, 3, 2, 2, true, 3}, {3, 4, 1, 1, true, 7}, {3, 3, 2, 2, true, 2}, {4, 1, 5, 5, true, 5}};
  int trial = 0;
  for (const auto& c : cases) {
    ++trial;
    const auto in = c.b * c.blocks;
    const MatD W = dwt::random<MatD>(c.out, in, 500 + trial);
    auto x = param("x", 3, in, 510 + trial);
    auto Q = param("Q", c.nq, c.b * (c.b - 1) / 2, 520 + trial, 0.3);
    const dw::oft_options o{c.neumann, c.terms};
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*Q)},
                                           [&W, o](const auto& v) { return dw::oft(dw::view(W), v[0], o); });
    };
    const std::string tag = std::string("oft ") + (c.neumann ? "neumann" + std::to_string(c.terms) : "cayley") + " b" +
                            std::to_string(c.b) + " nq" + std::to_string(c.nq);
    if (c.b == 1) {  // no parameters: only x has a gradient
      check(tag, run, {x.get()}, 530 + trial);
    } else {
      check(tag, run, {x.get(), Q.get()}, 530 + trial);
    }
  }
}

TEST_CASE("LoHa, IA³, OFT backward passes allocate nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16, r = 4, b = 16;
  const MatD W = dwt::random<MatD>(out, in, 1), X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  MatD dX = MatD::Zero(T, in);
  {
    const MatD B1 = dwt::random<MatD>(out, r, 4), A1 = dwt::random<MatD>(r, in, 5), B2 = dwt::random<MatD>(out, r, 6),
               A2 = dwt::random<MatD>(r, in, 7);
    auto u = dw::loha(B1, A1, B2, A2, dw::alpha(4));
    MatD g1 = MatD::Zero(out, r), g2 = MatD::Zero(r, in), g3 = MatD::Zero(out, r), g4 = MatD::Zero(r, in);
    std::array<dw::dense<double>*, 4> gs{&g1, &g2, &g3, &g4};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX); }) <
          dense_bytes);
  }
  {
    const Eigen::VectorXd l = Eigen::VectorXd::Constant(in, 1.2);
    auto u = dw::ia3(W, l, dw::ia3_side::input);
    MatD gl = MatD::Zero(1, in);
    std::array<dw::dense<double>*, 1> gs{&gl};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX); }) <
          dense_bytes);
  }
  {
    const MatD Q = 0.1 * dwt::random<MatD>(in / b, b * (b - 1) / 2, 8);
    auto u = dw::oft(W, Q);
    MatD gq = MatD::Zero(Q.rows(), Q.cols());
    std::array<dw::dense<double>*, 1> gs{&gq};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX); }) <
          dense_bytes);
  }
}
