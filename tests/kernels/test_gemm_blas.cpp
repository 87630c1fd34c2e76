// The BLAS build's GEMM (EIGEN_USE_BLAS with OpenBLAS): kernels::gemm through sgemm/dgemm,
// whole, and split over OpenMP threads by deltaw when OpenBLAS runs one thread per call
// (OPENBLAS_NUM_THREADS=1). CTest runs this executable twice, with one and with two OpenBLAS
// threads; DELTAW_EXPECT_SPLIT says which, so that the test fails if the path it means to
// check is not the one taken. The heterogeneous batch's matrix-vector products, which take
// Eigen's own kernels in this build rather than BLAS, are checked here too.
#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>

#include <deltaw/serve/batch.hpp>

#include "../test_util.hpp"

using deltaw::index_t;

namespace {
template <class C, int Order>
using mat = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Order>;

template <class C, int OrderC>
double gemm_error(bool ta, bool tb, index_t m, index_t n, index_t k, double alpha, double beta, std::uint64_t seed) {
  namespace kn = deltaw::kernels;
  const dwt::MatD A = dwt::random<dwt::MatD>(ta ? k : m, ta ? m : k, seed);
  const dwt::MatD B = dwt::random<dwt::MatD>(tb ? n : k, tb ? k : n, seed + 1);
  const dwt::MatD C0 = dwt::random<dwt::MatD>(m, n, seed + 2);
  const mat<C, Eigen::RowMajor> Ac = A.cast<C>(), Bc = B.cast<C>();
  mat<C, OrderC> Cc = C0.cast<C>();
  const kn::cpu_context ctx;
  kn::gemm<C>(ctx, C(alpha), deltaw::view(Ac), ta ? kn::op::trans : kn::op::none, deltaw::view(Bc),
              tb ? kn::op::trans : kn::op::none, C(beta), deltaw::view(Cc));
  const dwt::MatD opA = ta ? dwt::MatD(Ac.template cast<double>().transpose()) : dwt::MatD(Ac.template cast<double>());
  const dwt::MatD opB = tb ? dwt::MatD(Bc.template cast<double>().transpose()) : dwt::MatD(Bc.template cast<double>());
  const dwt::MatD want = alpha * opA * opB + beta * dwt::MatD(C0.cast<C>().template cast<double>());
  return (dwt::MatD(Cc.template cast<double>()) - want).norm() / want.norm();
}
}  // namespace

TEST_CASE("BLAS build: kernels::gemm, whole or split over OpenMP threads, equals a double reference") {
  const char* e = std::getenv("DELTAW_EXPECT_SPLIT");
  REQUIRE(e != nullptr);
  const bool split = e[0] == '1';
  CHECK(deltaw::detail::blas_single_threaded() == split);
  CHECK(deltaw::detail::elementwise_parallel() == split);
  if (split) CHECK(deltaw::detail::max_threads() == 2);
  double worst_f = 0, worst_d = 0;
  std::uint64_t seed = 1;
  // n = 1001 (not a multiple of the 16-column chunks), m·n·k above the split threshold;
  // and one product below it.
  for (auto [m, n, k] : {std::array<index_t, 3>{64, 1001, 48}, std::array<index_t, 3>{70, 515, 96},
                         std::array<index_t, 3>{5, 7, 3}})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (double beta : {0.0, 1.5}) {
          worst_f = std::max({worst_f, gemm_error<float, Eigen::RowMajor>(ta, tb, m, n, k, 0.5, beta, seed),
                              gemm_error<float, Eigen::ColMajor>(ta, tb, m, n, k, 0.5, beta, seed + 7)});
          worst_d = std::max({worst_d, gemm_error<double, Eigen::RowMajor>(ta, tb, m, n, k, -1.25, beta, seed + 3),
                              gemm_error<double, Eigen::ColMajor>(ta, tb, m, n, k, -1.25, beta, seed + 5)});
          seed += 11;
        }
  std::printf("gemm_blas (split %d): worst relative error float %.2e, double %.2e\n", int(split), worst_f, worst_d);
  CHECK(worst_f < 1e-5);
  CHECK(worst_d < 1e-13);
}

namespace gemm_blas_test {
template <class C>
double gemv_many_error(bool col_major, index_t incx, index_t incy, index_t count, std::size_t slab) {
  const index_t rows = 45, cols = 38;
  const dwt::MatD M = dwt::random<dwt::MatD>(rows, cols, 7);
  const mat<C, Eigen::RowMajor> Mr = M.cast<C>();
  const mat<C, Eigen::ColMajor> Mc = M.cast<C>();
  const dwt::MatD X = dwt::random<dwt::MatD>(count, incx * cols, 8), Y0 = dwt::random<dwt::MatD>(count, incy * rows, 9);
  const mat<C, Eigen::RowMajor> Xc = X.cast<C>();
  mat<C, Eigen::RowMajor> Yc = Y0.cast<C>();
  const deltaw::matrix_view<const C> Mv = col_major ? deltaw::matrix_view<const C>(Mc.data(), rows, cols, 1, rows)
                                                    : deltaw::matrix_view<const C>(Mr.data(), rows, cols, cols, 1);
  deltaw::serve::detail::gemv_add_many<C>(
      C(0.5), Mv, count, [&](index_t j) { return Xc.data() + j * Xc.cols(); }, incx,
      [&](index_t j) { return Yc.data() + j * Yc.cols(); }, incy, slab);
  double err = 0;
  for (index_t j = 0; j < count; ++j) {
    Eigen::VectorXd x(cols);
    for (index_t i = 0; i < cols; ++i) x(i) = double(Xc(j, i * incx));
    const Eigen::VectorXd want = 0.5 * (Mc.template cast<double>() * x);
    for (index_t i = 0; i < rows; ++i)
      err = std::max(err, std::abs(double(Yc(j, i * incy)) - double(C(Y0(j, i * incy))) - want(i)) /
                              (1e-300 + want.cwiseAbs().maxCoeff()));
  }
  return err;
}
}  // namespace gemm_blas_test

TEST_CASE("BLAS build: the batch's matrix-vector products (Eigen's kernels, slabs) equal a double reference") {
  // Unit strides take Eigen's built-in kernels; strided x (row-major M) or strided y
  // (column-major M) the expression fallback; both layouts, whole M or slabs, float and double.
  for (const bool col_major : {false, true})
    for (const index_t incx : {1, 3})
      for (const index_t incy : {1, 2})
        for (const index_t count : {1, 4})
          for (const std::size_t slab : {std::size_t(64), std::size_t(1) << 20}) {
            CAPTURE(col_major);
            CAPTURE(incx);
            CAPTURE(incy);
            CAPTURE(count);
            CAPTURE(slab);
            CHECK(gemm_blas_test::gemv_many_error<double>(col_major, incx, incy, count, slab) <= 1e-14);
            CHECK(gemm_blas_test::gemv_many_error<float>(col_major, incx, incy, count, slab) <= 2e-6);
          }
}

TEST_CASE("BLAS build: apply_lora_batch, gather and segments, equals the per-token dense result in double") {
  const index_t out = 70, in = 300, tokens = 33;
  const dwt::MatD W = dwt::random<dwt::MatD>(out, in, 20), X = dwt::random<dwt::MatD>(tokens, in, 21);
  std::vector<dwt::MatD> B, A;
  std::vector<deltaw::low_rank<double>> L;
  for (const index_t r : {8, 3, 16}) {
    B.push_back(dwt::random<dwt::MatD>(out, r, 30 + std::uint64_t(r)));
    A.push_back(dwt::random<dwt::MatD>(r, in, 31 + std::uint64_t(r)));
  }
  for (std::size_t a = 0; a < B.size(); ++a) L.push_back(deltaw::lora(B[a], A[a], deltaw::scale(0.5 + double(a))));
  std::vector<index_t> idx(static_cast<std::size_t>(tokens));
  for (std::size_t t = 0; t < idx.size(); ++t) idx[t] = t % 5 == 4 ? deltaw::serve::no_adapter : index_t(t % 3);
  dwt::MatD ref = X * W.transpose();
  for (index_t t = 0; t < tokens; ++t)
    if (const index_t a = idx[std::size_t(t)]; a >= 0)
      ref.row(t) += (0.5 + double(a)) * (X.row(t) * A[std::size_t(a)].transpose()) * B[std::size_t(a)].transpose();
  for (const auto how : {deltaw::serve::strategy::gather, deltaw::serve::strategy::segments}) {
    dwt::MatD Y(tokens, out);
    deltaw::serve::apply_lora_batch(W, L, idx, X, Y, {.how = how});
    CHECK(dwt::rel_err(Y, ref) <= 1e-12);
  }
}
