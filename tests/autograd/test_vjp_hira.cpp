// SPDX-License-Identifier: MIT
// The VJP of HiRA: the gradients of B, A and dX against central differences in double through
// autograd::adapted_linear, odd shapes, r = 1, more rows than one panel; the backward's
// largest allocation below one out × in matrix.
#include <deltaw/backend/cpu/hira_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

TEST_CASE("VJP of HiRA: gradients of B, A and x") {
  std::mt19937_64 g(191);
  for (int trial = 0; trial < 7; ++trial) {
    const Eigen::Index out = trial == 6 ? 260 : dim(g, 1, 7), in = dim(g, 1, 6), T = dim(g, 1, 4);
    const Eigen::Index r = trial < 2 ? 1 : dim(g, 1, 3);
    const MatD W = dwt::random<MatD>(out, in, 900 + trial);
    auto x = param("x", T, in, 910 + trial);
    auto B = param("B", out, r, 920 + trial), A = param("A", r, in, 930 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 2>(t.param(*x), dw::view(W), {t.param(*B), t.param(*A)},
                                           [&W](const auto& v) { return dw::hira(dw::view(W), v[0], v[1]); });
    };
    check("hira " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r), run, {x.get(), B.get(), A.get()},
          940 + trial);
  }
}

TEST_CASE("HiRA backward allocates nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 768, in = 512, T = 16, r = 4;
  const MatD W = dwt::random<MatD>(out, in, 1), X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const MatD B = dwt::random<MatD>(out, r, 4), A = dwt::random<MatD>(r, in, 5);
  auto u = dw::hira(W, B, A);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  MatD dX = MatD::Zero(T, in), gB = MatD::Zero(out, r), gA = MatD::Zero(r, in);
  std::array<dw::dense<double>*, 2> gsl{&gB, &gA};
  CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
        dense_bytes);
  CHECK(gB.norm() > 0);
  CHECK(gA.norm() > 0);
}
