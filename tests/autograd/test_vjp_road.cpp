// SPDX-License-Identifier: MIT
// The VJP of RoAd (road_1, road_2, road_4): the gradients of θ and α and dX against central
// differences in double through autograd::adapted_linear, odd input sizes, group sizes 2–6,
// both gradient slot layouts; the backward's largest allocation below one out × in matrix.
#include <deltaw/backend/cpu/road_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

TEST_CASE("VJP of RoAd: gradients of theta, alpha and x") {
  std::mt19937_64 g(181);
  const dw::road_variant vs[] = {dw::road_variant::road_1, dw::road_variant::road_2, dw::road_variant::road_4};
  for (int trial = 0; trial < 9; ++trial) {
    const auto v = vs[trial % 3];
    const Eigen::Index gs = 2 * dim(g, 1, 3), out = gs * dim(g, 1, 2), in = dim(g, 1, 7), T = dim(g, 1, 4);
    const Eigen::Index n = dw::road_parameter_size(v, out);
    const MatD W = dwt::random<MatD>(out, in, 800 + trial);
    auto x = param("x", T, in, 810 + trial);
    auto th = trial % 2 == 0 ? param("theta", 1, n, 820 + trial) : param("theta", n, 1, 820 + trial);
    auto al = trial % 2 == 0 ? param("alpha", n, 1, 830 + trial) : param("alpha", 1, n, 830 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 2>(t.param(*x), dw::view(W), {t.param(*th), t.param(*al)},
                                           [&W, v, gs, n](const auto& p) {
                                             auto vec = [n](const auto& m) {
                                               return dw::vector_view<const double>(m.data(), n, m.rows() == 1 ? m.col_stride() : m.row_stride());
                                             };
                                             return dw::road(dw::view(W), vec(p[0]), vec(p[1]), v, gs);
                                           });
    };
    check(std::string("road ") + dw::road_variant_name(v) + " g" + std::to_string(gs) + " " + std::to_string(out) + "x" +
              std::to_string(in),
          run, {x.get(), th.get(), al.get()}, 840 + trial);
  }
}

TEST_CASE("RoAd backward allocates nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16;
  const MatD W = dwt::random<MatD>(out, in, 1), X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const Eigen::VectorXd th = dwt::random<MatD>(out, 1, 4).col(0), al = dwt::random<MatD>(out, 1, 5).col(0);
  auto u = dw::road(W, th, al, dw::road_variant::road_2);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  MatD dX = MatD::Zero(T, in), gt = MatD::Zero(1, out), ga = MatD::Zero(out, 1);
  std::array<dw::dense<double>*, 2> gsl{&gt, &ga};
  CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
        dense_bytes);
  CHECK(gt.norm() > 0);
  CHECK(ga.norm() > 0);
}
