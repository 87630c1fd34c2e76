// SPDX-License-Identifier: MIT
// ICM-LoRA: the flatten/unflatten round trip (bit-exact, every update type, through the
// types' own operand lists), zero-padding, the CVAE's negative ELBO against central
// differences, and a CVAE fitted to a smooth family of adapters generalising to held-out
// descriptors.
#include <deltaw/deltaw.hpp>
#include <deltaw/expr/c3a.hpp>
#include <deltaw/expr/fourierft.hpp>
#include <deltaw/expr/waveft.hpp>
#include <deltaw/papers/icm_lora.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "../test_util.hpp"
#include <deltaw/autograd/gradcheck.hpp>

namespace icm_test {
namespace dw = deltaw;
namespace icm = deltaw::papers::icm;
using MatF = dwt::MatF;
using deltaw::index_t;
using VecF = Eigen::VectorXf;

MatF rnd(Eigen::Index r, Eigen::Index c, std::uint64_t seed) { return dwt::random<MatF>(r, c, seed); }
VecF rndv(Eigen::Index n, std::uint64_t seed, float shift = 0.f) {
  return (dwt::random<MatF>(n, 1, seed).col(0).array() + shift).matrix();
}

/// flatten → scramble the operands in place → unflatten: every element comes back bit for bit.
template <class U>
int round_trip(const char* name, const U& u) {
  INFO("type " << name);
  const auto raw0 = icm::flatten(u, {false});
  const auto f = icm::flatten(u);
  CHECK(f.inexact == 0);
  CHECK(f.layout.length == index_t(raw0.values.size()));
  CHECK(!f.layout.tensors.empty());
  for (const auto& s : f.layout.tensors) {
    if (s.integral || s.size() < 2) continue;
    // standardised: mean ≈ 0, std within a factor 2 of 1 (σ is the nearest lower power of two)
    double m = 0, q = 0;
    for (index_t i = 0; i < s.size(); ++i) m += f.values[std::size_t(s.offset + i)];
    m /= double(s.size());
    for (index_t i = 0; i < s.size(); ++i) q += std::pow(f.values[std::size_t(s.offset + i)] - m, 2);
    const double sd = std::sqrt(q / double(s.size()));
    CHECK(std::abs(m) < 1e-3 * std::max(1.0, sd));
    if (sd > 0) {
      CHECK(sd >= 1.0 - 1e-12);
      CHECK(sd < 2.0 + 1e-12);
    }
  }
  // Zero-padded with another (longer) vector, then scrambled.
  const auto padded = icm::stack_padded({f}, f.layout.length + 7);
  std::vector<double> row(padded.row(0).data(), padded.row(0).data() + padded.cols());
  for (std::size_t i = std::size_t(f.layout.length); i < row.size(); ++i) CHECK(row[i] == 0.0);
  std::vector<double> noise(f.values.size());
  for (std::size_t i = 0; i < noise.size(); ++i) noise[i] = 0.37 * double(i % 5) + 1.25;
  icm::unflatten_into(noise, f.layout, u);
  const auto scrambled = icm::flatten(u, {false});
  int changed = 0;
  for (std::size_t i = 0; i < raw0.values.size(); ++i) changed += scrambled.values[i] != raw0.values[i];
  CHECK(changed > 0);
  icm::unflatten_into(row, f.layout, u);
  const auto raw1 = icm::flatten(u, {false});
  REQUIRE(raw1.values.size() == raw0.values.size());
  int diff = 0;
  for (std::size_t i = 0; i < raw0.values.size(); ++i) diff += raw1.values[i] != raw0.values[i];
  CHECK(diff == 0);
  return diff;
}

/// A smooth family of "adapters": x(c) = tanh(P·c)·Q plus small per-task noise.
struct family {
  dw::dense<double> P, Q;
  explicit family(index_t c_dim, index_t x_dim) {
    std::mt19937_64 g(5);
    std::normal_distribution<double> n(0, 1);
    P.resize(6, c_dim);
    Q.resize(6, x_dim);
    for (index_t i = 0; i < P.size(); ++i) P.data()[i] = n(g);
    for (index_t i = 0; i < Q.size(); ++i) Q.data()[i] = n(g) / std::sqrt(6.0);
  }
  dw::dense<double> operator()(const dw::dense<double>& C) const {
    return dw::dense<double>((C * P.transpose()).array().tanh().matrix() * Q);
  }
};
}  // namespace icm_test

TEST_CASE("ICM-LoRA flatten/unflatten: a bit-exact round trip for every update type, through its operand list") {
  using namespace icm_test;
  namespace dw = deltaw;
  const int n = 8;
  int total = 0;
  {
    MatF B = rnd(n, 3, 1), A = rnd(3, n, 2);
    B(0, 0) = 0.f;  // exact zeros survive
    A(1, 1) = 1e-8f;
    total += round_trip("lora", dw::lora(B, A, dw::alpha(4)));
    total += round_trip("rslora", dw::rslora(B, A, dw::alpha(4)));
    MatF W = rnd(n, n, 3);
    VecF m = rndv(n, 4, 2.f);
    total += round_trip("dora", dw::dora(W, dw::lora(B, A, dw::alpha(4)), m));
    total += round_trip("hira", dw::hira(W, B, A));
    VecF lam = rndv(1, 5, 1.f), wn = rndv(n, 6, 2.f);
    total += round_trip("delora", dw::delora(B, A, lam, wn));
    VecF E = rndv(3, 7);
    total += round_trip("adalora", dw::adalora(B, E, A, dw::alpha(3), 5));
    total += round_trip("kasa", dw::kasa(B, E, A, dw::alpha(3)));
    MatF R = rnd(3, 3, 8);
    total += round_trip("lora_xs", dw::lora_xs(B, R, A, dw::alpha(2)));
    MatF B2 = rnd(n, 2, 9), A2 = rnd(2, n, 10);
    total += round_trip("loha", dw::loha(B, A, B2, A2, dw::alpha(2)));
    MatF P = rnd(4, 9, 11);
    VecF v = rndv(4, 12);
    total += round_trip("tinylora", dw::tinylora(B, v, P, A));
  }
  {
    MatF B = rnd(n, 4, 13), A0 = rnd(2, n, 14);
    total += round_trip("block_lora", dw::block_lora(B, A0, dw::alpha(2)));
    MatF Bd = rnd(9, 2, 15), Ad = rnd(6, 21, 16);
    total += round_trip("bd_lora", dw::bd_lora(Bd, Ad, dw::bd_side::B, 3, dw::alpha(5)));
  }
  {
    MatF W = rnd(n, n, 17);
    MatF b = rnd(n, 2, 18);
    total += round_trip("bone_bat", dw::bone_bat(W, b));
    MatF D = rnd(2, n, 19);
    total += round_trip("miss", dw::miss(D, n));
    MatF w1 = rnd(2, 2, 20), w2 = rnd(4, 4, 21);
    total += round_trip("kron", dw::kron(w1, w2));
    MatF w1b = rnd(4, 3, 22), w2b = rnd(5, 2, 23);
    total += round_trip("lokr", dw::lokr(w1b, w2b, dw::alpha(16), 8));
    const auto ld = dw::loldu(W, 3);  // holds its own factors: round trip through a copy below
    const auto raw = icm::flatten(ld, {false});
    CHECK(raw.layout.tensors.size() == 5);  // perm, L, z, z0, U
    CHECK(raw.layout.tensors[0].integral);
    const auto f = icm::flatten(ld);
    CHECK(f.inexact == 0);
  }
  {
    MatF W = rnd(n, n, 24);
    VecF a = rndv(3, 25), bb = rndv(3, 26);
    total += round_trip("nola", dw::nola(n, n, 2, 11, a, bb, dw::alpha(2)));
    const auto basis = dw::vera_shared_basis(3, 2, n, n);
    VecF ldv = rndv(2, 27), lb = rndv(n, 28);
    total += round_trip("vera", dw::vera(basis, n, n, ldv, lb));
    const auto rb = dw::randlora_shared_basis(3, 4, n, n);
    MatF lam = rnd(4, 2, 29), gam = rnd(2, n, 30);
    total += round_trip("randlora", dw::randlora(rb, n, n, lam, gam));
    const auto pb = dw::pvera_shared_basis(31, 2, n, n);
    VecF pd = rndv(4, 32), pbv = rndv(n, 33);
    total += round_trip("pvera", dw::pvera(pb, n, n, pd, pbv));
  }
  {
    MatF W = rnd(6, 10, 34);
    MatF U = rnd(10, 3, 35);
    total += round_trip("hra", dw::hra(W, U));
    VecF l = rndv(6, 36, 1.f);
    total += round_trip("ia3", dw::ia3(W, l, dw::ia3_side::output));
    MatF Wo = rnd(5, 6, 37), Q = 0.4f * rnd(2, 3, 38);
    total += round_trip("oft", dw::oft(Wo, Q));
    MatF Wb = rnd(5, 4, 39), Rp = 0.5f * rnd(1 * 2 * 2, 2, 40);
    VecF s = rndv(5, 41, 1.f);
    total += round_trip("boft", dw::boft(Wb, Rp, s));
    MatF Wr = rnd(4, 5, 42);
    const auto nr = dw::road_parameter_size(dw::road_variant::road_2, 4);
    VecF th = rndv(nr, 43), al = rndv(nr, 44, 1.5f);
    total += round_trip("road", dw::road(Wr, th, al, dw::road_variant::road_2, 2));
  }
  {
    const Eigen::Index k = 2, r = 2, in = 4, out = 6;
    MatF A = rnd(in, r, 45), B = rnd(k * r, out / k, 46), Ah = rnd(1, in, 47), Bh = rnd(out, 1, 48);
    total += round_trip("gralora", dw::gralora(A, B, k, Ah, Bh, dw::scale(0.5)));
    std::vector<std::int32_t> rows{0, 1, 3, 5}, cols{2, 0, 3, 1};
    VecF v = rndv(4, 49);
    total += round_trip("shira", dw::shira(out, in, std::span<const std::int32_t>(rows), std::span<const std::int32_t>(cols), v));
    std::vector<long long> ia(std::size_t(r * in)), ib(std::size_t(out * r));
    std::vector<float> sa(ia.size(), 0.5f), sb(ib.size(), 0.25f);
    for (std::size_t i = 0; i < ia.size(); ++i) ia[i] = (long long)(i % 5);
    for (std::size_t i = 0; i < ib.size(); ++i) ib[i] = (long long)((3 * i) % 5);
    VecF theta = rndv(5, 50);
    total += round_trip("unilora", dw::unilora(out, in, r, std::span<const long long>(ia), std::span<const long long>(ib),
                                               std::span<const float>(sa), std::span<const float>(sb), theta));
    MatF la = rnd(2 * 2, 5, 51), lbm = rnd(3 * 2, 5, 52), bank = rnd(5, 2, 53);
    total += round_trip("vblora", dw::vblora(la, lbm, bank, 2, 2));
    VecF spec = rndv(7, 54);
    total += round_trip("fourierft", dw::fourierft(spec, out, in, 5, dw::scale(40)));
    VecF wspec = rndv(9, 55);
    total += round_trip("waveft", dw::waveft(wspec, out, in, 9, dw::scale(25)));
    MatF K = rnd((out / 2) * (in / 2), 2, 56);
    total += round_trip("c3a", dw::c3a(K, out, in));
  }
  CHECK(total == 0);
}

TEST_CASE("ICM-LoRA flatten: a model's adapters as one vector (tuple of parameter lists), layout checks") {
  using namespace icm_test;
  namespace ag = deltaw::autograd;
  ag::parameter<double> b1("l0.lora_B", dwt::random(5, 2, 1)), a1("l0.lora_A", dwt::random(2, 4, 2)),
      b2("l1.lora_B", dwt::random(3, 2, 3));
  std::vector<ag::parameter<double>*> l0{&b1, &a1}, l1{&b2};
  const auto src = std::make_tuple(l0, l1);
  const auto f = icm::flatten(src);
  REQUIRE(f.layout.tensors.size() == 3);
  CHECK(f.layout.tensors[0].name == "0.l0.lora_B");
  CHECK(f.layout.tensors[2].name == "1.l1.lora_B");
  CHECK(f.layout.length == 10 + 8 + 6);
  // The inverse as owned tensors.
  const auto ts = icm::unflatten_tensors<double>(f.values, f.layout);
  CHECK((ts[1] - a1.value()).norm() <= 1e-15 * a1.value().norm());
  // exact_scale off: μ and σ as computed, the inverse to rounding.
  const auto g = icm::flatten(src, {true, false});
  const auto tg = icm::unflatten_tensors<double>(g.values, g.layout);
  CHECK((tg[0] - b1.value()).norm() <= 1e-14 * b1.value().norm());
  // A common scale for a set of adapters: pooled statistics, and flatten against them.
  const auto cl = icm::common_layout<double>({f, g});
  CHECK(cl.tensors[1].mean == doctest::Approx(a1.value().mean()).epsilon(1e-12));
  const auto fc = icm::flatten(src, cl);
  // double storage: x − μ is not always exact in double, so the inverse is exact to an ulp
  // and the elements that are not bit-identical are counted (float storage: see above).
  const auto back = icm::unflatten_tensors<double>(fc.values, cl);
  int off = 0;
  for (index_t i = 0; i < b2.value().size(); ++i) {
    const double x = b2.value().data()[i], y = back[2].data()[i];
    CHECK(std::abs(x - y) <= 2 * std::numeric_limits<double>::epsilon() * std::max(std::abs(x), std::abs(cl.tensors[2].mean)));
    off += x != y;
  }
  for (index_t i = 0; i < b1.value().size(); ++i) off += b1.value().data()[i] != back[0].data()[i];
  for (index_t i = 0; i < a1.value().size(); ++i) off += a1.value().data()[i] != back[1].data()[i];
  CHECK(fc.inexact == off);
  CHECK_THROWS_AS(icm::flatten(std::make_tuple(l1, l0), cl), deltaw::shape_error);
  // Wrong targets are named.
  std::vector<ag::parameter<double>*> wrong{&a1, &b1};
  CHECK_THROWS_WITH_AS(icm::unflatten_into(f.values, f.layout, std::make_tuple(wrong, l1)),
                       doctest::Contains("'0.l0.lora_B' [5, 2] in the layout"), deltaw::shape_error);
  CHECK_THROWS_AS(icm::unflatten_into(std::vector<double>(5), f.layout, src), deltaw::shape_error);
  CHECK_THROWS_AS(icm::unflatten_into(f.values, f.layout, l0), deltaw::shape_error);
}

TEST_CASE("ICM-LoRA CVAE: the negative ELBO (reconstruction + KL) against central differences") {
  using namespace icm_test;
  icm::cvae_config c;
  c.x_dim = 5;
  c.c_dim = 2;
  c.hidden = 4;
  c.latent = 3;
  c.beta = 0.7;
  c.seed = 3;
  icm::cvae<double> m(c);
  // Non-zero biases so that their gradients are checked away from the symmetric point.
  for (auto* p : m.parameters())
    if (p->rows() == 1) p->value() = 0.1 * dwt::random(1, p->cols(), 60 + std::uint64_t(p->cols()));
  const deltaw::dense<double> X = dwt::random(4, 5, 61), C = dwt::random(4, 2, 62), E = dwt::random(4, 3, 63);
  const auto rep = deltaw::autograd::gradcheck([&](auto& t) { return m.elbo(t, X, C, E).loss; }, m.parameters(), 1e-6);
  INFO("worst " << rep.worst);
  CHECK(rep.max_rel_error < 1e-7);
  CHECK(rep.min_grad_norm > 1e-4);
  // The terms separately: KL of N(μ, e^lv) against N(0, I), recomputed here.
  deltaw::autograd::tape<double> t;
  const auto terms = m.elbo(t, X, C, E);
  CHECK(terms.loss.value()(0, 0) == doctest::Approx(terms.recon.value()(0, 0) + 0.7 * terms.kl.value()(0, 0)).epsilon(1e-12));
  CHECK(terms.kl.value()(0, 0) > 0);
  CHECK_THROWS_AS(m.elbo(t, X, C, dwt::random(4, 2, 1)), deltaw::shape_error);
}

TEST_CASE("ICM-LoRA CVAE: fitted to a smooth family of adapters, it generates held-out ones") {
  using namespace icm_test;
  const index_t x_dim = 12, c_dim = 2, n_train = 40, n_test = 10;
  const family fam(c_dim, x_dim);
  std::mt19937_64 g(9);
  std::uniform_real_distribution<double> u(-1, 1);
  deltaw::dense<double> Ctr(n_train, c_dim), Cte(n_test, c_dim);
  for (index_t i = 0; i < Ctr.size(); ++i) Ctr.data()[i] = u(g);
  for (index_t i = 0; i < Cte.size(); ++i) Cte.data()[i] = u(g);
  const deltaw::dense<double> Xtr = fam(Ctr), Xte = fam(Cte);
  icm::cvae_config c{x_dim, c_dim, 24, 2, 0.05, 4};
  icm::cvae<double> m(c);
  const auto losses = m.train(Xtr, Ctr, 600, 1e-2, 5);
  CHECK(losses.back() < 0.2 * losses.front());
  const deltaw::dense<double> Xg = m.generate(Cte);
  const double err = (Xg - Xte).norm() / Xte.norm();
  // The baseline without the descriptor: the mean training adapter.
  const deltaw::dense<double> mean = Xtr.colwise().mean();
  const double base = (Xte.rowwise() - mean.row(0)).norm() / Xte.norm();
  MESSAGE("held-out relative error: CVAE " << err << ", mean adapter " << base);
  CHECK(err < 0.35 * base);
}
