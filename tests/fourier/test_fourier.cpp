// SPDX-License-Identifier: MIT
// FourierFT, C3A and WaveFT (issue 16; deltaw/fourier.hpp, FFTW) against dense references in
// double built here from PEFT's formulas (FourierFT: Re(ifft2(S))·s written as a cosine sum;
// C3A: the circulant blocks entry by entry; WaveFT: Haar synthesis of the padded coefficient
// grid, cropped), never from deltaw's own materialize: apply,
// apply_transposed, materialize, merge / unmerge round trip, frobenius_norm, a lazy sum with
// LoRA, odd shapes, float; PEFT's FourierFT index draw against torch's randperm; VJPs against
// central differences; the errors; the largest allocation of apply / backward / merge below
// one out × in matrix.
#include <deltaw/fourier.hpp>

#include <cmath>
#include <numbers>
#include <numeric>
#include <set>

#include "alloc_counter.hpp"
#include "autograd/grad_util.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

/// ΔW[p, j] = s/(out·in)·Σ_k c_k·cos(2π(r_k·p/out + q_k·j/in)): torch.fft.ifft2(S).real·s.
MatD fourierft_ref(const Eigen::VectorXd& c, const dw::fourierft_indices& ix, Eigen::Index out, Eigen::Index in, double s) {
  MatD D = MatD::Zero(out, in);
  for (Eigen::Index p = 0; p < out; ++p)
    for (Eigen::Index j = 0; j < in; ++j) {
      double v = 0;
      for (Eigen::Index k = 0; k < c.size(); ++k)
        v += c[k] * std::cos(2 * std::numbers::pi *
                             (double(ix.rows[std::size_t(k)]) * p / double(out) + double(ix.cols[std::size_t(k)]) * j / double(in)));
      D(p, j) = s * v / double(out * in);
    }
  return D;
}

/// ΔW[m·b + k, j·b + t] = s·w_{m,j}[(t − k) mod b] (PEFT's get_circulant_fast / in).
MatD c3a_ref(const MatD& K, Eigen::Index out, Eigen::Index in, double s) {
  const Eigen::Index b = K.cols(), n = in / b;
  MatD D(out, in);
  for (Eigen::Index r = 0; r < out; ++r)
    for (Eigen::Index c = 0; c < in; ++c) D(r, c) = s * K((r / b) * n + c / b, ((c % b) - (r % b) + b) % b);
  return D;
}

/// PEFT's WaveFT get_delta_weight for db1: the coefficients on an [out', in'] grid (even
/// sizes), split into the quadrants cA | cH over cV | cD, one level of Haar synthesis
/// (pixel (2i + u, 2j + w) = (cA + (−1)^u·cH + (−1)^w·cV + (−1)^(u+w)·cD)/2), cropped to
/// [out, in], times s; without use_idwt the coefficients placed directly.
MatD waveft_ref(const Eigen::VectorXd& c, const dw::fourierft_indices& ix, Eigen::Index out, Eigen::Index in, double s,
                bool idwt) {
  if (!idwt) {
    MatD D = MatD::Zero(out, in);
    for (Eigen::Index k = 0; k < c.size(); ++k) D(ix.rows[std::size_t(k)], ix.cols[std::size_t(k)]) = s * c[k];
    return D;
  }
  const Eigen::Index P = out + out % 2, Q = in + in % 2, H = P / 2, Wd = Q / 2;
  MatD G = MatD::Zero(P, Q), F(P, Q);
  for (Eigen::Index k = 0; k < c.size(); ++k) G(ix.rows[std::size_t(k)], ix.cols[std::size_t(k)]) = c[k];
  for (Eigen::Index i = 0; i < H; ++i)
    for (Eigen::Index j = 0; j < Wd; ++j)
      for (int u = 0; u < 2; ++u)
        for (int w = 0; w < 2; ++w)
          F(2 * i + u, 2 * j + w) = 0.5 * (G(i, j) + (u ? -1 : 1) * G(i, Wd + j) + (w ? -1 : 1) * G(H + i, j) +
                                           (u == w ? 1 : -1) * G(H + i, Wd + j));
  return s * F.topLeftCorner(out, in);
}

dw::fourierft_indices random_indices(std::mt19937_64& g, Eigen::Index out, Eigen::Index in, Eigen::Index n) {
  std::vector<Eigen::Index> all(std::size_t(out * in));
  std::iota(all.begin(), all.end(), Eigen::Index(0));
  std::shuffle(all.begin(), all.end(), g);
  dw::fourierft_indices ix;
  for (Eigen::Index k = 0; k < n; ++k) {
    ix.rows.push_back(all[std::size_t(k)] / in);
    ix.cols.push_back(all[std::size_t(k)] % in);
  }
  return ix;
}

template <class U>
void check_against(const U& u, const MatD& dW, std::uint64_t seed, double tol) {
  for (Eigen::Index T : {Eigen::Index(0), Eigen::Index(1), Eigen::Index(7), Eigen::Index(70)}) {
    const MatD X = dwt::random<MatD>(T, dW.cols(), seed + T), G = dwt::random<MatD>(T, dW.rows(), seed + 100 + T);
    CHECK(dwt::rel_err(dw::apply(u, X), X * dW.transpose()) < tol);
    CHECK(dwt::rel_err(dw::apply_transposed(u, G), G * dW) < tol);
  }
  CHECK(dwt::rel_err(dw::materialize(u), dW) < tol);
  CHECK(std::abs(dw::frobenius_norm(u) - dW.norm()) <= tol * std::max(1.0, dW.norm()));
  MatD W = dwt::random<MatD>(dW.rows(), dW.cols(), seed + 7);
  const MatD W0 = W;
  dw::merge(W, u);
  CHECK(dwt::rel_err(W, W0 + dW) < tol);
  dw::unmerge(W, u);
  CHECK((W - W0).cwiseAbs().maxCoeff() < 1e-12 * std::max(1.0, W0.cwiseAbs().maxCoeff() + dW.cwiseAbs().maxCoeff()));
  // in a lazy sum with a LoRA
  const MatD B = dwt::random<MatD>(dW.rows(), 2, seed + 8), A = dwt::random<MatD>(2, dW.cols(), seed + 9);
  const MatD X = dwt::random<MatD>(5, dW.cols(), seed + 10);
  const auto e = dw::view(W0) + u + dw::lora(B, A, dw::scale(0.5));
  CHECK(dwt::rel_err(dw::apply(e, X), X * (W0 + dW + 0.5 * B * A).transpose()) < tol);
}

}  // namespace

TEST_CASE("FourierFT: ΔW = s·Re(ifft2(S)), every operation against the cosine sum in double") {
  std::mt19937_64 g(1601);
  for (int trial = 0; trial < 16; ++trial) {
    const auto out = dwag::dim(g, 1, 13), in = dwag::dim(g, 1, 13);
    const auto n = trial == 0 ? out * in : dwag::dim(g, 1, int(out * in));
    const auto ix = random_indices(g, out, in, n);
    const Eigen::VectorXd c = dwt::random<MatD>(n, 1, 50 + trial);
    const double s = trial % 3 == 0 ? 150.0 : -2.5;
    INFO("trial " << trial << " out " << out << " in " << in << " n " << n);
    const MatD dW = fourierft_ref(c, ix, out, in, s);
    auto u = dw::fourierft(c, ix, out, in, dw::scale(s));
    CHECK(u.parameter_count() == n);
    check_against(u, dW, 60 + 200 * trial, 1e-12);
    // float arithmetic (FFTW single precision)
    const Eigen::VectorXf cf = c.cast<float>();
    auto uf = dw::fourierft(cf, ix, out, in, dw::scale(s));
    const MatD X = dwt::random<MatD>(9, in, 70 + trial);
    const Eigen::MatrixXf Xf = X.cast<float>();
    CHECK(dwt::rel_err(dw::apply(uf, Xf).cast<double>().eval(), X * dW.transpose()) < 1e-5);
  }
}

TEST_CASE("FourierFT: PEFT's indices are torch.randperm(out·in, seed)[:n], reproduced") {
  // torch.randperm(77, generator=torch.Generator().manual_seed(777))[:10] printed by torch 2.x
  const std::vector<Eigen::Index> torch77 = {12, 72, 48, 27, 73, 70, 33, 44, 22, 57};
  const auto ix = dw::fourierft_peft_indices(7, 11, 10, 777);
  for (std::size_t k = 0; k < torch77.size(); ++k) {
    CHECK(ix.rows[k] == torch77[k] / 11);
    CHECK(ix.cols[k] == torch77[k] % 11);
  }
  // the whole permutation: distinct, every index once
  const auto all = dw::fourierft_peft_indices(5, 9, 45, 3);
  std::set<Eigen::Index> seen;
  for (std::size_t k = 0; k < 45; ++k) seen.insert(all.rows[k] * 9 + all.cols[k]);
  CHECK(seen.size() == 45);
  dwt::check_throws_with<dw::argument_error>([] { dw::fourierft_peft_indices(3, 4, 13, 1); }, {"n ≤ out·in"});
  dwt::check_throws_with<dw::argument_error>([] { dw::fourierft_peft_indices(20000, 20000, 5, 1); }, {"randperm"});
}

TEST_CASE("FourierFT: errors name the shapes") {
  const Eigen::VectorXd c = Eigen::VectorXd::Ones(2);
  dwt::check_throws_with<dw::shape_error>([&] { dw::fourierft(c, dw::fourierft_indices{{0, 3}, {0, 1}}, 3, 4, dw::scale(1)); },
                                          {"frequency 1", "(3, 1)", "[3, 4]"});
  dwt::check_throws_with<dw::shape_error>([&] { dw::fourierft(c, dw::fourierft_indices{{0}, {0}}, 3, 4, dw::scale(1)); },
                                          {"2 coefficients"});
  dwt::check_throws_with<dw::argument_error>([&] { dw::fourierft(c, dw::fourierft_indices{{1, 1}, {2, 2}}, 3, 4, dw::scale(1)); },
                                             {"twice"});
}

TEST_CASE("C3A: block-circulant ΔW, every operation against the dense blocks in double") {
  std::mt19937_64 g(1602);
  for (int trial = 0; trial < 14; ++trial) {
    const auto b = trial < 2 ? Eigen::Index(1 + trial) : dwag::dim(g, 1, 9);
    const auto m = dwag::dim(g, 1, 4), n = dwag::dim(g, 1, 4), out = m * b, in = n * b;
    INFO("trial " << trial << " b " << b << " out " << out << " in " << in);
    const MatD K = dwt::random<MatD>(m * n, b, 80 + trial);
    const MatD dW = c3a_ref(K, out, in, 1.0 / double(in));
    auto u = dw::c3a(K, out, in);
    CHECK(u.block_size() == b);
    CHECK(u.parameter_count() == out * in / b);
    check_against(u, dW, 90 + 200 * trial, 1e-12);
    const Eigen::MatrixXf Kf = K.cast<float>();
    auto uf = dw::c3a(Kf, out, in, dw::scale(0.75));
    const MatD X = dwt::random<MatD>(6, in, 95 + trial);
    const Eigen::MatrixXf Xf = X.cast<float>();
    CHECK(dwt::rel_err(dw::apply(uf, Xf).cast<double>().eval(), X * c3a_ref(K, out, in, 0.75).transpose()) < 1e-5);
  }
  const MatD K = MatD::Ones(6, 4);
  dwt::check_throws_with<dw::shape_error>([&] { dw::c3a(K, 8, 10); }, {"divide", "[8, 10]"});
  dwt::check_throws_with<dw::shape_error>([&] { dw::c3a(K, 8, 8); }, {"4 rows", "[6, 4]"});
}

TEST_CASE("WaveFT (Haar): ΔW = s·IDWT2 of sparse coefficients, every operation against the synthesis in double") {
  std::mt19937_64 g(1604);
  for (int trial = 0; trial < 16; ++trial) {
    const bool idwt = trial % 4 != 3;
    const auto out = dwag::dim(g, 1, 13), in = dwag::dim(g, 1, 13);
    const auto n = trial == 0 ? out * in : dwag::dim(g, 1, int(out * in));
    const auto ix = random_indices(g, out, in, n);
    const Eigen::VectorXd c = dwt::random<MatD>(n, 1, 150 + trial);
    INFO("trial " << trial << " out " << out << " in " << in << " n " << n << (idwt ? "" : " direct"));
    const MatD dW = waveft_ref(c, ix, out, in, 25.0, idwt);
    auto u = dw::waveft(c, ix, out, in, dw::scale(25.0), idwt);
    check_against(u, dW, 160 + 200 * trial, 1e-12);
    const Eigen::VectorXf cf = c.cast<float>();
    const MatD X = dwt::random<MatD>(4, in, 170 + trial);
    const Eigen::MatrixXf Xf = X.cast<float>();
    CHECK(dwt::rel_err(dw::apply(dw::waveft(cf, ix, out, in, dw::scale(25.0), idwt), Xf).cast<double>().eval(),
                       X * dW.transpose()) < 1e-5);
  }
}

TEST_CASE("VJPs of FourierFT (spectrum) and C3A (kernel) against central differences") {
  using namespace dwag;
  std::mt19937_64 g(1603);
  for (int trial = 0; trial < 6; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4), n = dim(g, 1, int(out * in));
    const auto ix = random_indices(g, out, in, n);
    const MatD W = dwt::random<MatD>(out, in, 700 + trial);
    auto x = param("x", T, in, 710 + trial);
    auto c = param("c", 1, n, 720 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*c)}, [&](const auto& v) {
        return dw::fourierft(dw::vector_view<const double>(v[0].data(), n, v[0].col_stride()), ix, out, in, dw::scale(3.0));
      });
    };
    check("fourierft " + std::to_string(out) + "x" + std::to_string(in) + " n" + std::to_string(n), run, {x.get(), c.get()},
          730 + trial);
  }
  for (int trial = 0; trial < 6; ++trial) {
    const auto out = dim(g, 1, 7), in = dim(g, 1, 8), T = dim(g, 1, 4), n = dim(g, 1, int(out * in));
    const auto ix = random_indices(g, out, in, n);
    const bool idwt = trial != 5;
    const MatD W = dwt::random<MatD>(out, in, 780 + trial);
    auto x = param("x", T, in, 785 + trial);
    auto c = param("c", 1, n, 790 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*c)}, [&](const auto& v) {
        return dw::waveft(dw::vector_view<const double>(v[0].data(), n, v[0].col_stride()), ix, out, in, dw::scale(2.0), idwt);
      });
    };
    check("waveft " + std::to_string(out) + "x" + std::to_string(in) + " n" + std::to_string(n), run, {x.get(), c.get()},
          795 + trial);
  }
  for (int trial = 0; trial < 6; ++trial) {
    const auto b = dim(g, 1, 5), m = dim(g, 1, 3), nb = dim(g, 1, 3), T = dim(g, 1, 4);
    const auto out = m * b, in = nb * b;
    const MatD W = dwt::random<MatD>(out, in, 740 + trial);
    auto x = param("x", T, in, 750 + trial);
    auto k = param("kernel", m * nb, b, 760 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*k)},
                                           [&](const auto& v) { return dw::c3a(v[0], out, in); });
    };
    check("c3a b" + std::to_string(b) + " " + std::to_string(out) + "x" + std::to_string(in), run, {x.get(), k.get()}, 770 + trial);
  }
}

TEST_CASE("FourierFT, C3A and WaveFT apply / backward / merge allocate nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  constexpr Eigen::Index out = 512, in = 768, T = 16;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(double);
  const MatD X = dwt::random<MatD>(T, in, 1), dY = dwt::random<MatD>(T, out, 2);
  MatD W = dwt::random<MatD>(out, in, 3);
  const Eigen::VectorXd c = dwt::random<MatD>(1000, 1, 4);
  auto f = dw::fourierft(c, out, in, 777, dw::scale(150));
  const MatD K = dwt::random<MatD>((out / 16) * (in / 16), 16, 5);
  auto cc = dw::c3a(K, out, in);
  auto run = [&](const auto& u, MatD& g) {
    CHECK(dwt::largest_allocation([&] { (void)dw::apply(dw::view(W) + u, X); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { (void)dw::apply_transposed(dw::view(W) + u, dY); }) < dense_bytes);
    MatD dX = MatD::Zero(T, in);
    std::array<dw::dense<double>*, 1> gs{&g};
    CHECK(dwt::largest_allocation([&] { dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX); }) <
          dense_bytes);
    CHECK(g.norm() > 0);
    CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  };
  MatD gc = MatD::Zero(1, 1000), gk = MatD::Zero(K.rows(), K.cols()), gw = MatD::Zero(1, 1000);
  run(f, gc);
  run(cc, gk);
  run(dw::waveft(c, out, in, 777, dw::scale(25)), gw);
}
