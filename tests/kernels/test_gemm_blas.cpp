// The BLAS build's GEMM (EIGEN_USE_BLAS with OpenBLAS): kernels::gemm through sgemm/dgemm,
// whole, and split over OpenMP threads by deltaw when OpenBLAS runs one thread per call
// (OPENBLAS_NUM_THREADS=1). CTest runs this executable twice, with one and with two OpenBLAS
// threads; DELTAW_EXPECT_SPLIT says which, so that the test fails if the path it means to
// check is not the one taken.
#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>

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
