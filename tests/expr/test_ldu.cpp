// LoLDU: the partial-pivot LDU (reconstruction, unit-triangular factors, truncation), the
// update against its dense definition in double over square, tall and wide W with odd
// sizes, r = 1 and r = min(out, in); the exact initial output; merge/unmerge; the
// transpose identity; parameter counts; errors.
#include <cmath>
#include <limits>
#include <vector>

#include "test_util.hpp"

namespace dw = deltaw;
using dwt::MatD;
using dwt::MatF;
using dwt::RowMat;

namespace {

struct wshape {
  Eigen::Index out, in;
};
// square, tall, wide, odd sizes, a single row / column
const wshape wshapes[] = {{1, 1}, {5, 5}, {7, 3}, {3, 7}, {17, 9}, {9, 17}, {32, 32}, {33, 31}, {1, 6}, {6, 1}};

template <class V>
MatD dense_of(const V& v) {
  MatD m(v.rows(), v.cols());
  for (Eigen::Index i = 0; i < v.rows(); ++i)
    for (Eigen::Index j = 0; j < v.cols(); ++j) m(i, j) = dw::convert<double>(v(i, j));
  return m;
}

// The permutation matrix P (P[o, perm[o]] = 1), built only here, for the reference.
template <class Perm>
MatD perm_matrix(const Perm& perm, Eigen::Index n) {
  MatD P = MatD::Zero(n, n);
  for (Eigen::Index o = 0; o < n; ++o) P(o, perm[o]) = 1.0;
  return P;
}

// ΔW = P·L_r·diag(σ·z − σ₀·z₀)·U_r from the definition, in double.
template <class U>
MatD reference_delta(const U& u) {
  const MatD L = dense_of(u.L());
  const MatD Ur = dense_of(u.U());
  Eigen::VectorXd c(u.rank());
  for (Eigen::Index j = 0; j < u.rank(); ++j)
    c(j) = u.sigma() * dw::convert<double>(u.z()[j]) - u.sigma0() * dw::convert<double>(u.z0()[j]);
  return perm_matrix(u.perm(), u.rows()) * L * c.asDiagonal() * Ur;
}

template <class T>
double tol() {
  return std::is_same_v<T, double> ? 1e-11 : 2e-5;
}

bool is_permutation(const std::vector<dw::index_t>& p) {
  std::vector<char> seen(p.size(), 0);
  for (auto i : p) {
    if (i < 0 || std::size_t(i) >= p.size() || seen[std::size_t(i)]) return false;
    seen[std::size_t(i)] = 1;
  }
  return true;
}

}  // namespace

TEST_CASE("partial-pivot LDU reconstructs W with unit-triangular L and U") {
  std::uint64_t seed = 100;
  for (const auto& s : wshapes) {
    CAPTURE(s.out);
    CAPTURE(s.in);
    const MatD W = dwt::random(s.out, s.in, ++seed);
    const dw::ldu_factors f = dw::partial_pivot_ldu(W);
    const Eigen::Index k = std::min(s.out, s.in);
    REQUIRE(f.L.rows() == s.out);
    REQUIRE(f.L.cols() == k);
    REQUIRE(f.U.rows() == k);
    REQUIRE(f.U.cols() == s.in);
    REQUIRE(f.D.size() == k);
    CHECK(is_permutation(f.perm));
    for (Eigen::Index i = 0; i < s.out; ++i)
      for (Eigen::Index j = 0; j < k; ++j) {
        if (j == i) CHECK(f.L(i, j) == 1.0);
        if (j > i) CHECK(f.L(i, j) == 0.0);
        CHECK(std::abs(f.L(i, j)) <= 1.0);  // partial pivoting bounds the multipliers
      }
    for (Eigen::Index i = 0; i < k; ++i)
      for (Eigen::Index j = 0; j <= std::min(i, s.in - 1); ++j) CHECK(f.U(i, j) == (i == j ? 1.0 : 0.0));
    const MatD rec = perm_matrix(f.perm, s.out) * f.L * f.D.asDiagonal() * f.U;
    CHECK(dwt::rel_err(rec, W) < 1e-13);
  }
}

TEST_CASE("truncated LDU: the leading r steps of the full one, and the Schur complement is isolated") {
  std::uint64_t seed = 200;
  for (const auto& s : wshapes) {
    const Eigen::Index k = std::min(s.out, s.in);
    const MatD W = dwt::random(s.out, s.in, ++seed);
    const dw::ldu_factors full = dw::partial_pivot_ldu(W);
    const MatD PLfull = perm_matrix(full.perm, s.out) * full.L;
    for (Eigen::Index r : {Eigen::Index(1), (k + 1) / 2, k}) {
      CAPTURE(s.out);
      CAPTURE(s.in);
      CAPTURE(r);
      const dw::ldu_factors t = dw::cpu::partial_pivot_ldu(dw::matrix_view<const double>(dw::view(W)), r);
      // P·L_r, D_r and U_r do not depend on the later pivots.
      CHECK((perm_matrix(t.perm, s.out) * t.L - PLfull.leftCols(r)).cwiseAbs().maxCoeff() == 0.0);
      CHECK((t.D - full.D.head(r)).cwiseAbs().maxCoeff() == 0.0);
      CHECK((t.U - full.U.topRows(r)).cwiseAbs().maxCoeff() == 0.0);
      // W − P·L_r·D_r·U_r vanishes on the r pivot rows and on the first r columns.
      const MatD M = W - perm_matrix(t.perm, s.out) * t.L * t.D.asDiagonal() * t.U;
      for (Eigen::Index o = 0; o < s.out; ++o) {
        const bool pivot_row = t.perm[std::size_t(o)] < r;
        for (Eigen::Index j = 0; j < s.in; ++j)
          if (pivot_row || j < r) CHECK(std::abs(M(o, j)) < 1e-13);
      }
    }
  }
}

TEST_CASE_TEMPLATE("loldu: ΔW = 0 at initialisation and the initial output is exactly X·Wᵀ", T, float, double) {
  std::uint64_t seed = 300;
  for (const auto& s : wshapes) {
    const Eigen::Index k = std::min(s.out, s.in);
    for (Eigen::Index r : {Eigen::Index(1), k}) {
      CAPTURE(s.out);
      CAPTURE(s.in);
      CAPTURE(r);
      const RowMat<T> W = dwt::random<RowMat<T>>(s.out, s.in, ++seed);
      const RowMat<T> X = dwt::random<RowMat<T>>(5, s.in, ++seed);
      const auto u = dw::loldu(W, r, dw::alpha(1.0));
      CHECK(u.rows() == s.out);
      CHECK(u.cols() == s.in);
      CHECK(u.rank() == r);
      CHECK(u.sigma() == doctest::Approx(1.0 / double(r)));
      const auto D = dw::materialize(u);
      CHECK(D.cwiseAbs().maxCoeff() == 0.0);
      CHECK(dw::frobenius_norm(u) == 0.0);
      const auto Y0 = dw::apply(dw::view(W), X);
      const auto Y1 = dw::apply(dw::view(W) + u, X);
      CHECK((Y0.array() == Y1.array()).all());
      // The paper's residual form W_res + σ·P·L_r·diag(z)·U_r is W again (up to rounding).
      const MatD L = dense_of(u.L()), Ur = dense_of(u.U());
      Eigen::VectorXd z(r), z0(r);
      for (Eigen::Index j = 0; j < r; ++j) z(j) = double(u.z()[j]), z0(j) = double(u.z0()[j]);
      const MatD P = perm_matrix(u.perm(), s.out);
      const MatD Wd = W.template cast<double>();
      const MatD Wres = Wd - u.sigma0() * P * L * z0.asDiagonal() * Ur;
      CHECK(dwt::rel_err(MatD(Wres + u.sigma() * P * L * z.asDiagonal() * Ur), Wd) < 1e-12);
      // Merging the initial update leaves W bit-identical.
      RowMat<T> Wm = W;
      dw::merge(Wm, u);
      CHECK((Wm.array() == W.array()).all());
    }
  }
}

TEST_CASE_TEMPLATE("loldu: a trained z (and σ) against the dense definition", T, float, double) {
  std::uint64_t seed = 400;
  for (const auto& s : wshapes) {
    const Eigen::Index k = std::min(s.out, s.in);
    for (Eigen::Index r : {Eigen::Index(1), (k + 1) / 2, k}) {
      CAPTURE(s.out);
      CAPTURE(s.in);
      CAPTURE(r);
      const RowMat<T> W = dwt::random<RowMat<T>>(s.out, s.in, ++seed);
      const auto u0 = dw::loldu(W, r, dw::alpha(2.0), dw::ldu_options{true});
      CHECK(dw::parameter_count(u0) == r + 1);
      // z = z₀ + a perturbation, in caller memory.
      Eigen::Matrix<T, Eigen::Dynamic, 1> z(r);
      const MatD dz = dwt::random(r, 1, ++seed);
      for (Eigen::Index j = 0; j < r; ++j) z(j) = T(double(u0.z0()[j]) + dz(j, 0));
      for (double sigma : {u0.sigma0(), 0.7 * u0.sigma0()}) {
        CAPTURE(sigma);
        const auto u = u0.with_z(z).with_sigma(sigma);
        const MatD ref = reference_delta(u);
        CHECK(dwt::rel_err(dw::materialize(u), ref) < tol<T>());
        CHECK(dw::frobenius_norm(u) == doctest::Approx(ref.norm()).epsilon(tol<T>()));

        for (Eigen::Index tokens : {Eigen::Index(0), Eigen::Index(1), Eigen::Index(7)}) {
          const RowMat<T> X = dwt::random<RowMat<T>>(tokens, s.in, ++seed);
          const RowMat<T> G = dwt::random<RowMat<T>>(tokens, s.out, ++seed);
          const MatD Xd = X.template cast<double>(), Gd = G.template cast<double>();
          const MatD Wd = W.template cast<double>();
          CHECK(dwt::rel_err(dw::apply(dw::view(W) + u, X), MatD(Xd * (Wd + ref).transpose())) < tol<T>());
          CHECK(dwt::rel_err(dw::apply_transposed(dw::view(W) + u, G), MatD(Gd * (Wd + ref))) < tol<T>());
          // ⟨X·ΔWᵀ, G⟩ = ⟨X, G·ΔW⟩ with the update alone.
          const MatD YX = dw::apply(u, X).template cast<double>();
          const MatD OG = dw::apply_transposed(u, G).template cast<double>();
          const double lhs = YX.cwiseProduct(Gd).sum(), rhs = Xd.cwiseProduct(OG).sum();
          CHECK(std::abs(lhs - rhs) <= tol<T>() * (1.0 + std::abs(lhs)) * double(1 + tokens * s.in));
        }

        RowMat<T> Wm = W;
        dw::merge(Wm, u);
        CHECK(dwt::rel_err(Wm, MatD(W.template cast<double>() + ref)) < tol<T>());
        dw::unmerge(Wm, u);
        CHECK(dwt::rel_err(Wm, W) < tol<T>());
        RowMat<T> Wc = W;
        dw::merge_checked(Wc, u);
        CHECK(dwt::rel_err(Wc, MatD(W.template cast<double>() + ref)) < tol<T>());
      }
    }
  }
}

TEST_CASE("loldu: counts, options, from stored factors, bf16 weights") {
  const MatF W = dwt::random<MatF>(12, 9, 1);
  const auto u = dw::loldu(W, 4);  // α = 1 by default
  CHECK(u.sigma() == doctest::Approx(0.25));
  CHECK(dw::parameter_count(u) == 4);
  CHECK(dw::parameter_count(dw::loldu(W, 4, dw::alpha(1.0), dw::ldu_options{true})) == 5);
  CHECK(dw::flop_count(u, 10) == 2 * 10 * 4 * (12 + 9));
  CHECK(dw::flop_count(dw::view(W) + u, 10) == 2 * 10 * 12 * 9 + 2 * 10 * 4 * (12 + 9));

  // Rebuilt from its factors (views), a trained update gives the same ΔW.
  Eigen::VectorXf z(4);
  for (int j = 0; j < 4; ++j) z(j) = u.z0()[j] * 1.5f;
  const auto t = u.with_z(z);
  const std::vector<dw::index_t> perm(u.perm().data(), u.perm().data() + u.perm().size());
  const auto v = dw::ldu_from_factors(perm, u.L(), z, u.z0(), u.U(), dw::scale(u.sigma()), dw::scale(u.sigma0()));
  CHECK(dwt::rel_err(dw::materialize(v), dw::materialize(t)) == 0.0);
  CHECK(dwt::rel_err(dw::materialize(t), reference_delta(t)) < 2e-5);

  // bf16 weights: the factors are float; z = z₀ still gives the exact initial output.
  std::vector<dw::bf16> wb(12 * 9);
  for (std::size_t i = 0; i < wb.size(); ++i) wb[i] = dw::bf16(W.data()[i]);
  const auto Wb = dw::view(wb.data(), 12, 9);
  const auto ub = dw::loldu(Wb, 3);
  static_assert(std::is_same_v<decltype(ub)::value_type, float>);
  const MatF X = dwt::random<MatF>(4, 9, 2);
  const auto Y0 = dw::apply(Wb, X);
  CHECK((Y0.array() == dw::apply(Wb + ub, X).array()).all());
  const dw::ldu_factors fb = dw::partial_pivot_ldu(Wb);
  MatD Wbd(12, 9);
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < 9; ++j) Wbd(i, j) = double(float(wb[std::size_t(i * 9 + j)]));
  CHECK(dwt::rel_err(MatD(perm_matrix(fb.perm, 12) * fb.L * fb.D.asDiagonal() * fb.U), Wbd) < 1e-13);
}

TEST_CASE("loldu: bad inputs give specific errors") {
  const MatD W = dwt::random(6, 4, 7);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::loldu(W, 0); }, {"deltaw::loldu", "[1, 4]", "[6, 4]", "got 0"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::loldu(W, 5); }, {"deltaw::loldu", "[1, 4]", "got 5"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::loldu(W, 2, dw::alpha(NAN)); }, {"alpha"});
  MatD Wn = W;
  Wn(3, 2) = std::numeric_limits<double>::infinity();
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::loldu(Wn, 2); }, {"non-finite", "(3, 2)"});

  // Zero pivot: the second column is twice the first (exactly, with a power-of-two pivot).
  MatD Ws(3, 3);
  Ws << 1, 2, 3, 4, 8, 1, -2, -4, 5;
  CHECK_NOTHROW((void)dw::loldu(Ws, 1));
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::loldu(Ws, 2); }, {"zero pivot at step 1", "[3, 3]", "D[1] = 0"});
  MatD Wz = MatD::Zero(4, 4);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::loldu(Wz, 1); }, {"zero pivot at step 0"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::partial_pivot_ldu(Ws); }, {"zero pivot"});

  // Stored factors that do not fit.
  const auto u = dw::loldu(W, 2);
  std::vector<dw::index_t> perm(u.perm().data(), u.perm().data() + 6);
  std::vector<dw::index_t> bad = perm;
  bad[0] = bad[1];
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)dw::ldu_from_factors(bad, u.L(), u.z(), u.z0(), u.U(), dw::scale(0.5), dw::scale(0.5)); },
      {"not a permutation"});
  std::vector<dw::index_t> shorter(perm.begin(), perm.end() - 1);
  dwt::check_throws_with<dw::shape_error>(
      [&] { (void)dw::ldu_from_factors(shorter, u.L(), u.z(), u.z0(), u.U(), dw::scale(0.5), dw::scale(0.5)); },
      {"one entry per row", "perm [5]"});
  MatD L = dense_of(u.L());
  L(0, 1) = 0.5;
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)dw::ldu_from_factors(perm, L, u.z(), u.z0(), u.U(), dw::scale(0.5), dw::scale(0.5)); },
      {"unit lower-trapezoidal", "L(0, 1)"});
  MatD Ub = dense_of(u.U());
  Ub(1, 1) = 2.0;
  dwt::check_throws_with<dw::argument_error>(
      [&] { (void)dw::ldu_from_factors(perm, u.L(), u.z(), u.z0(), Ub, dw::scale(0.5), dw::scale(0.5)); },
      {"unit upper-trapezoidal", "U(1, 1)"});
  Eigen::VectorXd z3(3);
  z3.setOnes();
  dwt::check_throws_with<dw::shape_error>(
      [&] { (void)dw::ldu_from_factors(perm, u.L(), z3, u.z0(), u.U(), dw::scale(0.5), dw::scale(0.5)); },
      {"must share r", "z [3]"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)u.with_sigma(INFINITY); }, {"deltaw::ldu"});
  const MatD W2 = dwt::random(5, 4, 8);
  dwt::check_throws_with<dw::shape_error>([&] { (void)(dw::view(W2) + u); }, {"[5, 4]", "[6, 4]"});
}
