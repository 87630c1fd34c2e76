// deltaw/kernels/factor.hpp against independent checks in double: A = Q·R with QᵀQ = I and
// R upper triangular; A = U·diag(S)·Vᵀ with orthonormal U, V and descending S; A·Z = Z·diag(w);
// triangular solves against the product they invert, for every side / triangle / op / diag.
#include <deltaw/kernels/factor.hpp>

#include "test_util.hpp"

namespace dw = deltaw;
namespace k = deltaw::kernels;
using dwt::MatD;

TEST_CASE("kernels::qr_thin, svd_thin and symmetric_eigen reconstruct their input") {
  const k::cpu_context ctx;
  const MatD A = dwt::random(9, 4, 61);
  MatD Q(9, 4), R(4, 4);
  k::qr_thin<double>(ctx, dw::view(A), dw::view(Q), dw::view(R));
  CHECK(dwt::rel_err(Q * R, A) < 1e-14);
  CHECK(dwt::rel_err(Q.transpose() * Q, MatD::Identity(4, 4)) < 1e-14);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < i; ++j) CHECK(R(i, j) == 0.0);
  dwt::ColMat<float> Qf(9, 4);  // float output, column-major
  k::qr_thin<float>(ctx, dw::view(A), dw::view(Qf));
  CHECK(dwt::rel_err(Qf.cast<double>().transpose() * Qf.cast<double>(), MatD::Identity(4, 4)) < 1e-5);

  for (auto [m, n] : {std::array<int, 2>{7, 5}, {5, 7}}) {
    const MatD B = dwt::random(m, n, 62);
    const int kk = std::min(m, n);
    MatD U(m, kk), V(n, kk);
    std::vector<double> S(static_cast<std::size_t>(kk), 0.0);
    k::svd_thin<double>(ctx, dw::view(B), dw::view(U), dw::vector_view<double>(S.data(), kk), dw::view(V));
    const Eigen::VectorXd s = Eigen::Map<const Eigen::VectorXd>(S.data(), kk);
    CHECK(dwt::rel_err(U * s.asDiagonal() * V.transpose(), B) < 1e-13);
    CHECK(dwt::rel_err(U.transpose() * U, MatD::Identity(kk, kk)) < 1e-13);
    CHECK(dwt::rel_err(V.transpose() * V, MatD::Identity(kk, kk)) < 1e-13);
    for (int i = 1; i < kk; ++i) CHECK(S[std::size_t(i)] <= S[std::size_t(i - 1)]);
  }

  const MatD G = dwt::random(6, 6, 63);
  const MatD Sym = G + G.transpose();
  MatD Z(6, 6);
  std::vector<double> w(6);
  k::symmetric_eigen<double>(ctx, dw::view(Sym), dw::vector_view<double>(w.data(), 6), dw::view(Z));
  const Eigen::VectorXd wv = Eigen::Map<const Eigen::VectorXd>(w.data(), 6);
  CHECK(dwt::rel_err(Sym * Z, Z * wv.asDiagonal()) < 1e-13);
  for (int i = 1; i < 6; ++i) CHECK(w[std::size_t(i)] >= w[std::size_t(i - 1)]);

  MatD Qbad(9, 3);
  dwt::check_throws_with<dw::shape_error>([&] { k::qr_thin<double>(ctx, dw::view(A), dw::view(Qbad)); },
                                          {"qr_thin", "Q is [9, 3]", "[9, 4]"});
  const MatD wide = dwt::random(3, 5, 64);
  MatD Qw(3, 5);
  dwt::check_throws_with<dw::shape_error>([&] { k::qr_thin<double>(ctx, dw::view(wide), dw::view(Qw)); },
                                          {"qr_thin", "rows ≥ columns"});
}

TEST_CASE("kernels::trsm inverts the triangular product for every side, triangle, op and diagonal") {
  const k::cpu_context ctx;
  MatD T = dwt::random(5, 5, 71);
  T.diagonal().array() += 4.0;  // well conditioned
  for (auto s : {k::side::left, k::side::right})
    for (auto u : {k::uplo::lower, k::uplo::upper})
      for (auto o : {k::op::none, k::op::trans})
        for (auto d : {k::diag::non_unit, k::diag::unit}) {
          MatD tri = u == k::uplo::lower ? MatD(T.triangularView<Eigen::Lower>()) : MatD(T.triangularView<Eigen::Upper>());
          if (d == k::diag::unit) tri.diagonal().setOnes();
          const MatD opT = o == k::op::trans ? MatD(tri.transpose()) : tri;
          const MatD X = s == k::side::left ? dwt::random(5, 3, 72) : dwt::random(3, 5, 72);
          const MatD B0 = s == k::side::left ? MatD(opT * X) : MatD(X * opT);
          dwt::ColMat<double> B = 2.0 * B0;  // column-major, α = 0.5 undoes the 2
          k::trsm<double>(ctx, s, u, o, d, 0.5, dw::view(T), dw::view(B));
          INFO("side " << int(s) << " uplo " << int(u) << " op " << int(o) << " diag " << int(d));
          CHECK(dwt::rel_err(B, X) < 1e-13);
        }
  MatD Bbad(4, 3);
  dwt::check_throws_with<dw::shape_error>(
      [&] { k::trsm<double>(ctx, k::side::left, k::uplo::lower, k::op::none, k::diag::non_unit, 1.0, dw::view(T), dw::view(Bbad)); },
      {"trsm", "[5, 5]", "[4, 3]"});
}
