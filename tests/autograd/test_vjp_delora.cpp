// SPDX-License-Identifier: MIT
// The VJP of DeLoRA: the gradients of B, A, λ and dX against central differences in double
// through autograd::adapted_linear (w frozen), odd shapes, r = 1; a row of A below PEFT's
// 1e-4 norm floor (no gradient through the clamped norm); the backward's largest allocation
// below one out × in matrix.
#include <deltaw/backend/cpu/delora_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

TEST_CASE("VJP of DeLoRA: gradients of B, A, lambda and x") {
  std::mt19937_64 g(201);
  for (int trial = 0; trial < 8; ++trial) {
    // out, in ≥ 2: with one row (column) B's (A's) normalised columns (rows) are ±1 and its
    // gradient is exactly zero, which the check's "every gradient non-zero" would flag.
    const Eigen::Index out = dim(g, 2, 7), in = dim(g, 2, 6), T = dim(g, 1, 4), r = trial < 2 ? 1 : dim(g, 1, 3);
    const MatD W = dwt::random<MatD>(out, in, 1000 + trial);
    const Eigen::VectorXd w = dw::delora_weight_norms(W);
    auto x = param("x", T, in, 1010 + trial);
    auto B = param("B", out, r, 1020 + trial), A = param("A", r, in, 1030 + trial), l = param("lambda", 1, 1, 1040 + trial);
    if (trial == 7) A->value().row(0) *= 1e-7;  // clamped norm
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 3>(t.param(*x), dw::view(W), {t.param(*B), t.param(*A), t.param(*l)},
                                           [&w](const auto& v) {
                                             return dw::delora(v[0], v[1], dw::vector_view<const double>(v[2].data(), 1),
                                                               dw::vector_view<const double>(w.data(), w.size()));
                                           });
    };
    check("delora " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r), run,
          {x.get(), B.get(), A.get(), l.get()}, 1050 + trial, trial == 7 ? 1e-5 : 1e-6);  // clamped: larger curvature
  }
}

TEST_CASE("DeLoRA backward allocates nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16, r = 8;
  const MatD W = dwt::random<MatD>(out, in, 1), X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const MatD B = dwt::random<MatD>(out, r, 4), A = dwt::random<MatD>(r, in, 5);
  const Eigen::VectorXd l = Eigen::VectorXd::Constant(1, 3.0), w = dw::delora_weight_norms(W);
  auto u = dw::delora(B, A, l, w);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  MatD dX = MatD::Zero(T, in), gB = MatD::Zero(out, r), gA = MatD::Zero(r, in), gl = MatD::Zero(1, 1);
  std::array<dw::dense<double>*, 3> gsl{&gB, &gA, &gl};
  CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
        dense_bytes);
  CHECK(gB.norm() > 0);
  CHECK(gl.norm() > 0);
}
