// SPDX-License-Identifier: MIT
// cuSOLVER-backed linear algebra on device-resident data (cuda/include/deltaw/cuda/
// linalg.cuh, spectral.cuh, init.cuh) against the CPU versions on the same stored values:
// the randomized SVD of a device weight, of a device LoRA and of W + LoRA (same sketch:
// singular values and subspaces |UᵀU'| within 1e-10 in double, 1e-5 in float); the factored
// SVD of s·B·A (QR of B and Aᵀ, SVD of the r × r core); PiSSA (exact and randomized) and
// OLoRA factors and the rewritten weight; intruder dimensions; and, independently of the
// CPU code, reconstructions against dense double products and the scratch high-water mark
// of the factored versions (below one out × in matrix).
// In the nvcc build it joins test_cuda_lora, whose test_cuda_lora.cu skips (exit 77)
// without a usable device.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/cuda/init.cuh>
#include <deltaw/cuda/linalg.cuh>
#include <deltaw/cuda/spectral.cuh>
#include <deltaw/deltaw.hpp>
#include <deltaw/init/olora.hpp>
#include <deltaw/init/pissa.hpp>
#include <deltaw/spectral/factored_spectrum.hpp>
#include <deltaw/spectral/intruder.hpp>

#include <Eigen/QR>
#include <cmath>
#include <vector>

#include "cuda_test_util.cuh"
#include "test_util.hpp"

namespace cuda_linalg_test {

namespace dw = deltaw;
using dw::index_t;
using dwt::MatD;
using CMatD = Eigen::MatrixXd;

template <class C>
constexpr double tol() {
  return std::is_same_v<C, double> ? 1e-10 : 1e-5;
}

/// Q·diag(σ)·Pᵀ with random orthonormal Q, P and σ_i = 0.7^i: a spectrum with gaps.
inline MatD decaying(index_t m, index_t n, std::uint64_t seed) {
  const index_t t = std::min(m, n);
  const CMatD Q = Eigen::HouseholderQR<CMatD>(CMatD(dwt::random(m, t, seed))).householderQ() * CMatD::Identity(m, t);
  const CMatD P =
      Eigen::HouseholderQR<CMatD>(CMatD(dwt::random(n, t, seed + 1))).householderQ() * CMatD::Identity(n, t);
  Eigen::VectorXd s(t);
  for (index_t i = 0; i < t; ++i) s(i) = 3.0 * std::pow(0.7, double(i));
  return Q * s.asDiagonal() * P.transpose();
}

/// U·diag(S)·Vᵀ in double.
template <class C>
CMatD product(const dw::svd_result<C>& r) {
  return r.U.template cast<double>() * r.S.template cast<double>().asDiagonal() * r.V.template cast<double>().transpose();
}

/// Two SVDs agree: singular values and the rank-k product U·S·Vᵀ within t relative to the
/// largest value; each pair of vectors (u_j, v_j) equal up to one common sign, |UᵀU'| and
/// |VᵀV'| the identity within t·σ₁/gap (Davis–Kahan: a vector's rounding error grows as
/// the gap to its neighbours shrinks; in float that is visible at t = 1e-5).
template <class C>
void check_same_svd(const dw::svd_result<C>& cpu, const dw::svd_result<C>& dev, double t) {
  REQUIRE(cpu.S.size() == dev.S.size());
  REQUIRE(cpu.U.rows() == dev.U.rows());
  REQUIRE(cpu.V.rows() == dev.V.rows());
  const index_t k = cpu.S.size();
  if (k == 0) return;
  const double smax = std::max(1e-300, double(cpu.S(0)));
  CHECK((cpu.S.template cast<double>() - dev.S.template cast<double>()).cwiseAbs().maxCoeff() / smax <= t);
  CHECK((product(cpu) - product(dev)).cwiseAbs().maxCoeff() / smax <= t);
  double gap = smax;
  for (index_t j = 0; j + 1 < k; ++j) gap = std::min(gap, double(cpu.S(j) - cpu.S(j + 1)));
  const double tv = t * std::max(1.0, smax / std::max(gap, 1e-300));
  CAPTURE(tv);
  const CMatD uu = cpu.U.template cast<double>().transpose() * dev.U.template cast<double>();
  const CMatD vv = cpu.V.template cast<double>().transpose() * dev.V.template cast<double>();
  CHECK((uu.cwiseAbs() - CMatD::Identity(k, k)).cwiseAbs().maxCoeff() <= tv);
  CHECK((vv.cwiseAbs() - CMatD::Identity(k, k)).cwiseAbs().maxCoeff() <= tv);
  for (index_t j = 0; j < k; ++j) {
    CAPTURE(j);
    CHECK(uu(j, j) * vv(j, j) > 0.0);  // one sign for the pair
  }
}

/// Factors equal up to the sign of each pair (B[:, j], A[j, :]).
template <class T>
void check_same_factors(const dw::lora_factors<T>& cpu, const dw::lora_factors<T>& dev, double t, bool signs_free) {
  REQUIRE(cpu.B.rows() == dev.B.rows());
  REQUIRE(cpu.B.cols() == dev.B.cols());
  REQUIRE(cpu.A.rows() == dev.A.rows());
  REQUIRE(cpu.A.cols() == dev.A.cols());
  CHECK(cpu.s == dev.s);
  const MatD Bc = cpu.B.template cast<double>(), Ac = cpu.A.template cast<double>();
  MatD Bd = dev.B.template cast<double>(), Ad = dev.A.template cast<double>();
  for (index_t j = 0; j < Bc.cols(); ++j) {
    const double sign = Bc.col(j).dot(Bd.col(j)) < 0.0 ? -1.0 : 1.0;
    if (!signs_free) CHECK(sign > 0.0);
    Bd.col(j) *= sign;
    Ad.row(j) *= sign;
  }
  CHECK(dwt::rel_err(Bd, Bc) <= t);
  CHECK(dwt::rel_err(Ad, Ac) <= t);
}

}  // namespace cuda_linalg_test

TEST_CASE_TEMPLATE("cuda linalg: randomized SVD of a device weight, LoRA and W + LoRA equals the CPU's", C, float,
                   double) {
  namespace t = cuda_linalg_test;
  namespace dw = deltaw;
  using dw::index_t;
  dw::cuda::context ctx;
  const dw::rsvd_options opt{.oversampling = 5, .power_iterations = 2, .seed = 11};
  struct shape {
    index_t m, n;
    bool cm;
  };
  for (const shape sh : {shape{40, 30, false}, shape{30, 47, true}, shape{64, 64, false}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    const t::MatD W = t::decaying(sh.m, sh.n, 3 + std::uint64_t(sh.m));
    dwcuda::twin<C> Wt(W, sh.cm);
    const auto cpu = dw::randomized_svd<C>(Wt.cpu(), 5, opt);
    const auto dev = dw::cuda::randomized_svd<C>(ctx, Wt.gpu(), 5, opt).to_host();
    t::check_same_svd(cpu, dev, t::tol<C>());
    // Independently: the top singular values are 3·0.7^i.
    for (index_t i = 0; i < 5; ++i) CHECK(std::abs(double(dev.S(i)) - 3.0 * std::pow(0.7, double(i))) <= 1e-3);
    // The default compute type is the view's own.
    static_assert(std::is_same_v<decltype(dw::cuda::randomized_svd(ctx, Wt.gpu(), 1)), dw::cuda::device_svd<C>>);
  }

  // A LoRA alone (applied through an l × r scratch) and W + LoRA (a lazy sum).
  const index_t out = 400, in = 300, r = 8;
  const double s = 0.75;
  dwcuda::twin<C> B(dwt::random(out, r, 21)), A(dwt::random(r, in, 22)), W(0.05 * dwt::random(out, in, 23));
  const dw::rsvd_options lopt{.oversampling = 4, .power_iterations = 1, .seed = 5};
  {
    const auto cpu = dw::randomized_svd<C>(dw::lora(B.cpu(), A.cpu(), dw::scale(s)), 4, lopt);
    ctx.reset_scratch_statistics();
    const auto dsvd = dw::cuda::randomized_svd<C>(ctx, dw::lora(B.gpu(), A.gpu(), dw::scale(s)), 4, lopt);
    // Never out × in: (out + in)·(k + p) entries, small products and cuSOLVER's workspace.
    CHECK(ctx.scratch_high_water_bytes() < std::size_t(out * in) * sizeof(C) / 4);
    const auto dev = dsvd.to_host();
    t::check_same_svd(cpu, dev, t::tol<C>());
    // Against the exact spectrum of the dense update (r = 8 ≥ k + p: the sketch is exact).
    const t::CMatD D = s * B.host_d() * A.host_d();
    Eigen::JacobiSVD<t::CMatD> exact(D);
    for (index_t i = 0; i < 4; ++i)
      CHECK(std::abs(double(dev.S(i)) - exact.singularValues()(i)) <= t::tol<C>() * 10 * exact.singularValues()(0));
  }
  {
    const auto cpu = dw::randomized_svd<C>(dw::view(W.cpu()) + dw::lora(B.cpu(), A.cpu(), dw::scale(s)), 6, lopt);
    const auto dev =
        dw::cuda::randomized_svd<C>(ctx, W.gpu() + dw::lora(B.gpu(), A.gpu(), dw::scale(s)), 6, lopt).to_host();
    t::check_same_svd(cpu, dev, t::tol<C>());
  }
  CHECK_THROWS_AS(dw::cuda::randomized_svd<C>(ctx, W.gpu(), 0, lopt), dw::rank_error);
  CHECK_THROWS_AS(dw::cuda::randomized_svd<C>(ctx, W.gpu(), 301, lopt), dw::rank_error);
}

TEST_CASE_TEMPLATE("cuda linalg: factored SVD of a device LoRA equals the CPU's, without an out x in scratch", C, float,
                   double) {
  namespace t = cuda_linalg_test;
  namespace dw = deltaw;
  using dw::index_t;
  dw::cuda::context ctx;
  struct shape {
    index_t m, n, r;
    double s;
    bool cm;
  };
  for (const shape sh : {shape{50, 40, 6, 0.5, false}, shape{5, 40, 8, -1.5, true}, shape{50, 3, 6, 2.0, false},
                         shape{400, 300, 8, -0.25, false}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    CAPTURE(sh.r);
    dwcuda::twin<C> B(dwt::random(sh.m, sh.r, 31 + std::uint64_t(sh.m)), sh.cm),
        A(dwt::random(sh.r, sh.n, 32 + std::uint64_t(sh.n)), sh.cm);
    const auto cpu = dw::factored_svd<C>(B.cpu(), A.cpu(), sh.s);
    ctx.reset_scratch_statistics();
    const auto dsvd = dw::cuda::factored_svd<C>(ctx, dw::lora(B.gpu(), A.gpu(), dw::scale(sh.s)));
    if (sh.m * sh.n >= 400 * 300) CHECK(ctx.scratch_high_water_bytes() < std::size_t(sh.m * sh.n) * sizeof(C) / 4);
    const auto dev = dsvd.to_host();
    REQUIRE(dev.S.size() == std::min({sh.m, sh.n, sh.r}));
    t::check_same_svd(cpu, dev, t::tol<C>());
    // Independently: U·S·Vᵀ is s·B·A (the sign of s folded into U).
    const t::CMatD D = sh.s * B.host_d() * A.host_d();
    CHECK((t::product(dev) - D).cwiseAbs().maxCoeff() <= t::tol<C>() * 10 * std::max(1.0, D.cwiseAbs().maxCoeff()));
    const auto spec = dw::cuda::factored_spectrum<C>(ctx, B.gpu(), A.gpu(), sh.s);
    CHECK((spec - dev.S).cwiseAbs().maxCoeff() == 0);
  }
  dwcuda::twin<C> B(dwt::random(6, 3, 1)), A(dwt::random(4, 5, 2));
  CHECK_THROWS_AS(dw::cuda::factored_svd<C>(ctx, B.gpu(), A.gpu(), 1.0), dw::shape_error);
}

TEST_CASE_TEMPLATE("cuda linalg: PiSSA and OLoRA of a device weight equal the CPU's", T, float, double) {
  namespace t = cuda_linalg_test;
  namespace dw = deltaw;
  using dw::index_t;
  dw::cuda::context ctx;
  const double tl = t::tol<T>();
  struct shape {
    index_t m, n;
    bool cm;
  };
  for (const shape sh : {shape{36, 28, false}, shape{24, 41, true}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    const t::MatD W0 = t::decaying(sh.m, sh.n, 50 + std::uint64_t(sh.m)) + 0.01 * dwt::random(sh.m, sh.n, 9);
    const index_t r = 4;
    const double s = 2.0;
    const dw::pissa_options variants[] = {{}, {.power_iterations = 2, .seed = 3},
                                          {.power_iterations = 1, .seed = 4, .weight_type_arithmetic = true}};
    for (const auto& opt : variants) {
      CAPTURE(opt.power_iterations);
      CAPTURE(opt.weight_type_arithmetic);
      dwcuda::twin<T> W(W0, sh.cm);
      const t::MatD Wstored = W.host_d();
      const auto fc = dw::pissa(W.cpu(), r, s, opt);
      const auto fd = dw::cuda::pissa(ctx, W.gpu(), r, s, opt).to_host();
      // float factors in double arithmetic round the same values: one float spacing.
      t::check_same_factors(fc, fd, std::is_same_v<T, float> ? 1e-5 : 1e-10, true);
      CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= tl);
      // Independently: W_res + s·B·A is the weight that went in.
      const t::MatD back = W.dev_d() + s * fd.B.template cast<double>() * fd.A.template cast<double>();
      CHECK(dwt::rel_err(back, Wstored) <= (std::is_same_v<T, float> ? 1e-5 : 1e-12));
    }
    {
      dwcuda::twin<T> W(W0, sh.cm);
      const t::MatD Wstored = W.host_d();
      const double so = 0.5;
      const auto fc = dw::olora(W.cpu(), r, so);
      const auto fd = dw::cuda::olora(ctx, W.gpu(), r, so).to_host();
      t::check_same_factors(fc, fd, tl, false);  // the same Householder convention: no sign freedom
      CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= tl);
      const t::MatD Bd = fd.B.template cast<double>();
      CHECK((Bd.transpose() * Bd - t::MatD::Identity(r, r)).cwiseAbs().maxCoeff() <= tl);
      const t::MatD back = W.dev_d() + so * Bd * fd.A.template cast<double>();
      CHECK(dwt::rel_err(back, Wstored) <= (std::is_same_v<T, float> ? 1e-5 : 1e-12));
    }
  }
  {
    // OLoRA's scratch: Q [out, r], A [r, in] and row panels of 64 K entries, not W in double.
    const index_t out = 512, in = 384, r = 8;
    dwcuda::twin<T> W(dwt::random(out, in, 61));
    const auto fc = dw::olora(W.cpu(), r, 1.0);
    ctx.reset_scratch_statistics();
    const auto fd = dw::cuda::olora(ctx, W.gpu(), r, 1.0).to_host();
    CHECK(ctx.scratch_high_water_bytes() < std::size_t(out * in) * sizeof(double) / 2);
    t::check_same_factors(fc, fd, tl, false);
    CHECK(dwt::rel_err(W.dev_d(), W.host_d()) <= tl);
  }
  dwcuda::twin<T> W(dwt::random(8, 6, 1));
  CHECK_THROWS_AS(dw::cuda::pissa(ctx, W.gpu(), 7, 1.0), dw::rank_error);
  CHECK_THROWS_AS(dw::cuda::pissa(ctx, W.gpu(), 2, -1.0), dw::argument_error);
  CHECK_THROWS_AS(dw::cuda::olora(ctx, W.gpu(), 0, 1.0), dw::rank_error);
}

TEST_CASE("cuda linalg: intruder dimensions of a device-resident update equal the CPU's") {
  namespace t = cuda_linalg_test;
  namespace dw = deltaw;
  using dw::index_t;
  dw::cuda::context ctx;
  const dw::intruder_options opt{.k = 6, .epsilon = 0.5};
  struct shape {
    index_t m, n;
  };
  for (const shape sh : {shape{40, 30}, shape{30, 44}}) {
    CAPTURE(sh.m);
    CAPTURE(sh.n);
    dwcuda::twin<double> W0(t::decaying(sh.m, sh.n, 70 + std::uint64_t(sh.n)));
    // A strong rank-2 update in random directions: its vectors are new to W0 (intruders).
    dwcuda::twin<double> B(dwt::random(sh.m, 2, 71)), A(dwt::random(2, sh.n, 72));
    const double s = 1.5;
    const auto cpu = dw::intruder_dimensions(W0.cpu(), dw::view(W0.cpu()) + dw::lora(B.cpu(), A.cpu(), dw::scale(s)), opt);
    const auto dev = dw::cuda::intruder_dimensions(ctx, W0.gpu(), W0.gpu() + dw::lora(B.gpu(), A.gpu(), dw::scale(s)), opt);
    CHECK(cpu.count() > 0);  // the case tests something
    CHECK(dev.intruders == cpu.intruders);
    CHECK((dev.similarity - cpu.similarity).cwiseAbs().maxCoeff() <= 1e-10);
    CHECK((dev.singular_values - cpu.singular_values).cwiseAbs().maxCoeff() <= 1e-10 * cpu.singular_values(0));
    // The fine-tuned weight given as a dense device view gives the same report.
    dwcuda::twin<double> W1(W0.host_d() + s * B.host_d() * A.host_d());
    const auto dense = dw::cuda::intruder_dimensions(ctx, W0.gpu(), W1.gpu(), opt);
    CHECK(dense.intruders == cpu.intruders);
    CHECK((dense.similarity - cpu.similarity).cwiseAbs().maxCoeff() <= 1e-10);
    // Against itself: no intruders, every similarity 1.
    const auto self = dw::cuda::intruder_dimensions(ctx, W0.gpu(), W0.gpu(), opt);
    CHECK(self.count() == 0);
    CHECK((self.similarity.array() - 1.0).abs().maxCoeff() <= 1e-10);
  }
  dwcuda::twin<double> W(dwt::random(8, 6, 1));
  CHECK_THROWS_AS(dw::cuda::intruder_dimensions(ctx, W.gpu(), W.gpu(), {.k = 7}), dw::rank_error);
}
