// SPDX-License-Identifier: MIT
// The VJPs of BOFT (the free rotation parameters R through Cayley and Cayley–Neumann, the
// output scale s, one to three butterfly factors) and AdaLoRA (B, E, A, a pruned triplet):
// every factor's gradient and dX against central differences in double through
// autograd::adapted_linear, odd shapes; the backward's largest allocation below one in × in
// (or out × in) matrix.
#include <deltaw/backend/cpu/adalora_vjp.hpp>
#include <deltaw/backend/cpu/boft_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

namespace {
dw::vector_view<const double> as_vector(const dw::matrix_view<const double>& m) {
  return dw::vector_view<const double>(m.data(), m.rows() == 1 ? m.cols() : m.rows(),
                                       m.rows() == 1 ? m.col_stride() : m.row_stride());
}
}  // namespace

TEST_CASE("VJP of BOFT: gradients of R (Cayley, Cayley–Neumann), s and x, m butterfly factors") {
  struct Case {
    Eigen::Index out, b, nb, m;
    bool neumann;
  };
  const Case cases[] = {{3, 3, 2, 1, false}, {4, 2, 4, 2, false}, {3, 2, 4, 3, false}, {2, 4, 2, 2, false},
                        {3, 3, 2, 1, true},  {2, 2, 4, 2, true},  {5, 1, 3, 1, false}};
  int trial = 0;
  for (const auto& c : cases) {
    ++trial;
    const auto in = c.b * c.nb;
    const MatD W = dwt::random<MatD>(c.out, in, 600 + trial);
    auto x = param("x", 3, in, 610 + trial);
    auto R = param("R", c.m * in, c.b, 620 + trial, 0.4);
    auto s = trial % 2 ? param("s", c.out, 1, 630 + trial) : param("s", 1, c.out, 630 + trial);
    const dw::oft_options o{c.neumann, 5};
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 2>(t.param(*x), dw::view(W), {t.param(*R), t.param(*s)}, [&W, o](const auto& v) {
        return dw::boft(dw::view(W), v[0], as_vector(v[1]), o);
      });
    };
    const std::string tag = std::string("boft ") + (c.neumann ? "neumann" : "cayley") + " b" + std::to_string(c.b) + " nb" +
                            std::to_string(c.nb) + " m" + std::to_string(c.m);
    if (c.b == 1) check(tag, run, {x.get(), s.get()}, 640 + trial);  // 1 × 1 skew parts are 0
    else check(tag, run, {x.get(), R.get(), s.get()}, 640 + trial);
  }
}

TEST_CASE("VJP of AdaLoRA: gradients of B, E, A and x") {
  std::mt19937_64 g(163);
  for (int trial = 0; trial < 6; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4), r = trial < 2 ? 1 : dim(g, 2, 4);
    const MatD W = dwt::random<MatD>(out, in, 700 + trial);
    auto x = param("x", T, in, 710 + trial);
    auto B = param("B", out, r, 720 + trial), A = param("A", r, in, 730 + trial);
    auto E = trial % 2 ? param("E", r, 1, 740 + trial) : param("E", 1, r, 740 + trial);
    const double alpha = 2 + trial;
    const Eigen::Index ranknum = r + 1;
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 3>(t.param(*x), dw::view(W), {t.param(*B), t.param(*E), t.param(*A)},
                                           [alpha, ranknum](const auto& v) {
                                             return dw::adalora(v[0], as_vector(v[1]), v[2], dw::alpha(alpha), ranknum);
                                           });
    };
    check("adalora " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r), run,
          {x.get(), B.get(), E.get(), A.get()}, 750 + trial);
  }
}

TEST_CASE("BOFT and AdaLoRA backward passes allocate nothing of the size of an in × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16, b = 8, m = 2, r = 6;
  const MatD W = dwt::random<MatD>(out, in, 1), X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  MatD dX = MatD::Zero(T, in);
  {
    const MatD Rp = 0.1 * dwt::random<MatD>(m * in, b, 4);
    const Eigen::VectorXd s = Eigen::VectorXd::Constant(out, 1.1);
    auto u = dw::boft(W, Rp, s);
    MatD gR = MatD::Zero(Rp.rows(), Rp.cols()), gs = MatD::Zero(out, 1);
    std::array<dw::dense<double>*, 2> gsl{&gR, &gs};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
          dense_bytes);
  }
  {
    const MatD B = dwt::random<MatD>(out, r, 5), A = dwt::random<MatD>(r, in, 6);
    const Eigen::VectorXd E = Eigen::VectorXd::Constant(r, 0.7);
    auto u = dw::adalora(B, E, A, dw::alpha(4), r);
    MatD gB = MatD::Zero(out, r), gE = MatD::Zero(r, 1), gA = MatD::Zero(r, in);
    std::array<dw::dense<double>*, 3> gsl{&gB, &gE, &gA};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
          dense_bytes);
  }
}
