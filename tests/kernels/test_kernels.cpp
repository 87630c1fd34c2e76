// The primitive layer (deltaw/kernels/) against double-precision references computed
// here with plain loops: every GEMM layout and op-flag combination, α/β, strided and
// non-BLAS-compatible views, batches and groups, the element-wise maps, reductions,
// gathers/scatters and Philox fills.
#include <vector>

#include "test_util.hpp"

namespace dw = deltaw;
namespace k = deltaw::kernels;
using dwt::MatD;

namespace {

/// Storage for a rows × cols matrix in one of four layouts: row-major, column-major,
/// row-major with padded rows, and "no unit stride" (both strides > 1).
enum class layout { row, col, padded, strided };

template <class T>
struct stored {
  std::vector<T> buf;
  dw::matrix_view<T> v;
  stored(const MatD& m, layout l) {
    const dw::index_t r = m.rows(), c = m.cols();
    dw::index_t rs = 1, cs = 1, size = r * c;
    switch (l) {
      case layout::row: rs = std::max<dw::index_t>(c, 1); cs = 1; break;
      case layout::col: rs = 1; cs = std::max<dw::index_t>(r, 1); break;
      case layout::padded: rs = c + 3; cs = 1; size = r * (c + 3); break;
      case layout::strided: rs = 2 * (c + 1); cs = 2; size = r * 2 * (c + 1); break;
    }
    buf.assign(std::size_t(std::max<dw::index_t>(size, 1)), T(-7));  // junk outside the view
    v = dw::matrix_view<T>(buf.data(), r, c, rs, cs);
    for (dw::index_t i = 0; i < r; ++i)
      for (dw::index_t j = 0; j < c; ++j) v(i, j) = T(m(i, j));
  }
  MatD value() const {
    MatD m(v.rows(), v.cols());
    for (dw::index_t i = 0; i < v.rows(); ++i)
      for (dw::index_t j = 0; j < v.cols(); ++j) m(i, j) = double(v(i, j));
    return m;
  }
  dw::matrix_view<const T> cv() const { return v; }
};

MatD product(const MatD& a, const MatD& b) {
  MatD c = MatD::Zero(a.rows(), b.cols());
  for (Eigen::Index i = 0; i < a.rows(); ++i)
    for (Eigen::Index j = 0; j < b.cols(); ++j) {
      double s = 0;
      for (Eigen::Index l = 0; l < a.cols(); ++l) s += a(i, l) * b(l, j);
      c(i, j) = s;
    }
  return c;
}

constexpr layout all_layouts[] = {layout::row, layout::col, layout::padded, layout::strided};

template <class T>
void check_gemm_all_layouts(dw::index_t m, dw::index_t n, dw::index_t kk, double tol) {
  const k::cpu_context ctx;
  std::uint64_t seed = 100;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (layout la : all_layouts)
        for (layout lb : all_layouts)
          for (layout lc : all_layouts) {
            const MatD A = ta ? dwt::random(kk, m, ++seed) : dwt::random(m, kk, ++seed);
            const MatD B = tb ? dwt::random(n, kk, ++seed) : dwt::random(kk, n, ++seed);
            const MatD C0 = dwt::random(m, n, ++seed);
            const double alpha = 0.75, beta = -1.25;
            const stored<T> a(A, la), b(B, lb);
            stored<T> c(C0, lc);
            k::gemm<T>(ctx, T(alpha), a.cv(), ta ? k::op::trans : k::op::none, b.cv(), tb ? k::op::trans : k::op::none,
                       T(beta), c.v);
            const MatD ref = alpha * product(ta ? MatD(A.transpose()) : A, tb ? MatD(B.transpose()) : B) + beta * C0;
            INFO("m n k " << m << " " << n << " " << kk << " ta " << ta << " tb " << tb << " layouts " << int(la) << int(lb)
                          << int(lc));
            CHECK(dwt::rel_err(c.value(), ref) < tol);
            // The junk around a padded or strided C is untouched.
            if (lc == layout::padded && n > 0) CHECK(c.buf[std::size_t(n)] == T(-7));
          }
}

}  // namespace

TEST_CASE("kernels::gemm: every op flag and layout of A, B and C, against a double reference") {
  for (auto [m, n, kk] : {std::array<dw::index_t, 3>{5, 7, 3}, {1, 9, 4}, {6, 1, 5}, {33, 17, 40}, {4, 4, 1}})
    check_gemm_all_layouts<double>(m, n, kk, 1e-13);
  check_gemm_all_layouts<float>(33, 17, 40, 2e-6);
}

TEST_CASE("kernels::gemm: beta = 0 ignores NaN in C, k = 0 scales C, empty outputs, shape errors") {
  const k::cpu_context ctx;
  const MatD A = dwt::random(3, 4, 1), B = dwt::random(4, 2, 2);
  MatD C = MatD::Constant(3, 2, std::numeric_limits<double>::quiet_NaN());
  k::gemm<double>(ctx, 1.0, dw::view(std::as_const(A)), k::op::none, dw::view(std::as_const(B)), k::op::none, 0.0,
                  dw::view(C));
  CHECK(dwt::rel_err(C, product(A, B)) < 1e-14);

  const MatD A0(3, 0), B0(0, 2);
  MatD C2 = dwt::random(3, 2, 3);
  const MatD C2ref = 2.5 * C2;
  k::gemm<double>(ctx, 1.0, dw::view(A0), k::op::none, dw::view(B0), k::op::none, 2.5, dw::view(C2));
  CHECK(dwt::rel_err(C2, C2ref) < 1e-15);

  const MatD A1(0, 4);
  MatD C1(0, 2);
  k::gemm<double>(ctx, 1.0, dw::view(A1), k::op::none, dw::view(std::as_const(B)), k::op::none, 0.0, dw::view(C1));

  MatD Cbad(3, 3);
  dwt::check_throws_with<dw::shape_error>(
      [&] {
        k::gemm<double>(ctx, 1.0, dw::view(std::as_const(A)), k::op::none, dw::view(std::as_const(B)), k::op::none, 0.0,
                        dw::view(Cbad));
      },
      {"deltaw::kernels::gemm", "[3, 4]", "[4, 2]", "[3, 3]"});
}

TEST_CASE("kernels::gemm_strided_batched, gemm_strided_reduce and gemm_grouped against per-problem references") {
  const k::cpu_context ctx;
  const dw::index_t count = 4, m = 3, n = 5, kk = 2;
  const MatD As = dwt::random(count * kk, m, 11);  // A_i = rows [i·k, (i+1)·k) transposed
  const MatD Bs = dwt::random(count * kk, n, 12);
  MatD Cs = dwt::random(count * m, n, 13);
  const MatD C0 = Cs;
  k::gemm_strided_batched<double>(ctx, 2.0, dw::view(As).middle_rows(0, kk), kk * m, k::op::trans,
                                  dw::view(Bs).middle_rows(0, kk), kk * n, k::op::none, 1.0,
                                  dw::view(Cs).middle_rows(0, m), m * n, count);
  for (dw::index_t i = 0; i < count; ++i) {
    const MatD ref = 2.0 * product(As.middleRows(i * kk, kk).transpose(), Bs.middleRows(i * kk, kk)) +
                     C0.middleRows(i * m, m);
    CHECK(dwt::rel_err(MatD(Cs.middleRows(i * m, m)), ref) < 1e-14);
  }

  // The batch-reduce form: C = α·Σ_i op(A_i)·op(B_i) + β·C (sums of per-token products).
  MatD R = dwt::random(m, n, 17);
  const MatD R0 = R;
  k::gemm_strided_reduce<double>(ctx, 0.5, dw::view(As).middle_rows(0, kk), kk * m, k::op::trans,
                                 dw::view(Bs).middle_rows(0, kk), kk * n, k::op::none, -1.0, dw::view(R), count);
  MatD Rref = -1.0 * R0;
  for (dw::index_t i = 0; i < count; ++i)
    Rref += 0.5 * product(As.middleRows(i * kk, kk).transpose(), Bs.middleRows(i * kk, kk));
  CHECK(dwt::rel_err(R, Rref) < 1e-14);
  MatD Rz = MatD::Constant(m, n, std::numeric_limits<double>::quiet_NaN());
  k::gemm_strided_reduce<double>(ctx, 1.0, dw::view(As).middle_rows(0, kk), kk * m, k::op::trans,
                                 dw::view(Bs).middle_rows(0, kk), kk * n, k::op::none, 0.0, dw::view(Rz), 0);
  CHECK(Rz.cwiseAbs().maxCoeff() == 0.0);  // count = 0 with β = 0: zeros, the NaNs not read
  MatD Rbad(m + 1, n);
  dwt::check_throws_with<dw::shape_error>(
      [&] {
        k::gemm_strided_reduce<double>(ctx, 1.0, dw::view(As).middle_rows(0, kk), kk * m, k::op::trans,
                                       dw::view(Bs).middle_rows(0, kk), kk * n, k::op::none, 0.0, dw::view(Rbad), count);
      },
      {"gemm_strided_reduce", "[4, 5]"});

  // Groups of different shapes (adapters of different ranks).
  const MatD X = dwt::random(6, 8, 14), A1 = dwt::random(2, 8, 15), A2 = dwt::random(5, 8, 16);
  MatD Z1(6, 2), Z2(6, 5);
  const std::vector<k::gemm_problem<double>> ps{
      {1.0, dw::view(X), k::op::none, dw::view(A1), k::op::trans, 0.0, dw::view(Z1)},
      {-0.5, dw::view(X), k::op::none, dw::view(A2), k::op::trans, 0.0, dw::view(Z2)}};
  k::gemm_grouped<double>(ctx, ps);
  CHECK(dwt::rel_err(Z1, product(X, A1.transpose())) < 1e-14);
  CHECK(dwt::rel_err(Z2, -0.5 * product(X, A2.transpose())) < 1e-14);
}

TEST_CASE("kernels: element-wise maps, diagonal scalings, reductions, gathers and scatters") {
  const k::cpu_context ctx;
  for (layout l : all_layouts) {
    const MatD X = dwt::random(4, 6, 21), Y0 = dwt::random(4, 6, 22);
    const stored<double> x(X, l);
    stored<double> y(Y0, l);
    k::axpy<double>(ctx, -3.0, x.cv(), y.v);
    CHECK(dwt::rel_err(y.value(), Y0 - 3.0 * X) < 1e-15);
    k::scale<double>(ctx, y.v, 0.5);
    CHECK(dwt::rel_err(y.value(), 0.5 * (Y0 - 3.0 * X)) < 1e-15);
    k::transform(ctx, y.v, [](dw::index_t i, dw::index_t j, double v) { return v + double(10 * i + j); });
    MatD ref = 0.5 * (Y0 - 3.0 * X);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 6; ++j) ref(i, j) += 10 * i + j;
    CHECK(dwt::rel_err(y.value(), ref) < 1e-15);

    const std::vector<double> g{1, -2, 3, 0.5, 4, -1, 2};
    k::scale_rows(ctx, y.v, dw::vector_view<const double>(g.data(), 7), 2);  // rows use g[2..5]
    for (int i = 0; i < 4; ++i) ref.row(i) *= g[std::size_t(i + 2)];
    CHECK(dwt::rel_err(y.value(), ref) < 1e-15);
    k::scale_cols(ctx, y.v, dw::vector_view<const double>(g.data(), 7), 1);  // columns use g[1..6]
    for (int j = 0; j < 6; ++j) ref.col(j) *= g[std::size_t(j + 1)];
    CHECK(dwt::rel_err(y.value(), ref) < 1e-15);
    dwt::check_throws_with<dw::shape_error>(
        [&] { k::scale_rows(ctx, y.v, dw::vector_view<const double>(g.data(), 7), 4); }, {"scale_rows", "size 7"});

    std::vector<double> rs(4), cs(6);
    k::reduce_rows(ctx, y.cv(), dw::vector_view<double>(rs.data(), 4), [](double v) { return v * v; });
    k::reduce_cols(ctx, y.cv(), dw::vector_view<double>(cs.data(), 6), [](double v) { return v; });
    for (int i = 0; i < 4; ++i) CHECK(rs[std::size_t(i)] == doctest::Approx(ref.row(i).squaredNorm()).epsilon(1e-14));
    for (int j = 0; j < 6; ++j) CHECK(cs[std::size_t(j)] == doctest::Approx(ref.col(j).sum()).epsilon(1e-12));
  }

  const MatD X = dwt::random(5, 3, 31);
  const std::vector<dw::index_t> idx{4, 0, 4, 2};
  MatD G(4, 3);
  k::gather_rows(ctx, dw::view(X), idx, dw::view(G));
  for (int i = 0; i < 4; ++i) CHECK(G.row(i) == X.row(idx[std::size_t(i)]));
  MatD S = MatD::Zero(5, 3);
  k::scatter_add_rows<double>(ctx, 2.0, dw::view(std::as_const(G)), idx, dw::view(S));
  MatD Sref = MatD::Zero(5, 3);
  for (int i = 0; i < 4; ++i) Sref.row(idx[std::size_t(i)]) += 2.0 * G.row(i);
  CHECK(dwt::rel_err(S, Sref) < 1e-15);
  const std::vector<dw::index_t> bad{5};
  MatD G1(1, 3);
  dwt::check_throws_with<dw::shape_error>([&] { k::gather_rows(ctx, dw::view(X), bad, dw::view(G1)); },
                                          {"gather_rows", "row index 5", "[0, 5)"});
}

TEST_CASE("kernels::copy converts storage types; operand maps or copies; fill_random matches the stream") {
  const k::cpu_context ctx;
  const MatD X = dwt::random(3, 4, 41);
  Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Xb = X.cast<Eigen::bfloat16>();
  const auto xb = dw::view(std::as_const(Xb));
  const k::operand<float> op(ctx, xb);
  CHECK(op.copied());
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) CHECK(op.view()(i, j) == float(Xb(i, j)));
  const dwt::MatF Xf = X.cast<float>();
  const k::operand<float> direct(ctx, dw::view(Xf));
  CHECK(!direct.copied());
  CHECK(direct.view().data() == Xf.data());
  const stored<float> strided(X, layout::strided);
  const k::operand<float> conv(ctx, strided.cv());
  CHECK(conv.copied());
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) CHECK(conv.view()(i, j) == float(X(i, j)));

  dw::basis_entries e;
  e.stream = {1234, 7};
  e.scale = 0.5;
  dwt::MatF T(3, 5);
  k::fill_random(ctx, e, 9, 11, dw::view(T));  // rows of a basis with 11 columns, starting at entry 9
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 5; ++j) CHECK(T(i, j) == e.value<float>(9 + std::uint64_t(i) * 11 + std::uint64_t(j)));
  dwt::ColMat<float> Tc(3, 5);
  k::fill_random(ctx, e, 9, 11, dw::view(Tc));
  CHECK(dwt::rel_err(Tc, T) == 0.0);
}

TEST_CASE("kernels::axpy_random adds weighted bases entry by entry; dot_rows gives the row inner products") {
  const k::cpu_context ctx;
  std::vector<dw::basis_entries> bases(3);
  for (int b = 0; b < 3; ++b) {
    bases[std::size_t(b)].stream = {99, std::uint64_t(b + 1)};
    bases[std::size_t(b)].scale = 0.25 * (b + 1);
  }
  bases[2].law = dw::basis_law::ternary;
  bases[2].p = 0.3;
  const std::vector<double> c{1.0, -2.0, 0.5};
  for (layout l : all_layouts) {
    const MatD Y0 = dwt::random(4, 7, 51);
    stored<double> y(Y0, l);
    k::axpy_random(ctx, dw::vector_view<const double>(c.data(), 3), std::span<const dw::basis_entries>(bases), 5, 9,
                   y.v);
    MatD ref = Y0;
    for (int b = 0; b < 3; ++b)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 7; ++j)
          ref(i, j) += c[std::size_t(b)] * bases[std::size_t(b)].value<double>(5 + std::uint64_t(i) * 9 + std::uint64_t(j));
    CHECK(dwt::rel_err(y.value(), ref) < 1e-15);

    const stored<double> x(dwt::random(4, 7, 52), l);
    std::vector<double> d(4, 1.0);
    k::dot_rows(ctx, x.cv(), y.cv(), dw::vector_view<double>(d.data(), 4), /*accumulate=*/true);
    for (int i = 0; i < 4; ++i)
      CHECK(d[std::size_t(i)] == doctest::Approx(1.0 + x.value().row(i).dot(y.value().row(i))).epsilon(1e-14));
  }
  MatD Y(2, 2);
  dwt::check_throws_with<dw::shape_error>(
      [&] {
        k::axpy_random(ctx, dw::vector_view<const double>(c.data(), 2), std::span<const dw::basis_entries>(bases), 0, 2,
                       dw::view(Y));
      },
      {"axpy_random", "2 coefficients for 3 bases"});
}

TEST_CASE("kernels on empty views with null data: rows without columns and columns without rows do nothing") {
  // A view of [3, 0] or [0, 3] may have a null data pointer (a reader's empty tensor): no
  // primitive may offset it (UBSan caught copy and transform doing so through the fuzzers).
  const k::cpu_context ctx;
  for (const auto& [r, c] : {std::pair<dw::index_t, dw::index_t>{3, 0}, {0, 3}}) {
    const dw::matrix_view<float> Y(static_cast<float*>(nullptr), r, c, c, 1);
    const dw::matrix_view<const float> X(static_cast<const float*>(nullptr), r, c, c, 1);
    k::copy(ctx, X, Y);
    k::transform(ctx, Y, [](dw::index_t, dw::index_t, float v) { return v + 1; });
    k::transform(ctx, X, Y, [](float x, float y) { return x + y; });
    const dw::basis_entries e{};
    k::fill_random(ctx, e, 0, std::uint64_t(c), Y);
    // k = 0 (or an empty C): two products C_i = 0·C_i + X_i·B_i with empty X_i and B_i.
    std::vector<float> cbuf(std::size_t(2 * r * r) + 1, 5.f);
    k::gemm_strided_batched<float>(ctx, 1.f, X, 5, k::op::none,
                                   dw::matrix_view<const float>(static_cast<const float*>(nullptr), c, r, r, 1), 5,
                                   k::op::none, 0.f, dw::matrix_view<float>(cbuf.data(), r, r, r, 1), r * r, 2);
    for (std::size_t i = 0; i + 1 < cbuf.size(); ++i) CHECK(cbuf[i] == 0.f);
    CHECK(cbuf.back() == 5.f);
  }
  std::vector<float> out(3, 7.f);
  const dw::matrix_view<const float> E(static_cast<const float*>(nullptr), 3, 0, 0, 1);
  k::dot_rows(ctx, E, E, dw::vector_view<float>(out.data(), 3));
  CHECK(out == std::vector<float>(3, 0.f));
  out.assign(3, 7.f);
  k::dot_rows(ctx, E, E, dw::vector_view<float>(out.data(), 3), true);
  CHECK(out == std::vector<float>(3, 7.f));
}
