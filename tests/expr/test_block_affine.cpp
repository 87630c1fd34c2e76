// Block-affine updates (Bone bat, MiSS) against ΔW built entry by entry in double from
// their definitions:
//   bat:  ΔW[i·r + k, j·r + l] = Σ_m W[i·r + k, j·r + m]·b_i[m, l] + b_i[k, l]
//   MiSS: ΔW[o, j·r + k] = D[k, o mod m]   (columns j·r + k < in; m = out or mini_r)
#include <functional>
#include <limits>
#include <vector>

#include "alloc_counter.hpp"
#include "test_util.hpp"


namespace {
namespace dw = deltaw;
using dwt::MatD;

MatD reference_bat_delta(const MatD& W, const MatD& b) {
  const auto out = W.rows(), in = W.cols(), r = b.cols();
  MatD D(out, in);
  for (Eigen::Index i = 0; i < out / r; ++i)
    for (Eigen::Index k = 0; k < r; ++k)
      for (Eigen::Index j = 0; j < in / r; ++j)
        for (Eigen::Index l = 0; l < r; ++l) {
          double v = b(i * r + k, l);
          for (Eigen::Index m = 0; m < r; ++m) v += W(i * r + k, j * r + m) * b(i * r + m, l);
          D(i * r + k, j * r + l) = v;
        }
  return D;
}

MatD reference_miss_delta(const MatD& D, Eigen::Index out, Eigen::Index in) {
  const auto r = D.rows(), m = D.cols();
  MatD dW(out, in);
  for (Eigen::Index o = 0; o < out; ++o)
    for (Eigen::Index col = 0; col < in; ++col) dW(o, col) = D(col % r, o % m);
  return dW;
}

double ba_inner(const MatD& a, const MatD& b) { return a.cwiseProduct(b).sum(); }

template <class T>
double ba_tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-12;
}

/// apply, apply_transposed (and the transpose identity), materialize and frobenius_norm
/// of u (alone) and of view(W) + u, against ΔW = Dref.
template <class T, class U>
void check_apply(const U& u, const dwt::RowMat<T>& W, const MatD& Dref, Eigen::Index tokens, std::uint64_t seed) {
  using M = dwt::RowMat<T>;
  const auto out = Dref.rows(), in = Dref.cols();
  const double tol = ba_tolerance<T>() * std::max<double>(1, in + out);
  CHECK(dwt::rel_err(dw::materialize(u), Dref) <= ba_tolerance<T>());
  CHECK(dw::frobenius_norm(u) == doctest::Approx(Dref.norm()).epsilon(std::is_same_v<T, float> ? 1e-5 : 1e-12));

  const M X = dwt::random<M>(tokens, in, seed), G = dwt::random<M>(tokens, out, seed + 1);
  const MatD Xd = X.template cast<double>(), Gd = G.template cast<double>();
  const MatD Y = dw::apply(u, X).template cast<double>();
  const MatD O = dw::apply_transposed(u, G).template cast<double>();
  CHECK(dwt::rel_err(Y, Xd * Dref.transpose()) <= tol);
  CHECK(dwt::rel_err(O, Gd * Dref) <= tol);
  CHECK(ba_inner(Y, Gd) == doctest::Approx(ba_inner(Xd, O)).epsilon(std::is_same_v<T, float> ? 1e-4 : 1e-10).scale(1.0));

  const auto e = dw::view(W) + u;
  const MatD Wp = W.template cast<double>() + Dref;
  const MatD Ye = dw::apply(e, X).template cast<double>();
  const MatD Oe = dw::apply_transposed(e, G).template cast<double>();
  CHECK(dwt::rel_err(Ye, Xd * Wp.transpose()) <= tol);
  CHECK(dwt::rel_err(Oe, Gd * Wp) <= tol);
  CHECK(ba_inner(Ye, Gd) == doctest::Approx(ba_inner(Xd, Oe)).epsilon(std::is_same_v<T, float> ? 1e-4 : 1e-10).scale(1.0));
  CHECK(dwt::rel_err(dw::materialize(e), Wp) <= ba_tolerance<T>());

  // Column-major activations and output.
  const dwt::ColMat<T> Xc = X;
  dwt::ColMat<T> Yc(tokens, out);
  dw::apply(e, Xc, Yc);
  CHECK(dwt::rel_err(Yc, Ye) <= tol);
  dwt::ColMat<T> Oc(tokens, in);
  dw::apply_transposed(e, dwt::ColMat<T>(G), Oc);
  CHECK(dwt::rel_err(Oc, Oe) <= tol);
}

}  // namespace

TEST_CASE_TEMPLATE("Bone bat matches its definition over random shapes", T, float, double) {
  using M = dwt::RowMat<T>;
  struct shape {
    Eigen::Index out, in, r;
  };
  const std::vector<shape> shapes = {{8, 12, 4}, {6, 6, 3}, {12, 20, 2}, {5, 7, 1}, {9, 9, 9}, {6, 15, 3}, {0, 8, 4}};
  std::uint64_t seed = 300;
  for (const auto& sh : shapes) {
    // Tokens on both sides of r: blockwise (≤ r) and W' formed (> r).
    for (Eigen::Index tokens : {Eigen::Index(0), Eigen::Index(1), sh.r, sh.r + 1, 3 * sh.r + 2}) {
      CAPTURE(sh.out);
      CAPTURE(sh.in);
      CAPTURE(sh.r);
      CAPTURE(tokens);
      const M W = dwt::random<M>(sh.out, sh.in, seed);
      const M b = (dwt::random<M>(sh.out, sh.r, seed + 1) * T(0.3)).eval();
      const auto u = dw::bone_bat(W, b);
      CHECK(u.forms_merged_weight(tokens) == (tokens > sh.r));
      CHECK(dw::parameter_count(u) == sh.out * sh.r);  // out/r blocks of r × r
      const MatD Dref = reference_bat_delta(W.template cast<double>(), b.template cast<double>());
      check_apply<T>(u, W, Dref, tokens, seed + 2);
      seed += 5;
    }
  }
}

TEST_CASE_TEMPLATE("Bone bat merge and unmerge round trip", T, float, double) {
  using M = dwt::RowMat<T>;
  const Eigen::Index out = 24, in = 36, r = 6;
  M W = dwt::random<M>(out, in, 1);
  const M W0 = W;
  const M b = (dwt::random<M>(out, r, 2) * T(0.2)).eval();
  const auto u = dw::bone_bat(W, b);
  const MatD Wp = W0.template cast<double>() + reference_bat_delta(W0.template cast<double>(), b.template cast<double>());
  dw::merge(W, u);
  CHECK(dwt::rel_err(W, Wp) <= ba_tolerance<T>() * 10);
  dw::unmerge(W, u);
  // ‖b_i‖ ≤ 0.2·r·… keeps I + b_i well conditioned; the bound is a few ulps times cond.
  const double bound = std::is_same_v<T, float> ? 1e-5 : 1e-13;
  CHECK(dwt::rel_err(W, W0) <= bound);
  dw::merge_checked(W, u);
  CHECK(dwt::rel_err(W, Wp) <= ba_tolerance<T>() * 10);
}

TEST_CASE("Bone bat round trip on a bf16 weight, panel boundaries not aligned to r") {
  using M = dwt::RowMat<float>;
  const Eigen::Index out = 7 * 40, in = 21, r = 7;  // 280 rows: panels of 256 rows cut block 36
  const M Wf = dwt::random<M>(out, in, 3);
  Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> W = Wf.cast<Eigen::bfloat16>();
  const M W0 = W.cast<float>();
  const M b = (dwt::random<M>(out, r, 4) * 0.2f).eval();
  const auto u = dw::bone_bat(W, b);
  const MatD Wp = W0.cast<double>() + reference_bat_delta(W0.cast<double>(), b.cast<double>());
  dw::merge(W, u);
  CHECK(dwt::rel_err(W.cast<float>(), Wp) <= 2e-2);  // bf16 keeps 8 significant bits
  dw::unmerge(W, u);
  CHECK(dwt::rel_err(W.cast<float>(), W0) <= 4e-2);
}

TEST_CASE("Bone bat errors: blocks that do not divide, b's shape, singular I + b_i, foreign weight") {
  const MatD W = dwt::random(8, 10, 1), b = dwt::random(8, 4, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::bone_bat(W, b); },
                                          {"deltaw::bone_bat", "[8, 10]", "4 × 4", "in % r == 0", "10 % 4 = 2"});
  const MatD W2 = dwt::random(10, 8, 1), b2 = dwt::random(10, 4, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::bone_bat(W2, b2); },
                                          {"deltaw::bone_bat", "[10, 8]", "out % r == 0", "10 % 4 = 2"});
  const MatD W3 = dwt::random(8, 8, 1), b3 = dwt::random(4, 4, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::bone_bat(W3, b3); }, {"[8, 4]", "got b [4, 4]"});
  const MatD b0(8, 0);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::bone_bat(W3, b0); }, {"bone_bat", "at least 1"});

  // I + b_1 = 0: W cannot be recovered; unmerge says so and leaves W as it was.
  MatD Wm = dwt::random(8, 8, 3);
  MatD bs = dwt::random(8, 4, 4) * 0.1;
  bs.middleRows(4, 4) = -MatD::Identity(4, 4);
  const auto u = dw::bone_bat(Wm, bs);
  dw::merge(Wm, u);
  const MatD merged = Wm;
  dwt::check_throws_with<dw::argument_error>([&] { dw::unmerge(Wm, u); }, {"unmerge", "singular", "block i = 1"});
  CHECK(Wm == merged);

  MatD other = dwt::random(8, 8, 5);
  dwt::check_throws_with<dw::argument_error>([&] { dw::merge(other, u); }, {"merges only into the weight"});

  // merge_checked refuses a non-finite result and leaves W unchanged.
  MatD Wn = dwt::random(8, 8, 6);
  MatD bn = dwt::random(8, 4, 7);
  bn(2, 3) = std::numeric_limits<double>::infinity();
  const MatD Wn0 = Wn;
  dwt::check_throws_with<dw::non_finite_error>([&] { dw::merge_checked(Wn, dw::bone_bat(Wn, bn)); },
                                               {"merge_checked", "non-finite"});
  CHECK(Wn == Wn0);
}

TEST_CASE("a lazy sum holds at most one update over its own weight (DoRA, Bone bat)") {
  const MatD W = dwt::random(8, 8, 1), B = dwt::random(8, 2, 2), A = dwt::random(2, 8, 3);
  const MatD b = dwt::random(8, 4, 4) * 0.1;
  const auto l = dw::lora(B, A, dw::alpha(2));
  const auto dora = dw::dora(W, l, dw::dora_magnitude(W, l));
  const auto e = dw::view(W) + dora + dw::bone_bat(W, b);
  const MatD X = dwt::random(3, 8, 5);
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::apply(e, X); }, {"at most one", "Bone bat"});
}

TEST_CASE_TEMPLATE("Bone bat over another weight than the sum's base adds its own ΔW", T, float, double) {
  using M = dwt::RowMat<T>;
  const M W = dwt::random<M>(12, 8, 1), Wother = dwt::random<M>(12, 8, 2);
  const M b = (dwt::random<M>(12, 4, 3) * T(0.3)).eval();
  const auto u = dw::bone_bat(W, b);
  const MatD Dref = reference_bat_delta(W.template cast<double>(), b.template cast<double>());
  for (Eigen::Index tokens : {2, 9}) {
    const M X = dwt::random<M>(tokens, 8, 4);
    const MatD ref = X.template cast<double>() * (Wother.template cast<double>() + Dref).transpose();
    CHECK(dwt::rel_err(dw::apply(dw::view(Wother) + u, X), ref) <= ba_tolerance<T>() * 20);
  }
}

TEST_CASE_TEMPLATE("lazy sum W + LoRA + Bone bat and W + LoRA + MiSS", T, float, double) {
  using M = dwt::RowMat<T>;
  const Eigen::Index out = 12, in = 18, r = 3, lr = 2;
  const M W = dwt::random<M>(out, in, 1);
  const M B = dwt::random<M>(out, lr, 2), A = dwt::random<M>(lr, in, 3);
  const M b = (dwt::random<M>(out, r, 4) * T(0.3)).eval();
  const M D = dwt::random<M>(4, out, 5);  // MiSS with r = 4: 18 % 4 = 2, a partial block
  const MatD Wd = W.template cast<double>(), Ld = 1.0 * B.template cast<double>() * A.template cast<double>();
  const MatD bat_ref = Wd + Ld + reference_bat_delta(Wd, b.template cast<double>());
  const MatD miss_ref = Wd + Ld + reference_miss_delta(D.template cast<double>(), out, in);
  const auto e_bat = dw::view(W) + dw::lora(B, A, dw::alpha(2)) + dw::bone_bat(W, b);
  const auto e_miss = dw::view(W) + dw::lora(B, A, dw::alpha(2)) + dw::miss(D, in);
  const double tol = ba_tolerance<T>() * 40;
  for (Eigen::Index tokens : {0, 2, 7}) {
    const M X = dwt::random<M>(tokens, in, 6), G = dwt::random<M>(tokens, out, 7);
    CHECK(dwt::rel_err(dw::apply(e_bat, X), X.template cast<double>() * bat_ref.transpose()) <= tol);
    CHECK(dwt::rel_err(dw::apply_transposed(e_bat, G), G.template cast<double>() * bat_ref) <= tol);
    CHECK(dwt::rel_err(dw::apply(e_miss, X), X.template cast<double>() * miss_ref.transpose()) <= tol);
    CHECK(dwt::rel_err(dw::apply_transposed(e_miss, G), G.template cast<double>() * miss_ref) <= tol);
  }
  CHECK(dwt::rel_err(dw::materialize(e_bat), bat_ref) <= tol);
  CHECK(dwt::rel_err(dw::materialize(e_miss), miss_ref) <= tol);
  CHECK(dw::parameter_count(e_bat) == lr * (out + in) + out * r);
  CHECK(dw::parameter_count(e_miss) == lr * (out + in) + 4 * out);
}

TEST_CASE_TEMPLATE("MiSS matches its definition, including in % r != 0 and mini", T, float, double) {
  using M = dwt::RowMat<T>;
  struct shape {
    Eigen::Index out, in, r, mini;  // mini = 0: default D [r, out]
  };
  const std::vector<shape> shapes = {{8, 12, 4, 0}, {6, 14, 4, 0}, {5, 3, 4, 0},  {7, 9, 1, 0}, {12, 10, 3, 4},
                                     {12, 7, 5, 6}, {9, 9, 2, 1},  {0, 5, 2, 0},  {4, 0, 2, 0}, {10, 17, 6, 10}};
  std::uint64_t seed = 500;
  for (const auto& sh : shapes) {
    const Eigen::Index m = sh.mini ? sh.mini : sh.out;
    const M D = dwt::random<M>(sh.r, m, seed);
    const M W = dwt::random<M>(sh.out, sh.in, seed + 1);
    const MatD Dref = reference_miss_delta(D.template cast<double>(), sh.out, sh.in);
    for (Eigen::Index tokens : {0, 1, 6}) {
      CAPTURE(sh.out);
      CAPTURE(sh.in);
      CAPTURE(sh.r);
      CAPTURE(sh.mini);
      CAPTURE(tokens);
      if (sh.mini) {
        const auto u = dw::miss_mini(D, sh.out, sh.in);
        CHECK(dw::parameter_count(u) == sh.r * sh.mini);
        check_apply<T>(u, W, Dref, tokens, seed + 2);
      } else {
        const auto u = dw::miss(D, sh.in);
        CHECK(dw::parameter_count(u) == sh.r * sh.out);  // MiSS: r·out
        check_apply<T>(u, W, Dref, tokens, seed + 2);
      }
    }
    // merge / unmerge round trip (exact up to rounding: unmerge subtracts what merge added).
    M Wm = W;
    if (sh.mini) {
      dw::merge(Wm, dw::miss_mini(D, sh.out, sh.in));
      CHECK(dwt::rel_err(Wm, W.template cast<double>() + Dref) <= ba_tolerance<T>());
      dw::unmerge(Wm, dw::miss_mini(D, sh.out, sh.in));
    } else {
      dw::merge(Wm, dw::miss(D, sh.in));
      CHECK(dwt::rel_err(Wm, W.template cast<double>() + Dref) <= ba_tolerance<T>());
      dw::unmerge(Wm, dw::miss(D, sh.in));
    }
    CHECK(dwt::rel_err(Wm, W) <= 2 * ba_tolerance<T>());
    seed += 3;
  }
}

TEST_CASE("MiSS errors and counts") {
  const MatD D = dwt::random(4, 12, 1);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::miss_mini(D, 30, 8); },
                                          {"deltaw::miss", "[4, 12]", "out % mini_r", "30"});
  const MatD D0(0, 12);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::miss(D0, 8); }, {"deltaw::miss", "at least 1"});
  const auto u = dw::miss(D, 10);
  CHECK(u.rows() == 12);
  CHECK(u.cols() == 10);
  CHECK(dw::flop_count(u, 5) == 5 * 10 + 2 * 5 * 4 * 12);
  const MatD W = dwt::random(12, 11, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)(dw::view(W) + u); }, {"[12, 11]", "[12, 10]"});
}

TEST_CASE("block-affine operations never allocate an out x in matrix (except materialize)") {
  if (!dwt::allocation_counting_available()) return;
  using M = dwt::RowMat<float>;
  // out > 1024 so that the W' panels of bat's apply (1024 rows) are smaller than W.
  const Eigen::Index out = 2048, in = 256, r = 16;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  M W = dwt::random<M>(out, in, 1);
  const M b = (dwt::random<M>(out, r, 2) * 0.1f).eval(), D = dwt::random<M>(r, out, 3);
  const auto bat = dw::bone_bat(W, b);
  const auto ms = dw::miss(D, in);
  for (Eigen::Index tokens : {Eigen::Index(8), Eigen::Index(64)}) {
    const M X = dwt::random<M>(tokens, in, 4), G = dwt::random<M>(tokens, out, 5);
    M Y(tokens, out), O(tokens, in);
    CAPTURE(tokens);
    CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(std::as_const(W)) + bat, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(dw::view(std::as_const(W)) + bat, G, O); }) <
          dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(std::as_const(W)) + ms, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(dw::view(std::as_const(W)) + ms, G, O); }) <
          dense_bytes);
  }
  CHECK(dwt::largest_allocation([&] { dw::merge(W, bat); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, bat); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(bat); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::merge(W, ms); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(ms); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(bat); }) >= dense_bytes);  // the control
}
