// SPDX-License-Identifier: MIT
// to_lora / to_lora_dense (issue 16: any update as a plain LoRA) against the SVD of the
// dense ΔW built here in double from each type's definition: the kept product B·A equals
// the optimal rank-k approximation, the reported error is the true ‖ΔW − B·A‖_F/‖ΔW‖_F,
// energy thresholds pick PEFT's rank, and the sketch never allocates an out × in matrix.
#include <deltaw/linalg/to_lora.hpp>

#include <Eigen/SVD>
#include <algorithm>
#include <random>

#include "alloc_counter.hpp"
#include "test_util.hpp"

namespace {
namespace dw = deltaw;
using dwt::MatD;
using dwt::MatF;

/// The optimal rank-k approximation of D, its relative error, and the energy cutoff rank.
struct dense_ref {
  MatD best;
  double rel_err;
};
dense_ref best_rank_k(const MatD& D, Eigen::Index k) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(Eigen::MatrixXd(D), Eigen::ComputeThinU | Eigen::ComputeThinV);
  const auto& S = svd.singularValues();
  const MatD best = svd.matrixU().leftCols(k) * S.head(k).asDiagonal() * svd.matrixV().leftCols(k).transpose();
  return {best, (D - best).norm() / D.norm()};
}
Eigen::Index energy_rank(const MatD& D, double t) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd{Eigen::MatrixXd(D)};
  const auto& S = svd.singularValues();
  const double total = S.squaredNorm();
  double cs = 0;
  for (Eigen::Index i = 0; i < S.size(); ++i) {
    cs += S[i] * S[i];
    if (cs >= t * total) return i + 1;
  }
  return S.size();
}

template <class Conv>
MatD product(const Conv& c) {
  return c.B.template cast<double>() * c.A.template cast<double>();
}

/// Every check of one update whose dense ΔW is D (built independently by the caller);
/// `exact_rank` is the true rank when it fits a sketch (then the sketch is exact).
template <class U>
void check_conversion(const U& u, const MatD& D, Eigen::Index exact_rank, const char* what) {
  CAPTURE(what);
  const auto kmax = std::min(D.rows(), D.cols());
  for (Eigen::Index k : {Eigen::Index(1), std::min<Eigen::Index>(3, kmax), std::min(exact_rank, kmax), kmax}) {
    CAPTURE(k);
    const auto ref = best_rank_k(D, k);
    const auto c = dw::to_lora(u, dw::lora_rank{k});
    REQUIRE(c.rank == k);
    REQUIRE(c.B.rows() == D.rows());
    REQUIRE(c.B.cols() == k);
    REQUIRE(c.A.rows() == k);
    REQUIRE(c.A.cols() == D.cols());
    CHECK(std::abs(c.norm - D.norm()) < 1e-12 * D.norm());
    // The reported error is the error of the returned factors (to √ε: it is computed as
    // √(1 − Σσ²/‖ΔW‖²)).
    CHECK(std::abs(c.relative_error - (D - product(c)).norm() / D.norm()) < 1e-7);
    // A (= Vᵀ) has orthonormal rows, B = U·diag(S) orthogonal columns of norm σ.
    CHECK((c.A * c.A.transpose() - MatD::Identity(k, k)).cwiseAbs().maxCoeff() < 1e-10);
    const auto d = dw::to_lora_dense(u, dw::lora_rank{k});
    CHECK(dwt::rel_err(product(d), ref.best) < 1e-10);
    CHECK(std::abs(d.relative_error - ref.rel_err) < 1e-7);
    if (k >= exact_rank || k + 10 >= kmax) {
      // The sketch spans ΔW's column space: the exact truncated SVD to rounding.
      CHECK(dwt::rel_err(product(c), ref.best) < 1e-9);
    } else {
      // Randomized: within 1 % of the optimal error (power iterations on a random spectrum).
      CHECK(c.relative_error <= ref.rel_err * 1.01 + 1e-12);
    }
    // The update it gives applies as B·A.
    const MatD X = dwt::random<MatD>(3, D.cols(), 5);
    CHECK(dwt::rel_err(dw::apply(c.update(), X), X * product(c).transpose()) < 1e-12);
  }
  for (double t : {0.5, 0.9, 0.99, 1.0}) {
    CAPTURE(t);
    // At t = 1 the strict rule (PEFT's) depends on rounding in the last bits of Σσ²; deltaw
    // counts a shortfall within 1000 ε as reached, which gives the numerical rank.
    const auto k = t == 1.0 ? std::min(exact_rank, kmax) : energy_rank(D, t);
    const auto c = dw::to_lora(u, dw::energy_fraction{t}, {.initial_sketch = 2});
    const auto d = dw::to_lora_dense(u, dw::energy_fraction{t});
    CHECK(d.rank == k);
    CHECK(c.rank == k);
    CHECK(c.energy() >= t - 1e-9);
    CHECK(c.energy() == doctest::Approx(1.0 - c.relative_error * c.relative_error));
  }
}

}  // namespace

TEST_CASE("to_lora: LoRA, LoHa, Kronecker, MiSS and OFT updates against the SVD of their dense ΔW") {
  std::mt19937_64 g(3);
  for (int trial = 0; trial < 4; ++trial) {
    const Eigen::Index out = std::uniform_int_distribution<int>(9, 40)(g), in = std::uniform_int_distribution<int>(9, 40)(g);
    CAPTURE(out);
    CAPTURE(in);
    {  // LoRA: rank 5 exactly
      const MatD B = dwt::random<MatD>(out, 5, 10 + trial), A = dwt::random<MatD>(5, in, 20 + trial);
      check_conversion(dw::lora(B, A, dw::scale(0.7)), 0.7 * B * A, 5, "lora");
    }
    {  // LoHa: rank ≤ r1·r2 = 6
      const MatD B1 = dwt::random<MatD>(out, 2, 30 + trial), A1 = dwt::random<MatD>(2, in, 31 + trial);
      const MatD B2 = dwt::random<MatD>(out, 3, 32 + trial), A2 = dwt::random<MatD>(3, in, 33 + trial);
      const MatD D = 1.5 * (B1 * A1).cwiseProduct(B2 * A2);
      check_conversion(dw::loha(B1, A1, B2, A2, dw::scale(1.5)), D, 6, "loha");
    }
  }
  {  // Kronecker w1 [3, 4] ⊗ w2 [7, 5]: rank rank(w1)·rank(w2) = 3·5 = 15, a 21 × 20 ΔW
    const MatD w1 = dwt::random<MatD>(3, 4, 40), w2 = dwt::random<MatD>(7, 5, 41);
    MatD D(21, 20);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) D.block(i * 7, j * 5, 7, 5) = 0.5 * w1(i, j) * w2;
    check_conversion(dw::kron(w1, w2, dw::scale(0.5)), D, 15, "kron");
  }
  {  // MiSS: ΔW[o, i] = D[i mod r, o] (rank ≤ r = 4)
    const Eigen::Index out = 18, in = 22, r = 4;
    const MatD Dm = dwt::random<MatD>(r, out, 50);
    MatD D(out, in);
    for (Eigen::Index o = 0; o < out; ++o)
      for (Eigen::Index i = 0; i < in; ++i) D(o, i) = Dm(i % r, o);
    check_conversion(dw::miss(Dm, in), D, r, "miss");
  }
  {  // OFT: ΔW = W·(R − I)ᵀ-style, full rank; the reference is deltaw's checked materialize.
    const MatD W = dwt::random<MatD>(30, 24, 60), Q = dwt::random<MatD>(6, 6, 61);  // 6 blocks of 4
    const auto u = dw::oft(W, Q);
    const MatD D = dw::materialize(u);  // OFT's materialize is checked against its definition in test_loha_ia3_oft
    check_conversion(u, D, 24, "oft");
  }
}

TEST_CASE("to_lora: float updates, a zero update, and the errors") {
  const MatF B = dwt::random<MatF>(12, 4, 1), A = dwt::random<MatF>(4, 9, 2);
  const auto c = dw::to_lora(dw::lora(B, A, dw::scale(2.0)), dw::lora_rank{4});
  static_assert(std::is_same_v<decltype(c.B), dw::dense<float>>);
  CHECK(dwt::rel_err(product(c), 2.0 * B.cast<double>() * A.cast<double>()) < 1e-5);
  const auto cd = dw::to_lora<double>(dw::lora(B, A, dw::scale(2.0)), dw::lora_rank{2});
  static_assert(std::is_same_v<decltype(cd.B), dw::dense<double>>);

  // ΔW = 0: rank 1 of zeros, error 0 (not NaN).
  const MatD Z = MatD::Zero(6, 5);
  const auto z = dw::to_lora(dw::lora(Z, dwt::random<MatD>(5, 5, 3), dw::scale(1.0)), dw::energy_fraction{0.9});
  CHECK(z.rank == 1);
  CHECK(z.relative_error == 0);
  CHECK(product(z).norm() == 0);

  const MatD Bd = dwt::random<MatD>(8, 2, 4), Ad = dwt::random<MatD>(2, 6, 5);
  const auto l = dw::lora(Bd, Ad, dw::scale(1.0));
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::to_lora(l, dw::lora_rank{0}); }, {"deltaw::to_lora", "[1, 6]"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::to_lora(l, dw::lora_rank{7}); }, {"got k = 7"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::to_lora_dense(l, dw::lora_rank{7}); }, {"to_lora_dense"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::to_lora(l, dw::energy_fraction{0}); }, {"(0, 1]"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::to_lora(l, dw::energy_fraction{1.5}); }, {"got 1.5"});
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::to_lora_dense(l, dw::energy_fraction{-1}); }, {"(0, 1]"});
}

TEST_CASE("to_lora: no out × in allocation (a 600 × 500 LoHa at rank 8)") {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("allocation counting unavailable (sanitizer build): skipped");
    return;
  }
  const Eigen::Index out = 600, in = 500;
  const MatF B1 = dwt::random<MatF>(out, 2, 1), A1 = dwt::random<MatF>(2, in, 2);
  const MatF B2 = dwt::random<MatF>(out, 4, 3), A2 = dwt::random<MatF>(4, in, 4);
  const auto u = dw::loha(B1, A1, B2, A2, dw::scale(1.0));
  dw::lora_conversion<float> c;
  const auto biggest = dwt::largest_allocation([&] { c = dw::to_lora(u, dw::lora_rank{8}); });
  MESSAGE("to_lora 600x500 LoHa rank 8: largest allocation ", biggest, " bytes (ΔW would be ", out * in * 4, ")");
  CHECK(biggest < std::size_t(out * in * sizeof(float)) / 4);
  const MatD D = (B1.cast<double>() * A1.cast<double>()).cwiseProduct(B2.cast<double>() * A2.cast<double>());
  CHECK(dwt::rel_err(product(c), D) < 1e-5);  // rank 8 = r1·r2: exact to fp32 rounding
}
