// SPDX-License-Identifier: MIT
// GraLoRA and UniLoRA (issue 16) against dense references in double built here entry by entry
// from PEFT's definitions (GraLoRA: gralora_A [k, in/k, r], gralora_B [k, r, out/k], output
// block j reading columns j·q … of input block n's r-vector, plus the hybrid LoRA, times
// α/(r + hr); UniLoRA: A = θ[idx_A]·σ_A, B = θ[idx_B]·σ_B, ΔW = B·A): apply, apply_transposed,
// materialize, frobenius_norm, merge / unmerge / merge_checked, a lazy sum; odd shapes; float;
// the errors; no out × in allocation in apply, merge or norm.
#include <deltaw/deltaw.hpp>
#include <deltaw/backend/cpu/gralora.hpp>
#include <deltaw/backend/cpu/unilora.hpp>

#include <cmath>
#include <vector>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;

/// ΔW of GraLoRA from PEFT's 3-d tensors, given flattened as A [k·ib, r] and B [k·r, ob].
MatD gralora_ref(const MatD& A, const MatD& B, Eigen::Index k, const MatD& Ah, const MatD& Bh, double s) {
  const Eigen::Index r = A.cols(), q = r / k, ib = A.rows() / k, ob = B.cols(), out = k * ob, in = A.rows();
  MatD dW = MatD::Zero(out, in);
  for (Eigen::Index o = 0; o < out; ++o)
    for (Eigen::Index i = 0; i < in; ++i) {
      const Eigen::Index j = o / ob, oo = o % ob, n = i / ib, ii = i % ib;
      double v = 0;
      for (Eigen::Index t = 0; t < q; ++t) v += A(n * ib + ii, j * q + t) * B(j * r + n * q + t, oo);  // A[n][ii][j q + t]·B[j][n q + t][oo]
      dW(o, i) = s * v;
    }
  if (Ah.rows() > 0) dW += s * Bh * Ah;
  return dW;
}

struct uni_case {
  std::vector<long long> ia, ib;
  std::vector<double> sa, sb;
  Eigen::VectorXd theta;
};
/// Random indices into θ [d] for [r, in] and [out, r], with PEFT's 1/√count scales.
uni_case uni_random(Eigen::Index out, Eigen::Index in, Eigen::Index r, Eigen::Index d, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<long long> pick(0, d - 1);
  uni_case c;
  c.ia.resize(std::size_t(r * in));
  c.ib.resize(std::size_t(out * r));
  for (auto& v : c.ia) v = pick(g);
  for (auto& v : c.ib) v = pick(g);
  std::vector<double> cnt(std::size_t(d), 0.0);
  for (auto v : c.ia) cnt[std::size_t(v)] += 1;
  for (auto v : c.ib) cnt[std::size_t(v)] += 1;
  for (auto v : c.ia) c.sa.push_back(1.0 / std::sqrt(cnt[std::size_t(v)]));
  for (auto v : c.ib) c.sb.push_back(1.0 / std::sqrt(cnt[std::size_t(v)]));
  c.theta = dwt::random<MatD>(d, 1, seed + 1).col(0);
  return c;
}
MatD unilora_ref(const uni_case& c, Eigen::Index out, Eigen::Index in, Eigen::Index r) {
  MatD A(r, in), B(out, r);
  for (Eigen::Index i = 0; i < r; ++i)
    for (Eigen::Index j = 0; j < in; ++j)
      A(i, j) = c.theta[c.ia[std::size_t(i * in + j)]] * c.sa[std::size_t(i * in + j)];
  for (Eigen::Index o = 0; o < out; ++o)
    for (Eigen::Index i = 0; i < r; ++i)
      B(o, i) = c.theta[c.ib[std::size_t(o * r + i)]] * c.sb[std::size_t(o * r + i)];
  return B * A;
}
template <class T>
auto uni_update(const uni_case& c, Eigen::Index out, Eigen::Index in, Eigen::Index r, const Eigen::Matrix<T, -1, 1>& theta) {
  return dw::unilora(out, in, r, std::span<const long long>(c.ia), std::span<const long long>(c.ib),
                     std::span<const double>(c.sa), std::span<const double>(c.sb), theta);
}

}  // namespace

TEST_CASE("GraLoRA: k×k grid of rank-r/k blocks plus hybrid LoRA, every operation against dense") {
  std::mt19937_64 g(1601);
  for (int trial = 0; trial < 12; ++trial) {
    const Eigen::Index k = 1 + trial % 3, q = 1 + (trial / 3) % 2, r = k * q;
    const Eigen::Index ib = std::uniform_int_distribution<int>(1, 4)(g), ob = std::uniform_int_distribution<int>(1, 4)(g);
    const Eigen::Index in = k * ib, out = k * ob, hr = trial % 4 == 3 ? 0 : trial % 3;
    const double s = 5.0 / double(r + hr);
    const MatD A = dwt::random<MatD>(in, r, 10 + trial), B = dwt::random<MatD>(k * r, ob, 20 + trial);
    const MatD Ah = dwt::random<MatD>(hr, in, 30 + trial), Bh = dwt::random<MatD>(out, hr, 40 + trial);
    MatD W = dwt::random<MatD>(out, in, 50 + trial);
    const MatD dW = gralora_ref(A, B, k, Ah, Bh, s);
    INFO("trial " << trial << " out " << out << " in " << in << " k " << k << " r " << r << " hr " << hr);
    auto u = dw::gralora(A, B, k, Ah, Bh, dw::scale(s));
    CHECK(u.parameter_count() == (r + hr) * (out + in));
    CHECK(u.rows() == out);
    CHECK(u.cols() == in);
    dwt::check_update_ops(u, dW, 60 + trial, {0, 1, 7});
    dwt::check_update_over_weight(u, W, dW, 70 + trial, {.tokens = {0, 1, 6}});
    if (hr == 0) dwt::check_update_ops(dw::gralora(A, B, k, dw::scale(s)), dW, 80 + trial, {3});
  }
  // The grid is not a rank-r LoRA: with k = 3, q = 1 the rank reaches k·r = 9 > r = 3.
  const MatD A = dwt::random<MatD>(9, 3, 1), B = dwt::random<MatD>(9, 3, 2), E(0, 9), F(9, 0);
  const MatD dW = gralora_ref(A, B, 3, E, F, 1.0);
  CHECK(Eigen::FullPivLU<MatD>(dW).rank() == 9);
  CHECK(dwt::rel_err(dw::materialize(dw::gralora(A, B, 3, dw::scale(1.0))), dW) < 1e-13);
  // float
  const dwt::MatF Af = dwt::random<dwt::MatF>(12, 6, 3), Bf = dwt::random<dwt::MatF>(18, 5, 4), Ahf = dwt::random<dwt::MatF>(2, 12, 5),
                  Bhf = dwt::random<dwt::MatF>(15, 2, 6), Xf = dwt::random<dwt::MatF>(4, 12, 7);
  const MatD ref = Xf.cast<double>() * gralora_ref(Af.cast<double>(), Bf.cast<double>(), 3, Ahf.cast<double>(), Bhf.cast<double>(), 0.625).transpose();
  CHECK(dwt::rel_err(dw::apply(dw::gralora(Af, Bf, 3, Ahf, Bhf, dw::scale(0.625)), Xf).cast<double>(), ref) < 1e-5);
}

TEST_CASE("GraLoRA: errors") {
  const MatD A = dwt::random<MatD>(6, 4, 1), B = dwt::random<MatD>(8, 3, 2), E;
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::gralora(A, B, 0, dw::scale(1)); }, {"k = 0"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::gralora(A, B, 3, dw::scale(1)); }, {"r must be a positive multiple of k", "[6, 4]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::gralora(MatD(dwt::random<MatD>(5, 4, 3)), B, 2, dw::scale(1)); },
                                          {"in must be a multiple of k"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::gralora(A, MatD(dwt::random<MatD>(6, 3, 3)), 2, dw::scale(1)); },
                                          {"k·r rows", "[6, 3]"});
  dwt::check_throws_with<dw::shape_error>(
      [&] { (void)dw::gralora(A, B, 2, MatD(dwt::random<MatD>(2, 5, 4)), MatD(dwt::random<MatD>(6, 2, 5)), dw::scale(1)); },
      {"hybrid", "[2, 5]"});
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::gralora(A, B, 2, dw::scale(std::nan(""))); }, {"scale"});
}

TEST_CASE("UniLoRA: A and B gathered from θ with 1/√count scales, every operation against dense") {
  std::mt19937_64 g(1602);
  for (int trial = 0; trial < 10; ++trial) {
    const Eigen::Index out = std::uniform_int_distribution<int>(1, 11)(g), in = std::uniform_int_distribution<int>(1, 9)(g);
    const Eigen::Index r = trial < 2 ? 1 : std::uniform_int_distribution<int>(1, 4)(g), d = std::uniform_int_distribution<int>(1, 40)(g);
    const auto c = uni_random(out, in, r, d, 100 + trial);
    const MatD dW = unilora_ref(c, out, in, r);
    MatD W = dwt::random<MatD>(out, in, 200 + trial);
    INFO("trial " << trial << " out " << out << " in " << in << " r " << r << " d " << d);
    auto u = uni_update(c, out, in, r, c.theta);
    CHECK(u.parameter_count() == d);
    dwt::check_update_ops(u, dW, 300 + trial, {0, 1, 6});
    dwt::check_update_over_weight(u, W, dW, 400 + trial, {.tokens = {0, 1, 5}});
    // A shared pattern with another θ (both factors scale: ΔW by 4).
    const Eigen::VectorXd t2 = 2.0 * c.theta;
    CHECK(dwt::rel_err(dw::materialize(dw::unilora(u.pattern(), t2)), 4.0 * dW) < 1e-12);
  }
  // unilora_inverse_sqrt_counts: PEFT's scales over two modules' indices.
  const std::vector<long long> a{0, 1, 1, 3}, b{1, 3, 3, 3};
  const std::vector<std::span<const long long>> all{a, b};
  const auto sc = dw::unilora_inverse_sqrt_counts<long long>(5, all);
  CHECK(sc == std::vector<double>{1.0, 1.0 / std::sqrt(3.0), 0.0, 0.5, 0.0});
  // float
  const auto c = uni_random(7, 5, 3, 11, 9);
  const Eigen::VectorXf tf = c.theta.cast<float>();
  const dwt::MatF Xf = dwt::random<dwt::MatF>(4, 5, 10);
  uni_case cf = c;
  cf.theta = tf.cast<double>();
  CHECK(dwt::rel_err(dw::apply(uni_update(c, 7, 5, 3, tf), Xf).cast<double>(), Xf.cast<double>() * unilora_ref(cf, 7, 5, 3).transpose()) < 1e-5);
}

TEST_CASE("UniLoRA: errors") {
  const auto c = uni_random(4, 3, 2, 6, 1);
  dwt::check_throws_with<dw::shape_error>([&] { (void)uni_update(c, 4, 4, 2, c.theta); }, {"unilora_indices_A", "[2, 4]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)uni_update(c, 5, 3, 2, c.theta); }, {"unilora_indices_B", "[5, 2]"});
  auto bad = c;
  bad.ib[3] = 6;
  dwt::check_throws_with<dw::argument_error>([&] { (void)uni_update(bad, 4, 3, 2, bad.theta); }, {"unilora_indices_B entry 3", "[0, 6)"});
  auto u = uni_update(c, 4, 3, 2, c.theta);
  const Eigen::VectorXd t5 = Eigen::VectorXd::Ones(5);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::unilora(u.pattern(), t5); }, {"5 entries", "length 6"});
}

TEST_CASE("GraLoRA and UniLoRA: no apply, merge or norm allocates out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, r = 8, k = 4, T = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3);
  const Mat A = dwt::random<Mat>(in, r, 4), B = dwt::random<Mat>(k * r, out / k, 5), Ah = dwt::random<Mat>(2, in, 6),
            Bh = dwt::random<Mat>(out, 2, 7);
  Mat Y(T, out), O(T, in);
  // The update alone allocates nothing as large as one of the grid's [out/k, in/k] blocks
  // (over W, the base GEMM's own workspace is larger than a block, still below out × in).
  const std::size_t block_bytes = std::size_t(out / k) * (in / k) * sizeof(float);
  auto u = dw::gralora(A, B, k, Ah, Bh, dw::scale(0.5));
  CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply(u, X, Y); }) < block_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < block_bytes);
  CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
  const auto c = uni_random(out, in, r, 4096, 8);
  const Eigen::VectorXf tf = c.theta.cast<float>();
  auto v = uni_update(c, out, in, r, tf);
  CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + v, X, Y); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply(v, X, Y); }) < block_bytes);
  CHECK(dwt::largest_allocation([&] { dw::apply_transposed(v, G, O); }) < block_bytes);
  CHECK(dwt::largest_allocation([&] { dw::merge(W, v); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { dw::unmerge(W, v); }) < dense_bytes);
  CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(v); }) < dense_bytes);
}
