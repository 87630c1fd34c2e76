// The VJPs of the Kronecker (LoKr / DiffuseKronA, dense and low-rank factors), Bone bat,
// MiSS (and mini) and Block-LoRA updates: every factor's gradient and dX against central
// differences in double through autograd::adapted_linear, over random shapes with odd
// sizes and rank 1; the forward against X·(W + materialize(ΔW))ᵀ; each internal route of
// the Kronecker and bat backward against gradients formed from the dense ∂ΔW = dYᵀ·X; and
// the largest allocation of each backward below one out × in matrix.
#include <deltaw/backend/cpu/block_affine_vjp.hpp>
#include <deltaw/backend/cpu/block_lora_vjp.hpp>
#include <deltaw/backend/cpu/kron_vjp.hpp>

#include <array>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

namespace {

std::string shape_tag(Eigen::Index tokens, Eigen::Index in, Eigen::Index out) {
  // Appended piece by piece: `"[" + std::to_string(…)` trips GCC 12's false -Wrestrict.
  std::string s("[");
  s += std::to_string(tokens);
  s += "x";
  s += std::to_string(in);
  s += "->";
  s += std::to_string(out);
  s += "]";
  return s;
}

/// Runs y = f(tape) forward once (no grad) and checks it against X·(W + ΔW)ᵀ.
template <class F>
void check_forward(F&& f, const MatD& X, const MatD& W, const MatD& dW) {
  ag::tape<double> t;
  const auto y = f(t);
  const MatD ref = X * (W + dW).transpose();
  INFO("forward vs dense reference");
  CHECK(dwt::rel_err(MatD(y.value()), ref) < 1e-12);
}

/// ∂w1, ∂w2 of s·(w1 ⊗ w2) from the dense ∂ΔW (test-only reference).
void kron_reference(const MatD& dDW, const MatD& w1, const MatD& w2, double s, MatD& G1, MatD& G2) {
  const auto a = w1.rows(), c = w1.cols(), b = w2.rows(), d = w2.cols();
  G1 = MatD::Zero(a, c);
  G2 = MatD::Zero(b, d);
  for (Eigen::Index i1 = 0; i1 < a; ++i1)
    for (Eigen::Index j1 = 0; j1 < c; ++j1)
      for (Eigen::Index i2 = 0; i2 < b; ++i2)
        for (Eigen::Index j2 = 0; j2 < d; ++j2) {
          const double g = dDW(i1 * b + i2, j1 * d + j2);
          G1(i1, j1) += s * g * w2(i2, j2);
          G2(i2, j2) += s * g * w1(i1, j1);
        }
}

}  // namespace

TEST_CASE("VJP of Kronecker updates (LoKr, DiffuseKronA): dense and low-rank factors, gradients of every factor and x") {
  std::mt19937_64 g(101);
  double worst = 0;
  for (int trial = 0; trial < 12; ++trial) {
    const int kind = trial % 4;  // bit 0: w1 low-rank, bit 1: w2 low-rank
    const auto a = dim(g, 1, 3), c = dim(g, 1, 4), b = dim(g, 1, 4), d = dim(g, 1, 3), T = dim(g, 1, 4);
    const auto k1 = trial < 4 ? 1 : dim(g, 1, 3), k2 = trial < 4 ? 1 : dim(g, 1, 3);  // rank 1 first
    const auto out = a * b, in = c * d;
    const double s = trial % 3 == 0 ? 1.0 : 0.75;
    const MatD W = dwt::random<MatD>(out, in, 200 + trial);
    auto x = param("x", T, in, 210 + trial);
    std::vector<std::unique_ptr<P>> fs;
    if (kind & 1) {
      fs.push_back(param("w1_a", a, k1, 220 + trial));
      fs.push_back(param("w1_b", k1, c, 230 + trial));
    } else {
      fs.push_back(param("w1", a, c, 220 + trial));
    }
    if (kind & 2) {
      fs.push_back(param("w2_a", b, k2, 240 + trial));
      fs.push_back(param("w2_b", k2, d, 250 + trial));
    } else {
      fs.push_back(param("w2", b, d, 240 + trial));
    }
    std::vector<P*> ps{x.get()};
    for (auto& f : fs) ps.push_back(f.get());
    const MatD w1 = (kind & 1) ? MatD(fs[0]->value() * fs[1]->value()) : MatD(fs[0]->value());
    const MatD w2 = (kind & 2) ? MatD(fs[fs.size() - 2]->value() * fs.back()->value()) : MatD(fs.back()->value());
    MatD dW(out, in);
    for (Eigen::Index i = 0; i < out; ++i)
      for (Eigen::Index j = 0; j < in; ++j) dW(i, j) = s * w1(i / b, j / d) * w2(i % b, j % d);

    const std::string tag = std::string("kron ") + ((kind & 1) ? "lr" : "dense") + "x" + ((kind & 2) ? "lr" : "dense") +
                            " " + shape_tag(T, in, out) + " k" + std::to_string(k1) + "," + std::to_string(k2);
    auto run = [&](ag::tape<double>& t) {
      const auto sc = dw::scale(s);
      switch (kind) {
        case 0:
          return ag::adapted_linear<double, 2>(t.param(*x), dw::view(W), {t.param(*fs[0]), t.param(*fs[1])},
                                               [sc](const auto& v) { return dw::kron(v[0], v[1], sc); });
        case 1:
          return ag::adapted_linear<double, 3>(
              t.param(*x), dw::view(W), {t.param(*fs[0]), t.param(*fs[1]), t.param(*fs[2])},
              [sc](const auto& v) { return dw::kron(dw::kron_factor(v[0], v[1]), v[2], sc); });
        case 2:
          return ag::adapted_linear<double, 3>(
              t.param(*x), dw::view(W), {t.param(*fs[0]), t.param(*fs[1]), t.param(*fs[2])},
              [sc](const auto& v) { return dw::kron(v[0], dw::kron_factor(v[1], v[2]), sc); });
        default:
          return ag::adapted_linear<double, 4>(
              t.param(*x), dw::view(W), {t.param(*fs[0]), t.param(*fs[1]), t.param(*fs[2]), t.param(*fs[3])},
              [sc](const auto& v) { return dw::kron(dw::kron_factor(v[0], v[1]), dw::kron_factor(v[2], v[3]), sc); });
      }
    };
    check_forward(run, x->value(), W, dW);
    worst = std::max(worst, check(tag, run, ps, trial));
  }
  std::printf("gradcheck kron (all factor kinds): worst relative error %.2e\n", worst);
}

TEST_CASE("Kronecker backward: each of the eight routes equals the gradients formed from the dense dYᵀ·X") {
  std::mt19937_64 g(103);
  double worst = 0;
  for (int trial = 0; trial < 4; ++trial) {
    const auto a = dim(g, 1, 4), c = dim(g, 1, 5), b = dim(g, 1, 5), d = dim(g, 1, 4), T = dim(g, 1, 5);
    const double s = 1.3;
    const MatD w1 = dwt::random<MatD>(a, c, 300 + trial), w2 = dwt::random<MatD>(b, d, 310 + trial);
    const MatD X = dwt::random<MatD>(T, c * d, 320 + trial), dY = dwt::random<MatD>(T, a * b, 330 + trial);
    const auto u = dw::kron(w1, w2, dw::scale(s));
    const MatD dW = dw::materialize(u).template cast<double>();
    MatD G1r, G2r;
    kron_reference(MatD(dY.transpose() * X), w1, w2, s, G1r, G2r);
    const MatD dXr = dY * dW;
    for (int k = 0; k < 8; ++k) {
      const dw::cpu::kron_vjp_detail::plan p{(k & 1) != 0, (k & 2) != 0, (k & 4) != 0};
      dw::dense<double> G1 = dw::dense<double>::Zero(a, c), G2 = dw::dense<double>::Zero(b, d);
      dw::dense<double> dX = dw::dense<double>::Zero(T, c * d);
      std::array<dw::dense<double>*, 2> gs{&G1, &G2};
      dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(gs), &dX, p);
      worst = std::max({worst, dwt::rel_err(G1, G1r), dwt::rel_err(G2, G2r), dwt::rel_err(dX, dXr)});
    }
    // Low-rank factors: the same gradients reach left and right by the chain rule.
    const MatD l1 = dwt::random<MatD>(a, 2, 340 + trial), r1 = dwt::random<MatD>(2, c, 350 + trial);
    const auto ul = dw::kron(dw::kron_factor(l1, r1), w2, dw::scale(s));
    MatD G1l, G2l;
    kron_reference(MatD(dY.transpose() * X), MatD(l1 * r1), w2, s, G1l, G2l);
    dw::dense<double> gl = dw::dense<double>::Zero(a, 2), gr = dw::dense<double>::Zero(2, c),
                      g2 = dw::dense<double>::Zero(b, d), dX = dw::dense<double>::Zero(T, c * d);
    std::array<dw::dense<double>*, 3> slots{&gl, &gr, &g2};
    dw::cpu::backward<double>(ul, X, dY, std::span<dw::dense<double>* const>(slots), &dX);
    worst = std::max({worst, dwt::rel_err(gl, MatD(G1l * r1.transpose())), dwt::rel_err(gr, MatD(l1.transpose() * G1l)),
                      dwt::rel_err(g2, G2l), dwt::rel_err(dX, MatD(dY * dw::materialize(ul).template cast<double>()))});
  }
  std::printf("kron backward routes vs dense reference: worst relative error %.2e\n", worst);
  CHECK(worst < 1e-12);
}

TEST_CASE("VJP of Bone bat (ΔW depends on W): gradient of b through W_ij·b_i + b_i, and x") {
  std::mt19937_64 g(107);
  double worst = 0;
  for (int trial = 0; trial < 8; ++trial) {
    const auto r = trial < 2 ? Eigen::Index(1) : dim(g, 1, 3);
    const auto out = r * dim(g, 1, 3), in = r * dim(g, 1, 3), T = dim(g, 1, 6);  // T ≤ r and T > r both occur
    const MatD W = dwt::random<MatD>(out, in, 400 + trial);
    auto x = param("x", T, in, 410 + trial), b = param("b", out, r, 420 + trial, 0.5);
    const auto Wv = dw::view(W);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), Wv, {t.param(*b)},
                                           [Wv](const auto& v) { return dw::bone_bat(Wv, v[0]); });
    };
    check_forward(run, x->value(), W, MatD(dw::materialize(dw::bone_bat(Wv, b->value())).template cast<double>()));
    worst = std::max(worst, check("bone_bat " + shape_tag(T, in, out) + " r" + std::to_string(r), run,
                                  {x.get(), b.get()}, trial));
    // x frozen: no dX, so for tokens > r backward takes the route through dY_iᵀ·X.
    auto run_frozen = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.frozen(x->value()), Wv, {t.param(*b)},
                                           [Wv](const auto& v) { return dw::bone_bat(Wv, v[0]); });
    };
    worst = std::max(worst, check("bone_bat x frozen " + shape_tag(T, in, out) + " r" + std::to_string(r), run_frozen,
                                  {b.get()}, trial));
  }
  std::printf("gradcheck bone_bat: worst relative error %.2e\n", worst);
}

TEST_CASE("Bone bat backward: both routes equal Σ_j W_ijᵀ·∂ΔW_ij + Σ_j ∂ΔW_ij from the dense dYᵀ·X; dX = dY·ΔW") {
  std::mt19937_64 g(109);
  double worst = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const auto r = dim(g, 1, 4), out = r * dim(g, 1, 3), in = r * dim(g, 1, 3), T = dim(g, 1, 7);
    const MatD W = dwt::random<MatD>(out, in, 500 + trial), bm = dwt::random<MatD>(out, r, 510 + trial),
               X = dwt::random<MatD>(T, in, 520 + trial), dY = dwt::random<MatD>(T, out, 530 + trial);
    const auto u = dw::bone_bat(W, bm);
    const MatD G = dY.transpose() * X;  // ∂ΔW, test-only
    MatD ref = MatD::Zero(out, r);
    for (Eigen::Index i = 0; i < out / r; ++i)
      for (Eigen::Index j = 0; j < in / r; ++j) {
        const MatD Gij = G.block(i * r, j * r, r, r);
        ref.middleRows(i * r, r) += W.block(i * r, j * r, r, r).transpose() * Gij + Gij;
      }
    for (int route : {0, 1}) {
      dw::dense<double> db = dw::dense<double>::Zero(out, r);
      std::array<dw::dense<double>*, 1> slots{&db};
      dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(slots), nullptr, route);
      worst = std::max(worst, dwt::rel_err(db, ref));
    }
    dw::dense<double> dX = dw::dense<double>::Zero(T, in);
    std::array<dw::dense<double>*, 1> none{nullptr};
    dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(none), &dX);
    worst = std::max(worst, dwt::rel_err(dX, MatD(dY * dw::materialize(u).template cast<double>())));
    // A column-major W (its block rows are not packed: copied per block, r × in).
    const dwt::ColMat<double> Wc = W;
    const auto uc = dw::bone_bat(Wc, bm);
    for (int route : {0, 1}) {
      dw::dense<double> db = dw::dense<double>::Zero(out, r);
      std::array<dw::dense<double>*, 1> slots{&db};
      dw::cpu::backward<double>(uc, X, dY, std::span<dw::dense<double>* const>(slots), nullptr, route);
      worst = std::max(worst, dwt::rel_err(db, ref));
    }
  }
  std::printf("bone_bat backward routes vs dense reference: worst relative error %.2e\n", worst);
  CHECK(worst < 1e-12);
}

TEST_CASE("VJP of MiSS and MiSS mini: gradient of D (in % r ≠ 0 included) and x") {
  std::mt19937_64 g(113);
  double worst = 0;
  for (int trial = 0; trial < 8; ++trial) {
    const bool mini = trial % 2 == 1;
    const auto r = trial < 2 ? Eigen::Index(1) : dim(g, 1, 4), in = dim(g, 1, 9), T = dim(g, 1, 5);
    const auto m = dim(g, 1, 4), out = mini ? m * dim(g, 1, 3) : dim(g, 1, 7);
    const MatD W = dwt::random<MatD>(out, in, 600 + trial);
    auto x = param("x", T, in, 610 + trial), D = param("D", r, mini ? m : out, 620 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 1>(t.param(*x), dw::view(W), {t.param(*D)}, [mini, out, in](const auto& v) {
        return mini ? dw::miss_mini(v[0], out, in) : dw::miss(v[0], in);
      });
    };
    const MatD dW = mini ? MatD(dw::materialize(dw::miss_mini(D->value(), out, in)).template cast<double>())
                         : MatD(dw::materialize(dw::miss(D->value(), in)).template cast<double>());
    check_forward(run, x->value(), W, dW);
    worst = std::max(worst, check(std::string(mini ? "miss_mini " : "miss ") + shape_tag(T, in, out) + " r" +
                                      std::to_string(r),
                                  run, {x.get(), D.get()}, trial));
  }
  std::printf("gradcheck miss: worst relative error %.2e\n", worst);
}

TEST_CASE("VJP of Block-LoRA: gradients of B = [B₁ … Bₙ], A₀ and x") {
  std::mt19937_64 g(127);
  double worst = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const auto rb = trial < 2 ? Eigen::Index(1) : dim(g, 1, 3), n = dim(g, 1, 4), out = dim(g, 1, 7),
               in = dim(g, 1, 7), T = dim(g, 1, 5);
    const double s = 2.0 / double(n * rb);
    const MatD W = dwt::random<MatD>(out, in, 700 + trial);
    auto x = param("x", T, in, 710 + trial), B = param("B", out, n * rb, 720 + trial),
         A0 = param("A0", rb, in, 730 + trial);
    auto run = [&](ag::tape<double>& t) {
      return ag::adapted_linear<double, 2>(t.param(*x), dw::view(W), {t.param(*B), t.param(*A0)},
                                           [s](const auto& v) { return dw::block_lora(v[0], v[1], dw::scale(s)); });
    };
    check_forward(run, x->value(), W,
                  MatD(dw::materialize(dw::block_lora(B->value(), A0->value(), dw::scale(s))).template cast<double>()));
    worst = std::max(worst, check("block_lora " + shape_tag(T, in, out) + " n" + std::to_string(n) + " rb" +
                                      std::to_string(rb),
                                  run, {x.get(), B.get(), A0.get()}, trial));
  }
  std::printf("gradcheck block_lora: worst relative error %.2e\n", worst);
}

TEST_CASE("The backward passes allocate nothing of the size of an out × in matrix") {
  if (!dwt::allocation_counting_available()) return;
  using MatF = dwt::MatF;
  constexpr Eigen::Index out = 768, in = 1024, T = 64;
  const std::size_t dense_bytes = std::size_t(out) * in * sizeof(float);
  const MatF X = dwt::random<MatF>(T, in, 1), dY = dwt::random<MatF>(T, out, 2), W = dwt::random<MatF>(out, in, 3);
  dw::dense<float> dX = dw::dense<float>::Zero(T, in);

  // LoKr: out = 24·32, in = 32·32, w2 low-rank.
  const MatF w1 = dwt::random<MatF>(24, 32, 4), w2a = dwt::random<MatF>(32, 4, 5), w2b = dwt::random<MatF>(4, 32, 6);
  const auto k = dw::kron(w1, dw::kron_factor(w2a, w2b), dw::scale(0.5));
  dw::dense<float> g1 = dw::dense<float>::Zero(24, 32), g2a = dw::dense<float>::Zero(32, 4),
                   g2b = dw::dense<float>::Zero(4, 32);
  std::array<dw::dense<float>*, 3> ks{&g1, &g2a, &g2b};
  const std::size_t kb = dwt::largest_allocation(
      [&] { dw::cpu::backward<float>(k, X, dY, std::span<dw::dense<float>* const>(ks), &dX); });
  MESSAGE("largest allocation: kron backward " << kb << " B, out x in is " << dense_bytes << " B");
  CHECK(kb < dense_bytes / 4);

  // Bone bat, r = 16, with dX and (gradient of b only) both routes.
  const MatF bm = dwt::random<MatF>(out, 16, 7);
  const auto bat = dw::bone_bat(W, bm);
  dw::dense<float> db = dw::dense<float>::Zero(out, 16);
  std::array<dw::dense<float>*, 1> bs{&db};
  const std::size_t bb =
      dwt::largest_allocation([&] { dw::cpu::backward<float>(bat, X, dY, std::span<dw::dense<float>* const>(bs), &dX); });
  MESSAGE("largest allocation: bone_bat backward " << bb << " B");
  CHECK(bb < dense_bytes / 4);
  CHECK(dwt::largest_allocation([&] {
          dw::cpu::backward<float>(bat, X, dY, std::span<dw::dense<float>* const>(bs), nullptr, 1);
        }) < dense_bytes / 4);

  // MiSS and Block-LoRA.
  const MatF D = dwt::random<MatF>(16, out, 8);
  const auto ms = dw::miss(D, in);
  dw::dense<float> dD = dw::dense<float>::Zero(16, out);
  std::array<dw::dense<float>*, 1> mslots{&dD};
  CHECK(dwt::largest_allocation(
            [&] { dw::cpu::backward<float>(ms, X, dY, std::span<dw::dense<float>* const>(mslots), &dX); }) <
        dense_bytes / 4);
  const MatF B = dwt::random<MatF>(out, 4 * 8, 9), A0 = dwt::random<MatF>(8, in, 10);
  const auto bl = dw::block_lora(B, A0, dw::scale(0.25));
  dw::dense<float> dB = dw::dense<float>::Zero(out, 32), dA0 = dw::dense<float>::Zero(8, in);
  std::array<dw::dense<float>*, 2> bls{&dB, &dA0};
  CHECK(dwt::largest_allocation(
            [&] { dw::cpu::backward<float>(bl, X, dY, std::span<dw::dense<float>* const>(bls), &dX); }) <
        dense_bytes / 4);

  // The control: materialize forms ΔW, and the counter sees it.
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(k); }) >= dense_bytes);
}

TEST_CASE("VJP edge cases: no tokens, and loud errors for wrong slots and shapes") {
  const MatD w1 = dwt::random<MatD>(2, 3, 1), w2 = dwt::random<MatD>(3, 2, 2);
  const auto k = dw::kron(w1, w2);
  using VK = dw::cpu::vjp<std::remove_cvref_t<decltype(k)>>;
  CHECK(VK::factor_count == 2);
  CHECK(std::string(VK::factor_name(1)) == "w2");
  dw::dense<double> g1 = dw::dense<double>::Constant(2, 3, 7.0), g2 = dw::dense<double>::Zero(3, 2);
  std::array<dw::dense<double>*, 2> slots{&g1, &g2};
  const MatD X0(0, 6), dY0(0, 6);
  dw::cpu::backward<double>(k, X0, dY0, std::span<dw::dense<double>* const>(slots), nullptr);
  CHECK(g1.isConstant(7.0));  // accumulators untouched: nothing flows from no tokens
  CHECK(g2.isZero());

  const MatD X = dwt::random<MatD>(2, 6, 3), dY = dwt::random<MatD>(2, 6, 4);
  dw::dense<double> bad(3, 3);
  std::array<dw::dense<double>*, 2> wrong{&g1, &bad};
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cpu::backward<double>(k, X, dY, std::span<dw::dense<double>* const>(wrong), nullptr); },
      {"vjp<kron>", "w2", "[3, 3]", "[3, 2]"});
  std::array<dw::dense<double>*, 1> one{&g1};
  dwt::check_throws_with<dw::argument_error>(
      [&] { dw::cpu::backward<double>(k, X, dY, std::span<dw::dense<double>* const>(one), nullptr); },
      {"vjp<kron>", "expected 2"});
  const MatD Xbad = dwt::random<MatD>(2, 5, 5);
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cpu::backward<double>(k, Xbad, dY, std::span<dw::dense<double>* const>(slots), nullptr); },
      {"vjp<kron>", "X is [2, 5]"});

  const MatD W = dwt::random<MatD>(4, 4, 6), bm = dwt::random<MatD>(4, 2, 7);
  const auto bat = dw::bone_bat(W, bm);
  dw::dense<double> db = dw::dense<double>::Zero(4, 2), dX = dw::dense<double>::Zero(2, 4);
  std::array<dw::dense<double>*, 1> bs{&db};
  const MatD Xb = dwt::random<MatD>(2, 4, 8), dYb = dwt::random<MatD>(2, 4, 9);
  dwt::check_throws_with<dw::argument_error>(
      [&] { dw::cpu::backward<double>(bat, Xb, dYb, std::span<dw::dense<double>* const>(bs), &dX, 1); },
      {"vjp<bone_bat>", "dX"});
}
