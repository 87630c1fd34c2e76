// SPDX-License-Identifier: MIT
// The primitive layer on CUDA (cuda/primitives.cuh, cuda/elementwise.cuh) against the CPU
// primitives (deltaw/kernels/) on the same values and layouts: gemm with op flags over
// row-major, column-major, padded and non-unit-stride views, the strided batched GEMM
// (including a broadcast operand), fill, scale, axpy, the converting copy and transform by
// a host-device functor; gemm_grouped and scatter_add_rows (repeated rows). fp32 within 1e-6 and fp64 within 1e-12 of the CPU, relative to
// max(1, max |CPU|); elements outside the views must keep their sentinel.
#include <deltaw/cuda/cuda.hpp>
#include <deltaw/deltaw.hpp>
#include <deltaw/kernels/kernels.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "cuda_test_util.cuh"

namespace dw = deltaw;
using dw::index_t;
namespace kn = dw::kernels;

namespace {

/// Layouts of a [rows, cols] matrix inside its buffer.
enum class layout { row_major, col_major, padded_col_major, strided };

const char* name(layout l) {
  switch (l) {
    case layout::row_major: return "row-major";
    case layout::col_major: return "column-major";
    case layout::padded_col_major: return "column-major, ld = rows + 3";
    case layout::strided: return "no unit stride";
  }
  return "?";
}

/// A matrix in a buffer held twice, on the host (for the CPU primitives) and on the
/// device; elements outside the view hold a sentinel.
template <class T>
struct pair {
  static constexpr double sentinel = 1234.5;
  index_t rows, cols, rs, cs;
  std::vector<T> host;
  dw::cuda::buffer<T> dev;

  pair(index_t r, index_t c, layout l, std::uint64_t seed, bool nan = false) : rows(r), cols(c) {
    std::size_t n = 0;
    switch (l) {
      case layout::row_major: rs = c, cs = 1, n = std::size_t(r * c); break;
      case layout::col_major: rs = 1, cs = r, n = std::size_t(r * c); break;
      case layout::padded_col_major: rs = 1, cs = r + 3, n = std::size_t((r + 3) * c); break;
      case layout::strided: rs = 2 * c, cs = 2, n = std::size_t(2 * r * c); break;
    }
    host.assign(std::max<std::size_t>(n, 1), dw::convert<T>(sentinel));
    std::mt19937_64 g(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < c; ++j)
        host[std::size_t(i * rs + j * cs)] = dw::convert<T>(nan ? std::numeric_limits<double>::quiet_NaN() : u(g));
    dev = dw::cuda::buffer<T>(host);
  }
  dw::matrix_view<T> cpu() { return dw::matrix_view<T>(host.data(), rows, cols, rs, cs); }
  dw::matrix_view<T, dw::device::cuda> gpu() { return dw::cuda::view(dev.data(), rows, cols, rs, cs); }
  dw::matrix_view<const T> ccpu() { return cpu(); }
  dw::matrix_view<const T, dw::device::cuda> cgpu() { return gpu(); }

  /// max |device − host| / max(1, max |host|) over the whole buffer (sentinels included).
  double diff() const {
    const std::vector<T> d = dev.to_vector();
    double err = 0, scale = 1;
    for (std::size_t i = 0; i < host.size(); ++i) {
      const double h = dw::convert<double>(host[i]), v = dw::convert<double>(d[i]);
      scale = std::max(scale, std::abs(h));
      err = std::max(err, std::isnan(h) || std::isnan(v) ? (std::isnan(h) && std::isnan(v) ? 0.0 : 1e300)
                                                          : std::abs(h - v));
    }
    return err / scale;
  }
};

template <class T>
constexpr double tol() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-6;
}

/// A functor that reads its position: the form device code takes (no host references).
template <class C>
struct position_map {
  C a;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C y) const { return a * y + C(i) - C(2 * j); }
};

}  // namespace

TEST_CASE_TEMPLATE("cuda primitives: gemm with op flags over every layout matches the CPU primitive", T, float,
                   double) {
  dw::cuda::context ctx;
  const kn::cpu_context cpu;
  struct dims {
    index_t m, n, k;
  };
  std::uint64_t seed = 1;
  const layout layouts[] = {layout::row_major, layout::col_major, layout::padded_col_major, layout::strided};
  for (dims d : {dims{5, 7, 3}, dims{1, 1, 1}, dims{17, 9, 33}, dims{4, 6, 0}, dims{0, 3, 2}, dims{6, 1, 8}})
    for (kn::op oa : {kn::op::none, kn::op::trans})
      for (kn::op ob : {kn::op::none, kn::op::trans})
        for (layout lab : layouts)
          for (layout lc : layouts)
            for (double beta : {0.0, 1.0, -0.5}) {
              CAPTURE(d.m);
              CAPTURE(d.n);
              CAPTURE(d.k);
              CAPTURE(int(oa));
              CAPTURE(int(ob));
              CAPTURE(std::string(name(lab)));
              CAPTURE(std::string(name(lc)));
              CAPTURE(beta);
              const bool ta = oa == kn::op::trans, tb = ob == kn::op::trans;
              pair<T> A(ta ? d.k : d.m, ta ? d.m : d.k, lab, ++seed), B(tb ? d.n : d.k, tb ? d.k : d.n, lab, ++seed),
                  C(d.m, d.n, lc, ++seed, beta == 0.0);  // β = 0: C holds NaN, which must not be read
              kn::gemm<T>(cpu, T(0.75), A.ccpu(), oa, B.ccpu(), ob, T(beta), C.cpu());
              dw::cuda::gemm<T>(ctx, T(0.75), A.cgpu(), oa, B.cgpu(), ob, T(beta), C.gpu());
              CHECK(C.diff() <= tol<T>());
            }
}

TEST_CASE_TEMPLATE("cuda primitives: strided batched gemm, one call or one product per item", T, float, double) {
  dw::cuda::context ctx;
  const kn::cpu_context cpu;
  const index_t m = 6, n = 5, k = 4, count = 3;
  for (layout l : {layout::row_major, layout::col_major, layout::strided})
    for (bool broadcast_b : {false, true}) {
      CAPTURE(std::string(name(l)));
      CAPTURE(broadcast_b);
      // Batches stacked in one buffer: item i starts i·stride elements in.
      pair<T> A(count * m, k, layout::row_major, 1), B(k * (broadcast_b ? 1 : count), n, layout::row_major, 2),
          C(count * m, n, l == layout::strided ? layout::row_major : l, 3);
      const index_t sa = m * k, sb = broadcast_b ? 0 : k * n;
      // C's items: rows i·m … i·m + m − 1 of the stacked view (row-major: stride m·n;
      // column-major: stride m, the items interleave by columns).
      const index_t sc = C.rs == 1 ? m : m * C.rs;
      auto item = [&](auto v, index_t rows, index_t cols) {
        return decltype(v)(v.data(), rows, cols, v.row_stride(), v.col_stride());
      };
      auto Ac = item(A.ccpu(), m, k), Bc = item(B.ccpu(), k, n);
      auto Ag = item(A.cgpu(), m, k), Bg = item(B.cgpu(), k, n);
      auto Cc = item(C.cpu(), m, n);
      auto Cg = item(C.gpu(), m, n);
      if (l == layout::strided) {  // every other column of C: no unit stride, the per-item path
        Cc = dw::matrix_view<T>(C.host.data(), m, n / 2, C.rs, 2);
        Cg = dw::cuda::view(C.dev.data(), m, n / 2, C.rs, 2);
        Bc = dw::matrix_view<const T>(B.host.data(), k, n / 2, B.rs, 2);
        Bg = dw::matrix_view<const T, dw::device::cuda>(B.dev.data(), k, n / 2, B.rs, 2);
      }
      kn::gemm_strided_batched<T>(cpu, T(1.5), Ac, sa, kn::op::none, Bc, sb, kn::op::none, T(1), Cc, sc, count);
      dw::cuda::gemm_strided_batched<T>(ctx, T(1.5), Ag, sa, kn::op::none, Bg, sb, kn::op::none, T(1), Cg, sc, count);
      CHECK(C.diff() <= tol<T>());
      // Transposed operands through the flags: Cᵢ += op(Aᵢᵀ)ᵀ… the same products again.
      kn::gemm_strided_batched<T>(cpu, T(-1), Ac.transpose(), sa, kn::op::trans, Bc, sb, kn::op::none, T(1), Cc, sc,
                                  count);
      dw::cuda::gemm_strided_batched<T>(ctx, T(-1), Ag.transpose(), sa, kn::op::trans, Bg, sb, kn::op::none, T(1), Cg,
                                        sc, count);
      CHECK(C.diff() <= tol<T>());
    }
  pair<T> A(2, 2, layout::row_major, 1), C(2, 2, layout::row_major, 2);
  CHECK_THROWS_AS(dw::cuda::gemm_strided_batched<T>(ctx, T(1), A.cgpu(), 0, kn::op::none, A.cgpu(), 0, kn::op::none,
                                                    T(0), C.gpu(), 0, -1),
                  dw::argument_error);
  CHECK_THROWS_AS(dw::cuda::gemm<T>(ctx, T(1), A.cgpu(), kn::op::none, C.cgpu().middle_cols(0, 1), kn::op::none, T(0),
                                    C.gpu()),
                  dw::shape_error);
}

TEST_CASE_TEMPLATE("cuda primitives: fill, scale, axpy, copy and transform match the CPU primitives", T, float,
                   double) {
  dw::cuda::context ctx;
  const kn::cpu_context cpu;
  for (layout l : {layout::row_major, layout::col_major, layout::padded_col_major, layout::strided}) {
    CAPTURE(std::string(name(l)));
    pair<T> Y(7, 5, l, 1), X(7, 5, layout::strided, 2);
    kn::axpy<T>(cpu, T(0.25), X.ccpu(), Y.cpu());
    dw::cuda::axpy<T>(ctx, T(0.25), X.cgpu(), Y.gpu());
    CHECK(Y.diff() <= tol<T>());
    kn::scale<T>(cpu, Y.cpu(), T(-3));
    dw::cuda::scale<T>(ctx, Y.gpu(), T(-3));
    CHECK(Y.diff() <= tol<T>());
    kn::transform(cpu, Y.cpu(), position_map<T>{T(0.5)});
    dw::cuda::transform(ctx, Y.gpu(), position_map<T>{T(0.5)});
    CHECK(Y.diff() <= tol<T>());
    kn::fill<T>(cpu, Y.cpu(), T(2));
    dw::cuda::fill<T>(ctx, Y.gpu(), T(2));
    CHECK(Y.diff() == 0.0);
    pair<T> N(4, 3, l, 3, true);  // scale by 0 writes zeros over NaN
    kn::scale<T>(cpu, N.cpu(), T(0));
    dw::cuda::scale<T>(ctx, N.gpu(), T(0));
    CHECK(N.diff() == 0.0);
    pair<dw::bf16> H(7, 5, layout::col_major, 4);
    kn::copy(cpu, H.ccpu(), Y.cpu());
    dw::cuda::copy(ctx, H.cgpu(), Y.gpu());
    CHECK(Y.diff() == 0.0);  // bf16 → T is exact
  }
  pair<T> A(3, 4, layout::row_major, 1), B(4, 3, layout::row_major, 2);
  CHECK_THROWS_AS(dw::cuda::axpy<T>(ctx, T(1), A.cgpu(), B.gpu()), dw::shape_error);
}

TEST_CASE_TEMPLATE("cuda primitives: gemm_grouped and scatter_add_rows match the CPU primitives", T, float, double) {
  using dwcuda::twin;
  const double tol = std::is_same_v<T, double> ? 1e-12 : 1e-6;
  dw::cuda::context ctx;
  const kn::cpu_context cpu;
  // Three problems of different shapes, op flags and β: adapters of different ranks.
  twin<T> A0(dwt::random(5, 3, 1)), B0(dwt::random(3, 7, 2)), C0(dwt::random(5, 7, 3), true);
  twin<T> A1(dwt::random(4, 6, 4), true), B1(dwt::random(2, 4, 5)), C1(dwt::random(6, 2, 6));
  twin<T> A2(dwt::random(1, 8, 7)), B2(dwt::random(8, 1, 8)), C2(dwt::random(1, 1, 9));
  const dwt::MatD C1r = C1.host_d();
  std::vector<kn::gemm_problem<T, dw::device::cuda>> pg = {
      {T(1.5), A0.gpu(), kn::op::none, B0.gpu(), kn::op::none, T(0), C0.gpu()},
      {T(-0.5), A1.gpu(), kn::op::trans, B1.gpu(), kn::op::trans, T(1), C1.gpu()},
      {T(2), A2.gpu(), kn::op::none, B2.gpu(), kn::op::none, T(0.5), C2.gpu()}};
  std::vector<kn::gemm_problem<T>> pc = {{T(1.5), A0.cpu(), kn::op::none, B0.cpu(), kn::op::none, T(0), C0.cpu()},
                                         {T(-0.5), A1.cpu(), kn::op::trans, B1.cpu(), kn::op::trans, T(1), C1.cpu()},
                                         {T(2), A2.cpu(), kn::op::none, B2.cpu(), kn::op::none, T(0.5), C2.cpu()}};
  dw::cuda::gemm_grouped<T>(ctx, pg);
  kn::gemm_grouped<T>(cpu, pc);
  CHECK(dwt::rel_err(C0.dev_d(), C0.host_d()) <= tol);
  CHECK(dwt::rel_err(C1.dev_d(), C1.host_d()) <= tol);
  CHECK(dwt::rel_err(C2.dev_d(), C2.host_d()) <= tol);
  CHECK(dwt::rel_err(C0.dev_d(), dwt::MatD(1.5 * A0.host_d() * B0.host_d())) <= tol);
  CHECK(dwt::rel_err(C1.dev_d(), dwt::MatD(C1r - 0.5 * A1.host_d().transpose() * B1.host_d().transpose())) <= tol);

  // Scatter-add with repeated rows (they add up), rows left alone, both layouts.
  for (bool cm : {false, true}) {
    twin<T> X(dwt::random(6, 5, 10), cm), Yg(dwt::random(7, 5, 11), !cm), Yc(dwt::random(7, 5, 11), !cm);
    const std::vector<index_t> rows = {3, 0, 3, 6, 3, 1};
    dwt::MatD ref = Yc.host_d();
    for (std::size_t i = 0; i < rows.size(); ++i) ref.row(rows[i]) += 0.75 * X.host_d().row(index_t(i));
    dw::cuda::scatter_add_rows<T>(ctx, T(0.75), X.gpu(), rows, Yg.gpu());
    kn::scatter_add_rows<T>(cpu, T(0.75), X.cpu(), rows, Yc.cpu());
    CHECK(dwt::rel_err(Yg.dev_d(), Yc.host_d()) <= tol);
    CHECK(dwt::rel_err(Yg.dev_d(), ref) <= tol);
    const std::vector<index_t> bad = {3, 0, 7, 6, 3, 1};
    CHECK_THROWS_WITH_AS(dw::cuda::scatter_add_rows<T>(ctx, T(1), X.gpu(), bad, Yg.gpu()),
                         doctest::Contains("row index 7 outside [0, 7)"), dw::shape_error);
    CHECK(dwt::rel_err(Yg.dev_d(), ref) <= tol);  // nothing written
  }
}
