// The core low-rank form s·B·R·A (LoRA-XS, LoRA-SB, LaMDA) and Block-LoRA against their
// dense definitions in double, over random shapes (odd sizes, r = 1, r = min(out, in),
// rectangular cores, empty dimensions) and every evaluation order; merge/unmerge; the
// transpose identity; parameter and flop counts; composition in the lazy sum; errors.
#include <cmath>
#include <limits>

#include "test_util.hpp"

namespace dw = deltaw;
using dwt::MatD;
using dwt::MatF;
using dwt::RowMat;

namespace {

template <class T>
double core_tol() {
  return std::is_same_v<T, double> ? 1e-11 : 2e-5;
}

// Checks apply, apply_transposed, the transpose identity, materialize, merge/unmerge,
// merge_checked and the Frobenius norm of u against `ref` (ΔW in double).
template <class T, class U>
void check_against_dense(const U& u, const MatD& ref, Eigen::Index tokens, std::uint64_t seed) {
  const Eigen::Index out = ref.rows(), in = ref.cols();
  const RowMat<T> W = dwt::random<RowMat<T>>(out, in, seed);
  const RowMat<T> X = dwt::random<RowMat<T>>(tokens, in, seed + 1);
  const RowMat<T> G = dwt::random<RowMat<T>>(tokens, out, seed + 2);
  const MatD Wd = W.template cast<double>(), Xd = X.template cast<double>(), Gd = G.template cast<double>();

  CHECK(dwt::rel_err(dw::materialize(u), ref) < core_tol<T>());
  CHECK(dw::frobenius_norm(u) == doctest::Approx(ref.norm()).epsilon(core_tol<T>()));
  CHECK(dwt::rel_err(dw::apply(dw::view(W) + u, X), MatD(Xd * (Wd + ref).transpose())) < core_tol<T>());
  CHECK(dwt::rel_err(dw::apply_transposed(dw::view(W) + u, G), MatD(Gd * (Wd + ref))) < core_tol<T>());
  const MatD YX = dw::apply(u, X).template cast<double>();
  const MatD OG = dw::apply_transposed(u, G).template cast<double>();
  CHECK(dwt::rel_err(YX, MatD(Xd * ref.transpose())) < core_tol<T>());
  const double lhs = YX.cwiseProduct(Gd).sum(), rhs = Xd.cwiseProduct(OG).sum();
  CHECK(std::abs(lhs - rhs) <= core_tol<T>() * (1.0 + std::abs(lhs)) * double(1 + tokens * (in + out)));

  RowMat<T> Wm = W;
  dw::merge(Wm, u);
  CHECK(dwt::rel_err(Wm, MatD(Wd + ref)) < core_tol<T>());
  dw::unmerge(Wm, u);
  CHECK(dwt::rel_err(Wm, W) < core_tol<T>());
  RowMat<T> Wc = W;
  dw::merge_checked(Wc, u);
  CHECK(dwt::rel_err(Wc, MatD(Wd + ref)) < core_tol<T>());
}

struct core_shape {
  Eigen::Index out, in, r1, r2, tokens;
};
const core_shape core_shapes[] = {
    {1, 1, 1, 1, 1}, {7, 5, 1, 1, 3}, {13, 17, 4, 4, 6}, {9, 9, 9, 9, 4} /* r = min(out, in) */,
    {33, 20, 20, 20, 9}, {20, 33, 5, 3, 5}, {31, 17, 2, 7, 11},
    {5, 40, 4, 4, 64} /* fold_B_R is cheapest */, {40, 5, 4, 4, 64} /* fold_R_A is cheapest */, {40, 5, 2, 6, 64},
    {6, 0, 2, 2, 3} /* empty */, {0, 5, 2, 2, 3} /* empty */, {11, 13, 3, 3, 0} /* no tokens */};

}  // namespace

TEST_CASE_TEMPLATE("core low rank s·B·R·A against the dense definition", T, float, double) {
  std::uint64_t seed = 1000;
  bool seen[3] = {false, false, false};
  for (const auto& s : core_shapes) {
    CAPTURE(s.out);
    CAPTURE(s.in);
    CAPTURE(s.r1);
    CAPTURE(s.r2);
    CAPTURE(s.tokens);
    const RowMat<T> B = dwt::random<RowMat<T>>(s.out, s.r1, ++seed);
    const RowMat<T> R = dwt::random<RowMat<T>>(s.r1, s.r2, ++seed);
    const RowMat<T> A = dwt::random<RowMat<T>>(s.r2, s.in, ++seed);
    const double sc = -0.75;
    const auto u = dw::core_lora(B, R, A, dw::scale(sc));
    // ΔW from the definition: ΔW[o, i] = s·Σ_jk B[o, j]·R[j, k]·A[k, i], in double.
    MatD ref = MatD::Zero(s.out, s.in);
    for (Eigen::Index o = 0; o < s.out; ++o)
      for (Eigen::Index i = 0; i < s.in; ++i)
        for (Eigen::Index j = 0; j < s.r1; ++j)
          for (Eigen::Index k = 0; k < s.r2; ++k) ref(o, i) += sc * double(B(o, j)) * double(R(j, k)) * double(A(k, i));
    seen[int(u.cheapest_order(s.tokens))] = true;
    check_against_dense<T>(u, ref, s.tokens, ++seed);
    // flop_count is twice the cheapest order's multiply-adds.
    dw::index_t best = std::numeric_limits<dw::index_t>::max();
    for (auto o : {dw::core_order::right_to_left, dw::core_order::fold_B_R, dw::core_order::fold_R_A})
      best = std::min(best, u.order_cost(o, s.tokens));
    CHECK(dw::flop_count(u, s.tokens) == 2 * best);
    ++seed;
  }
  CHECK(seen[int(dw::core_order::right_to_left)]);
  CHECK(seen[int(dw::core_order::fold_B_R)]);
  CHECK(seen[int(dw::core_order::fold_R_A)]);
}

TEST_CASE("core low rank: the method factories, scales and parameter counts") {
  const Eigen::Index out = 12, in = 10, r = 4;
  const MatF B = dwt::random<MatF>(out, r, 1), R = dwt::random<MatF>(r, r, 2), A = dwt::random<MatF>(r, in, 3);
  const auto xs = dw::lora_xs(B, R, A, dw::alpha(8.0));
  CHECK(xs.scale() == doctest::Approx(2.0));
  CHECK(dw::parameter_count(xs) == r * r);
  CHECK((!xs.trainable().B && xs.trainable().R && !xs.trainable().A));
  CHECK(dw::lora_xs(B, R, A).scale() == 1.0);
  const auto sb = dw::lora_sb(B, R, A);
  CHECK(sb.scale() == 1.0);
  CHECK(dw::parameter_count(sb) == r * r);
  const auto la = dw::lamda(B, R, A, dw::alpha(2.0));
  CHECK(la.scale() == doctest::Approx(0.5));
  CHECK(dw::parameter_count(la) == r * r + out * r);
  CHECK(dw::parameter_count(la.with_trainable({false, true, false})) == r * r);  // B frozen by the schedule
  CHECK(dw::parameter_count(dw::core_lora(B, R, A, dw::scale(1.0), {true, true, true})) == out * r + r * r + r * in);
  CHECK(dw::parameter_count(dw::core_lora(B, R, A, dw::scale(1.0), {false, false, false})) == 0);
  // Rectangular core: LoRA-XS-style R [r1, r2].
  const MatF R2 = dwt::random<MatF>(r, 3, 4), A2 = dwt::random<MatF>(3, in, 5);
  CHECK(dw::parameter_count(dw::lora_xs(B, R2, A2)) == r * 3);
  // r1 = r2 = r, few tokens: LoRA's flops plus 2·tokens·r².
  CHECK(dw::flop_count(xs, 5) == 2 * 5 * r * (in + out) + 2 * 5 * r * r);
  // The three methods evaluate the same s·B·R·A.
  CHECK(dwt::rel_err(dw::materialize(sb), MatD(B.cast<double>() * R.cast<double>() * A.cast<double>())) < 2e-5);
}

TEST_CASE_TEMPLATE("Block-LoRA s·(Σᵢ Bᵢ)·A₀ against the dense definition", T, float, double) {
  struct bshape {
    Eigen::Index out, in, rb, n, tokens;
  };
  const bshape shapes[] = {{1, 1, 1, 1, 1},   {7, 5, 1, 3, 3},   {13, 17, 4, 2, 6}, {9, 9, 9, 1, 4},
                           {33, 20, 4, 5, 9}, {20, 33, 3, 4, 0}, {6, 0, 2, 2, 3},   {0, 5, 2, 3, 3}};
  std::uint64_t seed = 2000;
  for (const auto& s : shapes) {
    CAPTURE(s.out);
    CAPTURE(s.in);
    CAPTURE(s.rb);
    CAPTURE(s.n);
    const RowMat<T> B = dwt::random<RowMat<T>>(s.out, s.n * s.rb, ++seed);
    const RowMat<T> A0 = dwt::random<RowMat<T>>(s.rb, s.in, ++seed);
    const auto u = dw::block_lora(B, A0, dw::alpha(3.0));
    const double sc = 3.0 / double(s.n * s.rb);
    CHECK(u.scale() == doctest::Approx(sc));
    CHECK(u.blocks() == s.n);
    CHECK(u.block_rank() == s.rb);
    // ΔW = s·Σᵢ Bᵢ·A₀ block by block, in double.
    MatD ref = MatD::Zero(s.out, s.in);
    const MatD Bd = B.template cast<double>(), Ad = A0.template cast<double>();
    for (Eigen::Index i = 0; i < s.n; ++i) ref += sc * Bd.middleCols(i * s.rb, s.rb) * Ad;
    check_against_dense<T>(u, ref, s.tokens, ++seed);
    CHECK(dw::parameter_count(u) == s.out * s.n * s.rb + s.rb * s.in);
    CHECK(dw::flop_count(u, s.tokens) == 2 * s.tokens * s.rb * (s.in + s.out) + s.out * s.rb * (s.n - 1));
    ++seed;
  }
}

TEST_CASE("Block-LoRA with one block is LoRA") {
  const MatF B = dwt::random<MatF>(11, 3, 1), A = dwt::random<MatF>(3, 7, 2);
  CHECK(dwt::rel_err(dw::materialize(dw::block_lora(B, A, dw::alpha(6.0))),
                     dw::materialize(dw::lora(B, A, dw::alpha(6.0)))) < 1e-6);
}

TEST_CASE("LoRA-XS, Block-LoRA, LoLDU and LoRA compose in one lazy sum") {
  const Eigen::Index out = 19, in = 14, tokens = 6;
  const MatD W = dwt::random(out, in, 1);
  const MatD B = dwt::random(out, 3, 2), R = dwt::random(3, 3, 3), A = dwt::random(3, in, 4);
  const MatD Bb = dwt::random(out, 6, 5), A0 = dwt::random(2, in, 6);
  const MatD Bl = dwt::random(out, 2, 7), Al = dwt::random(2, in, 8);
  const auto xs = dw::lora_xs(B, R, A, dw::alpha(3.0));
  const auto bl = dw::block_lora(Bb, A0, dw::scale(0.5));
  Eigen::VectorXd z(4);
  const auto ld0 = dw::loldu(W, 4);
  for (int j = 0; j < 4; ++j) z(j) = ld0.z0()[j] + 0.1 * (j + 1);
  const auto ld = ld0.with_z(z);
  const auto lo = dw::lora(Bl, Al, dw::alpha(2.0));
  const auto e = dw::view(W) + xs + bl + ld + lo;
  const MatD Weff = W + B * R * A + 0.5 * (Bb.leftCols(2) + Bb.middleCols(2, 2) + Bb.rightCols(2)) * A0 +
                    dw::materialize(ld) + Bl * Al;
  const MatD X = dwt::random(tokens, in, 9), G = dwt::random(tokens, out, 10);
  CHECK(dwt::rel_err(dw::apply(e, X), MatD(X * Weff.transpose())) < 1e-12);
  CHECK(dwt::rel_err(dw::apply_transposed(e, G), MatD(G * Weff)) < 1e-12);
  CHECK(dwt::rel_err(dw::materialize(e), Weff) < 1e-12);
  CHECK(dw::parameter_count(e) == 9 + (out * 6 + 2 * in) + 4 + 2 * (out + in));
}

TEST_CASE("core low rank and Block-LoRA: bad inputs give specific errors") {
  const MatF B = dwt::random<MatF>(8, 4, 1), R = dwt::random<MatF>(4, 4, 2), A = dwt::random<MatF>(4, 6, 3);
  const MatF R3 = dwt::random<MatF>(3, 4, 4), A5 = dwt::random<MatF>(5, 6, 5);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::lora_xs(B, R3, A); },
                                          {"deltaw::lora_xs", "must chain", "B [8, 4]", "R [3, 4]", "A [4, 6]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::lamda(B, R, A5, dw::alpha(1.0)); },
                                          {"deltaw::lamda", "R [4, 4]", "A [5, 6]"});
  const MatF B0(8, 0), R0(0, 0), A0(0, 6);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::lora_sb(B0, R0, A0); }, {"deltaw::lora_sb", "at least 1"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::lora_xs(B, R, A, dw::alpha(NAN)); }, {"alpha"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::core_lora(B, R, A, dw::scale(INFINITY)); },
                                               {"deltaw::core_lora", "finite"});
  const MatF W = dwt::random<MatF>(7, 6, 6);
  const auto xs = dw::lora_xs(B, R, A);
  dwt::check_throws_with<dw::shape_error>([&] { (void)(dw::view(W) + xs); }, {"[7, 6]", "[8, 6]"});
  MatF Wm = dwt::random<MatF>(8, 6, 7);
  const MatF Wkeep = Wm;
  MatF Rinf = R;
  Rinf(1, 2) = std::numeric_limits<float>::infinity();
  dwt::check_throws_with<dw::non_finite_error>([&] { dw::merge_checked(Wm, dw::lora_xs(B, Rinf, A)); },
                                               {"merge_checked", "unchanged"});
  CHECK((Wm.array() == Wkeep.array()).all());

  const MatF Bb = dwt::random<MatF>(8, 7, 8), Ab = dwt::random<MatF>(3, 6, 9);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::block_lora(Bb, Ab, dw::alpha(1.0)); },
                                          {"deltaw::block_lora", "whole blocks", "B [8, 7]", "A₀ [3, 6]"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::block_lora(B0, A0); }, {"deltaw::block_lora", "at least 1"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::block_lora(B, A, dw::alpha(INFINITY)); }, {"alpha"});
}
