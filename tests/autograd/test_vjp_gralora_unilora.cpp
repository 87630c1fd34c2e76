// SPDX-License-Identifier: MIT
// The VJPs of GraLoRA (gradients of the grid's A and B and of the hybrid LoRA's A_h, B_h)
// and UniLoRA (gradient of the shared θ through the index gather with 1/√count scales, indices
// repeated within and across A and B) against central differences in double through
// autograd::adapted_linear; odd shapes, k = 1…3, hr = 0 and > 0; the backward's largest
// allocation below one out × in matrix.
#include <deltaw/backend/cpu/gralora_vjp.hpp>
#include <deltaw/backend/cpu/unilora_vjp.hpp>

#include <cmath>
#include <vector>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

TEST_CASE("VJP of GraLoRA: gradients of A, B, the hybrid A_h, B_h and x") {
  std::mt19937_64 g(1611);
  for (int trial = 0; trial < 8; ++trial) {
    const Eigen::Index k = 1 + trial % 3, q = 1 + (trial / 3) % 2, r = k * q, hr = trial % 4 == 0 ? 0 : 1 + trial % 2;
    const Eigen::Index in = k * dim(g, 1, 3), out = k * dim(g, 1, 3), T = dim(g, 1, 4);
    const double s = 3.0 / double(r + hr);
    const MatD W = dwt::random<MatD>(out, in, 1000 + trial);
    auto x = param("x", T, in, 1010 + trial);
    auto A = param("A", in, r, 1020 + trial), B = param("B", k * r, out / k, 1030 + trial);
    const std::string what = "gralora " + std::to_string(out) + "x" + std::to_string(in) + " k" + std::to_string(k) + " r" +
                             std::to_string(r) + " hr" + std::to_string(hr);
    if (hr == 0) {  // empty hybrid factors (the VJP's slots 2 and 3 are [0, in] and [out, 0])
      auto Ah = param("A_h", 0, in, 1), Bh = param("B_h", out, 0, 2);
      auto run = [&](ag::tape<double>& t) {
        return ag::adapted_linear<double, 4>(t.param(*x), dw::view(W), {t.param(*A), t.param(*B), t.param(*Ah), t.param(*Bh)},
                                             [&](const auto& v) { return dw::gralora(v[0], v[1], k, dw::scale(s)); });
      };
      check(what, run, {x.get(), A.get(), B.get()}, 1040 + trial);
    } else {
      auto Ah = param("A_h", hr, in, 1050 + trial), Bh = param("B_h", out, hr, 1060 + trial);
      auto run = [&](ag::tape<double>& t) {
        return ag::adapted_linear<double, 4>(t.param(*x), dw::view(W), {t.param(*A), t.param(*B), t.param(*Ah), t.param(*Bh)},
                                             [&](const auto& v) { return dw::gralora(v[0], v[1], k, v[2], v[3], dw::scale(s)); });
      };
      check(what, run, {x.get(), A.get(), B.get(), Ah.get(), Bh.get()}, 1070 + trial);
    }
  }
}

TEST_CASE("VJP of UniLoRA: gradient of the shared theta and x") {
  std::mt19937_64 g(1612);
  for (int trial = 0; trial < 6; ++trial) {
    const Eigen::Index out = dim(g, 1, 6), in = dim(g, 1, 6), r = dim(g, 1, 3), T = dim(g, 1, 4);
    // d smaller than r·(in + out): indices repeat, so the scatter-add sums several entries.
    const Eigen::Index d = std::max<Eigen::Index>(1, r * (in + out) / 3);
    std::vector<long long> ia(std::size_t(r * in)), ib(std::size_t(out * r));
    std::uniform_int_distribution<long long> pick(0, d - 1);
    for (auto& v : ia) v = pick(g);
    for (auto& v : ib) v = pick(g);
    // Every θ entry used at least once (an unused entry has no gradient; gradcheck wants one).
    for (Eigen::Index i = 0; i < d && std::size_t(i) < ia.size() + ib.size(); ++i)
      (std::size_t(i) < ia.size() ? ia[std::size_t(i)] : ib[std::size_t(i) - ia.size()]) = i;
    const std::vector<std::span<const long long>> all{ia, ib};
    const auto inv = dw::unilora_inverse_sqrt_counts<long long>(d, all);
    std::vector<double> sa, sb;
    for (auto v : ia) sa.push_back(inv[std::size_t(v)]);
    for (auto v : ib) sb.push_back(inv[std::size_t(v)]);
    const MatD W = dwt::random<MatD>(out, in, 2000 + trial);
    auto x = param("x", T, in, 2010 + trial), th = param("theta", d, 1, 2020 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*th)}, [&](const auto& v) {
        return dw::unilora(out, in, r, std::span<const long long>(ia), std::span<const long long>(ib),
                           std::span<const double>(sa), std::span<const double>(sb),
                           dw::vector_view<const double>(v[0].data(), d));
      });
    };
    check("unilora " + std::to_string(out) + "x" + std::to_string(in) + " r" + std::to_string(r) + " d" + std::to_string(d), run,
          {x.get(), th.get()}, 2030 + trial);
  }
}

TEST_CASE("GraLoRA and UniLoRA backward allocate nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16, r = 8, k = 4, d = 1000;
  const MatD X = dwt::random<MatD>(T, in, 2), dY = dwt::random<MatD>(T, out, 3);
  const MatD A = dwt::random<MatD>(in, r, 4), B = dwt::random<MatD>(k * r, out / k, 5), Ah = dwt::random<MatD>(3, in, 6),
             Bh = dwt::random<MatD>(out, 3, 7);
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  auto u = dw::gralora(A, B, k, Ah, Bh, dw::scale(0.5));
  MatD dX = MatD::Zero(T, in), gA = MatD::Zero(in, r), gB = MatD::Zero(k * r, out / k), gAh = MatD::Zero(3, in),
       gBh = MatD::Zero(out, 3);
  std::array<dw::dense<double>*, 4> gs{&gA, &gB, &gAh, &gBh};
  CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX); }) <
        dense_bytes);
  CHECK(gA.norm() > 0);
  CHECK(gBh.norm() > 0);
  std::vector<long long> ia(std::size_t(r * in)), ib(std::size_t(out * r));
  for (std::size_t i = 0; i < ia.size(); ++i) ia[i] = (long long)((i * 7) % d);
  for (std::size_t i = 0; i < ib.size(); ++i) ib[i] = (long long)((i * 13 + 5) % d);
  const std::vector<double> sa(ia.size(), 0.3), sb(ib.size(), 0.2);
  const Eigen::VectorXd th = dwt::random<MatD>(d, 1, 8).col(0);
  auto v = dw::unilora(out, in, r, std::span<const long long>(ia), std::span<const long long>(ib), std::span<const double>(sa),
                       std::span<const double>(sb), th);
  MatD gt = MatD::Zero(d, 1);
  std::array<dw::dense<double>*, 1> gs1{&gt};
  dX.setZero();
  CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(v, X, dY, std::span<dw::dense<double>* const>(gs1), &dX); }) <
        dense_bytes);
  CHECK(gt.norm() > 0);
}
