// Gradient-driven initialisations: LoRA-GA (both variants) and LoRA-SB, against dense SVDs
// (Eigen's JacobiSVD, independent of the BDCSVD/randomized code under test), the exact
// algebra of one SGD step, and central finite differences for the gradient helper.
#include "linalg/spectrum_util.hpp"

#include <Eigen/SVD>
#include <deltaw/autograd/ops.hpp>
#include <deltaw/init/lora_ga.hpp>
#include <deltaw/init/lora_sb.hpp>

#include <limits>
#include <vector>

namespace dw = deltaw;
using dwt::ColD;
using dwt::MatD;
using dw::index_t;
using dwt::MatF;

namespace {
struct dense_svd {
  ColD U;
  Eigen::VectorXd S;
  ColD V;
};
dense_svd jacobi(const MatD& M) {
  Eigen::JacobiSVD<ColD> svd(ColD(M), Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {svd.matrixU(), svd.singularValues(), svd.matrixV()};
}
/// Σ_{i in [a, a+k)} σ_i^p·u_i·v_iᵀ.
MatD svd_part(const dense_svd& d, Eigen::Index a, Eigen::Index k, double p = 1.0) {
  const Eigen::VectorXd w = d.S.segment(a, k).array().pow(p);
  return d.U.middleCols(a, k) * w.asDiagonal() * d.V.middleCols(a, k).transpose();
}
}  // namespace

TEST_CASE("lora_ga: the model is unchanged at init (both variants, double and float)") {
  for (const auto variant : {dw::lora_ga_variant::paper, dw::lora_ga_variant::peft}) {
    CAPTURE(int(variant));
    const MatD W0 = dwt::random(48, 40, 5);
    const MatD G = dwt::with_spectrum(48, 40, dwt::geometric_spectrum(40, 3.0, 0.8), 6);
    MatD W = W0;
    const auto f = dw::lora_ga(W, G, 4, 2.0, dw::lora_ga_options{.variant = variant});
    REQUIRE(f.B.rows() == 48);
    REQUIRE(f.B.cols() == 4);
    REQUIRE(f.A.rows() == 4);
    REQUIRE(f.A.cols() == 40);
    const double e = dwt::rel_err(MatD(W + 2.0 * f.B * f.A), W0);
    MESSAGE("lora_ga double variant ", int(variant), ": rel err of W_res + s·B·A vs W = ", e);
    CHECK(e < 1e-14);
    CHECK(dwt::rel_err(W, W0) > 1e-3);  // W really was offset
    // Through deltaw's lazy sum: X·(W_res + s·B·A)ᵀ = X·Wᵀ.
    const MatD X = dwt::random(6, 40, 9);
    CHECK(dwt::rel_err(MatD(dw::apply(dw::view(W) + f.adapter(), X)), MatD(X * W0.transpose())) < 1e-13);

    const MatF Wf0 = W0.cast<float>();
    MatF Wf = Wf0;
    const auto ff = dw::lora_ga(Wf, G.cast<float>().eval(), 4, 2.0, dw::lora_ga_options{.variant = variant});
    static_assert(std::is_same_v<decltype(ff.B)::Scalar, float>);
    const double ef = dwt::rel_err(MatD(Wf.cast<double>() + 2.0 * ff.B.cast<double>() * ff.A.cast<double>()), Wf0);
    MESSAGE("lora_ga float variant ", int(variant), ": rel err of W_res + s·B·A vs W = ", ef);
    // One rounding of W_res to float (the offset is computed in double from the stored factors).
    CHECK(ef < 2 * std::numeric_limits<float>::epsilon());
  }
}

TEST_CASE("lora_ga: one SGD step on A and B moves W_eff by the scaled rank-2r truncation of G") {
  // G with a clear gap at every index so the truncations are well defined.
  const Eigen::Index m = 64, n = 48, r = 3;
  const double s = 2.0, eta = 1e-6;
  const MatD G = dwt::with_spectrum(m, n, dwt::geometric_spectrum(n, 4.0, 0.75), 21);
  const dense_svd ref = jacobi(G);
  for (const auto variant : {dw::lora_ga_variant::paper, dw::lora_ga_variant::peft}) {
    CAPTURE(int(variant));
    MatD W = dwt::random(m, n, 22);
    const dw::lora_ga_options opt{.variant = variant};
    const auto f = dw::lora_ga(W, G, r, s, opt);
    const double zeta = std::pow(double(m), 0.25) / 4.0;  // out^{1/4}/√16
    CHECK(dw::lora_ga_zeta(m, opt) == doctest::Approx(zeta).epsilon(1e-15));

    // Factor gradients of L at W_eff = W_res + s·B·A when dL/dW_eff = G.
    const MatD gB = s * G * f.A.transpose();
    const MatD gA = s * f.B.transpose() * G;
    const MatD B1 = f.B - eta * gB, A1 = f.A - eta * gA;
    const MatD dW = s * (B1 * A1 - f.B * f.A);  // the change of W_eff (W_res is fixed)

    // Exact algebra: s(B'A' − BA) = −η s²(G AᵀA + B BᵀG) + η² s³ G Aᵀ Bᵀ G.
    const MatD first = -eta * s * s * (G * f.A.transpose() * f.A + f.B * f.B.transpose() * G);
    const MatD second = eta * eta * s * s * s * G * f.A.transpose() * f.B.transpose() * G;
    CHECK(dwt::rel_err(dW, MatD(first + second)) < 1e-12);

    // First order against the dense SVD of G.
    const MatD expected = variant == dw::lora_ga_variant::paper
                              ? MatD(s * s * zeta * zeta * svd_part(ref, 0, 2 * r))  // the rank-2r truncation
                              : MatD(s * s * (svd_part(ref, 0, r) + zeta * zeta * svd_part(ref, r, r, 3.0)));
    // Tolerance: the second-order term is bounded by η²s³‖G‖₂²‖A‖₂‖B‖₂ entrywise (a spectral
    // bound), so ‖dW/(−η) − first/(−η)‖_max ≤ η·s³·‖G‖₂²·‖A‖₂·‖B‖₂; plus the rounding of
    // B'A' − BA in double, ≈ s·‖B‖‖A‖·1e-16/η, divided by −η; plus the randomized SVD's
    // error (q = 4r, 4 power iterations on a 0.75-geometric spectrum: (0.75)^(2r·9) ≈ 1e-7
    // of a singular value at worst), which the factor 10 covers.
    const double nA = Eigen::JacobiSVD<ColD>(ColD(f.A)).singularValues()(0);
    const double nB = Eigen::JacobiSVD<ColD>(ColD(f.B)).singularValues()(0);
    const double second_bound = eta * s * s * s * ref.S(0) * ref.S(0) * nA * nB;
    const double round_bound = s * nA * nB * 1e-15 / eta;
    const double err = (MatD(dW / -eta) - expected).cwiseAbs().maxCoeff();
    MESSAGE("lora_ga one step, variant ", int(variant), ": max |ΔW_eff/(−η) − expected| = ", err,
            " (second-order bound ", second_bound, ", rounding bound ", round_bound, ", max |expected| = ",
            expected.cwiseAbs().maxCoeff(), ")");
    CHECK(err < 10 * (second_bound + round_bound) + 1e-6 * expected.cwiseAbs().maxCoeff());
    // First order means the residual shrinks with η: ten times smaller at η/10.
    const double eta2 = eta / 10;
    const MatD dW2 = s * ((f.B - eta2 * gB) * (f.A - eta2 * gA) - f.B * f.A);
    const double err2 = (MatD(dW2 / -eta2) - expected).cwiseAbs().maxCoeff();
    MESSAGE("  at η/10: ", err2);
    CHECK(err2 < 0.15 * err);
    // And the step is not the trivial one: it has rank 2r exactly.
    const dense_svd step = jacobi(dW);
    CHECK(step.S(2 * r - 1) > 1e-3 * step.S(0));
    CHECK(step.S(2 * r) < 1e-6 * step.S(0));
  }
}

TEST_CASE("lora_ga: factors against the dense SVD (paper: orthonormal scaled by ζ; PEFT: B carries S)") {
  const Eigen::Index m = 40, n = 56, r = 4;
  const MatD G = dwt::with_spectrum(m, n, dwt::geometric_spectrum(m, 2.0, 0.7), 31);
  const dense_svd ref = jacobi(G);
  MatD W = dwt::random(m, n, 32);
  // Exact SVD path and the unit scale.
  const auto p = dw::lora_ga(W, G, r, 1.0,
                             dw::lora_ga_options{.scale = dw::lora_ga_scale::unit, .power_iterations = -1});
  CHECK(dwt::subspace_diff(ColD(p.A.transpose()), ref.V.leftCols(r)) < 1e-10);
  CHECK(dwt::subspace_diff(ColD(p.B), ref.U.middleCols(r, r)) < 1e-10);
  CHECK((p.A * p.A.transpose() - MatD::Identity(r, r)).cwiseAbs().maxCoeff() < 1e-12);
  MatD W2 = dwt::random(m, n, 32);
  const auto q = dw::lora_ga(W2, G, r, 1.0, dw::lora_ga_options{.variant = dw::lora_ga_variant::peft});
  const double zeta = std::pow(double(m), 0.25) / 4.0;
  const ColD BtB = q.B.transpose() * q.B;
  for (Eigen::Index i = 0; i < r; ++i)
    CHECK(std::sqrt(BtB(i, i)) == doctest::Approx(zeta * ref.S(r + i)).epsilon(1e-8));
}

TEST_CASE("lora_ga: errors name the operation and the shapes") {
  MatD W = dwt::random(10, 12, 1);
  const MatD G = dwt::random(10, 12, 2);
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::lora_ga(W, G, 6, 1.0); }, {"deltaw::lora_ga", "r = 6", "[10, 12]"});
  const MatD G2 = dwt::random(12, 10, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)dw::lora_ga(W, G2, 2, 1.0); }, {"deltaw::lora_ga", "[12, 10]"});
  MatD Gn = G;
  Gn(3, 4) = std::numeric_limits<double>::quiet_NaN();
  dwt::check_throws_with<dw::non_finite_error>([&] { (void)dw::lora_ga(W, Gn, 2, 1.0); }, {"non-finite"});
  CHECK(dwt::rel_err(W, dwt::random(10, 12, 1)) == 0.0);  // untouched after the errors
}

TEST_CASE("estimate_weight_gradients: the mean dL/dW over batches, against central differences") {
  // A two-layer MLP y = relu(x·W1ᵀ)·W2ᵀ with an MSE loss; batches differ in x and target.
  const MatD W1 = dwt::random(7, 5, 41), W2 = dwt::random(3, 7, 42);
  const index_t batches = 3;
  std::vector<MatD> xs, ts;
  for (index_t b = 0; b < batches; ++b) {
    xs.push_back(dwt::random(4, 5, 50 + b));
    ts.push_back(dwt::random(4, 3, 60 + b));
  }
  const std::vector<dw::matrix_view<const double>> Ws{dw::view(W1), dw::view(W2)};
  namespace ag = dw::autograd;
  const auto G = dw::estimate_weight_gradients<double>(
      std::span<const dw::matrix_view<const double>>(Ws), batches,
      [&](ag::tape<double>& t, std::span<const ag::var<double>> W, index_t b) {
        const auto x = t.frozen(xs[std::size_t(b)]);
        const auto h = ag::relu(ag::matmul_nt(x, W[0]));
        const auto y = ag::matmul_nt(h, W[1]);
        return ag::mse(y, t.frozen(ts[std::size_t(b)]));
      });
  REQUIRE(G.size() == 2);
  // Reference: plain Eigen forward passes, central differences of the mean loss.
  const auto mean_loss = [&](const MatD& A1, const MatD& A2) {
    double L = 0.0;
    for (index_t b = 0; b < batches; ++b) {
      const MatD h = (xs[std::size_t(b)] * A1.transpose()).cwiseMax(0.0);
      L += (h * A2.transpose() - ts[std::size_t(b)]).squaredNorm() / double(ts[std::size_t(b)].size());
    }
    return L / double(batches);
  };
  const double h = 1e-6;
  double worst = 0.0;
  for (int which = 0; which < 2; ++which) {
    const MatD& Wi = which == 0 ? W1 : W2;
    MatD num(Wi.rows(), Wi.cols());
    for (Eigen::Index i = 0; i < Wi.rows(); ++i)
      for (Eigen::Index j = 0; j < Wi.cols(); ++j) {
        MatD P = Wi, M = Wi;
        P(i, j) += h;
        M(i, j) -= h;
        num(i, j) = which == 0 ? (mean_loss(P, W2) - mean_loss(M, W2)) / (2 * h)
                               : (mean_loss(W1, P) - mean_loss(W1, M)) / (2 * h);
      }
    worst = std::max(worst, dwt::rel_err(G[std::size_t(which)], num));
  }
  MESSAGE("estimate_weight_gradients vs central differences: rel err ", worst);
  CHECK(worst < 1e-7);
}

TEST_CASE("lora_sb_init: B·R·A is the best rank-r approximation of −η·sign(ΣG); W untouched or offset") {
  const Eigen::Index m = 36, n = 28, r = 5;
  const double lr = 2e-3;
  const MatD G = dwt::random(m, n, 71);
  const MatD D = G.unaryExpr([&](double g) { return g > 0 ? -lr : (g < 0 ? lr : 0.0); });
  const dense_svd ref = jacobi(D);

  const auto f = dw::lora_sb_init(G, r, dw::lora_sb_options{.lr = lr});
  CHECK(f.s == 1.0);
  REQUIRE(f.rank() == r);
  // B, A orthonormal; R = diag(Σ_r) non-increasing.
  CHECK((f.B.transpose() * f.B - MatD::Identity(r, r)).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((f.A * f.A.transpose() - MatD::Identity(r, r)).cwiseAbs().maxCoeff() < 1e-12);
  for (Eigen::Index i = 0; i < r; ++i) {
    CHECK(f.R(i, i) == doctest::Approx(ref.S(i)).epsilon(1e-12));
    for (Eigen::Index j = 0; j < r; ++j)
      if (i != j) CHECK(f.R(i, j) == 0.0);
  }
  // Eckart–Young: ‖D − B·R·A‖_F² = Σ_{i ≥ r} σ_i², and the truncation itself.
  const MatD BRA = dw::materialize(f.adapter());  // through the core_low_rank (LoRA-SB) update
  CHECK(dwt::rel_err(BRA, MatD(f.B * f.R * f.A)) < 1e-14);
  CHECK((D - BRA).squaredNorm() == doctest::Approx(ref.S.tail(ref.S.size() - r).squaredNorm()).epsilon(1e-10));
  CHECK(dwt::rel_err(BRA, svd_part(ref, 0, r)) < 1e-10);
  // The randomized path agrees on this spectrum to its own accuracy.
  const auto g = dw::lora_sb_init(G, r, dw::lora_sb_options{.lr = lr, .power_iterations = 6});
  const double er = dwt::rel_err(MatD(g.B * g.R * g.A), svd_part(ref, 0, r)) / lr;
  MESSAGE("lora_sb randomized (q = 6) vs exact truncation, relative to η: ", er);
  CHECK(er < 0.05);

  // offset_weight variant: W_res + B·R·A = W.
  for (int fl = 0; fl < 2; ++fl) {
    const MatD W0 = dwt::random(m, n, 72);
    if (fl == 0) {
      MatD W = W0;
      const auto h = dw::lora_sb_init_offset(W, G, r, dw::lora_sb_options{.lr = lr});
      CHECK(dwt::rel_err(MatD(W + dw::materialize(h.adapter())), W0) < 1e-15);
      CHECK(dwt::rel_err(MatD(dw::materialize(h.adapter())), BRA) < 1e-13);
    } else {
      MatF W = W0.cast<float>();
      const auto h = dw::lora_sb_init_offset(W, G.cast<float>().eval(), r, dw::lora_sb_options{.lr = lr});
      const MatD back = W.cast<double>() + h.B.cast<double>() * h.R.cast<double>() * h.A.cast<double>();
      CHECK(dwt::rel_err(back, MatD(W0.cast<float>().cast<double>())) < 2 * std::numeric_limits<float>::epsilon());
    }
  }
  dwt::check_throws_with<dw::argument_error>([&] { (void)dw::lora_sb_init(G, r, dw::lora_sb_options{.lr = 0.0}); },
                                             {"deltaw::lora_sb_init", "η₁"});
  dwt::check_throws_with<dw::rank_error>([&] { (void)dw::lora_sb_init(G, 29); }, {"deltaw::lora_sb_init", "29"});
}
