// SPDX-License-Identifier: MIT
// VB-LoRA and PVeRA (issue 16) against dense references in double built here from PEFT
// 0.21.2's definitions (VB-LoRA: top-k of each logit row, softmax over the k, mixture of bank
// vectors, A [r, in] row-tiled and B [out, r] from PEFT's transpose/reshape; PVeRA:
// diag(λ_b)·B·diag(λ_d[:r])·A₂[:r] with the seeded VeRA bases drawn entry by entry): apply,
// apply_transposed, materialize, frobenius_norm, merge / unmerge / merge_checked, a lazy
// sum with LoRA, float; VB-LoRA's −∞ logits (save_only_topk_weights), PVeRA's sampled
// forward with given noise; the errors; no out × in allocation in apply, merge or the norm.
#include <deltaw/backend/cpu/pvera.hpp>
#include <deltaw/backend/cpu/vblora.hpp>

#include <algorithm>
#include <limits>
#include <numeric>

#include "alloc_counter.hpp"
#include "expr/update_checks.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;
using VecD = Eigen::VectorXd;

/// The mixture of one logit row: top k by value (ties: lower index), softmax over them.
Eigen::RowVectorXd mix_row(const MatD& logits, Eigen::Index row, const MatD& bank, Eigen::Index k) {
  std::vector<Eigen::Index> idx(static_cast<std::size_t>(logits.cols()));
  std::iota(idx.begin(), idx.end(), Eigen::Index(0));
  std::stable_sort(idx.begin(), idx.end(), [&](Eigen::Index a, Eigen::Index b) { return logits(row, a) > logits(row, b); });
  double mx = logits(row, idx[0]), sum = 0;
  std::vector<double> w(static_cast<std::size_t>(k));
  for (Eigen::Index q = 0; q < k; ++q) sum += w[std::size_t(q)] = std::exp(logits(row, idx[std::size_t(q)]) - mx);
  Eigen::RowVectorXd v = Eigen::RowVectorXd::Zero(bank.cols());
  for (Eigen::Index q = 0; q < k; ++q) v += (w[std::size_t(q)] / sum) * bank.row(idx[std::size_t(q)]);
  return v;
}

/// PEFT's get_delta_weight: A = mixtures of logits_A [r, in/L, n] reshaped to [r, in];
/// B = mixtures of logits_B [out/L, r, n] → [out/L, r, L] → transpose(1, 2) → [out, r].
MatD vblora_reference(const MatD& la, const MatD& lb, const MatD& bank, Eigen::Index r, Eigen::Index k) {
  const Eigen::Index L = bank.cols(), ti = la.rows() / r, to = lb.rows() / r;
  MatD A(r, ti * L), B(to * L, r);
  for (Eigen::Index i = 0; i < r; ++i)
    for (Eigen::Index t = 0; t < ti; ++t) A.block(i, t * L, 1, L) = mix_row(la, i * ti + t, bank, k);
  for (Eigen::Index t = 0; t < to; ++t)
    for (Eigen::Index i = 0; i < r; ++i) B.block(t * L, i, L, 1) = mix_row(lb, t * r + i, bank, k).transpose();
  return B * A;
}

double uni(std::uint64_t seed, std::uint64_t tensor, std::uint64_t idx, double bound) {
  return bound * double(dw::random_stream{seed, tensor}.uniform_pm1(idx));
}
/// A₂ [2r, in] and B [out, r] of the shared PVeRA bases, entry by entry.
std::pair<MatD, MatD> pvera_bases(const dw::vera_basis& b, Eigen::Index out, Eigen::Index in) {
  const Eigen::Index r = b.r;
  MatD A(2 * r, in), B(out, r);
  for (Eigen::Index k = 0; k < 2 * r; ++k)
    for (Eigen::Index j = 0; j < in; ++j) A(k, j) = uni(b.seed, 0, std::uint64_t(k * b.in_max + j), std::sqrt(6.0 / double(b.in_max)));
  for (Eigen::Index i = 0; i < out; ++i)
    for (Eigen::Index k = 0; k < r; ++k) B(i, k) = uni(b.seed, 1, std::uint64_t(i * r + k), std::sqrt(6.0 / double(r)));
  return {A, B};
}
MatD pvera_reference(const dw::vera_basis& b, Eigen::Index out, Eigen::Index in, const VecD& ld, const VecD& lb) {
  const auto [A, B] = pvera_bases(b, out, in);
  const Eigen::Index r = b.r;
  return lb.asDiagonal() * B * ld.head(r).asDiagonal() * A.topRows(r);
}

}  // namespace

TEST_CASE("VB-LoRA: ΔW = B·A mixed from the bank by top-k softmax, every operation against dense") {
  std::mt19937_64 g(4242);
  for (int trial = 0; trial < 10; ++trial) {
    const Eigen::Index L = std::uniform_int_distribution<int>(1, 5)(g);
    const Eigen::Index ti = std::uniform_int_distribution<int>(1, 4)(g), to = std::uniform_int_distribution<int>(1, 4)(g);
    const Eigen::Index r = trial < 2 ? 1 : std::uniform_int_distribution<int>(1, 4)(g);
    const Eigen::Index n = std::uniform_int_distribution<int>(1, 9)(g);
    const Eigen::Index k = trial == 2 ? n : std::uniform_int_distribution<int>(1, int(std::min<Eigen::Index>(n, 3)))(g);
    const Eigen::Index out = to * L, in = ti * L;
    const MatD la = 2.0 * dwt::random<MatD>(r * ti, n, 10 + trial), lb = 2.0 * dwt::random<MatD>(to * r, n, 20 + trial);
    const MatD bank = dwt::random<MatD>(n, L, 30 + trial);
    const MatD dW = vblora_reference(la, lb, bank, r, k);
    INFO("trial " << trial << " out " << out << " in " << in << " r " << r << " L " << L << " n " << n << " k " << k);
    auto u = dw::vblora(la, lb, bank, r, k);
    CHECK(u.rows() == out);
    CHECK(u.cols() == in);
    CHECK(u.parameter_count() == (r * ti + to * r) * n + n * L);
    dwt::check_update_ops(u, dW, 40 + trial, {0, 1, 6});
    MatD W = dwt::random<MatD>(out, in, 50 + trial);
    dwt::check_update_over_weight(u, W, dW, 60 + trial, {.tokens = {0, 1, 6}, .unmerge_tol = 1e-13});
    const auto [Af, Bf] = dw::cpu::vblora_factors<double>(u);
    CHECK(dwt::rel_err(MatD(Bf * Af), dW) < 1e-13);
  }
  // float storage against the double reference.
  const dwt::MatF laf = dwt::random<dwt::MatF>(3 * 4, 7, 91), lbf = dwt::random<dwt::MatF>(2 * 3, 7, 92),
                  bf = dwt::random<dwt::MatF>(7, 5, 93), Xf = dwt::random<dwt::MatF>(6, 20, 94);
  const MatD ref = Xf.cast<double>() * vblora_reference(laf.cast<double>(), lbf.cast<double>(), bf.cast<double>(), 3, 2).transpose();
  CHECK(dwt::rel_err(dw::apply(dw::vblora(laf, lbf, bf, 3, 2), Xf).cast<double>(), ref) < 1e-5);
}

TEST_CASE("VB-LoRA: PEFT's save_only_topk_weights logits (−∞ but the k kept, log of their weights) give the same ΔW") {
  const Eigen::Index r = 2, L = 3, ti = 3, to = 2, n = 6, k = 3;
  const MatD la = dwt::random<MatD>(r * ti, n, 1), lb = dwt::random<MatD>(to * r, n, 2), bank = dwt::random<MatD>(n, L, 3);
  // What PEFT's loader rebuilds from <…>_topk_indices / _topk_weights.
  auto topk_logits = [&](const MatD& l) {
    MatD o = MatD::Constant(l.rows(), l.cols(), -std::numeric_limits<double>::infinity());
    for (Eigen::Index q = 0; q < l.rows(); ++q) {
      std::vector<Eigen::Index> idx(static_cast<std::size_t>(n));
      std::iota(idx.begin(), idx.end(), Eigen::Index(0));
      std::sort(idx.begin(), idx.end(), [&](auto a, auto b) { return l(q, a) > l(q, b); });
      double s = 0;
      for (Eigen::Index p = 0; p < k; ++p) s += std::exp(l(q, idx[std::size_t(p)]));
      for (Eigen::Index p = 0; p < k; ++p) o(q, idx[std::size_t(p)]) = std::log(std::exp(l(q, idx[std::size_t(p)])) / s);
    }
    return o;
  };
  const MatD la2 = topk_logits(la), lb2 = topk_logits(lb);
  CHECK(dwt::rel_err(dw::materialize(dw::vblora(la2, lb2, bank, r, k)), vblora_reference(la, lb, bank, r, k)) < 1e-13);
  // A kept weight that underflowed to 0 (logit −∞) is selected with weight 0.
  MatD la3 = la2;
  for (Eigen::Index j = 0; j < n; ++j)
    if (std::isfinite(la3(0, j)) && la3(0, j) < la3.row(0).maxCoeff()) { la3(0, j) = -std::numeric_limits<double>::infinity(); break; }
  CHECK(dw::materialize(dw::vblora(la3, lb2, bank, r, k)).allFinite());
}

TEST_CASE("VB-LoRA: errors") {
  const MatD la = dwt::random<MatD>(6, 5, 1), lb = dwt::random<MatD>(4, 5, 2), bank = dwt::random<MatD>(5, 3, 3);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::vblora(la, lb, bank, 4, 2); }, {"logits_A [6, 5]", "r = 4"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::vblora(la, MatD(dwt::random<MatD>(4, 6, 4)), bank, 2, 2); },
                                          {"logits_B [4, 6]", "bank [5, 3]"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::vblora(la, lb, bank, 2, 6); }, {"topk = 6", "[1, 5]"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::vblora(la, lb, bank, 0, 1); }, {"rank r"});
  MatD bad = la;
  bad(3, 1) = std::numeric_limits<double>::quiet_NaN();
  const auto u = dw::vblora(bad, lb, bank, 2, 2);
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::materialize(u); }, {"logit row 3", "NaN"});
  MatD minf = la;
  minf.row(2).setConstant(-std::numeric_limits<double>::infinity());
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::apply(dw::vblora(minf, lb, bank, 2, 2), MatD(dwt::random<MatD>(2, 9, 5))); },
                                               {"logit row 2", "−∞"});
}

TEST_CASE("PVeRA: ΔW = diag(λ_b)·B·diag(λ_d[:r])·A₂[:r] on VeRA's seeded bases, every operation against dense") {
  std::mt19937_64 g(777);
  for (int trial = 0; trial < 8; ++trial) {
    const Eigen::Index out = std::uniform_int_distribution<int>(1, 13)(g), in = std::uniform_int_distribution<int>(1, 11)(g);
    const Eigen::Index r = trial < 2 ? 1 : std::uniform_int_distribution<int>(1, 5)(g);
    const auto basis = dw::pvera_shared_basis(900 + trial, r, out + trial % 3, in + 2 * (trial % 2));
    const VecD ld = dwt::random<MatD>(2 * r, 1, 10 + trial).col(0), lb = dwt::random<MatD>(out, 1, 20 + trial).col(0);
    const MatD dW = pvera_reference(basis, out, in, ld, lb);
    INFO("trial " << trial << " out " << out << " in " << in << " r " << r);
    auto u = dw::pvera(basis, out, in, ld, lb);
    CHECK(u.parameter_count() == 2 * r + out);
    dwt::check_update_ops(u, dW, 40 + trial, {0, 1, 6});
    MatD W = dwt::random<MatD>(out, in, 50 + trial);
    dwt::check_update_over_weight(u, W, dW, 60 + trial, {.tokens = {0, 1, 6}, .unmerge_tol = 1e-13});
    // The log-variance half of λ_d does not enter the deterministic path.
    VecD ld2 = ld;
    ld2.tail(r).setConstant(5.0);
    CHECK(dwt::rel_err(dw::materialize(dw::pvera(basis, out, in, ld2, lb)), dW) < 1e-14);

    // The sampled forward with given noise: (μ + ε ⊙ exp(½·log σ²))·(diag(λ_b)·B)ᵀ.
    const Eigen::Index T = 1 + trial % 4;
    const MatD X = dwt::random<MatD>(T, in, 70 + trial), eps = dwt::random<MatD>(T, r, 80 + trial);
    const auto [A2, B] = pvera_bases(basis, out, in);
    const MatD H = X * (ld.asDiagonal() * A2).transpose();
    const MatD Z = H.leftCols(r) + MatD(eps.array() * (0.5 * H.rightCols(r).array()).exp());
    const MatD Y0 = dwt::random<MatD>(T, out, 90 + trial);
    MatD Y = Y0;
    dw::cpu::pvera_apply_sampled<double>(u, dw::view(X), dw::view(eps), dw::view(Y));
    CHECK(dwt::rel_err(Y, MatD(Y0 + Z * (lb.asDiagonal() * B).transpose())) < 1e-12);
    Y = Y0;
    const MatD zero = MatD::Zero(T, r);
    dw::cpu::pvera_apply_sampled<double>(u, dw::view(X), dw::view(zero), dw::view(Y));
    CHECK(dwt::rel_err(Y, MatD(Y0 + X * dW.transpose())) < 1e-12);
  }
  const auto basis = dw::pvera_shared_basis(5, 3, 9, 8);
  const Eigen::VectorXf ldf = dwt::random<dwt::MatF>(6, 1, 1).col(0), lbf = dwt::random<dwt::MatF>(9, 1, 2).col(0);
  const dwt::MatF Xf = dwt::random<dwt::MatF>(4, 8, 3);
  CHECK(dwt::rel_err(dw::apply(dw::pvera(basis, 9, 8, ldf, lbf), Xf).cast<double>(),
                     MatD(Xf.cast<double>() * pvera_reference(basis, 9, 8, ldf.cast<double>(), lbf.cast<double>()).transpose())) < 1e-5);
}

TEST_CASE("PVeRA: errors") {
  const auto basis = dw::pvera_shared_basis(1, 3, 8, 8);
  const VecD l3 = VecD::Ones(3), l6 = VecD::Ones(6), l8 = VecD::Ones(8), l5 = VecD::Ones(5);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::pvera(basis, 8, 8, l3, l8); }, {"lambda_d has 3", "[2r] = [6]"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::pvera(basis, 9, 8, l6, l8); }, {"does not fit the shared bases"});
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::pvera(basis, 8, 8, l6, l5); }, {"lambda_b has 5"});
  const auto u = dw::pvera(basis, 8, 8, l6, l8);
  MatD Y = MatD::Zero(2, 8);
  const MatD X = MatD::Zero(2, 8), e6 = MatD::Zero(2, 6);
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cpu::pvera_apply_sampled<double>(u, dw::view(X), dw::view(e6), dw::view(Y)); },
      {"pvera_apply_sampled", "eps [2, 6]"});
}

TEST_CASE("VB-LoRA and PVeRA: no apply, merge or norm allocates out × in") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  constexpr Eigen::Index out = 768, in = 1024, T = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  using Mat = dwt::RowMat<float>;
  Mat W = dwt::random<Mat>(out, in, 1);
  const Mat X = dwt::random<Mat>(T, in, 2), G = dwt::random<Mat>(T, out, 3);
  Mat Y(T, out), O(T, in);
  auto check = [&](const auto& u) {
    CHECK(dwt::largest_allocation([&] { dw::apply(dw::view(W) + u, X, Y); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::apply_transposed(u, G, O); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::merge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { dw::unmerge(W, u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { (void)dw::frobenius_norm(u); }) < dense_bytes);
    CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);
  };
  const Eigen::Index L = 64, n = 32, r = 8;
  const Mat la = dwt::random<Mat>(r * in / L, n, 4), lb = dwt::random<Mat>(out / L * r, n, 5), bank = dwt::random<Mat>(n, L, 6);
  check(dw::vblora(la, lb, bank, r, 2));
  const Eigen::VectorXf ld = Eigen::VectorXf::Constant(2 * 256, 0.1f), lbv = Eigen::VectorXf::Constant(out, 0.5f);
  check(dw::pvera(dw::pvera_shared_basis(3, 256, out, in), out, in, ld, lbv));
}
