// SPDX-License-Identifier: MIT
// The VJP of SHiRA: the gradient of the values v and dX against central differences in
// double through autograd::adapted_linear (random patterns in random order, both gradient
// slot layouts, nnz = out·in); the backward's largest allocation below one out × in matrix.
#include <deltaw/backend/cpu/shira_vjp.hpp>

#include <numeric>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

namespace {
std::shared_ptr<const dw::shira_pattern> random_shira_pattern(std::mt19937_64& g, Eigen::Index out, Eigen::Index in,
                                                              Eigen::Index nnz) {
  std::vector<Eigen::Index> all(std::size_t(out * in));
  std::iota(all.begin(), all.end(), Eigen::Index(0));
  std::shuffle(all.begin(), all.end(), g);
  std::vector<dw::index_t> r, c;
  for (Eigen::Index k = 0; k < nnz; ++k) {
    r.push_back(all[std::size_t(k)] / in);
    c.push_back(all[std::size_t(k)] % in);
  }
  return dw::detail::shira_make_pattern(out, in, std::span<const dw::index_t>(r), std::span<const dw::index_t>(c));
}
}  // namespace

TEST_CASE("VJP of SHiRA: gradient of v and x") {
  std::mt19937_64 g(171);
  for (int trial = 0; trial < 8; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4);
    const Eigen::Index nnz = trial == 0 ? out * in : dim(g, 1, int(out * in));
    const auto p = random_shira_pattern(g, out, in, nnz);
    const MatD W = dwt::random<MatD>(out, in, 700 + trial);
    auto x = param("x", T, in, 710 + trial);
    auto v = trial % 2 == 0 ? param("v", 1, nnz, 720 + trial) : param("v", nnz, 1, 720 + trial);
    const double s = 0.5 + trial;
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*v)}, [p, s, nnz](const auto& vv) {
        const auto& m = vv[0];
        return dw::shira(p, dw::vector_view<const double>(m.data(), nnz, m.rows() == 1 ? m.col_stride() : m.row_stride()),
                         dw::scale(s));
      });
    };
    check("shira " + std::to_string(out) + "x" + std::to_string(in) + " nnz" + std::to_string(nnz), run, {x.get(), v.get()},
          730 + trial);
  }
}

TEST_CASE("SHiRA backward allocates nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16, r = 8;
  std::mt19937_64 g(9);
  const auto p = random_shira_pattern(g, out, in, r * (out + in));
  const MatD X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const Eigen::VectorXd v = dwt::random<MatD>(p->nnz(), 1, 4).col(0);
  auto u = dw::shira(p, v);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  MatD dX = MatD::Zero(T, in), gv = MatD::Zero(1, p->nnz());
  std::array<dw::dense<double>*, 1> gsl{&gv};
  CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gsl), &dX); }) <
        dense_bytes);
  CHECK(gv.norm() > 0);
  CHECK(dX.norm() > 0);
}
