// SPDX-License-Identifier: MIT
// Aliased and overlapping outputs (issue 13, item 3): a writable view that overlaps itself
// is refused at construction; every operation that writes refuses an output that shares
// memory with one of its inputs (X, G, dY, the weight, any factor of any update, another
// output), naming both; views that only sit side by side in one buffer still work.
// Also merge_checked's check in W's own storage type (issue 14, item 6).
#include <array>
#include <cstring>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "test_util.hpp"

namespace dw = deltaw;
using dwt::MatD;
using dwt::MatF;

namespace {

/// The bytes a lattice covers, by brute force.
std::set<std::uintptr_t> bytes_of(std::uintptr_t base, long es, long n0, long s0, long n1, long s1) {
  std::set<std::uintptr_t> b;
  for (long i = 0; i < n0; ++i)
    for (long j = 0; j < n1; ++j)
      for (long k = 0; k < es; ++k) b.insert(base + std::uintptr_t((i * s0 + j * s1) * es + k));
  return b;
}

bool brute_overlap(const std::set<std::uintptr_t>& a, const std::set<std::uintptr_t>& b) {
  for (auto x : a)
    if (b.count(x)) return true;
  return false;
}

template <class F>
void refused(F&& f, std::initializer_list<std::string> names) {
  dwt::check_throws_with<dw::aliasing_error>(std::forward<F>(f), names);
}

}  // namespace

TEST_CASE("aliasing: a writable view that overlaps itself is refused; a read-only one may broadcast") {
  std::vector<float> buf(640 + 64);
  // The case: row stride 10 < 64 columns, row-major.
  dwt::check_throws_with<dw::layout_error>([&] { (void)dw::view(buf.data(), 10, 64, 10, 1); },
                                           {"matrix_view", "[10, 64]", "(10, 1)", "overlaps itself"});
  dwt::check_throws_with<dw::layout_error>([&] { (void)dw::matrix_view<float>(buf.data(), 3, 4, 0, 1); },
                                           {"overlaps itself"});
  dwt::check_throws_with<dw::layout_error>([&] { (void)dw::matrix_view<float>(buf.data(), 4, 3, 2, 3); },
                                           {"overlaps itself"});  // (0, 2) and (3, 0) share element 6
  dwt::check_throws_with<dw::layout_error>([&] { (void)dw::vector_view<float>(buf.data(), 3, 0); },
                                           {"vector_view", "stride 0", "overlaps itself"});
  // Read-only: overlapping rows and stride-0 broadcasting stay legal.
  const float* cp = buf.data();
  CHECK_NOTHROW((void)dw::matrix_view<const float>(cp, 10, 64, 10, 1));
  CHECK_NOTHROW((void)dw::matrix_view<const float>(cp, 5, 64, 0, 1));
  CHECK_NOTHROW((void)dw::vector_view<const float>(cp, 5, 0));
  // Writable and injective: row/column major, padded rows, interleaved strides, one row
  // with any row stride, empty.
  CHECK_NOTHROW((void)dw::view(buf.data(), 10, 64, 64, 1));
  CHECK_NOTHROW((void)dw::view(buf.data(), 10, 64, 1, 10));
  CHECK_NOTHROW((void)dw::view(buf.data(), 8, 60, 64, 1));
  CHECK_NOTHROW((void)dw::matrix_view<float>(buf.data(), 4, 2, 2, 3));
  CHECK_NOTHROW((void)dw::matrix_view<float>(buf.data(), 1, 64, 0, 1));
  CHECK_NOTHROW((void)dw::matrix_view<float>(buf.data(), 0, 64, 0, 0));
  CHECK_NOTHROW((void)dw::vector_view<float>(buf.data(), 1, 0));

  // The constructor's test against brute force over small lattices.
  for (long r = 0; r <= 5; ++r)
    for (long c = 0; c <= 5; ++c)
      for (long rs = 0; rs <= 7; ++rs)
        for (long cs = 0; cs <= 7; ++cs) {
          std::set<long> seen;
          bool dup = false;
          for (long i = 0; i < r; ++i)
            for (long j = 0; j < c; ++j) dup = !seen.insert(i * rs + j * cs).second || dup;
          CAPTURE(r);
          CAPTURE(c);
          CAPTURE(rs);
          CAPTURE(cs);
          CHECK(dw::detail::lattice_self_overlaps(r, c, rs, cs) == dup);
        }
}

TEST_CASE("aliasing: views_overlap is exact for blocks, rows, columns and transposes of one matrix") {
  MatF M = MatF::Zero(12, 16);
  const auto v = dw::view(M);
  // Side by side: two column blocks, two row blocks, even and odd rows.
  CHECK_FALSE(dw::views_overlap(v.middle_cols(0, 7), v.middle_cols(7, 9)));
  CHECK_FALSE(dw::views_overlap(v.middle_rows(0, 5), v.middle_rows(5, 7)));
  CHECK_FALSE(dw::views_overlap(dw::view(M.data(), 6, 16, 32, 1), dw::view(M.data() + 16, 6, 16, 32, 1)));
  CHECK_FALSE(dw::views_overlap(v.block(0, 0, 3, 3), v.block(3, 3, 3, 3)));
  CHECK_FALSE(dw::views_overlap(v.transpose().middle_rows(0, 4), v.middle_cols(4, 4)));
  // Sharing elements.
  CHECK(dw::views_overlap(v.middle_cols(0, 8), v.middle_cols(7, 9)));
  CHECK(dw::views_overlap(v, v.transpose()));
  CHECK(dw::views_overlap(v.block(2, 2, 3, 3), v.block(4, 4, 3, 3)));
  CHECK(dw::views_overlap(v, dw::vector_view<const float>(M.data() + 5, 12, 16)));  // a column as a vector
  CHECK_FALSE(dw::views_overlap(v.middle_cols(0, 5), dw::vector_view<const float>(M.data() + 5, 12, 16)));
  // Different element sizes meeting in one buffer: conservative (the intervals meet).
  CHECK(dw::views_overlap(v.middle_cols(0, 2), dw::matrix_view<const double>(reinterpret_cast<const double*>(M.data() + 8), 1, 1)));
  // Disjoint buffers, empty views.
  MatF N = MatF::Zero(12, 16);
  CHECK_FALSE(dw::views_overlap(v, dw::view(N)));
  CHECK_FALSE(dw::views_overlap(v, v.middle_cols(3, 0)));

  // Against brute force: random lattices in one float buffer, the same or a misaligned
  // byte offset. The only conservative case (three distinct strides) counts as overlap
  // and is skipped here.
  std::mt19937_64 g(7);
  std::uniform_int_distribution<long> cnt(0, 5), str(0, 9), off(0, 40);
  std::vector<float> buf(400);
  const auto base = reinterpret_cast<std::uintptr_t>(buf.data());
  int exact = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    const long n0 = cnt(g), n1 = cnt(g), s0 = str(g), s1 = str(g), m0 = cnt(g), m1 = cnt(g), t0 = str(g), t1 = str(g);
    const long oa = off(g), ob = off(g);
    const auto a = dw::matrix_view<const float>(buf.data() + oa, n0, n1, s0, s1);
    const bool misaligned = trial % 4 == 0;
    const auto* pb = reinterpret_cast<const float*>(reinterpret_cast<const char*>(buf.data() + ob) + (misaligned ? 2 : 0));
    const auto b = dw::matrix_view<const float>(pb, m0, m1, t0, t1);
    std::set<long> strides;
    for (auto [n, s] : {std::pair{n0, s0}, {n1, s1}, {m0, t0}, {m1, t1}})
      if (n > 1 && s > 0) strides.insert(s);
    if (strides.size() > 2) continue;
    ++exact;
    const bool want = brute_overlap(bytes_of(base + std::uintptr_t(oa * 4), 4, n0, s0, n1, s1),
                                    bytes_of(reinterpret_cast<std::uintptr_t>(pb), 4, m0, t0, m1, t1));
    CAPTURE(trial);
    CHECK(dw::views_overlap(a, b) == want);
  }
  CHECK(exact > 10000);
}

TEST_CASE("aliasing: LoRA's apply, apply_transposed, merge, unmerge, merge_checked refuse overlapping outputs") {
  const int n = 6, r = 2, tokens = 4;
  const MatD W0 = dwt::random(n, n, 1), B = dwt::random(n, r, 2), A = dwt::random(r, n, 3);
  MatD W = W0, X = dwt::random(tokens, n, 4);
  const MatD X0 = X;
  const auto u = dw::lora(B, A, dw::alpha(2));
  const auto e = dw::view(W) + u;

  // Y = X (the case), for the update alone, the lazy sum and the bare weight.
  refused([&] { dw::apply(u, X, X); }, {"deltaw::apply", "the output Y", "the input X"});
  refused([&] { dw::apply(e, X, X); }, {"deltaw::apply", "the output Y", "the input X"});
  refused([&] { dw::apply(dw::view(W), X, X); }, {"deltaw::apply", "the output Y", "the input X"});
  refused([&] { dw::apply_transposed(e, X, X); }, {"deltaw::apply_transposed", "the output O", "the input G"});
  // Y over part of X: rows 1… of one buffer against rows …3.
  MatD Z = dwt::random(tokens + 1, n, 6);
  refused([&] { dw::apply(e, dw::view(std::as_const(Z)).middle_rows(0, tokens), dw::view(Z).middle_rows(1, tokens)); },
          {"the output Y", "the input X"});
  CHECK(X == X0);

  // The output over the weight or a factor of the update.
  MatD Wy = W0;
  const auto e2 = dw::view(Wy) + u;
  const MatD Xn = dwt::random(n, n, 7);
  refused([&] { dw::apply(e2, Xn, dw::view(Wy)); }, {"the output Y", "the weight W"});
  MatD big = MatD::Zero(n + tokens, n);
  const auto eb = dw::view(W) + dw::lora(dw::view(big).middle_rows(0, n).middle_cols(0, r), A, dw::alpha(2));
  refused([&] { dw::apply(eb, X, dw::view(big).middle_rows(n - 1, tokens)); }, {"the output Y", "the update's B"});
  CHECK_NOTHROW(dw::apply(eb, X, dw::view(big).middle_rows(n, tokens)));  // right after B's rows: fine
  MatD GA = dwt::random(tokens, n, 5);
  const auto ua = dw::lora(B, dw::view(GA).middle_rows(0, r), dw::alpha(2));
  refused([&] { dw::apply_transposed(ua, X, dw::view(GA)); }, {"the output O", "the update's A"});

  // merge / unmerge / merge_checked into a W that holds B (B a block of W).
  MatD Wm = W0;
  const MatD Wm0 = Wm;
  const auto inW = dw::lora(dw::view(std::as_const(Wm)).middle_cols(0, r), A, dw::alpha(2));
  refused([&] { dw::merge(Wm, inW); }, {"deltaw::merge", "the weight W", "the update's B"});
  refused([&] { dw::unmerge(Wm, inW); }, {"deltaw::unmerge", "the weight W", "the update's B"});
  refused([&] { dw::merge_checked(Wm, inW); }, {"deltaw::merge_checked", "the weight W", "the update's B"});
  const auto inWA = dw::lora(B, dw::view(std::as_const(Wm)).middle_rows(n - r, r), dw::alpha(2));
  refused([&] { dw::merge(Wm, inWA); }, {"the weight W", "the update's A"});
  CHECK(Wm == Wm0);
  // Merging into the other rows of a buffer that holds A: fine, and exact.
  MatD WA(n + r, n);
  WA.topRows(n) = W0;
  WA.bottomRows(r) = A;
  const auto uA = dw::lora(B, dw::view(std::as_const(WA)).middle_rows(n, r), dw::alpha(2));
  dw::merge(dw::view(WA).middle_rows(0, n), uA);
  CHECK(dwt::rel_err(MatD(WA.topRows(n)), MatD(W0 + 1.0 * B * A)) < 1e-14);
  CHECK(WA.bottomRows(r) == A);
}

TEST_CASE("aliasing: the VJPs refuse gradient buffers that overlap inputs, factors or each other") {
  const int n = 4, r = 4, tokens = 3;
  const MatD B = dwt::random(n, r, 1), A = dwt::random(r, n, 2), X = dwt::random(tokens, n, 3),
             dY = dwt::random(tokens, n, 4);
  const auto u = dw::lora(B, A, dw::alpha(2));
  MatD g1 = MatD::Zero(n, r), g2 = MatD::Zero(r, n), dX = MatD::Zero(tokens, n);
  using S = std::span<dw::dense<double>* const>;
  // One buffer for two gradients.
  std::array<dw::dense<double>*, 2> same{&g1, &g1};
  refused([&] { dw::cpu::backward<double>(u, X, dY, S(same), nullptr); },
          {"vjp<lora>::backward", "the gradient of B", "the gradient of A"});
  // dX over X, a gradient over dY.
  MatD Xm = X, dYm = dY;
  std::array<dw::dense<double>*, 2> ok{&g1, &g2};
  refused([&] { dw::cpu::backward<double>(u, Xm, dY, S(ok), &Xm); },
          {"deltaw::cpu::backward", "the input gradient dX", "the input X"});
  MatD dYsq = dwt::random(n, n, 5);
  std::array<dw::dense<double>*, 2> over_dy{&dYsq, &g2};
  refused([&] { dw::cpu::backward<double>(u, dwt::random(n, n, 6), dYsq, S(over_dy), nullptr); },
          {"the gradient of B", "the upstream gradient dY"});
  // A gradient slot over the factor itself (the protocol form, views).
  MatD Bm = B;
  const auto ub = dw::lora(std::as_const(Bm), A, dw::alpha(2));
  const dw::kernels::cpu_context ctx;
  const dw::matrix_view<double> slots[2] = {dw::view(Bm), dw::view(g2)};
  refused([&] {
    dw::cpu::vjp<decltype(ub)>::backward<double>(ctx, ub, dw::view(std::as_const(X)), dw::view(std::as_const(dY)),
                                                 std::span<const dw::matrix_view<double>>(slots, 2), dw::view(dX));
  }, {"vjp<lora>::backward", "the gradient of B", "the update's B"});
  CHECK(Bm == B);
  CHECK(g2.isZero());
  // Gradients side by side in one buffer are fine and equal separate ones.
  MatD both = MatD::Zero(n, 2 * r);
  const dw::matrix_view<double> packed[2] = {dw::view(both).middle_cols(0, r), dw::view(both).middle_cols(r, n)};
  dw::cpu::vjp<decltype(u)>::backward<double>(ctx, u, dw::view(std::as_const(X)), dw::view(std::as_const(dY)),
                                              std::span<const dw::matrix_view<double>>(packed, 2), dw::view(dX));
  MatD h1 = MatD::Zero(n, r), h2 = MatD::Zero(r, n);
  std::array<dw::dense<double>*, 2> sep{&h1, &h2};
  dw::cpu::backward<double>(u, X, dY, S(sep), nullptr);
  CHECK(dwt::rel_err(MatD(both.leftCols(r)), h1) < 1e-14);
  CHECK(dwt::rel_err(MatD(both.rightCols(n)), h2) < 1e-14);
}

TEST_CASE("aliasing: X and Y side by side in one buffer (column blocks) compute as if separate") {
  const int in = 5, out = 7, r = 2, tokens = 9;
  const MatD W = dwt::random(out, in, 1), B = dwt::random(out, r, 2), A = dwt::random(r, in, 3);
  MatD XY = MatD::Zero(tokens, in + out);
  XY.leftCols(in) = dwt::random(tokens, in, 4);
  const MatD X = XY.leftCols(in);
  const auto e = dw::view(W) + dw::lora(B, A, dw::alpha(4));
  dw::apply(e, dw::view(std::as_const(XY)).middle_cols(0, in), dw::view(XY).middle_cols(in, out));
  CHECK(dwt::rel_err(MatD(XY.rightCols(out)), MatD(X * (W + 2.0 * B * A).transpose())) < 1e-14);
  CHECK(XY.leftCols(in) == X);
  // And the transposed product back into the first block, reading the second.
  const MatD G = XY.rightCols(out);
  dw::apply_transposed(e, dw::view(std::as_const(XY)).middle_cols(in, out), dw::view(XY).middle_cols(0, in));
  CHECK(dwt::rel_err(MatD(XY.leftCols(in)), MatD(G * (W + 2.0 * B * A))) < 1e-14);
}

namespace {
/// Every type's entry points: Y = X, O = G, dX = X refused; merge into a W that holds
/// the update's first operand refused, naming it. n × n layers.
template <class U>
void check_type(const char* what, const U& u, MatD& W, const char* first_operand, bool merge_shares_first) {
  CAPTURE(what);
  const int n = int(u.rows()), tokens = 3;
  MatD X = dwt::random(tokens, n, 9);
  const MatD X0 = X, W0 = W;
  refused([&] { dw::apply(u, X, X); }, {"deltaw::apply", "the output Y", "the input X"});
  refused([&] { dw::apply(dw::view(std::as_const(W)) + u, X, X); }, {"the output Y", "the input X"});
  refused([&] { dw::apply_transposed(u, X, X); }, {"deltaw::apply_transposed", "the output O", "the input G"});
  std::array<dw::dense<double>*, dw::cpu::vjp<U>::factor_count> none{};
  refused([&] { dw::cpu::backward<double>(u, X, X0, std::span<dw::dense<double>* const>(none), &X); },
          {"the input gradient dX", "the input X"});
  CHECK(X == X0);
  if (merge_shares_first) {
    refused([&] { dw::merge(W, u); }, {"deltaw::merge", "the weight W", std::string("the update's ") + first_operand});
    refused([&] { dw::unmerge(W, u); }, {"deltaw::unmerge", "the weight W", std::string("the update's ") + first_operand});
    refused([&] { dw::merge_checked(W, u); }, {"deltaw::merge_checked", "the weight W"});
    // The output of apply over that operand too.
    refused([&] { dw::apply(u, X, dw::view(W).middle_rows(0, tokens)); },
            {"the output Y", std::string("the update's ") + first_operand});
    CHECK(W == W0);
  }
}
}  // namespace

TEST_CASE("aliasing: every update type's entry points refuse overlapping outputs") {
  const int n = 8;
  const auto cW = [](MatD& W) { return dw::view(std::as_const(W)); };
  {
    MatD W = dwt::random(n, n, 1);
    const MatD A = dwt::random(2, n, 2);
    check_type("lora", dw::lora(cW(W).middle_cols(0, 2), A, dw::alpha(2)), W, "B", true);
  }
  {
    MatD W2 = dwt::random(n, n, 5);
    const MatD B = dwt::random(n, 2, 2), A = dwt::random(2, n, 3);
    const auto l = dw::lora(B, A, dw::alpha(2));
    const Eigen::VectorXd m0 = dw::dora_magnitude(W2, l);
    MatD mcol = W2;  // m stored in the first column of W2 (stride n)
    mcol.col(0) = m0;
    const auto d = dw::dora(W2, l, dw::vector_view<const double>(mcol.data(), n, n));
    check_type("dora", d, W2, "", false);
    // DoRA merges only into its own W; m living inside that W is refused.
    MatD Wd = W2;
    Wd.col(0) = m0;
    const auto dm = dw::dora(Wd, l, dw::vector_view<const double>(Wd.data(), n, n));
    refused([&] { dw::merge(Wd, dm); }, {"deltaw::merge", "the weight W", "the update's m"});
    // The output of apply over DoRA's own W.
    MatD Xs = dwt::random(n, n, 4);
    refused([&] { dw::apply(dm, Xs, Wd); }, {"the output Y", "the update's W"});
    // The training form: forward's Y and P, backward_with_base's outputs against P.
    using V = dw::cpu::vjp<decltype(d)>;
    const dw::kernels::cpu_context ctx;
    MatD Y = MatD::Zero(n, n), P = MatD::Zero(n, n), dX = MatD::Zero(n, n);
    const auto cX = dw::view(std::as_const(Xs));
    refused([&] { V::forward<double>(ctx, d, cX, dw::view(Y), dw::view(Y)); },
            {"vjp<dora>::forward", "the output Y", "the pre-gain output P"});
    V::forward<double>(ctx, d, cX, dw::view(Y), dw::view(P));
    const dw::matrix_view<double> none3[3] = {};
    refused([&] {
      V::backward_with_base<double>(ctx, d, cX, dw::view(std::as_const(P)), dw::view(std::as_const(Y)),
                                    std::span<const dw::matrix_view<double>>(none3, 3), dw::view(P));
    }, {"vjp<dora>::backward", "the input gradient dX", "the pre-gain output P"});
    CHECK(dX.isZero());
  }
  {
    MatD W = dwt::random(n, n, 1);
    const MatD R = dwt::random(2, 2, 2), A = dwt::random(2, n, 3);
    check_type("lora_xs", dw::lora_xs(cW(W).middle_cols(0, 2), R, A, dw::alpha(2)), W, "B", true);
  }
  {
    MatD W = dwt::random(n, n, 1);
    const MatD A0 = dwt::random(2, n, 3);
    check_type("block_lora", dw::block_lora(cW(W).middle_cols(0, 4), A0, dw::alpha(2)), W, "B", true);
  }
  {
    MatD W = dwt::random(n, n, 1);
    MatD Wb = W;
    Wb.leftCols(2) = 0.1 * dwt::random(n, 2, 2);  // b [out, r] inside W
    const auto bat = dw::bone_bat(Wb, cW(Wb).middle_cols(0, 2));
    refused([&] { dw::merge(Wb, bat); }, {"deltaw::merge", "the weight W", "the update's b"});
    const MatD b = 0.1 * dwt::random(n, 2, 2);
    check_type("bone_bat", dw::bone_bat(W, b), W, "", false);
  }
  {
    MatD W = dwt::random(n, n, 1);
    check_type("miss", dw::miss(cW(W).middle_rows(0, 2), n), W, "D", true);
  }
  {
    MatD W = dwt::random(n, n, 1);
    const MatD w2 = dwt::random(4, 4, 2);
    check_type("kron", dw::kron(cW(W).block(0, 0, 2, 2), w2), W, "w1", true);
  }
  {
    MatD W = dwt::random(n, n, 1);
    const auto ld = dw::loldu(W, 3);
    check_type("loldu", ld, W, "", false);
  }
  {
    MatD W = dwt::random(n, n, 1);
    const Eigen::VectorXd b = dwt::random(3, 1, 2);
    check_type("nola", dw::nola(n, n, 2, 11, dw::vector_view<const double>(W.data(), 3, 1), b, dw::alpha(2)), W,
               "a_coef", true);
  }
  {
    MatD W = dwt::random(n, n, 1);
    const auto basis = dw::vera_shared_basis(3, 2, n, n);
    const Eigen::VectorXd lb = dwt::random(n, 1, 2);
    check_type("vera", dw::vera(basis, n, n, dw::vector_view<const double>(W.data(), 2, 1), lb), W, "lambda_d", true);
  }
  {
    MatD W = dwt::random(n, n, 1);
    const auto basis = dw::randlora_shared_basis(3, 4, n, n);
    const MatD gamma = dwt::random(2, n, 2);
    check_type("randlora", dw::randlora(basis, n, n, cW(W).block(0, 0, 4, 2), gamma), W, "lambda", true);
  }
}

TEST_CASE("merge_checked checks in W's storage type and leaves W bit-identical when it refuses") {
  // fp16: 60000 + 10000 is finite in float, +Inf in fp16.
  {
    std::vector<dw::fp16> w(4, dw::fp16(60000.f));
    const auto before = w;
    const MatF B = MatF::Constant(2, 1, 10000.f), A = MatF::Constant(1, 2, 1.f);
    dwt::check_throws_with<dw::non_finite_error>([&] { dw::merge_checked(dw::view(w.data(), 2, 2), dw::lora(B, A)); },
                                                 {"merge_checked", "W(0, 0)", "float16", "unchanged"});
    CHECK(std::memcmp(w.data(), before.data(), w.size() * sizeof(dw::fp16)) == 0);
    // 60000 + 1000 fits: merged and rounded as stored.
    const MatF B2 = MatF::Constant(2, 1, 1000.f);
    dw::merge_checked(dw::view(w.data(), 2, 2), dw::lora(B2, A));
    CHECK(float(w[3]) == float(dw::fp16(61000.f)));
  }
  // bf16: 3.376e38 + 2.5e36 is finite in float, rounds to +Inf in bf16.
  {
    std::vector<dw::bf16> w(6, dw::bf16(3.376e38f));
    const auto before = w;
    const MatF B = MatF::Constant(3, 1, 2.5e36f), A = MatF::Constant(1, 2, 1.f);
    CHECK(std::isfinite(float(w[0]) + 2.5e36f));
    dwt::check_throws_with<dw::non_finite_error>([&] { dw::merge_checked(dw::view(w.data(), 3, 2), dw::lora(B, A)); },
                                                 {"merge_checked", "bfloat16", "unchanged"});
    CHECK(std::memcmp(w.data(), before.data(), w.size() * sizeof(dw::bf16)) == 0);
  }
  // float W, double factors: 3e38 + 1e38 is finite in double, +Inf in float.
  {
    MatF W = MatF::Constant(300, 3, 1.f);  // several panels; the overflow in the second
    W(280, 1) = 3e38f;
    const MatF before = W;
    MatD B = MatD::Zero(300, 1);
    B(280, 0) = 1e38;
    const MatD A = MatD::Constant(1, 3, 1.0);
    dwt::check_throws_with<dw::non_finite_error>([&] { dw::merge_checked(W, dw::lora(B, A)); },
                                                 {"merge_checked", "W(280, 1)", "float32", "unchanged"});
    CHECK(std::memcmp(W.data(), before.data(), std::size_t(W.size()) * sizeof(float)) == 0);
  }
}
