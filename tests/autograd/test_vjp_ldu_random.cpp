// The VJPs of LoLDU, NOLA, VeRA and RandLoRA (backend/cpu/ldu_vjp.hpp,
// backend/cpu/random_basis_vjp.hpp): every trainable factor and x against central
// differences in double over random shapes (odd sizes, rank 1, both RandLoRA
// orientations, all three RandLoRA laws); the forward of adapted_linear against the dense
// X·(W + materialize(ΔW))ᵀ; and backward never allocating an out × in block.
#include <deltaw/backend/cpu/ldu.hpp>
#include <deltaw/backend/cpu/ldu_vjp.hpp>
#include <deltaw/backend/cpu/random_basis.hpp>
#include <deltaw/backend/cpu/random_basis_vjp.hpp>

#include "alloc_counter.hpp"
#include "grad_util.hpp"

using namespace dwag;
namespace dw = deltaw;

namespace {
std::string shape_tag(Eigen::Index tokens, Eigen::Index in, Eigen::Index out, Eigen::Index r) {
  return "[" + std::to_string(tokens) + "x" + std::to_string(in) + "->" + std::to_string(out) + ", r" +
         std::to_string(r) + "]";
}
std::unique_ptr<P> param_of(const std::string& name, MatD v) { return std::make_unique<P>(name, std::move(v)); }

/// y = adapted_linear(x, W, {f0, f1}, rebind(proto, ·)).
template <class U>
auto adapted(ag::tape<double>& t, const ag::var<double>& x, const MatD& W, const U& proto, P& f0, P& f1) {
  return ag::adapted_linear<double, 2>(x, dw::view(W), {t.param(f0), t.param(f1)}, [&proto](const auto& v) {
    return dw::cpu::vjp<U>::rebind(proto, v);
  });
}

/// Forward of adapted_linear equals X·(W + ΔW)ᵀ with ΔW materialised densely.
template <class U>
void check_forward(const MatD& W, const MatD& X, const U& proto, P& f0, P& f1, const char* what) {
  ag::tape<double> t;
  const auto y = adapted(t, t.frozen(X), W, proto, f0, f1);
  const auto u = dw::cpu::vjp<U>::rebind(proto, {dw::matrix_view<const double>(dw::view(f0.value())),
                                                 dw::matrix_view<const double>(dw::view(f1.value()))});
  const MatD D = dw::materialize(u);
  const MatD ref = X * (W + D).transpose();
  const double e = dwt::rel_err(MatD(y.value()), ref);
  INFO(what);
  CHECK(e < 1e-13);
  std::printf("forward  %-30s rel err vs dense %.2e\n", what, e);
}
}  // namespace

// ─────────────────────────────────────────────────────────────────────────────────────────
// LoLDU
// ─────────────────────────────────────────────────────────────────────────────────────────

TEST_CASE("VJP of LoLDU: gradients of z, sigma and x; forward equals the dense reference") {
  std::mt19937_64 g(23);
  double worst = 0;
  for (int trial = 0; trial < 7; ++trial) {
    const auto out = dim(g, 1, 9), in = dim(g, 1, 9), tokens = dim(g, 1, 5);
    const auto r = trial == 0 ? Eigen::Index(1) : dim(g, 1, int(std::min(out, in)));
    const MatD W = dwt::random<MatD>(out, in, 200 + trial);
    for (bool train_sigma : {true, false}) {
      const auto base = dw::loldu(W, r, dw::alpha(1.3), dw::ldu_options{train_sigma});
      MatD z0(1, r);
      for (Eigen::Index j = 0; j < r; ++j) z0(0, j) = base.z0()[j];
      // Move z and σ away from the initial point so that ΔW ≠ 0.
      auto z = param_of("z", z0 + 0.5 * dwt::random<MatD>(1, r, 210 + trial));
      auto sg = param_of("sigma", MatD::Constant(1, 1, 0.8 * base.sigma0() + 0.1));
      auto x = param("x", tokens, in, 220 + trial);
      const std::string tag = std::string("loldu") + (train_sigma ? "+sigma " : " ") + shape_tag(tokens, in, out, r);
      std::vector<P*> params{x.get(), z.get()};
      if (train_sigma) params.push_back(sg.get());
      else sg->set_trainable(false);
      worst = std::max(worst, check(tag, [&](auto& t) { return adapted(t, t.param(*x), W, base, *z, *sg); }, params,
                                    trial));
      check_forward(W, x->value(), base, *z, *sg, tag.c_str());
    }
  }
  std::printf("gradcheck loldu: worst relative error %.2e\n", worst);
}

TEST_CASE("VJP of LoLDU: at initialisation (ΔW = 0) z still gets σ·⟨G, Z⟩; σ's slot is left alone when σ is frozen") {
  const MatD W = dwt::random<MatD>(6, 5, 1), X = dwt::random<MatD>(3, 5, 2), dY = dwt::random<MatD>(3, 6, 3);
  const auto u = dw::loldu(W, 3, dw::alpha(2.0));
  dw::dense<double> gz = dw::dense<double>::Zero(1, 3), gs = dw::dense<double>::Zero(1, 1),
                    dX = dw::dense<double>::Zero(3, 5);
  std::array<dw::dense<double>*, 2> slots{&gz, &gs};
  dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(slots), &dX);
  // Independent reference: ∂/∂z_j ⟨dY, X·ΔWᵀ⟩ = σ·⟨dY, X·(P·L_r·e_j·e_jᵀ·U_r)ᵀ⟩ with the
  // permutation applied as a dense matrix.
  const auto f = dw::partial_pivot_ldu(W);
  MatD Pm = MatD::Zero(6, 6);
  for (Eigen::Index o = 0; o < 6; ++o) Pm(o, f.perm[std::size_t(o)]) = 1.0;
  for (Eigen::Index j = 0; j < 3; ++j) {
    const MatD Ej = Pm * f.L.col(j) * f.U.row(j);
    CHECK(gz(0, j) == doctest::Approx(u.sigma() * (dY.cwiseProduct(X * Ej.transpose())).sum()).epsilon(1e-12));
  }
  CHECK(gs(0, 0) == 0.0);           // train_sigma is off
  CHECK(dX.cwiseAbs().maxCoeff() == 0.0);  // ΔW = 0 exactly
}

// ─────────────────────────────────────────────────────────────────────────────────────────
// NOLA
// ─────────────────────────────────────────────────────────────────────────────────────────

TEST_CASE("VJP of NOLA: gradients of the A and B coefficients and x; forward equals the dense reference") {
  std::mt19937_64 g(29);
  double worst = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const auto out = dim(g, 1, 9), in = dim(g, 1, 9), tokens = dim(g, 1, 5);
    const auto r = trial == 0 ? Eigen::Index(1) : dim(g, 1, 4);
    const auto k = dim(g, 1, 6), l = dim(g, 1, 6);
    const MatD W = dwt::random<MatD>(out, in, 300 + trial);
    dw::nola_options opt;
    opt.frozen_a0 = trial % 2 == 0;
    const auto proto = dw::nola(out, in, r, 1000 + trial, Eigen::VectorXd(Eigen::VectorXd::Zero(k)), Eigen::VectorXd(Eigen::VectorXd::Zero(l)),
                                dw::scale(0.7), opt);
    auto x = param("x", tokens, in, 310 + trial), a = param("a_coef", 1, k, 320 + trial),
         b = param("b_coef", 1, l, 330 + trial);
    const std::string tag = std::string("nola") + (opt.frozen_a0 ? "+A0 " : " ") + shape_tag(tokens, in, out, r) +
                            " k" + std::to_string(k) + " l" + std::to_string(l);
    worst = std::max(worst, check(tag, [&](auto& t) { return adapted(t, t.param(*x), W, proto, *a, *b); },
                                  {x.get(), a.get(), b.get()}, trial));
    check_forward(W, x->value(), proto, *a, *b, tag.c_str());
  }
  std::printf("gradcheck nola: worst relative error %.2e\n", worst);
}

TEST_CASE("VJP of NOLA: coefficient gradients span several 16 K chunks") {
  // r·in = 20000 and out·r = 18000 entries per basis, more than one 16 K-entry chunk: the
  // chunked contraction against bases drawn whole (no finite differences at this size).
  const Eigen::Index out = 4500, in = 5000, r = 4, k = 3, l = 2, tokens = 2;
  const Eigen::VectorXd a = dwt::random<MatD>(k, 1, 1).col(0), b = dwt::random<MatD>(l, 1, 2).col(0);
  const auto u = dw::nola(out, in, r, 77, a, b, dw::scale(0.5));
  const MatD X = dwt::random<MatD>(tokens, in, 3), dY = dwt::random<MatD>(tokens, out, 4);
  dw::dense<double> ga = dw::dense<double>::Zero(1, k), gb = dw::dense<double>::Zero(1, l);
  std::array<dw::dense<double>*, 2> slots{&ga, &gb};
  dw::cpu::backward<double>(u, X, dY, std::span<dw::dense<double>* const>(slots), nullptr);
  // Reference: the bases drawn whole, dα_i = ⟨s·(dY·B)ᵀ·X, A_i⟩, dβ_j = ⟨s·dYᵀ·(X·Aᵀ), B_j⟩.
  auto draw = [](const dw::basis_entries& e, Eigen::Index rows, Eigen::Index cols) {
    MatD M(rows, cols);
    dw::fill_entries<double>(e, 0, std::uint64_t(M.size()), M.data());
    return M;
  };
  MatD A = draw(u.a0(), r, in), B = MatD::Zero(out, r);
  for (Eigen::Index i = 0; i < k; ++i) A += a(i) * draw(u.a_basis(i), r, in);
  for (Eigen::Index j = 0; j < l; ++j) B += b(j) * draw(u.b_basis(j), out, r);
  const MatD dA = 0.5 * (dY * B).transpose() * X, dB = 0.5 * dY.transpose() * (X * A.transpose());
  for (Eigen::Index i = 0; i < k; ++i)
    CHECK(ga(0, i) == doctest::Approx(dA.cwiseProduct(draw(u.a_basis(i), r, in)).sum()).epsilon(1e-11));
  for (Eigen::Index j = 0; j < l; ++j)
    CHECK(gb(0, j) == doctest::Approx(dB.cwiseProduct(draw(u.b_basis(j), out, r)).sum()).epsilon(1e-11));
}

// ─────────────────────────────────────────────────────────────────────────────────────────
// VeRA
// ─────────────────────────────────────────────────────────────────────────────────────────

TEST_CASE("VJP of VeRA: gradients of lambda_d, lambda_b and x; forward equals the dense reference") {
  std::mt19937_64 g(31);
  double worst = 0;
  for (int trial = 0; trial < 6; ++trial) {
    const auto out = dim(g, 1, 9), in = dim(g, 1, 9), tokens = dim(g, 1, 5);
    const auto r = trial == 0 ? Eigen::Index(1) : dim(g, 1, 6);
    const MatD W = dwt::random<MatD>(out, in, 400 + trial);
    // Shared bases made for a larger layer: the layer uses their top-left slices.
    const auto basis = dw::vera_shared_basis(2000 + trial, r, out + trial % 3, in + 2 * (trial % 2));
    const auto proto = dw::vera(basis, out, in, Eigen::VectorXd(Eigen::VectorXd::Zero(r)), Eigen::VectorXd(Eigen::VectorXd::Zero(out)));
    auto x = param("x", tokens, in, 410 + trial), ld = param("lambda_d", 1, r, 420 + trial),
         lb = param("lambda_b", 1, out, 430 + trial);
    const std::string tag = "vera " + shape_tag(tokens, in, out, r);
    worst = std::max(worst, check(tag, [&](auto& t) { return adapted(t, t.param(*x), W, proto, *ld, *lb); },
                                  {x.get(), ld.get(), lb.get()}, trial));
    check_forward(W, x->value(), proto, *ld, *lb, tag.c_str());
  }
  std::printf("gradcheck vera: worst relative error %.2e\n", worst);
}

// ─────────────────────────────────────────────────────────────────────────────────────────
// RandLoRA
// ─────────────────────────────────────────────────────────────────────────────────────────

TEST_CASE("VJP of RandLoRA: gradients of lambda, gamma and x (out > in, out < in, square; three laws)") {
  std::mt19937_64 g(37);
  double worst = 0;
  const dw::randlora_kind kinds[] = {dw::randlora_kind::dense, dw::randlora_kind::sparse,
                                     dw::randlora_kind::very_sparse};
  for (int trial = 0; trial < 9; ++trial) {
    Eigen::Index out = dim(g, 2, 9), in = dim(g, 2, 9);
    if (trial % 3 == 0) std::tie(out, in) = std::pair{std::max(out, in) + 1, std::min(out, in)};  // out > in
    if (trial % 3 == 1) std::tie(out, in) = std::pair{std::min(out, in), std::max(out, in) + 1};  // out < in
    if (trial == 2) in = out;                                                                     // square
    const auto tokens = dim(g, 1, 5);
    const auto r = trial < 2 ? Eigen::Index(1) : dim(g, 1, 4);
    const auto kind = kinds[trial % 3];
    const MatD W = dwt::random<MatD>(out, in, 500 + trial);
    const auto basis = dw::randlora_shared_basis(3000 + trial, r, out + 1, in + 2, kind);
    const Eigen::Index mn = std::min(out, in), N = (mn + r - 1) / r;
    const auto proto = dw::randlora(basis, out, in, MatD(MatD::Zero(r, N)), MatD(MatD::Zero(N, mn)), dw::scale(0.9));
    auto x = param("x", tokens, in, 510 + trial), lam = param("lambda", r, N, 520 + trial),
         gam = param("gamma", N, mn, 530 + trial);
    const char* law = kind == dw::randlora_kind::dense ? "dense" : kind == dw::randlora_kind::sparse ? "sparse" : "vsparse";
    const std::string tag = std::string("randlora/") + law + " " + shape_tag(tokens, in, out, r);
    worst = std::max(worst, check(tag, [&](auto& t) { return adapted(t, t.param(*x), W, proto, *lam, *gam); },
                                  {x.get(), lam.get(), gam.get()}, trial));
    check_forward(W, x->value(), proto, *lam, *gam, tag.c_str());
  }
  std::printf("gradcheck randlora: worst relative error %.2e\n", worst);
}

// ─────────────────────────────────────────────────────────────────────────────────────────
// No out × in allocation in backward (DESIGN.md principle 1)
// ─────────────────────────────────────────────────────────────────────────────────────────

namespace {
using MatF = dwt::RowMat<float>;
template <class U>
void check_backward_no_dense(const U& u, std::array<dw::dense<float>, 2>& grads, const char* what) {
  if (!dwt::allocation_counting_available()) {
    MESSAGE("skipped: allocation counting is unavailable under sanitizers");
    return;
  }
  const Eigen::Index tokens = 64;
  const MatF X = dwt::random<MatF>(tokens, u.cols(), 1), dY = dwt::random<MatF>(tokens, u.rows(), 2);
  dw::dense<float> dX = dw::dense<float>::Zero(tokens, u.cols());
  std::array<dw::dense<float>*, 2> slots{&grads[0], &grads[1]};
  const std::size_t dense_bytes = std::size_t(u.rows()) * std::size_t(u.cols()) * sizeof(float);
  const std::size_t a = dwt::largest_allocation([&] {
    dw::cpu::backward<float>(u, X, dY, std::span<dw::dense<float>* const>(slots), &dX);
  });
  std::printf("backward %-30s largest allocation %zu B; out x in is %zu B\n", what, a, dense_bytes);
  INFO(what);
  CHECK(a < dense_bytes);
  CHECK(dX.cwiseAbs().maxCoeff() > 0);  // it did run
  CHECK(dwt::largest_allocation([&] { (void)dw::materialize(u); }) >= dense_bytes);  // the control
}
}  // namespace

TEST_CASE("backward of LoLDU, NOLA, VeRA and RandLoRA never allocates out x in") {
  {
    const MatF W = dwt::random<MatF>(768, 1024, 1);
    const auto u0 = dw::loldu(W, 16);
    Eigen::VectorXf z(16);
    for (Eigen::Index j = 0; j < 16; ++j) z(j) = 1.5f * u0.z0()[j];
    const auto u = u0.with_z(dw::vview(z));
    std::array<dw::dense<float>, 2> grads{dw::dense<float>::Zero(1, 16), dw::dense<float>::Zero(1, 1)};
    check_backward_no_dense(u, grads, "loldu 1024->768 r16");
  }
  {
    const Eigen::VectorXf a = dwt::random<MatF>(64, 1, 3).col(0), b = dwt::random<MatF>(32, 1, 4).col(0);
    const auto u = dw::nola(768, 1024, 8, 5, a, b, dw::alpha(16));
    std::array<dw::dense<float>, 2> grads{dw::dense<float>::Zero(1, 64), dw::dense<float>::Zero(1, 32)};
    check_backward_no_dense(u, grads, "nola 1024->768 r8 k64 l32");
  }
  {
    const auto vb = dw::vera_shared_basis(1, 256, 1024, 1024);
    const Eigen::VectorXf ld = Eigen::VectorXf::Constant(256, 0.1f), lb = dwt::random<MatF>(768, 1, 2).col(0);
    const auto u = dw::vera(vb, 768, 1024, ld, lb);
    std::array<dw::dense<float>, 2> grads{dw::dense<float>::Zero(1, 256), dw::dense<float>::Zero(1, 768)};
    check_backward_no_dense(u, grads, "vera 1024->768 r256");
  }
  for (auto [out, in] : {std::pair<Eigen::Index, Eigen::Index>{1024, 768}, {768, 1024}}) {
    const auto basis = dw::randlora_shared_basis(3, 8, 1024, 1024);
    const Eigen::Index n = std::min(out, in), N = n / 8;
    const MatF lam = dwt::random<MatF>(8, N, 4), gam = dwt::random<MatF>(N, n, 5);
    const auto u = dw::randlora(basis, out, in, lam, gam, dw::alpha(640));
    std::array<dw::dense<float>, 2> grads{dw::dense<float>::Zero(8, N), dw::dense<float>::Zero(N, n)};
    check_backward_no_dense(u, grads, out > in ? "randlora 768->1024 r8" : "randlora 1024->768 r8");
  }
}

TEST_CASE("rebind and backward reject mis-shaped factors and gradient slots with named shapes") {
  const MatD W = dwt::random<MatD>(5, 4, 1), X = dwt::random<MatD>(2, 4, 2), dY = dwt::random<MatD>(2, 5, 3);
  const auto l = dw::loldu(W, 2);
  using VL = dw::cpu::vjp<std::remove_cvref_t<decltype(l)>>;
  const MatD z3 = MatD::Zero(1, 3), s1 = MatD::Ones(1, 1), s2 = MatD::Ones(1, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)VL::rebind(l, {dw::view(z3), dw::view(s1)}); },
                                          {"vjp<ldu>::rebind", "[1, 3]", "[1, 2]"});
  const MatD z2 = MatD::Zero(1, 2);
  dwt::check_throws_with<dw::shape_error>([&] { (void)VL::rebind(l, {dw::view(z2), dw::view(s2)}); },
                                          {"sigma", "[1, 2]", "[1, 1]"});
  dw::dense<double> g3 = dw::dense<double>::Zero(1, 3);
  std::array<dw::dense<double>*, 2> bad{&g3, nullptr};
  dwt::check_throws_with<dw::shape_error>(
      [&] { dw::cpu::backward<double>(l, X, dY, std::span<dw::dense<double>* const>(bad), nullptr); },
      {"vjp<ldu>::backward", "gradient of z", "[1, 3]"});
  std::array<dw::dense<double>*, 1> one{nullptr};
  dwt::check_throws_with<dw::argument_error>(
      [&] { dw::cpu::backward<double>(l, X, dY, std::span<dw::dense<double>* const>(one), nullptr); },
      {"expected 2 gradient slots", "got 1"});

  const auto basis = dw::vera_shared_basis(1, 3, 8, 8);
  const auto v = dw::vera(basis, 5, 4, Eigen::VectorXd(Eigen::VectorXd::Zero(3)), Eigen::VectorXd(Eigen::VectorXd::Zero(5)));
  using VV = dw::cpu::vjp<std::remove_cvref_t<decltype(v)>>;
  const MatD d3 = MatD::Zero(1, 3), b4 = MatD::Zero(1, 4);
  dwt::check_throws_with<dw::shape_error>([&] { (void)VV::rebind(v, {dw::view(d3), dw::view(b4)}); },
                                          {"vjp<vera>::rebind", "lambda_b", "[1, 4]", "[1, 5]"});

  const auto rb = dw::randlora_shared_basis(1, 2, 8, 8);
  const auto rl = dw::randlora(rb, 5, 4, MatD(MatD::Zero(2, 2)), MatD(MatD::Zero(2, 4)));
  using VR = dw::cpu::vjp<std::remove_cvref_t<decltype(rl)>>;
  const MatD lam_bad = MatD::Zero(2, 3), gam = MatD::Zero(2, 4);
  dwt::check_throws_with<dw::shape_error>([&] { (void)VR::rebind(rl, {dw::view(lam_bad), dw::view(gam)}); },
                                          {"lambda is [2, 3]", "[r, N] = [2, 2]"});
}

TEST_CASE("docs/methods.md's snippet: vjp<decltype(proto)>::rebind with a const proto, over a non-const W") {
  const Eigen::Index out = 6, in = 5, r = 3, tokens = 4;
  const auto basis = dw::vera_shared_basis(9, r, out, in);
  const auto proto =
      dw::vera(basis, out, in, Eigen::VectorXd(Eigen::VectorXd::Zero(r)), Eigen::VectorXd(Eigen::VectorXd::Zero(out)));
  static_assert(std::is_const_v<decltype(proto)>);
  MatD W = dwt::random<MatD>(out, in, 1);  // not const: view(W) is a view of non-const elements
  const MatD X = dwt::random<MatD>(tokens, in, 2), R = dwt::random<MatD>(tokens, out, 3);
  P ld("lambda_d", dwt::random<MatD>(1, r, 4)), lb("lambda_b", dwt::random<MatD>(1, out, 5));
  ag::tape<double> t;
  const auto y = ag::adapted_linear<double, 2>(t.frozen(X), dw::view(W), {t.param(ld), t.param(lb)},
                                               [&](const auto& v) { return dw::cpu::vjp<decltype(proto)>::rebind(proto, v); });
  const auto u = dw::cpu::vjp<decltype(proto)>::rebind(
      proto, {dw::matrix_view<const double>(dw::view(ld.value())), dw::matrix_view<const double>(dw::view(lb.value()))});
  const MatD D = dw::materialize(u);
  CHECK(D.norm() > 0);
  CHECK(dwt::rel_err(MatD(y.value()), MatD(X * (W + D).transpose())) < 1e-13);
  t.backward(ag::weighted_sum(y, R));
  // dλ_b[o] = Σ_t R[t, o]·(X·(ΔW/λ_b)ᵀ)[t, o]: ΔW is linear in λ_b, so with λ_b = 1 the
  // product gives the per-row factor.
  const MatD ones = MatD::Ones(1, out);
  const auto u1 = dw::cpu::vjp<decltype(proto)>::rebind(
      proto, {dw::matrix_view<const double>(dw::view(ld.value())), dw::matrix_view<const double>(dw::view(ones))});
  const MatD Y1 = X * dw::materialize(u1).transpose();
  const MatD want = (R.array() * Y1.array()).colwise().sum();
  CHECK(dwt::rel_err(lb.grad(), want) < 1e-12);
}
