// Masked composition (deltaw/serve/masked.hpp, serve/autograd.hpp): the forward pass
// against the dense per-token sum in double, the VJP by central differences (LoRA through
// the tape) and against the dense formulas (other types).
#include <deltaw/serve/autograd.hpp>
#include <deltaw/serve/batch.hpp>
#include <deltaw/serve/masked.hpp>

#include <random>
#include <variant>

#include "../autograd/grad_util.hpp"
#include "test_util.hpp"

namespace dw = deltaw;
namespace sv = deltaw::serve;
using dwt::MatD;

namespace {

/// Y = X·Wᵀ + Σ_k diag(M(:, k))·X·ΔW_kᵀ, dense, in double.
MatD reference(const MatD& W, const std::vector<MatD>& dW, const MatD& M, const MatD& X) {
  MatD Y = X * W.transpose();
  for (std::size_t k = 0; k < dW.size(); ++k) Y += M.col(Eigen::Index(k)).asDiagonal() * (X * dW[k].transpose());
  return Y;
}

/// Soft masks with exact zeros (a fraction `zeros` of the entries) and one all-zero column.
MatD soft_masks(Eigen::Index tokens, Eigen::Index K, std::uint64_t seed, double zeros = 0.3) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(0, 1);
  MatD M(tokens, K);
  for (Eigen::Index t = 0; t < tokens; ++t)
    for (Eigen::Index k = 0; k < K; ++k) M(t, k) = u(g) < zeros ? 0.0 : 2 * u(g) - 0.5;
  if (K > 2) M.col(K - 1).setZero();
  return M;
}

}  // namespace

TEST_CASE("apply_masked: LoRA of mixed ranks under soft masks, in double; one-hot masks give the batch") {
  const Eigen::Index out = 19, in = 14;
  const MatD W = dwt::random<MatD>(out, in, 1);
  const std::vector<dw::index_t> ranks = {1, 4, 7, 2};
  std::vector<MatD> B, A, dense;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    B.push_back(dwt::random<MatD>(out, ranks[i], 10 + i));
    A.push_back(dwt::random<MatD>(ranks[i], in, 20 + i));
  }
  std::vector<dw::low_rank<double>> u;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    u.push_back(dw::lora(B[i], A[i], dw::scale(0.3 + 0.4 * double(i))));
    dense.push_back(dw::materialize(u.back()));
  }
  for (const Eigen::Index tokens : {1, 9, 33}) {
    CAPTURE(tokens);
    const MatD X = dwt::random<MatD>(tokens, in, 30 + tokens);
    const MatD M = soft_masks(tokens, Eigen::Index(u.size()), 40 + tokens);
    MatD Y(tokens, out);
    sv::apply_masked(W, u, M, X, Y);
    CHECK(dwt::rel_err(Y, reference(W, dense, M, X)) <= 1e-12);
    // All-ones masks: the plain sum W + ΔW_0 + … + ΔW_3.
    MatD Y1(tokens, out);
    const MatD ones = MatD::Ones(tokens, Eigen::Index(u.size()));
    sv::apply_masked(W, u, ones, X, Y1);
    const MatD Ysum = dw::apply(dw::view(W) + u[0] + u[1] + u[2] + u[3], X);
    CHECK(dwt::rel_err(Y1, Ysum) <= 1e-12);
    // One-hot rows: the heterogeneous batch.
    std::vector<dw::index_t> idx(static_cast<std::size_t>(tokens));
    MatD H = MatD::Zero(tokens, Eigen::Index(u.size()));
    for (Eigen::Index t = 0; t < tokens; ++t) {
      idx[std::size_t(t)] = t % 5 == 4 ? sv::no_adapter : dw::index_t(t % 4);
      if (idx[std::size_t(t)] >= 0) H(t, idx[std::size_t(t)]) = 1.0;
    }
    MatD Yh(tokens, out), Yb(tokens, out);
    sv::apply_masked(W, u, H, X, Yh);
    sv::apply_lora_batch(W, u, idx, X, Yb);
    CHECK(dwt::rel_err(Yh, Yb) <= 1e-12);
  }
  // Float arithmetic against the same reference.
  const Eigen::Index tokens = 21;
  const MatD X = dwt::random<MatD>(tokens, in, 50);
  const MatD M = soft_masks(tokens, Eigen::Index(u.size()), 51);
  const dwt::MatF Xf = X.cast<float>(), Mf = M.cast<float>();
  dwt::MatF Yf(tokens, out);
  sv::apply_masked(W, u, Mf, Xf, Yf);
  CHECK(dwt::rel_err(Yf, reference(W, dense, Mf.cast<double>(), Xf.cast<double>())) <= 1e-5);
  // Shapes.
  const MatD ones3 = MatD::Ones(tokens, 3);
  dwt::check_throws_with<dw::shape_error>([&] { sv::apply_masked(W, u, ones3, X, Yf); },
                                          {"apply_masked", "[21, 3]", "4 updates"});
}

TEST_CASE("apply_masked: other update types (variants) against the dense sum") {
  const Eigen::Index out = 12, in = 16, tokens = 25;
  const MatD W = dwt::random<MatD>(out, in, 1);
  const MatD B = dwt::random<MatD>(out, 3, 2), A = dwt::random<MatD>(3, in, 3);
  const MatD B1 = dwt::random<MatD>(out, 2, 5), A1 = dwt::random<MatD>(2, in, 6), B2 = dwt::random<MatD>(out, 2, 7),
             A2 = dwt::random<MatD>(2, in, 8);
  const MatD k1 = dwt::random<MatD>(3, 4, 12), k2 = dwt::random<MatD>(4, 4, 13);
  const Eigen::VectorXd m = Eigen::VectorXd::Constant(out, 1.3) + 0.1 * dwt::random<MatD>(out, 1, 4).col(0);
  const MatD Q = 0.2 * dwt::random<MatD>(in / 4, 6, 10);
  auto lora = dw::lora(B, A, dw::alpha(6));
  auto loha = dw::loha(B1, A1, B2, A2, dw::alpha(4));
  auto kron = dw::kron(k1, k2, dw::scale(0.5));
  auto dora = dw::dora(W, lora, m);
  auto oft = dw::oft(W, Q);
  using V = std::variant<decltype(lora), decltype(loha), decltype(kron), decltype(dora), decltype(oft)>;
  const std::vector<V> ups = {lora, loha, kron, dora, oft};
  std::vector<MatD> dense;
  for (const auto& v : ups) dense.push_back(std::visit([](const auto& u) { return MatD(dw::materialize(u)); }, v));
  const MatD X = dwt::random<MatD>(tokens, in, 20);
  const MatD M = soft_masks(tokens, Eigen::Index(ups.size()), 21, 0.25);
  MatD Y(tokens, out);
  sv::apply_masked(W, ups, M, X, Y);
  CHECK(dwt::rel_err(Y, reference(W, dense, M, X)) <= 1e-12);
}

TEST_CASE("masked_backward: dM and dX against the dense formulas, factors against each type's VJP of diag(m)·dY") {
  const Eigen::Index out = 12, in = 16, tokens = 17;
  const MatD W = dwt::random<MatD>(out, in, 1);
  const MatD B = dwt::random<MatD>(out, 3, 2), A = dwt::random<MatD>(3, in, 3);
  const MatD B1 = dwt::random<MatD>(out, 2, 5), A1 = dwt::random<MatD>(2, in, 6), B2 = dwt::random<MatD>(out, 2, 7),
             A2 = dwt::random<MatD>(2, in, 8);
  const MatD k1 = dwt::random<MatD>(3, 4, 12), k2 = dwt::random<MatD>(4, 4, 13);
  auto lora = dw::lora(B, A, dw::alpha(6));
  auto loha = dw::loha(B1, A1, B2, A2, dw::alpha(4));
  auto kron = dw::kron(k1, k2, dw::scale(0.5));
  using V = std::variant<decltype(lora), decltype(loha), decltype(kron)>;
  const std::vector<V> ups = {lora, loha, kron};
  std::vector<MatD> dense;
  for (const auto& v : ups) dense.push_back(std::visit([](const auto& u) { return MatD(dw::materialize(u)); }, v));
  const MatD X = dwt::random<MatD>(tokens, in, 20);
  const MatD M = soft_masks(tokens, 3, 21, 0.3);
  const MatD dY = dwt::random<MatD>(tokens, out, 22);
  MatD dM = MatD::Zero(tokens, 3), dX = MatD::Zero(tokens, in);
  // Factor slots for LoRA (B, A) and LoHa (B1, A1, B2, A2); none for the Kronecker update.
  MatD gB = MatD::Zero(out, 3), gA = MatD::Zero(3, in);
  MatD gB1 = MatD::Zero(out, 2), gA1 = MatD::Zero(2, in), gB2 = MatD::Zero(out, 2), gA2 = MatD::Zero(2, in);
  sv::masked_grads<double> g;
  g.dM = dw::view(dM);
  g.dX = dw::view(dX);
  g.factors = {{dw::view(gB), dw::view(gA)}, {dw::view(gB1), dw::view(gA1), dw::view(gB2), dw::view(gA2)}, {}};
  sv::masked_backward<double>(W, ups, M, X, dY, g);
  MatD dM_ref(tokens, 3), dX_ref = dY * W;
  for (Eigen::Index k = 0; k < 3; ++k) {
    dM_ref.col(k) = (dY.array() * (X * dense[std::size_t(k)].transpose()).array()).rowwise().sum();
    dX_ref += M.col(k).asDiagonal() * dY * dense[std::size_t(k)];
  }
  CHECK(dwt::rel_err(dM, dM_ref) <= 1e-12);
  CHECK(dwt::rel_err(dX, dX_ref) <= 1e-12);
  // LoRA's factor gradients in closed form: dΔW = (diag(m)·dY)ᵀ·X, dB = s·dΔW·Aᵀ, dA = s·Bᵀ·dΔW.
  const MatD dDW = (M.col(0).asDiagonal() * dY).transpose() * X;
  CHECK(dwt::rel_err(gB, lora.scale() * dDW * A.transpose()) <= 1e-12);
  CHECK(dwt::rel_err(gA, lora.scale() * B.transpose() * dDW) <= 1e-12);
  // LoHa: ΔW = s·(B1·A1) ⊙ (B2·A2); dB1 = s·(dΔW1 ⊙ (B2·A2))·A1ᵀ with dΔW1 = (diag(m)·dY)ᵀ·X.
  const MatD dDW1 = (M.col(1).asDiagonal() * dY).transpose() * X;
  const MatD P1 = B1 * A1, P2 = B2 * A2;
  const double sh = std::get<1>(ups[1]).scale();
  CHECK(dwt::rel_err(gB1, sh * (dDW1.array() * P2.array()).matrix() * A1.transpose()) <= 1e-12);
  CHECK(dwt::rel_err(gA2, sh * B2.transpose() * (dDW1.array() * P1.array()).matrix()) <= 1e-12);
  // Slots accumulate: a second call doubles every gradient.
  const MatD dM1 = dM, gB1c = gB1;
  sv::masked_backward<double>(W, ups, M, X, dY, g);
  CHECK(dwt::rel_err(dM, 2 * dM1) <= 1e-14);
  CHECK(dwt::rel_err(gB1, 2 * gB1c) <= 1e-14);
}

TEST_CASE("masked_lora on the tape: central differences for x, the masks and every adapter's B and A") {
  namespace ag = deltaw::autograd;
  const Eigen::Index out = 7, in = 6, tokens = 5;
  const MatD W = dwt::random<MatD>(out, in, 1);
  auto x = dwag::param("x", tokens, in, 2);
  auto m = dwag::param("m", tokens, 3, 3);
  m->value()(0, 0) = 0.0;  // a zero weight still gets its gradient
  m->value()(2, 1) = 0.0;
  m->value()(4, 2) = 0.0;
  auto B0 = dwag::param("B0", out, 1, 4), A0 = dwag::param("A0", 1, in, 5);
  auto B1 = dwag::param("B1", out, 3, 6), A1 = dwag::param("A1", 3, in, 7);
  auto B2 = dwag::param("B2", out, 2, 8), A2 = dwag::param("A2", 2, in, 9);
  const std::vector<double> s = {0.5, 1.25, -0.75};
  auto f = [&](ag::tape<double>& t) {
    std::vector<sv::lora_vars<double>> ad = {
        {t.param(*B0), t.param(*A0), s[0]}, {t.param(*B1), t.param(*A1), s[1]}, {t.param(*B2), t.param(*A2), s[2]}};
    return sv::masked_lora(dw::matrix_view<const double>(W.data(), out, in), t.param(*x), t.param(*m), ad);
  };
  dwag::check("masked_lora", f, {x.get(), m.get(), B0.get(), A0.get(), B1.get(), A1.get(), B2.get(), A2.get()}, 77);
}
