// NOLA, VeRA and RandLoRA against dense references built here, in double, from the
// documented entry laws (random_stream draws, not the evaluators' tile fills) and the
// papers' / PEFT's formulas: materialize, apply, apply_transposed, merge/unmerge, norms,
// the lazy sum, parameter counts, determinism across calls and threads, errors.
#include <cmath>
#include <cstring>
#include <thread>

#include "test_util.hpp"

namespace dw = deltaw;
using dwt::MatD;
using dwt::MatF;
using VecD = Eigen::VectorXd;
using VecF = Eigen::VectorXf;

namespace {

VecD random_vec(Eigen::Index n, std::uint64_t seed) { return dwt::random<MatD>(n, 1, seed).col(0); }

// ── references ────────────────────────────────────────────────────────────────────────

// One entry of a uniform basis: bound · U(−1, 1) at the flat index, from the raw stream.
double uni(std::uint64_t seed, std::uint64_t tensor, std::uint64_t idx, double bound) {
  return bound * double(dw::random_stream{seed, tensor}.uniform_pm1(idx));
}

MatD nola_reference(Eigen::Index out, Eigen::Index in, Eigen::Index r, std::uint64_t seed, const VecD& a,
                    const VecD& b, double s) {
  const double k = double(a.size()), l = double(b.size());
  MatD A(r, in), B = MatD::Zero(out, r);
  for (Eigen::Index i = 0; i < r; ++i)
    for (Eigen::Index j = 0; j < in; ++j) {
      const std::uint64_t idx = std::uint64_t(i * in + j);
      double v = uni(seed, 0, idx, 1.0 / std::sqrt(double(in)));  // frozen A₀
      for (Eigen::Index q = 0; q < a.size(); ++q)
        v += a(q) * uni(seed, (std::uint64_t(1) << 32) + std::uint64_t(q), idx, 1.0 / std::sqrt(k));
      A(i, j) = v;
    }
  for (Eigen::Index o = 0; o < out; ++o)
    for (Eigen::Index i = 0; i < r; ++i)
      for (Eigen::Index q = 0; q < b.size(); ++q)
        B(o, i) += b(q) * uni(seed, (std::uint64_t(2) << 32) + std::uint64_t(q), std::uint64_t(o * r + i),
                              1.0 / std::sqrt(l));
  return s * B * A;
}

MatD vera_reference(const dw::vera_basis& basis, Eigen::Index out, Eigen::Index in, const VecD& ld, const VecD& lb) {
  const Eigen::Index r = basis.r;
  MatD A(r, in), B(out, r);
  for (Eigen::Index k = 0; k < r; ++k)
    for (Eigen::Index j = 0; j < in; ++j)
      A(k, j) = uni(basis.seed, 0, std::uint64_t(k * basis.in_max + j), std::sqrt(6.0 / double(basis.in_max)));
  for (Eigen::Index i = 0; i < out; ++i)
    for (Eigen::Index k = 0; k < r; ++k)
      B(i, k) = uni(basis.seed, 1, std::uint64_t(i * r + k), std::sqrt(6.0 / double(r)));
  return lb.asDiagonal() * B * ld.asDiagonal() * A;
}

// A RandLoRA basis entry by PEFT's rules: kaiming-uniform or ternary (u < p → −1,
// u > 1 − p → +1 on a uniform u in [0, 1)), divided by the law's standard deviation.
double randlora_entry(const dw::randlora_basis& b, std::uint64_t tensor, std::uint64_t idx) {
  const dw::random_stream st{b.seed, tensor};
  if (b.kind == dw::randlora_kind::dense) return std::sqrt(3.0) * double(st.uniform_pm1(idx));
  const double p = b.kind == dw::randlora_kind::sparse ? 1.0 / 6.0 : 1.0 / (2.0 * std::sqrt(double(b.min_dim)));
  const double u = st.uniform01(idx);
  const double t = u < p ? -1.0 : (u > 1.0 - p ? 1.0 : 0.0);
  return t / std::sqrt(2.0 * p);
}

// PEFT's construction, transcribed literally: A3 [r, 1, n_s], B3 [m_s, N_s, r]; sliced to
// the layer; V3[k, b, j] = λ[k, b]·A3[k, 0, j]·γ[b, j]; update_A = V3.flatten(0, 1) (row
// k·N + b); update_B = B3[:m, :N, :].flatten(1) (column b·r + k); D = update_B·update_A.
MatD randlora_reference(const dw::randlora_basis& bs, Eigen::Index out, Eigen::Index in, const MatD& lambda,
                        const MatD& gamma, double s) {
  const Eigen::Index r = bs.r, n = std::min(out, in), m = std::max(out, in);
  const Eigen::Index N = (n + r - 1) / r;
  MatD Vflat(r * N, n), Uflat(m, N * r);
  for (Eigen::Index k = 0; k < r; ++k)
    for (Eigen::Index b = 0; b < N; ++b)
      for (Eigen::Index j = 0; j < n; ++j)
        Vflat(k * N + b, j) =
            lambda(k, b) * randlora_entry(bs, 0, std::uint64_t(k * bs.min_dim + j)) * gamma(b, j);
  for (Eigen::Index i = 0; i < m; ++i)
    for (Eigen::Index b = 0; b < N; ++b)
      for (Eigen::Index k = 0; k < r; ++k)
        Uflat(i, b * r + k) = randlora_entry(bs, 1, std::uint64_t((i * bs.num_bases + b) * r + k));
  const MatD D = Uflat * Vflat;
  return out >= in ? MatD(s * D) : MatD(s * D.transpose());
}

// ── shared checks ─────────────────────────────────────────────────────────────────────

// materialize, apply, apply_transposed, frobenius_norm against the reference ΔW, and
// the transpose identity ⟨X·ΔWᵀ, G⟩ = ⟨X, G·ΔW⟩.
template <class U>
void check_against(const U& u, const MatD& ref, Eigen::Index tokens, double tol, std::uint64_t seed) {
  REQUIRE(u.rows() == ref.rows());
  REQUIRE(u.cols() == ref.cols());
  CHECK(dwt::rel_err(dw::materialize(u), ref) < tol);
  const MatD X = dwt::random<MatD>(tokens, ref.cols(), seed);
  const MatD G = dwt::random<MatD>(tokens, ref.rows(), seed + 1);
  using C = dw::accum_t<typename U::value_type>;
  using MC = dwt::RowMat<C>;
  const MC Xc = X.cast<C>(), Gc = G.cast<C>();
  const MC Y = dw::apply(u, Xc);
  const MC O = dw::apply_transposed(u, Gc);
  const MatD Xr = Xc.template cast<double>(), Gr = Gc.template cast<double>();
  CHECK(dwt::rel_err(Y, MatD(Xr * ref.transpose())) < tol);
  CHECK(dwt::rel_err(O, MatD(Gr * ref)) < tol);
  const double lhs = Y.template cast<double>().cwiseProduct(Gr).sum();
  const double rhs = Xr.cwiseProduct(O.template cast<double>()).sum();
  CHECK(std::abs(lhs - rhs) <= tol * std::max(1.0, std::abs(lhs)) * double(std::max<Eigen::Index>(tokens, 1)));
  const double fn = ref.norm();
  CHECK(std::abs(dw::frobenius_norm(u) - fn) <= tol * std::max(1.0, fn));
}

// merge then unmerge on a float W and a double W.
template <class U>
void check_merge_roundtrip(const U& u, const MatD& ref, double tol) {
  // W + ΔW − ΔW loses W's low bits in proportion to |ΔW| (RandLoRA's s = α/r makes
  // |ΔW| ≫ |W| here), so the round-trip bounds scale with max |ΔW|.
  const double big = std::max(1.0, ref.size() ? ref.cwiseAbs().maxCoeff() : 0.0);
  const MatD W0 = dwt::random<MatD>(ref.rows(), ref.cols(), 77);
  MatD W = W0;
  dw::merge(W, u);
  CHECK(dwt::rel_err(W, MatD(W0 + ref)) < tol);
  dw::unmerge(W, u);
  CHECK(dwt::rel_err(W, W0) < tol * big);
  MatF Wf = W0.cast<float>();
  const MatF Wf0 = Wf;
  dw::merge(Wf, u);
  CHECK(dwt::rel_err(Wf, MatD(W0.cast<float>().cast<double>() + ref)) < 1e-5);
  dw::unmerge(Wf, u);
  CHECK(dwt::rel_err(Wf, Wf0) < 2e-6 * big);
}

template <class U>
void check_deterministic(const U& u) {
  using C = dw::accum_t<typename U::value_type>;
  dwt::RowMat<C> a, b, c;
  std::thread t1([&] { a = dw::materialize(u); });
  std::thread t2([&] { b = dw::materialize(u); });
  t1.join();
  t2.join();
  c = dw::materialize(u);
  REQUIRE(a.size() == c.size());
  CHECK(std::memcmp(a.data(), b.data(), std::size_t(a.size()) * sizeof(C)) == 0);
  CHECK(std::memcmp(a.data(), c.data(), std::size_t(a.size()) * sizeof(C)) == 0);
  const dwt::RowMat<C> X = dwt::random<MatD>(5, u.cols(), 3).template cast<C>();
  const dwt::RowMat<C> y1 = dw::apply(u, X), y2 = dw::apply(u, X);
  CHECK(std::memcmp(y1.data(), y2.data(), std::size_t(y1.size()) * sizeof(C)) == 0);
}

template <class U>
void check_zero_tokens(const U& u) {
  using C = dw::accum_t<typename U::value_type>;
  const dwt::RowMat<C> X(0, u.cols()), G(0, u.rows());
  const auto Y = dw::apply(u, X);
  const auto O = dw::apply_transposed(u, G);
  CHECK(Y.rows() == 0);
  CHECK(Y.cols() == u.rows());
  CHECK(O.rows() == 0);
  CHECK(O.cols() == u.cols());
}

struct shape {
  Eigen::Index out, in, r, tokens;
};

}  // namespace

// ── NOLA ──────────────────────────────────────────────────────────────────────────────

TEST_CASE("NOLA matches B·A built from the regenerated bases, in double") {
  const shape shapes[] = {{1, 1, 1, 1}, {7, 5, 2, 3}, {13, 17, 4, 0}, {40, 33, 8, 9}, {300, 270, 3, 7}, {0, 5, 2, 3}};
  for (const auto& sh : shapes) {
    for (auto kl : {std::pair<int, int>{1, 1}, {5, 3}, {16, 9}}) {
      CAPTURE(sh.out);
      CAPTURE(sh.in);
      CAPTURE(sh.r);
      CAPTURE(kl.first);
      const std::uint64_t seed = 1000 + std::uint64_t(sh.out * 7 + sh.in);
      const VecD a = random_vec(kl.first, seed + 1), b = random_vec(kl.second, seed + 2);
      const auto u = dw::nola(sh.out, sh.in, sh.r, seed, a, b, dw::alpha(4.0));
      CHECK(u.scale() == doctest::Approx(4.0 / double(sh.r)));
      const MatD ref = nola_reference(sh.out, sh.in, sh.r, seed, a, b, 4.0 / double(sh.r));
      check_against(u, ref, sh.tokens, 1e-12, seed);
      check_merge_roundtrip(u, ref, 1e-12);
      CHECK(dw::parameter_count(u) == kl.first + kl.second);
      CHECK(dw::flop_count(u, sh.tokens) ==
            2 * sh.tokens * sh.r * (sh.in + sh.out) + 2 * sh.r * (kl.first * sh.in + kl.second * sh.out) + sh.r * sh.in);
      // float coefficients: same bases, float arithmetic.
      const VecF af = a.cast<float>(), bf = b.cast<float>();
      const auto uf = dw::nola(sh.out, sh.in, sh.r, seed, af, bf, dw::alpha(4.0));
      check_against(uf, nola_reference(sh.out, sh.in, sh.r, seed, af.cast<double>(), bf.cast<double>(), 4.0 / sh.r),
                    sh.tokens, 2e-5, seed);
    }
  }
}

TEST_CASE("NOLA options: no frozen A0, explicit bounds") {
  const VecD a = random_vec(4, 1), b = random_vec(3, 2);
  dw::nola_options opt;
  opt.frozen_a0 = false;
  opt.a_basis_bound = 0.5;
  opt.b_basis_bound = 2.0;
  const auto u = dw::nola(9, 11, 3, 5, a, b, dw::scale(1.5), opt);
  MatD A = MatD::Zero(3, 11), B = MatD::Zero(9, 3);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 11; ++j)
      for (int q = 0; q < 4; ++q) A(i, j) += a(q) * uni(5, (std::uint64_t(1) << 32) + q, std::uint64_t(i * 11 + j), 0.5);
  for (int o = 0; o < 9; ++o)
    for (int i = 0; i < 3; ++i)
      for (int q = 0; q < 3; ++q) B(o, i) += b(q) * uni(5, (std::uint64_t(2) << 32) + q, std::uint64_t(o * 3 + i), 2.0);
  check_against(u, MatD(1.5 * B * A), 4, 1e-12, 9);
  CHECK(dw::flop_count(u, 4) == 2 * 4 * 3 * 20 + 2 * 3 * (4 * 11 + 3 * 9));
}

// ── VeRA ──────────────────────────────────────────────────────────────────────────────

TEST_CASE("VeRA matches diag(λb)·B·diag(λd)·A on the top-left slices of the shared bases") {
  const auto basis = dw::vera_shared_basis(31337, 5, 310, 280);
  const shape shapes[] = {{1, 1, 5, 1}, {7, 5, 5, 3}, {13, 17, 5, 0}, {310, 280, 5, 6}, {300, 270, 5, 4}, {0, 9, 5, 2}};
  for (const auto& sh : shapes) {
    CAPTURE(sh.out);
    CAPTURE(sh.in);
    const VecD ld = random_vec(5, 11 + std::uint64_t(sh.out)), lb = random_vec(sh.out, 12 + std::uint64_t(sh.in));
    const auto u = dw::vera(basis, sh.out, sh.in, ld, lb);
    const MatD ref = vera_reference(basis, sh.out, sh.in, ld, lb);
    check_against(u, ref, sh.tokens, 1e-12, 5);
    check_merge_roundtrip(u, ref, 1e-12);
    CHECK(dw::parameter_count(u) == 5 + sh.out);
    const VecF ldf = ld.cast<float>(), lbf = lb.cast<float>();
    check_against(dw::vera(basis, sh.out, sh.in, ldf, lbf),
                  vera_reference(basis, sh.out, sh.in, ldf.cast<double>(), lbf.cast<double>()), sh.tokens, 2e-5, 6);
  }
}

TEST_CASE("VeRA at PEFT's init (λd = 0.1, λb = 0) is the zero update") {
  const auto basis = dw::vera_shared_basis(1, 4, 16, 16);
  const VecD ld = VecD::Constant(4, 0.1), lb = VecD::Zero(12);
  const auto u = dw::vera(basis, 12, 10, ld, lb);
  CHECK(dw::materialize(u).cwiseAbs().maxCoeff() == 0.0);
}

// ── RandLoRA ──────────────────────────────────────────────────────────────────────────

TEST_CASE("RandLoRA matches PEFT's U·V construction (pairing k·N + b / b·r + k), out > in and out < in") {
  struct rl_shape {
    Eigen::Index out, in, r, tokens, out_max, in_max;
  };
  const rl_shape shapes[] = {
      {1, 1, 1, 1, 1, 1},       {7, 5, 2, 3, 7, 5},        {5, 7, 2, 3, 7, 7},      {13, 17, 4, 0, 20, 20},
      {17, 13, 4, 5, 20, 20},   {9, 9, 3, 4, 9, 9},        {40, 11, 32, 3, 40, 40}, {301, 290, 4, 6, 301, 290},
      {290, 301, 3, 5, 301, 301}, {0, 6, 2, 3, 6, 6}, {6, 0, 2, 3, 6, 6}};
  for (auto kind : {dw::randlora_kind::dense, dw::randlora_kind::sparse, dw::randlora_kind::very_sparse}) {
    for (const auto& sh : shapes) {
      CAPTURE(int(kind));
      CAPTURE(sh.out);
      CAPTURE(sh.in);
      CAPTURE(sh.r);
      const auto basis = dw::randlora_shared_basis(2024, sh.r, sh.out_max, sh.in_max, kind);
      const Eigen::Index n = std::min(sh.out, sh.in), N = (n + sh.r - 1) / sh.r;
      const MatD lambda = dwt::random<MatD>(sh.r, N, 3), gamma = dwt::random<MatD>(N, n, 4);
      const auto u = dw::randlora(basis, sh.out, sh.in, lambda, gamma, dw::alpha(640.0));
      CHECK(u.num_bases() == N);
      CHECK(u.transposed() == (sh.out < sh.in));
      const MatD ref = randlora_reference(basis, sh.out, sh.in, lambda, gamma, 640.0 / double(sh.r));
      check_against(u, ref, sh.tokens, 1e-12, 8);
      check_merge_roundtrip(u, ref, 1e-12);
      CHECK(dw::parameter_count(u) == N * sh.r + N * n);
      const MatF lf = lambda.cast<float>(), gf = gamma.cast<float>();
      check_against(dw::randlora(basis, sh.out, sh.in, lf, gf, dw::alpha(640.0)),
                    randlora_reference(basis, sh.out, sh.in, lf.cast<double>(), gf.cast<double>(), 640.0 / sh.r),
                    sh.tokens, 2e-5, 9);
    }
  }
}

TEST_CASE("RandLoRA with one basis (N = 1) is the paper's B·Λ·A·Γ") {
  // r ≥ min_dim gives N = 1, where PEFT's pairing and the paper's formula coincide.
  const auto basis = dw::randlora_shared_basis(7, 8, 12, 6);
  const MatD lambda = dwt::random<MatD>(8, 1, 1), gamma = dwt::random<MatD>(1, 6, 2);
  const auto u = dw::randlora(basis, 12, 6, lambda, gamma, dw::scale(0.5));
  MatD A(8, 6), B(12, 8);
  for (int k = 0; k < 8; ++k)
    for (int j = 0; j < 6; ++j) A(k, j) = randlora_entry(basis, 0, std::uint64_t(k * 6 + j));
  for (int i = 0; i < 12; ++i)
    for (int k = 0; k < 8; ++k) B(i, k) = randlora_entry(basis, 1, std::uint64_t(i * 8 + k));
  const MatD ref = 0.5 * B * lambda.col(0).asDiagonal() * A * gamma.row(0).transpose().asDiagonal();
  CHECK(dwt::rel_err(dw::materialize(u), ref) < 1e-12);
}

TEST_CASE("RandLoRA bases have unit standard deviation and the documented sparsity") {
  for (auto kind : {dw::randlora_kind::dense, dw::randlora_kind::sparse, dw::randlora_kind::very_sparse}) {
    const auto basis = dw::randlora_shared_basis(5, 32, 4096, 1024, kind);
    const auto e = basis.B();
    const int n = 400000;
    double m = 0, v = 0;
    int zeros = 0;
    for (int i = 0; i < n; ++i) {
      const double x = e(std::uint64_t(i));
      m += x;
      v += x * x;
      zeros += x == 0.0;
    }
    m /= n;
    v = v / n - m * m;
    CAPTURE(int(kind));
    CHECK(std::abs(m) < 0.02);
    CHECK(std::abs(v - 1.0) < 0.03);
    const double p = kind == dw::randlora_kind::sparse ? 1.0 / 6 : 1.0 / (2 * std::sqrt(1024.0));
    if (kind != dw::randlora_kind::dense) CHECK(std::abs(double(zeros) / n - (1 - 2 * p)) < 0.005);
  }
}

// ── all three ─────────────────────────────────────────────────────────────────────────

TEST_CASE("random-basis updates compose in the lazy sum with LoRA") {
  const Eigen::Index out = 23, in = 19, r = 3;
  const MatD W = dwt::random<MatD>(out, in, 1);
  const VecD a = random_vec(4, 2), b = random_vec(5, 3);
  const auto nu = dw::nola(out, in, r, 9, a, b, dw::alpha(2.0));
  const auto vb = dw::vera_shared_basis(10, 4, 30, 30);
  const VecD ld = random_vec(4, 4), lb = random_vec(out, 5);
  const auto vu = dw::vera(vb, out, in, ld, lb);
  const auto rb = dw::randlora_shared_basis(11, 4, out, in);
  const MatD lam = dwt::random<MatD>(4, 5, 6), gam = dwt::random<MatD>(5, 19, 7);
  const auto ru = dw::randlora(rb, out, in, lam, gam, dw::alpha(8.0));
  const MatD LB = dwt::random<MatD>(out, 2, 8), LA = dwt::random<MatD>(2, in, 9);
  const auto e = dw::view(W) + nu + vu + ru + dw::lora(LB, LA, dw::alpha(2.0));
  const MatD ref = W + nola_reference(out, in, r, 9, a, b, 2.0 / r) + vera_reference(vb, out, in, ld, lb) +
                   randlora_reference(rb, out, in, lam, gam, 2.0) + LB * LA;
  CHECK(dwt::rel_err(dw::materialize(e), ref) < 1e-12);
  const MatD X = dwt::random<MatD>(6, in, 10), G = dwt::random<MatD>(6, out, 11);
  CHECK(dwt::rel_err(dw::apply(e, X), MatD(X * ref.transpose())) < 1e-12);
  CHECK(dwt::rel_err(dw::apply_transposed(e, G), MatD(G * ref)) < 1e-12);
  CHECK(dw::parameter_count(e) == (4 + 5) + (4 + out) + (5 * 4 + 5 * 19) + 2 * (out + in));
}

TEST_CASE("bases are bit-identical across two calls and two threads; tokens = 0") {
  const VecF a = random_vec(6, 1).cast<float>(), b = random_vec(4, 2).cast<float>();
  const auto nu = dw::nola(70, 50, 4, 3, a, b, dw::alpha(4.0));
  const auto vb = dw::vera_shared_basis(4, 8, 80, 80);
  const VecF ld = random_vec(8, 5).cast<float>(), lb = random_vec(70, 6).cast<float>();
  const auto vu = dw::vera(vb, 70, 50, ld, lb);
  const auto rb = dw::randlora_shared_basis(7, 4, 70, 50, dw::randlora_kind::sparse);
  const MatF lam = dwt::random<MatF>(4, 13, 8), gam = dwt::random<MatF>(13, 50, 9);
  const auto ru = dw::randlora(rb, 70, 50, lam, gam, dw::alpha(640.0));
  check_deterministic(nu);
  check_deterministic(vu);
  check_deterministic(ru);
  check_zero_tokens(nu);
  check_zero_tokens(vu);
  check_zero_tokens(ru);
  // The same seed and laws built again give the same update; another seed does not.
  const auto nu2 = dw::nola(70, 50, 4, 3, a, b, dw::alpha(4.0));
  const auto nu3 = dw::nola(70, 50, 4, 4, a, b, dw::alpha(4.0));
  CHECK(dw::materialize(nu) == dw::materialize(nu2));
  CHECK(dw::materialize(nu) != dw::materialize(nu3));
}

TEST_CASE("bad inputs give specific errors") {
  const VecD a = random_vec(3, 1), b = random_vec(2, 2), empty(0);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::nola(5, 4, 0, 1, a, b, dw::alpha(1.0)); },
                                         {"deltaw::nola", "rank r must be at least 1", "0"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::nola(5, 4, 2, 1, empty, b, dw::alpha(1.0)); },
                                             {"deltaw::nola", "k = 0"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::nola(-1, 4, 2, 1, a, b, dw::alpha(1.0)); },
                                          {"deltaw::nola", "[-1, 4]"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::nola(5, 4, 2, 1, a, b, dw::alpha(NAN)); },
                                               {"deltaw::nola", "alpha"});
  dw::nola_options bad;
  bad.a0_bound = -1;
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::nola(5, 4, 2, 1, a, b, dw::alpha(1.0), bad); },
                                             {"deltaw::nola", "bounds"});

  const auto vb = dw::vera_shared_basis(1, 4, 10, 8);
  const VecD ld = random_vec(4, 3), lb = random_vec(10, 4);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::vera(vb, 10, 9, ld, lb); },
                                          {"deltaw::vera", "[10, 9]", "[10, 8]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::vera(vb, 10, 8, VecD(random_vec(3, 5)), lb); },
                                          {"deltaw::vera", "lambda_d has 3", "r = 4"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::vera(vb, 9, 8, ld, lb); },
                                          {"deltaw::vera", "lambda_b has 10", "out = 9"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::vera_shared_basis(1, 0, 10, 8); },
                                         {"deltaw::vera_shared_basis", "rank"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::vera_shared_basis(1, 2, 0, 8); },
                                          {"deltaw::vera_shared_basis", "[0, 8]"});

  const auto rb = dw::randlora_shared_basis(1, 4, 12, 10);
  const MatD lam = dwt::random<MatD>(4, 3, 1), gam = dwt::random<MatD>(3, 10, 2);
  dwt::check_throws_with<dw::shape_error>(
      [&] { (void)dw::randlora(rb, 12, 10, MatD(dwt::random<MatD>(3, 4, 1)), gam, dw::alpha(1.0)); },
      {"deltaw::randlora", "lambda is [3, 4]", "[r, N] = [4, 3]"});
  dwt::check_throws_with<dw::shape_error>(
      [&] { (void)dw::randlora(rb, 12, 10, lam, MatD(dwt::random<MatD>(3, 9, 2)), dw::alpha(1.0)); },
      {"deltaw::randlora", "gamma is [3, 9]", "[N, min_dim] = [3, 10]"});
  dwt::check_throws_with<dw::shape_error>(
      [&] { (void)dw::randlora(rb, 13, 10, lam, gam, dw::alpha(1.0)); },
      {"deltaw::randlora", "[13, 10]", "max_dim 12"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::randlora_shared_basis(1, 0, 12, 10); },
                                         {"deltaw::randlora_shared_basis", "rank"});

  // Operand shapes at apply time are checked by the generic ops.
  const auto u = dw::randlora(rb, 12, 10, lam, gam, dw::alpha(1.0));
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::apply(u, MatD(2, 9)); }, {"deltaw::apply", "[2, 9]"});
  MatD W(12, 9);
  dwt::check_throws_with<dw::shape_error>([&] { dw::merge(W, u); }, {"deltaw::merge", "[12, 9]", "[12, 10]"});
  // A sum needs equal shapes.
  const MatD W2(11, 10);
  dwt::check_throws_with<dw::shape_error>([&] { (void)(dw::view(W2) + u); }, {"W + ΔW", "[11, 10]", "[12, 10]"});
}
