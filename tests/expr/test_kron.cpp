// Kronecker updates (LoKr, DiffuseKronA) against ΔW built entry by entry in double from
// the definition ΔW[i1·b + i2, j1·d + j2] = s·w1[i1, j1]·w2[i2, j2].
//
// With tests/alloc_counter.cpp linked in, the Kronecker and block-affine tests also check
// that no operation but materialize allocates an out × in matrix.
#include <cstddef>
#include <functional>
#include <numeric>
#include <vector>

#include "alloc_counter.hpp"
#include "test_util.hpp"


namespace {
namespace dw = deltaw;
using dwt::MatD;

/// ΔW = s·(w1 ⊗ w2), entry by entry.
MatD reference_kron(const MatD& w1, const MatD& w2, double s) {
  const auto a = w1.rows(), c = w1.cols(), b = w2.rows(), d = w2.cols();
  MatD D(a * b, c * d);
  for (Eigen::Index i1 = 0; i1 < a; ++i1)
    for (Eigen::Index i2 = 0; i2 < b; ++i2)
      for (Eigen::Index j1 = 0; j1 < c; ++j1)
        for (Eigen::Index j2 = 0; j2 < d; ++j2) D(i1 * b + i2, j1 * d + j2) = s * w1(i1, j1) * w2(i2, j2);
  return D;
}

double inner(const MatD& a, const MatD& b) { return a.cwiseProduct(b).sum(); }

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

/// A factor of either kind, with its double value for the reference.
template <class T>
struct factor_data {
  bool low_rank;
  dwt::RowMat<T> M, L, R;
  MatD value;
};
template <class T>
factor_data<T> make_factor(Eigen::Index rows, Eigen::Index cols, Eigen::Index rank, std::uint64_t seed) {
  factor_data<T> f;
  f.low_rank = rank > 0;
  if (f.low_rank) {
    f.L = dwt::random<dwt::RowMat<T>>(rows, rank, seed);
    f.R = dwt::random<dwt::RowMat<T>>(rank, cols, seed + 1);
    f.value = f.L.template cast<double>() * f.R.template cast<double>();
  } else {
    f.M = dwt::random<dwt::RowMat<T>>(rows, cols, seed);
    f.value = f.M.template cast<double>();
  }
  return f;
}

/// Every operation of u against the dense reference Dref (out × in).
template <class T, class U>
void check_against_reference(const U& u, const MatD& Dref, Eigen::Index tokens, std::uint64_t seed) {
  using M = dwt::RowMat<T>;
  const double tol = tolerance<T>();
  const auto out = Dref.rows(), in = Dref.cols();
  REQUIRE(u.rows() == out);
  REQUIRE(u.cols() == in);

  CHECK(dwt::rel_err(dw::materialize(u), Dref) <= tol);
  CHECK(dw::frobenius_norm(u) == doctest::Approx(Dref.norm()).epsilon(std::is_same_v<T, float> ? 1e-5 : 1e-12));

  const M X = dwt::random<M>(tokens, in, seed + 10);
  const M G = dwt::random<M>(tokens, out, seed + 11);
  const MatD Y = dw::apply(u, X).template cast<double>();
  const MatD O = dw::apply_transposed(u, G).template cast<double>();
  CHECK(dwt::rel_err(Y, X.template cast<double>() * Dref.transpose()) <= tol * std::max<double>(1, in));
  CHECK(dwt::rel_err(O, G.template cast<double>() * Dref) <= tol * std::max<double>(1, out));
  // ⟨X·ΔWᵀ, G⟩ = ⟨X, G·ΔW⟩ from deltaw's own apply and apply_transposed.
  const double lhs = inner(Y, G.template cast<double>()), rhs = inner(X.template cast<double>(), O);
  CHECK(lhs == doctest::Approx(rhs).epsilon(std::is_same_v<T, float> ? 1e-4 : 1e-10).scale(1.0));

  // Other layouts: column-major activations and outputs, and a strided (non-packed) input.
  const dwt::ColMat<T> Xc = X;
  dwt::ColMat<T> Yc(tokens, out);
  dw::apply(u, Xc, Yc);
  CHECK(dwt::rel_err(Yc, Y) <= tol * std::max<double>(1, in));
  M Xwide = M::Zero(tokens, in + 3);
  Xwide.leftCols(in) = X;
  M Yw(tokens, out);
  dw::apply(u, dw::view(std::as_const(Xwide)).middle_cols(0, in), Yw);
  CHECK(dwt::rel_err(Yw, Y) <= tol * std::max<double>(1, in));

  // merge / unmerge on a weight of the same type: merge gives W + ΔW, unmerge restores W.
  const M W0 = dwt::random<M>(out, in, seed + 12);
  M W = W0;
  dw::merge(W, u);
  CHECK(dwt::rel_err(W, W0.template cast<double>() + Dref) <= tol);
  dw::unmerge(W, u);
  CHECK(dwt::rel_err(W, W0) <= 4 * tol);
  dw::merge_checked(W, u);
  CHECK(dwt::rel_err(W, W0.template cast<double>() + Dref) <= tol);
}

}  // namespace

TEST_CASE("lokr_factorization follows PEFT's factorization") {
  using P = std::pair<dw::index_t, dw::index_t>;
  CHECK(dw::lokr_factorization(256) == P{16, 16});
  CHECK(dw::lokr_factorization(128) == P{8, 16});
  CHECK(dw::lokr_factorization(127) == P{1, 127});
  CHECK(dw::lokr_factorization(4096) == P{64, 64});
  CHECK(dw::lokr_factorization(1) == P{1, 1});
  CHECK(dw::lokr_factorization(6) == P{2, 3});
  // A factor that divides is used as given, unsorted (PEFT returns (factor, dim/factor)).
  CHECK(dw::lokr_factorization(128, 4) == P{4, 32});
  CHECK(dw::lokr_factorization(128, 64) == P{64, 2});
  // Otherwise the search stops before a divisor larger than the factor.
  CHECK(dw::lokr_factorization(128, 3) == P{2, 64});
  CHECK(dw::lokr_factorization(100, 7) == P{5, 20});
  CHECK(dw::lokr_factorization(128, 0) == P{1, 128});
  CHECK(dw::lokr_factorization(128, -2) == P{1, 128});
  dwt::check_throws_with<dw::argument_error>([] { (void)dw::lokr_factorization(0); },
                                             {"lokr_factorization", "at least 1", "0"});

  // Default: the divisor pair m ≤ n with the smallest m + n, by brute force.
  for (dw::index_t dim = 1; dim <= 3000; ++dim) {
    dw::index_t best = 1;
    for (dw::index_t m = 1; m * m <= dim; ++m)
      if (dim % m == 0 && m + dim / m < best + dim / best) best = m;
    const auto got = dw::lokr_factorization(dim);
    INFO("dim = " << dim);
    CHECK(got == P{best, dim / best});
  }
}

TEST_CASE("lokr_shapes follows PEFT's update_layer for Linear") {
  const auto s = dw::lokr_shapes(4096, 4096, 8);
  CHECK(s.a == 64);
  CHECK(s.b == 64);
  CHECK(s.c == 64);
  CHECK(s.d == 64);
  CHECK(s.w1_dense);   // decompose_both is off
  CHECK(!s.w2_dense);  // 8 < 64 / 2
  const auto t = dw::lokr_shapes(768, 3072, 8, true);  // 768 = 24·32, 3072 = 48·64
  CHECK(t.a == 24);
  CHECK(t.b == 32);
  CHECK(t.c == 48);
  CHECK(t.d == 64);
  CHECK(!t.w1_dense);  // 8 < 48 / 2
  CHECK(!t.w2_dense);
  CHECK(dw::lokr_shapes(256, 256, 8).w2_dense);  // 8 < 16 / 2 is false
  dwt::check_throws_with<dw::rank_error>([] { (void)dw::lokr_shapes(64, 64, 0); }, {"lokr_shapes", "r"});
}

TEST_CASE_TEMPLATE("kron matches the dense Kronecker product over random shapes", T, float, double) {
  struct shape {
    Eigen::Index a, b, c, d;
  };
  // Odd sizes, 1s, one side much larger than the other (so both apply orders run), empty.
  const std::vector<shape> shapes = {{3, 4, 5, 2},  {1, 7, 3, 1}, {7, 2, 1, 9}, {1, 9, 7, 2},  {5, 5, 5, 5},
                                     {2, 3, 11, 1}, {6, 1, 2, 13}, {1, 1, 1, 1}, {0, 3, 2, 2}, {3, 2, 0, 4}};
  const std::vector<Eigen::Index> token_counts = {0, 1, 5};
  bool saw_w1_first = false, saw_w2_first = false;
  std::uint64_t seed = 100;
  for (const auto& sh : shapes) {
    for (int kinds = 0; kinds < 4; ++kinds) {
      const Eigen::Index r1 = (kinds & 1) ? 2 : 0, r2 = (kinds & 2) ? 3 : 0;
      const auto f1 = make_factor<T>(sh.a, sh.c, r1, seed);
      const auto f2 = make_factor<T>(sh.b, sh.d, r2, seed + 2);
      const double s = 0.75;
      const MatD Dref = reference_kron(f1.value, f2.value, s);
      for (auto tokens : token_counts) {
        CAPTURE(sh.a);
        CAPTURE(sh.b);
        CAPTURE(sh.c);
        CAPTURE(sh.d);
        CAPTURE(kinds);
        CAPTURE(tokens);
        auto run = [&](const auto& u) {
          CHECK(u.parameter_count() == (r1 ? r1 * (sh.a + sh.c) : sh.a * sh.c) + (r2 ? r2 * (sh.b + sh.d) : sh.b * sh.d));
          (u.w1_first(tokens) ? saw_w1_first : saw_w2_first) = true;
          check_against_reference<T>(u, Dref, tokens, seed + 5);
        };
        if (kinds == 0) run(dw::kron(f1.M, f2.M, dw::scale(s)));
        if (kinds == 1) run(dw::kron(dw::kron_factor(f1.L, f1.R), f2.M, dw::scale(s)));
        if (kinds == 2) run(dw::kron(f1.M, dw::kron_factor(f2.L, f2.R), dw::scale(s)));
        if (kinds == 3) run(dw::kron(dw::kron_factor(f1.L, f1.R), dw::kron_factor(f2.L, f2.R), dw::scale(s)));
      }
      seed += 7;
    }
  }
  CHECK(saw_w1_first);
  CHECK(saw_w2_first);
}

TEST_CASE("kron flop_count takes the cheaper order") {
  const MatD w1 = dwt::random(7, 2, 1), w2 = dwt::random(3, 11, 2);  // a = 7, c = 2, b = 3, d = 11
  const auto u = dw::kron(w1, w2);
  const dw::index_t t = 10;
  const dw::index_t w1_first = t * (2 * 7 * 2 * 11 + 2 * 3 * 11 * 7);  // [a,c]·[c,d], then [a,d]·w2ᵀ
  const dw::index_t w2_first = t * (2 * 3 * 11 * 2 + 2 * 7 * 2 * 3);   // [c,d]·w2ᵀ, then w1·[c,b]
  CHECK(u.flops_w1_first(t) == w1_first);
  CHECK(u.flops_w2_first(t) == w2_first);
  CHECK(u.flop_count(t) == std::min(w1_first, w2_first));
  CHECK(dw::flop_count(u, t) == std::min(w1_first, w2_first));
  CHECK(dw::parameter_count(u) == 7 * 2 + 3 * 11);
}

TEST_CASE("lokr scales by alpha / r even with both factors dense; diffusekrona does not scale") {
  const MatD w1 = dwt::random(4, 3, 1), w2 = dwt::random(5, 2, 2);
  const auto u = dw::lokr(w1, w2, dw::alpha(16), 8);
  CHECK(u.scale() == doctest::Approx(2.0));
  CHECK(dwt::rel_err(dw::materialize(u), reference_kron(w1, w2, 2.0)) <= 1e-14);

  const MatD a = dwt::random(4, 8, 3), b = dwt::random(8, 3, 4);
  const auto v = dw::lokr(dw::kron_factor(a, b), w2, dw::alpha(4), 8);
  CHECK(v.scale() == doctest::Approx(0.5));
  CHECK(dwt::rel_err(dw::materialize(v), reference_kron(a * b, w2, 0.5)) <= 1e-14);
  CHECK(dw::parameter_count(v) == 8 * (4 + 3) + 5 * 2);

  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::lokr(dw::kron_factor(a, b), w2, dw::alpha(4), 4); },
                                         {"lokr", "rank 8", "r = 4"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::lokr(w1, w2, dw::alpha(4), 0); }, {"lokr", "r"});

  const auto k = dw::diffusekrona(w1, w2);
  CHECK(k.scale() == 1.0);
  CHECK(dwt::rel_err(dw::materialize(k), reference_kron(w1, w2, 1.0)) <= 1e-15);
}

TEST_CASE("a DiffuseKronA checkpoint's forward is kron(up, down^T) on perfect-shuffled inputs") {
  // Its forward, step by step: x viewed [a2, b2], transposed to [b2, a2], y = vec(up·X̃·down).
  const Eigen::Index a1 = 3, a2 = 4, b1 = 5, b2 = 2, tokens = 6;
  const MatD up = dwt::random(b1, b2, 1), down = dwt::random(a2, a1, 2);
  const MatD X = dwt::random(tokens, a2 * b2, 3);
  MatD Yref(tokens, a1 * b1), Xs(tokens, a2 * b2);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    MatD Xt(b2, a2);
    for (Eigen::Index q = 0; q < a2; ++q)
      for (Eigen::Index p = 0; p < b2; ++p) Xt(p, q) = X(t, q * b2 + p);
    const MatD R = up * Xt * down;  // [b1, a1]
    for (Eigen::Index u = 0; u < b1; ++u)
      for (Eigen::Index v = 0; v < a1; ++v) Yref(t, u * a1 + v) = R(u, v);
    for (Eigen::Index q = 0; q < a2; ++q)
      for (Eigen::Index p = 0; p < b2; ++p) Xs(t, p * a2 + q) = X(t, q * b2 + p);  // S·x
  }
  const MatD downT = down.transpose();
  CHECK(dwt::rel_err(dw::apply(dw::kron(up, downT), Xs), Yref) <= 1e-13);
}

TEST_CASE("kron factor shape errors name the shapes") {
  const MatD a = dwt::random(4, 2, 1), b = dwt::random(3, 5, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::kron_factor(a, b); }, {"kron_factor", "[4, 2]", "[3, 5]"});
  const MatD W = dwt::random(6, 6, 3);
  const auto u = dw::kron(a, b);  // ΔW [12, 10]
  dwt::check_throws_with<dw::shape_error>([&] { (void)(dw::view(W) + u); }, {"[6, 6]", "[12, 10]"});
}

TEST_CASE_TEMPLATE("lazy sum W + LoRA + Kronecker", T, float, double) {
  using M = dwt::RowMat<T>;
  const Eigen::Index a = 3, b = 4, c = 5, d = 3, out = a * b, in = c * d, r = 2, tokens = 7;
  const M W = dwt::random<M>(out, in, 1);
  const M B = dwt::random<M>(out, r, 2), A = dwt::random<M>(r, in, 3);
  const M w1 = dwt::random<M>(a, c, 4), w2a = dwt::random<M>(b, 2, 5), w2b = dwt::random<M>(2, d, 6);
  const auto e = dw::view(W) + dw::lora(B, A, dw::alpha(4)) + dw::lokr(w1, dw::kron_factor(w2a, w2b), dw::alpha(3), 2);
  const MatD ref = W.template cast<double>() + 2.0 * B.template cast<double>() * A.template cast<double>() +
                   reference_kron(w1.template cast<double>(),
                                  w2a.template cast<double>() * w2b.template cast<double>(), 1.5);
  const M X = dwt::random<M>(tokens, in, 7), G = dwt::random<M>(tokens, out, 8);
  const double tol = tolerance<T>() * 20;
  CHECK(dwt::rel_err(dw::apply(e, X), X.template cast<double>() * ref.transpose()) <= tol);
  CHECK(dwt::rel_err(dw::apply_transposed(e, G), G.template cast<double>() * ref) <= tol);
  CHECK(dwt::rel_err(dw::materialize(e), ref) <= tol);
  CHECK(dw::parameter_count(e) == r * (out + in) + a * c + 2 * (b + d));
  const M X0(0, in);
  CHECK(dw::apply(e, X0).rows() == 0);
}

TEST_CASE("Kronecker operations never allocate an out x in matrix (except materialize)") {
  if (!dwt::allocation_counting_available()) return;  // sanitizers own malloc
  using M = dwt::RowMat<float>;
  const Eigen::Index a = 32, b = 32, c = 32, d = 32, out = a * b, in = c * d, tokens = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  const M w1 = dwt::random<M>(a, c, 1), w2a = dwt::random<M>(b, 4, 2), w2b = dwt::random<M>(4, d, 3);
  M W = dwt::random<M>(out, in, 4);
  const M X = dwt::random<M>(tokens, in, 5), G = dwt::random<M>(tokens, out, 6);
  M Y(tokens, out), O(tokens, in);
  const auto u = dw::lokr(w1, dw::kron_factor(w2a, w2b), dw::alpha(8), 4);
  const auto e = dw::view(std::as_const(W)) + u;
  CHECK(dwt::largest_allocation([&] { dw::apply(e, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply_transposed(e, G, O); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);  // the control
}
