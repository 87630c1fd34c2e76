// LoRA+, LoRA-FA and ALLoRA: each method's defining property against a rule written out
// here from the chain rule of W' = W + s·B·A (G = ∂L/∂W' = Rᵀ·X for L = Σ R ⊙ (X·W'ᵀ)).
#include <deltaw/train/allora.hpp>
#include <deltaw/train/loop.hpp>
#include <deltaw/train/lora_fa.hpp>
#include <deltaw/train/lora_plus.hpp>

#include <cstdio>
#include <memory>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;
namespace op = deltaw::optim;
namespace tr = deltaw::train;

namespace {
constexpr Eigen::Index in = 7, out = 6, tokens = 5, rank = 3;

// A layer over W with a rank-3 LoRA whose B is non-zero (so that A gets a gradient).
struct setup {
  MatD W = dwt::random<MatD>(out, in, 1);
  nn::linear<double> layer{"l", deltaw::view(W)};
  explicit setup(std::uint64_t seed, double alpha = 6.0) {
    std::mt19937_64 g(seed);
    layer.attach(nn::adapter_kind::lora, rank, alpha, g);
    layer.lora_B()->value() = dwt::random<MatD>(out, rank, seed + 1);
  }
};
MatD inputs(std::uint64_t step) { return dwt::random<MatD>(tokens, in, 1000 + step); }
MatD weights(std::uint64_t step) { return dwt::random<MatD>(tokens, out, 2000 + step); }
// The tape views X (frozen leaves are never copied), so X must outlive the backward
// pass: the returned closure keeps the current batch alive.
auto loss_of(nn::linear<double>& l) {
  auto X = std::make_shared<MatD>();
  return [&l, X](ag::tape<double>& t, deltaw::index_t step) {
    *X = inputs(std::uint64_t(step));
    return ag::weighted_sum(l(t, t.frozen(*X)), weights(std::uint64_t(step)));
  };
}
MatD full_gradient(std::uint64_t step) { return weights(step).transpose() * inputs(step); }
tr::fit_options quiet(deltaw::index_t steps) {
  tr::fit_options o;
  o.steps = steps;
  o.log_every = 0;
  return o;
}
}  // namespace

TEST_CASE("LoRA+: B moves λ times as far as with plain AdamW on the first step, A as far") {
  setup plain(5), plus(5);
  op::adamw<double> o1(std::vector<P*>{plain.layer.lora_B(), plain.layer.lora_A()}, {0.01, 0.9, 0.999, 1e-12, 0.0});
  op::adamw<double> o2(std::vector<P*>{plus.layer.lora_B(), plus.layer.lora_A()}, {0.01, 0.9, 0.999, 1e-12, 0.0});
  tr::apply_lora_plus<double>(o2, {&plus.layer}, {16.0});
  CHECK(o2.lr_scale(plus.layer.lora_B()) == 16.0);
  CHECK(o2.lr_scale(plus.layer.lora_A()) == 1.0);
  const MatD A0 = plain.layer.lora_A()->value(), B0 = plain.layer.lora_B()->value();
  tr::fit<double>(loss_of(plain.layer), o1, {}, quiet(1));
  tr::fit<double>(loss_of(plus.layer), o2, {}, quiet(1));
  const MatD dB1 = plain.layer.lora_B()->value() - B0, dB2 = plus.layer.lora_B()->value() - B0;
  const MatD dA1 = plain.layer.lora_A()->value() - A0, dA2 = plus.layer.lora_A()->value() - A0;
  CHECK(dB1.norm() > 0);
  CHECK(dwt::rel_err(dB2, MatD(16.0 * dB1)) < 1e-12);
  CHECK(dwt::rel_err(dA2, dA1) < 1e-15);
  // First AdamW step: |Δ| = lr·λ in every entry of B (the sign of its gradient).
  const MatD gB = plain.layer.scale() * full_gradient(0) * A0.transpose();
  CHECK(dwt::rel_err(dB2, MatD(-0.16 * gB.array().sign().matrix())) < 1e-8);
  const MatD W2 = dwt::random<MatD>(out, in, 6);
  nn::linear<double> bare("bare", deltaw::view(W2));
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::apply_lora_plus<double>(o2, {&bare}); },
                                                 {"apply_lora_plus", "'bare'", "no adapter"});
}

TEST_CASE("LoRA-FA: A never changes over many steps; B's update is −lr·(1/s²)·g_B·(AAᵀ + εI)⁻¹") {
  setup st(7);
  auto& l = st.layer;
  const MatD A0 = l.lora_A()->value(), B0 = l.lora_B()->value();
  tr::lora_fa_options fo;
  fo.eps = 1e-3;  // large enough that dropping ε from the reference would be seen
  tr::lora_fa<double> fa({&l}, fo);
  CHECK_FALSE(l.lora_A()->trainable());
  std::vector<P*> ps;
  l.collect(ps);
  REQUIRE(ps.size() == 1u);  // B only
  CHECK(ps[0] == l.lora_B());
  const double lr = 0.05, s = l.scale();
  // The optimiser is given A too: it must still leave it alone.
  op::sgd<double> opt({l.lora_B(), l.lora_A()}, {lr, 0, 0, 0, false});
  tr::fit<double>(loss_of(l), opt, {&fa}, quiet(1));
  const MatD gB = s * full_gradient(0) * A0.transpose();  // LoRA gradient of B
  const MatD want = B0 - lr * (1.0 / (s * s)) * gB * (A0 * A0.transpose() + 1e-3 * MatD::Identity(rank, rank)).inverse();
  const double e = dwt::rel_err(l.lora_B()->value(), want);
  std::printf("LoRA-FA B update vs formula: rel err %.2e\n", e);
  CHECK(e < 1e-12);
  // Many more steps, with momentum and weight decay in AdamW: A is bit-identical.
  op::adamw<double> adam({l.lora_B(), l.lora_A()}, {0.01, 0.9, 0.999, 1e-8, 0.1});
  const auto r = tr::fit<double>(loss_of(l), adam, {&fa}, quiet(200));
  CHECK(r.steps_run == 200);
  CHECK((l.lora_A()->value().array() == A0.array()).all());
  CHECK(l.lora_A()->grad().norm() == 0);
  CHECK((l.lora_B()->value() - want).norm() > 0);
  // The free function against the same formula, and DoRA is refused.
  CHECK(dwt::rel_err(tr::lora_fa_gradient<double>(gB, A0, s, 0.0), MatD(gB * (A0 * A0.transpose()).inverse() / (s * s))) <
        1e-12);
  MatD W2 = dwt::random<MatD>(out, in, 9);
  nn::linear<double> d("d", deltaw::view(W2));
  std::mt19937_64 g(1);
  d.attach(nn::adapter_kind::dora, 2, 4.0, g);
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::lora_fa<double> bad({&d}); }, {"lora_fa", "'d'", "DoRA"});
}

TEST_CASE("ALLoRA: the update equals θ − lr·g/√(‖θ_row‖² + 1/β²), row-wise and whole-tensor") {
  using gran = tr::allora_options::granularity;
  for (auto gr : {gran::row, gran::tensor}) {
    INFO("granularity " << (gr == gran::row ? "row" : "tensor"));
    setup st(11, /*alpha*/ 9.0);
    auto& l = st.layer;
    tr::allora_options ao;
    ao.beta = 2.0;
    ao.norm = gr;
    tr::allora<double> al({&l}, ao);
    CHECK(l.scale() == 1.0);  // scaling-free
    const MatD A0 = l.lora_A()->value(), B0 = l.lora_B()->value();
    const double lr = 0.1;
    op::sgd<double> opt({l.lora_B(), l.lora_A()}, {lr, 0, 0, 0, false});
    tr::fit<double>(loss_of(l), opt, {&al}, quiet(1));
    // Written out: s = 1, g_B = G·Aᵀ, g_A = Bᵀ·G; coefficient per row or per tensor.
    const MatD G = full_gradient(0);
    const MatD gB = G * A0.transpose(), gA = B0.transpose() * G;
    auto rule = [&](const MatD& th, const MatD& gth) {
      MatD next = th;
      for (Eigen::Index i = 0; i < th.rows(); ++i) {
        const double nsq = gr == gran::row ? th.row(i).squaredNorm() : th.squaredNorm();
        next.row(i) -= lr * gth.row(i) / std::sqrt(nsq + 1.0 / (2.0 * 2.0));
      }
      return next;
    };
    CHECK(dwt::rel_err(l.lora_B()->value(), rule(B0, gB)) < 1e-14);
    CHECK(dwt::rel_err(l.lora_A()->value(), rule(A0, gA)) < 1e-14);

    // target::update with AdamW: the optimiser's step is scaled by the coefficient of θ
    // before the step. AdamW's first step is −lr·g/(|g| + ε).
    setup st2(11, 9.0);
    auto& l2 = st2.layer;
    ao.apply_to = tr::allora_options::target::update;
    tr::allora<double> al2({&l2}, ao);
    op::adamw<double> adam({l2.lora_B(), l2.lora_A()}, {lr, 0.9, 0.999, 1e-12, 0.0});
    tr::fit<double>(loss_of(l2), adam, {&al2}, quiet(1));
    const MatD signB = gB.array().sign().matrix(), signA = gA.array().sign().matrix();
    CHECK(dwt::rel_err(l2.lora_B()->value(), rule(B0, signB)) < 1e-10);
    CHECK(dwt::rel_err(l2.lora_A()->value(), rule(A0, signA)) < 1e-10);
  }
  // At θ = 0 (B at init) the coefficient is β.
  const auto c = tr::allora_coefficients<double>(MatD::Zero(4, 2), 3.0, gran::row);
  CHECK(c.minCoeff() == doctest::Approx(3.0));
  CHECK(c.maxCoeff() == doctest::Approx(3.0));
}
