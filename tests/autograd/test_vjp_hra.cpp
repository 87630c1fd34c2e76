// SPDX-License-Identifier: MIT
// The VJP of HRA (plain product of reflections and Gram–Schmidt): the gradient of U and dX
// against central differences in double through autograd::adapted_linear, random odd shapes,
// r = 1 and r = in; the backward's largest allocation below one out × in matrix.
#include <deltaw/backend/cpu/hra_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

TEST_CASE("VJP of HRA: gradient of U (plain and Gram–Schmidt) and x") {
  std::mt19937_64 g(167);
  for (int trial = 0; trial < 14; ++trial) {
    const bool gs = trial % 2 == 1;
    const auto out = dim(g, 1, 7), in = trial < 4 ? dim(g, 1, 8) : dim(g, 3, 8), T = dim(g, 1, 4);
    // r = 1, r = in, then 2 ≤ r < in (for Gram–Schmidt, r = in makes H = −I).
    const auto r = trial < 2 ? 1 : trial < 4 ? in : dim(g, 2, int(in) - 1);
    const MatD W = dwt::random<MatD>(out, in, 600 + trial);
    auto x = param("x", T, in, 610 + trial);
    auto U = param("U", in, r, 620 + trial);
    const dw::hra_options o{gs};
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*U)},
                                           [&W, o](const auto& v) { return dw::hra(dw::view(W), v[0], o); });
    };
    const std::string tag = std::string("hra ") + (gs ? "gs " : "plain ") + std::to_string(out) + "x" + std::to_string(in) +
                            " r" + std::to_string(r);
    if (gs && r == in) {
      check(tag, run, {x.get()}, 630 + trial);  // Q·Qᵀ = I: H = −I does not depend on U
    } else {
      check(tag, run, {x.get(), U.get()}, 630 + trial);
    }
  }
  // Gram–Schmidt with r = in: H = −I, so ∂U is zero up to rounding.
  const MatD Wi = dwt::random<MatD>(3, 4, 5), Xi = dwt::random<MatD>(2, 4, 6), dYi = dwt::random<MatD>(2, 3, 7);
  auto u = dw::hra(Wi, dwt::random<MatD>(4, 4, 8), dw::hra_options{true});
  MatD gu = MatD::Zero(4, 4);
  std::array<dw::dense<double>*, 1> gsl{&gu};
  dw::cpu::backward<double>(u, Xi, dYi, std::span<dw::dense<double>* const>(gsl), nullptr);
  CHECK(gu.norm() < 1e-12);
}

TEST_CASE("HRA backward allocates nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16, r = 8;
  const MatD W = dwt::random<MatD>(out, in, 1), X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const MatD U = dwt::random<MatD>(in, r, 4);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  for (bool gs : {false, true}) {
    auto u = dw::hra(W, U, dw::hra_options{gs});
    MatD dX = MatD::Zero(T, in), gu = MatD::Zero(in, r);
    std::array<dw::dense<double>*, 1> gsl{&gu};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
          dense_bytes);
    CHECK(gu.norm() > 0);
  }
}
