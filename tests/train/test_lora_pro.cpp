// The symmetric Sylvester solver against the dense Kronecker form, and LoRA-Pro's defining
// property: its equivalent gradient is the projection P_B·G + G·P_A − P_B·G·P_A of the
// full gradient G onto the tangent space at B·A, with X optimal for closeness to the LoRA
// gradients. References are dense double computations written out in this file.
#include <deltaw/linalg/sylvester.hpp>
#include <deltaw/train/loop.hpp>
#include <deltaw/train/lora_pro.hpp>

#include <Eigen/QR>
#include <cstdio>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace la = deltaw::linalg;
namespace nn = deltaw::nn;
namespace op = deltaw::optim;
namespace tr = deltaw::train;
using ColD = Eigen::MatrixXd;

namespace {
// Column-major vec: vec(A·X + X·B) = (I_q ⊗ A + Bᵀ ⊗ I_p)·vec(X).
ColD kron(const ColD& a, const ColD& b) {
  ColD k(a.rows() * b.rows(), a.cols() * b.cols());
  for (Eigen::Index i = 0; i < a.rows(); ++i)
    for (Eigen::Index j = 0; j < a.cols(); ++j) k.block(i * b.rows(), j * b.cols(), b.rows(), b.cols()) = a(i, j) * b;
  return k;
}
ColD sylvester_operator(const ColD& A, const ColD& B) {
  return kron(ColD::Identity(B.rows(), B.rows()), A) + kron(B.transpose(), ColD::Identity(A.rows(), A.rows()));
}
ColD vec(const ColD& m) { return Eigen::Map<const ColD>(m.data(), m.size(), 1); }
ColD unvec(const ColD& v, Eigen::Index r, Eigen::Index c) { return Eigen::Map<const ColD>(v.data(), r, c); }
// A random symmetric positive semidefinite matrix of the given rank.
ColD spd(Eigen::Index n, Eigen::Index rank, std::uint64_t seed) {
  const ColD f = dwt::random<ColD>(n, rank, seed);
  return f * f.transpose();
}
MatD dense_projector_cols(const MatD& B) { return B * (B.transpose() * B).inverse() * B.transpose(); }  // P_B
MatD dense_projector_rows(const MatD& A) { return A.transpose() * (A * A.transpose()).inverse() * A; }  // P_A
}  // namespace

TEST_CASE("solve_sylvester_symmetric: A·X + X·B = C against the dense Kronecker solve") {
  for (auto [p, q] : {std::pair<Eigen::Index, Eigen::Index>{4, 4}, {5, 3}, {1, 6}, {8, 8}}) {
    const ColD A = spd(p, p, 10 + std::uint64_t(p)) + 0.1 * ColD::Identity(p, p);
    const ColD B = spd(q, q, 20 + std::uint64_t(q)) + 0.1 * ColD::Identity(q, q);
    const ColD C = dwt::random<ColD>(p, q, 30);
    const MatD X = la::solve_sylvester_symmetric<double>(A, B, C);
    const ColD want = unvec(sylvester_operator(A, B).partialPivLu().solve(vec(C)), p, q);
    INFO("p " << p << ", q " << q);
    CHECK(dwt::rel_err(X, want) < 1e-12);
    CHECK(dwt::rel_err(MatD(A * X + X * B), C) < 1e-12);
  }
  // Indefinite symmetric operands (no λ_i + μ_j near zero) still solve exactly.
  {
    ColD A = dwt::random<ColD>(4, 4, 40), B = dwt::random<ColD>(3, 3, 41);
    A = (A + A.transpose()).eval();
    B = (B + B.transpose()).eval();
    B.diagonal().array() += 5.0;
    const ColD C = dwt::random<ColD>(4, 3, 42);
    const MatD X = la::solve_sylvester_symmetric<double>(A, B, C);
    CHECK(dwt::rel_err(MatD(A * X + X * B), C) < 1e-11);
  }
}

TEST_CASE("solve_sylvester_symmetric: singular semidefinite operands give the minimum-norm least-squares solution") {
  // A and B both rank deficient: the Kronecker operator is singular; the pseudo-inverse
  // solution of the dense system is the reference.
  const ColD A = spd(5, 2, 50), B = spd(4, 1, 51);
  const ColD C = dwt::random<ColD>(5, 4, 52);
  const MatD X = la::solve_sylvester_symmetric<double>(A, B, C);
  const ColD K = sylvester_operator(A, B);
  Eigen::CompleteOrthogonalDecomposition<ColD> cod(K);
  cod.setThreshold(1e-10);
  const ColD want = unvec(cod.solve(vec(C)), 5, 4);
  CHECK(cod.rank() < K.rows());
  CHECK(dwt::rel_err(X, want) < 1e-10);
  // Zero operands (B = 0 in LoRA: BᵀB = 0) and a zero right-hand side give X = 0.
  CHECK(la::solve_sylvester_symmetric<double>(ColD::Zero(3, 3), spd(3, 3, 53), ColD::Zero(3, 3)).norm() == 0);
}

TEST_CASE("symmetric_pinv and the solvers' argument checks") {
  const ColD M = spd(4, 4, 60);
  CHECK(dwt::rel_err(la::symmetric_pinv<double>(M, 1e-3), MatD((M + 1e-3 * ColD::Identity(4, 4)).inverse())) < 1e-12);
  const ColD S = spd(5, 2, 61);  // rank 2
  Eigen::CompleteOrthogonalDecomposition<ColD> cod(S);
  cod.setThreshold(1e-10);
  CHECK(dwt::rel_err(la::symmetric_pinv<double>(S), MatD(cod.pseudoInverse())) < 1e-10);
  // At zero, pinv(0 + δ·I) = I/δ: the reference's damping, not a cut-off.
  CHECK(dwt::rel_err(MatD(1e-8 * la::symmetric_pinv<double>(ColD::Zero(3, 3), 1e-8)), MatD(MatD::Identity(3, 3))) < 1e-12);
  dwt::check_throws_with<deltaw::shape_error>(
      [] { la::solve_sylvester_symmetric<double>(ColD::Identity(3, 3), ColD::Identity(2, 2), ColD::Zero(2, 3)); },
      {"solve_sylvester_symmetric", "[3, 2]", "[2, 3]"});
  dwt::check_throws_with<deltaw::argument_error>(
      [] { la::symmetric_pinv<double>(dwt::random<ColD>(3, 3, 62)); }, {"symmetric_pinv", "not symmetric"});
  dwt::check_throws_with<deltaw::shape_error>([] { la::symmetric_pinv<double>(ColD::Zero(2, 3)); }, {"square", "[2, 3]"});
}

TEST_CASE("LoRA-Pro: the equivalent gradient is the tangent-space projection of the full gradient") {
  const Eigen::Index m = 20, n = 15, r = 4;
  const double s = 2.0;
  const MatD B = dwt::random<MatD>(m, r, 70), A = dwt::random<MatD>(r, n, 71), G = dwt::random<MatD>(m, n, 72);
  // The LoRA gradients by the chain rule of W' = W + s·B·A.
  const MatD gA = s * B.transpose() * G, gB = s * G * A.transpose();
  const MatD PB = dense_projector_cols(B), PA = dense_projector_rows(A);
  const MatD want = PB * G + G * PA - PB * G * PA;
  using xc = tr::lora_pro_options::x_choice;
  for (auto x : {xc::sylvester, xc::zero, xc::symmetry}) {
    INFO("x choice " << int(x));
    tr::lora_pro_options o;
    o.x = x;
    const auto g = tr::lora_pro_adjust(B, A, gA, gB, s, o);  // δ = 1e-8 as in the reference
    const MatD gt = tr::lora_pro_equivalent_gradient_dense(B, A, g.g_A, g.g_B, s);
    const double e = dwt::rel_err(gt, want);
    std::printf("LoRA-Pro g̃ vs projection (x choice %d, δ = 1e-8): rel err %.2e\n", int(x), e);
    CHECK(e < 1e-8);
    const auto f = tr::lora_pro_equivalent_gradient(B, A, g.g_A, g.g_B, s);
    CHECK(f.U.cols() == 2 * r);
    CHECK(dwt::rel_err(MatD(f.U * f.V), gt) < 1e-14);
    o.delta = 0;
    const auto g0 = tr::lora_pro_adjust(B, A, gA, gB, s, o);
    CHECK(dwt::rel_err(tr::lora_pro_equivalent_gradient_dense(B, A, g0.g_A, g0.g_B, s), want) < 1e-12);
  }
  // g̃ differs from the plain LoRA one (s·B·g_Aᴸ + s·g_Bᴸ·A), so the test can fail.
  CHECK(dwt::rel_err(tr::lora_pro_equivalent_gradient_dense(B, A, gA, gB, s), want) > 1e-2);
}

TEST_CASE("LoRA-Pro: the Sylvester X makes (g_A, g_B) the closest to the LoRA gradients") {
  // Over all X the adjusted pair is (g_A + Z·A, g_B − B·Z) with the same g̃; the distance
  // ‖g_A − g_Aᴸ‖² + ‖g_B − g_Bᴸ‖² is stationary in Z iff (g_A − g_Aᴸ)·Aᵀ = Bᵀ·(g_B − g_Bᴸ).
  const Eigen::Index m = 12, n = 9, r = 3;
  const double s = 0.5;
  const MatD B = dwt::random<MatD>(m, r, 80), A = dwt::random<MatD>(r, n, 81), G = dwt::random<MatD>(m, n, 82);
  const MatD gA = s * B.transpose() * G, gB = s * G * A.transpose();
  auto stationarity = [&](tr::lora_pro_options::x_choice x) {
    tr::lora_pro_options o;
    o.x = x;
    o.delta = 0;
    const auto g = tr::lora_pro_adjust(B, A, gA, gB, s, o);
    const MatD res = (g.g_A - gA) * A.transpose() - B.transpose() * (g.g_B - gB);
    return res.norm() / (gA.norm() * A.norm() + B.norm() * gB.norm());
  };
  const double syl = stationarity(tr::lora_pro_options::x_choice::sylvester);
  const double zero = stationarity(tr::lora_pro_options::x_choice::zero);
  std::printf("LoRA-Pro stationarity residual: Sylvester X %.2e, X = 0 %.2e\n", syl, zero);
  CHECK(syl < 1e-12);
  CHECK(zero > 1e-3);
}

TEST_CASE("LoRA-Pro method: through the tape, the rewritten gradients give the projected chain-rule gradient") {
  const Eigen::Index in = 7, out = 6, tokens = 5;
  const MatD W = dwt::random<MatD>(out, in, 90), X = dwt::random<MatD>(tokens, in, 91), R = dwt::random<MatD>(tokens, out, 92);
  nn::linear<double> layer("l", deltaw::view(W));
  std::mt19937_64 g(3);
  layer.attach(nn::adapter_kind::lora, 2, 4.0, g);
  layer.lora_B()->value() = dwt::random<MatD>(out, 2, 93);
  // δ = 0 here: A's Gram matrix has eigenvalues ≈ 0.3, where δ = 1e-8 alone moves g̃ by ~6e-8.
  tr::lora_pro_options po;
  po.delta = 0;
  tr::lora_pro<double> pro({&layer}, po);
  ag::tape<double> t;
  t.backward(ag::weighted_sum(layer(t, t.frozen(X)), R));
  pro.after_backward({});
  // loss = Σ R ⊙ (X·W'ᵀ) ⇒ G = ∂loss/∂W' = Rᵀ·X.
  const MatD G = R.transpose() * X;
  const MatD& Bv = layer.lora_B()->value();
  const MatD& Av = layer.lora_A()->value();
  const MatD PB = dense_projector_cols(Bv), PA = dense_projector_rows(Av);
  const MatD gt = tr::lora_pro_equivalent_gradient_dense(Bv, Av, layer.lora_A()->grad(), layer.lora_B()->grad(), layer.scale());
  CHECK(dwt::rel_err(gt, MatD(PB * G + G * PA - PB * G * PA)) < 1e-12);
  // A frozen factor is refused.
  layer.lora_A()->set_trainable(false);
  dwt::check_throws_with<deltaw::argument_error>([&] { pro.after_backward({}); }, {"lora_pro", "'l'", "frozen"});
}

TEST_CASE("LoRA-Pro full-size AdamW: the first step moves W' along −lr·projection of the Adam direction") {
  const Eigen::Index in = 9, out = 8, tokens = 6, r = 3;
  const MatD W = dwt::random<MatD>(out, in, 100), X = dwt::random<MatD>(tokens, in, 101),
             R = dwt::random<MatD>(tokens, out, 102);
  nn::linear<double> layer("l", deltaw::view(W));
  std::mt19937_64 g(4);
  layer.attach(nn::adapter_kind::lora, r, 6.0, g);
  layer.lora_B()->value() = dwt::random<MatD>(out, r, 103);
  const MatD A0 = layer.lora_A()->value(), B0 = layer.lora_B()->value();
  const double s = layer.scale(), lr = 1e-3;
  tr::lora_pro_adamw_options o;
  o.lr = lr;
  o.eps = 1e-12;
  o.report = nullptr;
  tr::lora_pro_adamw<double> opt({&layer}, o);
  CHECK(opt.state_bytes() == 2 * out * in * Eigen::Index(sizeof(double)));
  CHECK(opt.parameters().size() == 2u);
  tr::fit_options fo;
  fo.steps = 1;
  fo.log_every = 0;
  tr::fit<double>([&](ag::tape<double>& t, deltaw::index_t) { return ag::weighted_sum(layer(t, t.frozen(X)), R); }, opt,
                  {}, fo);
  // Step 1: m̂ = g̃, v̂ = g̃², so D = g̃/(|g̃| + ε), with g̃ = proj(G) computed densely here.
  const MatD G = R.transpose() * X;
  auto proj = [&](const MatD& M) {
    const MatD PB = dense_projector_cols(B0), PA = dense_projector_rows(A0);
    return MatD(PB * M + M * PA - PB * M * PA);
  };
  const MatD gt = proj(G);
  const MatD D = (gt.array() / (gt.array().abs() + 1e-12)).matrix();
  CHECK(dwt::rel_err(opt.first_moment(0), MatD(0.1 * gt)) < 1e-8);
  const MatD dA = layer.lora_A()->value() - A0, dB = layer.lora_B()->value() - B0;
  const MatD first_order = s * (B0 * dA + dB * A0);
  const double e = dwt::rel_err(MatD(first_order / lr), MatD(-proj(D)));
  std::printf("LoRA-Pro full-moment step: first-order ΔW' vs −lr·proj(D), rel err %.2e\n", e);
  CHECK(e < 1e-7);
  CHECK(layer.lora_A()->grad().norm() == 0);  // fit zeroed the gradients
}

TEST_CASE("LoRA-Pro full-size AdamW, decay_base_weight: W' = (1 − lr·wd)·W; the effective update is the written-out rule") {
  const Eigen::Index in = 9, out = 8, r = 3;
  const double lr = 2e-2, wd = 0.5, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  MatD W = dwt::random<MatD>(out, in, 110);
  const MatD W0 = W;
  nn::linear<double> layer("proj", deltaw::view(std::as_const(W)));
  std::mt19937_64 g(5);
  layer.attach(nn::adapter_kind::lora, r, 6.0, g);
  layer.lora_B()->value() = dwt::random<MatD>(out, r, 111);
  const MatD A0 = layer.lora_A()->value(), B0 = layer.lora_B()->value();
  const double s = layer.scale();
  tr::lora_pro_adamw_options o;
  o.lr = lr;
  o.weight_decay = wd;
  o.decay_base_weight = true;
  o.adjust.delta = 0;  // exact inverses, as the dense reference below
  o.report = nullptr;

  // Zero gradient: the moments stay zero, D = 0, and only the decay acts.
  {
    tr::lora_pro_adamw<double> opt({&layer}, o, {deltaw::view(W)});
    layer.lora_A()->zero_grad();
    layer.lora_B()->zero_grad();
    opt.step();
    CHECK(W == MatD((1 - lr * wd) * W0));  // the reference's rule, bit for bit
    CHECK(layer.lora_A()->value() == MatD(std::sqrt(1 - lr * wd) * A0));
    CHECK(layer.lora_B()->value() == MatD(std::sqrt(1 - lr * wd) * B0));
    const MatD eff0 = W0 + s * B0 * A0, eff1 = W + s * layer.lora_B()->value() * layer.lora_A()->value();
    CHECK(dwt::rel_err(eff1, MatD((1 - lr * wd) * eff0)) < 1e-15);
  }

  // A real gradient G = ∂L/∂W' (LoRA gradients s·Bᵀ·G, s·G·Aᵀ), first step of a fresh optimiser.
  W = W0;
  layer.lora_A()->value() = A0;
  layer.lora_B()->value() = B0;
  tr::lora_pro_adamw<double> opt({&layer}, o, {deltaw::view(W)});
  const MatD G = dwt::random<MatD>(out, in, 112);
  layer.lora_A()->grad() = s * B0.transpose() * G;
  layer.lora_B()->grad() = s * G * A0.transpose();
  opt.step();
  // Written out densely: g̃ = P_B·G + G·P_A − P_B·G·P_A, Adam's first step on it, the LoRA
  // gradients of D, X from the Kronecker form of the Sylvester equation, then the factors.
  const MatD PB = dense_projector_cols(B0), PA = dense_projector_rows(A0);
  const MatD gt = PB * G + G * PA - PB * G * PA;
  const MatD m = (1 - b1) * gt, v = (1 - b2) * gt.cwiseProduct(gt);
  const MatD D = ((m / (1 - b1)).array() / ((v / (1 - b2)).array().sqrt() + eps)).matrix();
  const MatD gA = s * B0.transpose() * D, gB = s * D * A0.transpose();
  const MatD BtBi = (B0.transpose() * B0).inverse(), AAti = (A0 * A0.transpose()).inverse();
  const ColD C = -(1 / (s * s)) * BtBi * gA * A0.transpose();
  const ColD Xs = unvec(sylvester_operator(B0.transpose() * B0, A0 * A0.transpose()).lu().solve(vec(C)), r, r);
  const MatD X = Xs;
  const MatD nA = (1 / (s * s)) * BtBi * gA + X * A0;
  const MatD nB = (1 / (s * s)) * (MatD::Identity(out, out) - PB) * gB * AAti - B0 * X;
  const double d = std::sqrt(1 - lr * wd);
  const MatD want = (1 - lr * wd) * W0 + s * (d * B0 - lr * nB) * (d * A0 - lr * nA);
  const MatD got = W + s * layer.lora_B()->value() * layer.lora_A()->value();
  const double e = dwt::rel_err(got, want);
  std::printf("LoRA-Pro full-moment step with base decay: effective W + s·B·A vs the written-out rule, rel err %.2e\n", e);
  CHECK(e < 1e-12);
  CHECK(W == MatD((1 - lr * wd) * W0));
  // Without the option the base weight is not written; the rest of the step is the same.
  MatD W2 = W0;
  layer.lora_A()->value() = A0;
  layer.lora_B()->value() = B0;
  o.decay_base_weight = false;
  tr::lora_pro_adamw<double> plain({&layer}, o);
  layer.lora_A()->grad() = s * B0.transpose() * G;
  layer.lora_B()->grad() = s * G * A0.transpose();
  plain.step();
  CHECK(W2 == W0);
  CHECK(dwt::rel_err(MatD(W0 + s * layer.lora_B()->value() * layer.lora_A()->value()),
                     MatD(want - (1 - lr * wd) * W0 + W0)) < 1e-12);
}

TEST_CASE("LoRA-Pro full-size AdamW, decay_base_weight: a read-only W throws, naming the layer") {
  const MatD W = dwt::random<MatD>(4, 5, 120);
  MatD other = W;
  nn::linear<double> layer("attn.q", deltaw::view(W));
  std::mt19937_64 g(6);
  layer.attach(nn::adapter_kind::lora, 2, 4.0, g);
  tr::lora_pro_adamw_options o;
  o.weight_decay = 0.1;
  o.report = nullptr;
  o.decay_base_weight = true;
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::lora_pro_adamw<double> opt({&layer}, o); },
                                                 {"lora_pro_adamw", "'attn.q'", "read-only", "base_weights"});
  // A mutable view of other memory is not the layer's W.
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { tr::lora_pro_adamw<double> opt({&layer}, o, {deltaw::view(other)}); },
      {"base_weights[0]", "'attn.q'", "[4, 5]"});
  o.decay_base_weight = false;
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { tr::lora_pro_adamw<double> opt({&layer}, o, {deltaw::view(other)}); }, {"decay_base_weight is off"});
}
