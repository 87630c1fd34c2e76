// The VJPs of the update types (LoRA, rsLoRA, DoRA) against central differences in
// double over random shapes: gradients of every trainable factor and of the input.
#include "grad_util.hpp"

using namespace dwag;

namespace {
struct layer_case {
  Eigen::Index tokens, out, in, r;
};
layer_case random_case(std::mt19937_64& g) {
  const auto in = dim(g, 1, 7), out = dim(g, 1, 7);
  return {dim(g, 1, 5), out, in, dim(g, 1, std::max<int>(1, int(std::min(in, out)) + 1))};
}
}  // namespace

TEST_CASE("VJP of LoRA and rsLoRA: gradients of B, A and x") {
  std::mt19937_64 g(11);
  double worst = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const auto c = random_case(g);
    const MatD W = dwt::random<MatD>(c.out, c.in, 10 + trial);
    auto x = param("x", c.tokens, c.in, 20 + trial), B = param("B", c.out, c.r, 30 + trial),
         A = param("A", c.r, c.in, 40 + trial);
    for (bool rs : {false, true}) {
      const double s = rs ? 8.0 / std::sqrt(double(c.r)) : 8.0 / double(c.r);
      worst = std::max(worst, check(std::string(rs ? "rslora" : "lora") + " [" + std::to_string(c.tokens) + "x" +
                                        std::to_string(c.in) + "->" + std::to_string(c.out) + ", r" +
                                        std::to_string(c.r) + "]",
                                    [&](auto& t) {
                                      return ag::lora_linear(t.param(*x), deltaw::view(W), t.param(*B), t.param(*A), s);
                                    },
                                    {x.get(), B.get(), A.get()}, trial));
    }
  }
  std::printf("gradcheck lora/rslora: worst relative error %.2e\n", worst);
}

TEST_CASE("VJP of LoRA: forward equals the dense reference, frozen W untouched and not copied") {
  const MatD W = dwt::random<MatD>(5, 4, 1), X = dwt::random<MatD>(3, 4, 2), B = dwt::random<MatD>(5, 2, 3),
             A = dwt::random<MatD>(2, 4, 4);
  P pB("B", B), pA("A", A);
  ag::tape<double> t;
  const auto y = ag::lora_linear(t.frozen(X), deltaw::view(W), t.param(pB), t.param(pA), 0.5);
  const MatD ref = X * (W + 0.5 * B * A).transpose();
  CHECK(dwt::rel_err(MatD(y.value()), ref) < 1e-14);
  // the tape's frozen node views the caller's memory
  CHECK(t.value(t.frozen(X)).data() == X.data());
}

TEST_CASE("VJP of DoRA (row norms detached): gradients of B, A, m and x") {
  std::mt19937_64 g(13);
  double worst = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const auto c = random_case(g);
    const MatD W = dwt::random<MatD>(c.out, c.in, 50 + trial);
    auto x = param("x", c.tokens, c.in, 60 + trial), B = param("B", c.out, c.r, 70 + trial, 0.5),
         A = param("A", c.r, c.in, 80 + trial, 0.5), m = param("m", 1, c.out, 90 + trial);
    const double s = 2.0 / double(c.r);
    // The norms are held at their value at the base point, as the detached backward assumes.
    const auto l = deltaw::lora(B->value(), A->value(), deltaw::scale(s));
    auto norms = std::make_shared<const std::vector<double>>(deltaw::cpu::dora_row_norms<double>(deltaw::view(std::as_const(W)), l));
    worst = std::max(worst, check("dora [" + std::to_string(c.tokens) + "x" + std::to_string(c.in) + "->" +
                                      std::to_string(c.out) + ", r" + std::to_string(c.r) + "]",
                                  [&](auto& t) {
                                    return ag::dora_linear(t.param(*x), deltaw::view(W), t.param(*B), t.param(*A),
                                                           t.param(*m), s, norms);
                                  },
                                  {x.get(), B.get(), A.get(), m.get()}, trial));
  }
  std::printf("gradcheck dora: worst relative error %.2e\n", worst);
}

TEST_CASE("DoRA forward (norms recomputed) equals the dense formula; gradient equals the detached one") {
  const MatD W = dwt::random<MatD>(6, 5, 1), X = dwt::random<MatD>(4, 5, 2), B = dwt::random<MatD>(6, 3, 3),
             A = dwt::random<MatD>(3, 5, 4), m = dwt::random<MatD>(1, 6, 5);
  const double s = 0.7;
  const MatD Wl = W + s * B * A;
  MatD Wp = Wl;
  for (Eigen::Index o = 0; o < 6; ++o) Wp.row(o) *= m(0, o) / Wl.row(o).norm();
  P pB("B", B), pA("A", A), pm("m", m);
  ag::tape<double> t;
  const auto y = ag::dora_linear(t.frozen(X), deltaw::view(W), t.param(pB), t.param(pA), t.param(pm), s);
  CHECK(dwt::rel_err(MatD(y.value()), MatD(X * Wp.transpose())) < 1e-13);
  // dm by the detached formula: dm_o = Σ_t dY·(X·(W + sBA)ᵀ)[t, o] / n_o with dY = 1.
  t.backward(ag::sum(y));
  const MatD Pm = X * Wl.transpose();
  for (Eigen::Index o = 0; o < 6; ++o) CHECK(pm.grad()(0, o) == doctest::Approx(Pm.col(o).sum() / Wl.row(o).norm()).epsilon(1e-12));
}

TEST_CASE("VJP of the core low-rank form s·B·R·A (LoRA-XS / LaMDA): gradients of B, R, A and x") {
  std::mt19937_64 g(17);
  double worst = 0;
  for (int trial = 0; trial < 5; ++trial) {
    const auto c = random_case(g);
    const auto r1 = dim(g, 1, 4), r2 = dim(g, 1, 4);
    const MatD W = dwt::random<MatD>(c.out, c.in, 110 + trial);
    auto x = param("x", c.tokens, c.in, 120 + trial), B = param("B", c.out, r1, 130 + trial),
         R = param("R", r1, r2, 140 + trial), A = param("A", r2, c.in, 150 + trial);
    const double s = 1.5;
    worst = std::max(worst, check("core_lora [" + std::to_string(c.tokens) + "x" + std::to_string(c.in) + "->" +
                                      std::to_string(c.out) + ", r" + std::to_string(r1) + "x" + std::to_string(r2) + "]",
                                  [&](auto& t) {
                                    return ag::adapted_linear<double, 3>(
                                        t.param(*x), deltaw::view(W), {t.param(*B), t.param(*R), t.param(*A)},
                                        [s](const auto& v) {
                                          return deltaw::core_lora(v[0], v[1], v[2], deltaw::scale(s),
                                                                   deltaw::core_trainable{true, true, true});
                                        });
                                  },
                                  {x.get(), B.get(), R.get(), A.get()}, trial));
  }
  std::printf("gradcheck core_lora: worst relative error %.2e\n", worst);
}

TEST_CASE("linear and lora_linear take a view of a non-const W (the README's autograd::linear(x, view(W)))") {
  MatD W = dwt::random<MatD>(5, 4, 1);  // deliberately not const
  const MatD X = dwt::random<MatD>(3, 4, 2), R = dwt::random<MatD>(3, 5, 3), B = dwt::random<MatD>(5, 2, 4),
             A = dwt::random<MatD>(2, 4, 5);
  P px("x", X), pB("B", B), pA("A", A);
  ag::tape<double> t;
  const auto y = ag::linear(t.param(px), deltaw::view(W));
  CHECK(dwt::rel_err(MatD(y.value()), MatD(X * W.transpose())) < 1e-14);
  t.backward(ag::weighted_sum(y, R));
  CHECK(dwt::rel_err(px.grad(), MatD(R * W)) < 1e-14);
  ag::tape<double> t2;
  const auto y2 = ag::lora_linear(t2.frozen(X), deltaw::view(W), t2.param(pB), t2.param(pA), 0.5);
  CHECK(dwt::rel_err(MatD(y2.value()), MatD(X * (W + 0.5 * B * A).transpose())) < 1e-14);
}
