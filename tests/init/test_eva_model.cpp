// EVA from a tiny_transformer's forward passes (init/eva_model.hpp): the inputs the hooks
// collect against a forward pass written out in Eigen (embedding, LayerNorm, causal
// attention, exact GELU), and eva_init against eva_state fed those manual inputs.
#include "../test_util.hpp"

#include <deltaw/init/eva_model.hpp>
#include <deltaw/nn/layers.hpp>

#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace dw = deltaw;
namespace nn = deltaw::nn;
using dw::index_t;
using dwt::MatD;
using model_t = nn::tiny_transformer<double>;

namespace {
nn::transformer_config config() {
  nn::transformer_config c;
  c.vocab = 16;
  c.seq = 8;
  c.d_model = 12;
  c.heads = 2;
  c.d_ff = 16;
  c.layers = 2;
  c.seed = 4;
  return c;
}

// The embedding tables, drawn as tiny_transformer's constructor draws them (token table,
// position table, head, then the block weights); the block weights check the order.
struct tables {
  MatD tok, pos;
};
tables regenerate(model_t& m) {
  const auto c = m.config();
  std::mt19937_64 g(c.seed);
  tables t{nn::uniform<double>(c.vocab, c.d_model, 1.0, g), nn::uniform<double>(c.seq, c.d_model, 0.5, g)};
  nn::uniform<double>(c.vocab, c.d_model, 1.0 / std::sqrt(double(c.d_model)), g);  // head
  const MatD q0 = nn::uniform<double>(c.d_model, c.d_model, 1.0 / std::sqrt(double(c.d_model)), g);
  REQUIRE(q0 == *m.projection_weights()[0]);
  return t;
}

MatD layer_norm(const MatD& x) {
  MatD y(x.rows(), x.cols());
  for (index_t i = 0; i < x.rows(); ++i) {
    const double mu = x.row(i).mean();
    const double var = (x.row(i).array() - mu).square().mean();
    y.row(i) = (x.row(i).array() - mu) / std::sqrt(var + 1e-5);
  }
  return y;
}
MatD gelu(const MatD& x) {
  return x.unaryExpr([](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); });
}
MatD attention(const MatD& Q, const MatD& K, const MatD& V, index_t batch, index_t seq, index_t heads) {
  const index_t dh = Q.cols() / heads;
  MatD out = MatD::Zero(Q.rows(), Q.cols());
  for (index_t b = 0; b < batch; ++b)
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < seq; ++i) {
        std::vector<double> w(std::size_t(i + 1));
        double mx = -1e300, z = 0;
        for (index_t j = 0; j <= i; ++j) {
          w[std::size_t(j)] = Q.row(b * seq + i).segment(h * dh, dh).dot(K.row(b * seq + j).segment(h * dh, dh)) /
                              std::sqrt(double(dh));
          mx = std::max(mx, w[std::size_t(j)]);
        }
        for (auto& v : w) z += (v = std::exp(v - mx));
        for (index_t j = 0; j <= i; ++j)
          out.row(b * seq + i).segment(h * dh, dh) += (w[std::size_t(j)] / z) * V.row(b * seq + j).segment(h * dh, dh);
      }
  return out;
}
// Every projection's input (all rows), in the order of model.projections().
std::vector<MatD> manual_inputs(model_t& m, const tables& tb, const std::vector<std::int64_t>& ids, index_t batch) {
  const auto c = m.config();
  const auto layers = m.projections();
  const auto W = m.projection_weights();
  auto lin = [&](const MatD& h, std::size_t k) {
    MatD y = h * W[k]->transpose();
    if (layers[k]->has_adapter())
      y += layers[k]->scale() * (h * layers[k]->lora_A()->value().transpose()) * layers[k]->lora_B()->value().transpose();
    return y;
  };
  MatD x(batch * c.seq, c.d_model);
  for (index_t r = 0; r < x.rows(); ++r) x.row(r) = tb.tok.row(ids[std::size_t(r)]) + tb.pos.row(r % c.seq);
  std::vector<MatD> in;
  for (index_t blk = 0; blk < c.layers; ++blk) {
    const std::size_t k = std::size_t(6 * blk);
    const MatD h = layer_norm(x);
    const MatD a = attention(lin(h, k), lin(h, k + 1), lin(h, k + 2), batch, c.seq, c.heads);
    const MatD x1 = x + lin(a, k + 3);
    const MatD h2 = layer_norm(x1);
    const MatD u = gelu(lin(h2, k + 4));
    for (const MatD* p : {&h, &h, &h, &a, &h2, &u}) in.push_back(*p);
    x = x1 + lin(u, k + 5);
  }
  return in;
}
MatD kept_rows(const MatD& X, const std::vector<std::uint8_t>& keep) {
  MatD out(std::count(keep.begin(), keep.end(), 1), X.cols());
  for (index_t i = 0, o = 0; i < X.rows(); ++i)
    if (keep[std::size_t(i)]) out.row(o++) = X.row(i);
  return out;
}
// Batch b: random tokens, about one label in five −100.
dw::eva_batch make_batch(index_t b, index_t n, const nn::transformer_config& c) {
  std::mt19937_64 g(1000 + std::uint64_t(b));
  std::uniform_int_distribution<std::int64_t> u(0, c.vocab - 1);
  std::uniform_real_distribution<double> p(0, 1);
  dw::eva_batch out;
  out.batch = n;
  for (index_t i = 0; i < n * c.seq; ++i) {
    out.ids.push_back(u(g));
    out.labels.push_back(p(g) < 0.2 ? -100 : u(g));
  }
  return out;
}
}  // namespace

TEST_CASE("eva_collect_inputs: each adapted layer's kept input rows, as a manual Eigen forward pass computes them") {
  model_t m(config());
  m.attach(nn::adapter_kind::lora, 2, 4.0);
  std::uint64_t s = 50;
  for (auto* l : m.adapted_layers()) l->lora_B()->value() = 0.2 * dwt::random<MatD>(l->out_features(), 2, s++);
  const tables tb = regenerate(m);
  const auto b = make_batch(0, 3, m.config());
  const auto keep = dw::eva_token_mask(b.labels);
  const auto got = dw::eva_collect_inputs(m, b);
  const auto want = manual_inputs(m, tb, b.ids, b.batch);
  REQUIRE(got.size() == 12);
  double worst = 0;
  for (std::size_t l = 0; l < got.size(); ++l) {
    CHECK(got[l].rows() == index_t(std::count(keep.begin(), keep.end(), 1)));
    worst = std::max(worst, dwt::rel_err(got[l], kept_rows(want[l], keep)));
  }
  std::printf("EVA hooks: collected inputs of 12 layers (%td of %zu tokens kept) vs manual Eigen forward: max rel err %.2e\n",
              got[0].rows(), keep.size(), worst);
  CHECK(worst < 1e-12);
  CHECK(got[0].rows() < index_t(keep.size()));  // some tokens were dropped
  for (auto* l : m.adapted_layers()) CHECK_FALSE(l->has_forward_hook());
}

TEST_CASE("eva_init(model) equals eva_state fed with manually computed inputs: same ranks, same components, applied") {
  const auto c = config();
  model_t m(c);
  m.attach(nn::adapter_kind::lora, 3, 6.0);
  const tables tb = regenerate(m);
  const auto layers = m.adapted_layers();
  dw::eva_model_options o;
  o.eva.alpha = 6.0;
  o.eva.tau = 0.99;
  o.max_batches = 60;
  o.allow_unconverged = true;  // the comparison holds either way; the run prints whether it converged
  auto data = [&](index_t b) { return make_batch(b, 8, c); };

  // The explicit route: groups named by hand (q, k, v of a block share the input).
  std::vector<dw::eva_layer> spec;
  for (std::size_t l = 0; l < layers.size(); ++l)
    spec.push_back({layers[l]->name(), layers[l]->in_features(), layers[l]->out_features(), 3,
                    l % 6 < 3 ? "block" + std::to_string(l / 6) + ".qkv" : std::string()});
  dw::eva_state st(spec, o.eva);
  const index_t used = dw::eva_fit(
      st,
      [&](index_t b, dw::eva_state& s) {
        const auto batch = data(b);
        const auto keep = dw::eva_token_mask(batch.labels);
        const auto X = manual_inputs(m, tb, batch.ids, batch.batch);
        for (std::size_t l = 0; l < layers.size(); ++l)
          if (s.needs_input(l)) s.observe(l, X[l], keep);
      },
      o.max_batches);
  const auto want = st.result<double>(true);

  const auto r = dw::eva_init(m, data, o);
  CHECK(r.batches == used);
  CHECK(r.converged == st.done());
  CHECK(r.ranks == st.ranks());
  index_t total = 0;
  for (auto k : r.ranks) total += k;
  CHECK(total == 3 * 12);
  // The groups found from the tape: q, k, v of each block together, the rest alone.
  for (std::size_t l = 0; l < layers.size(); ++l)
    for (std::size_t j = 0; j < layers.size(); ++j)
      CHECK((r.input_groups[l] == r.input_groups[j]) == (l == j || (l / 6 == j / 6 && l % 6 < 3 && j % 6 < 3)));
  double worst_cos = 1, worst_s = 0;
  int with = 0, without = 0;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    const auto& a = r.adapters[l];
    REQUIRE(a.rank == want[l].rank);
    CHECK(a.alpha == doctest::Approx(want[l].alpha));
    for (index_t k = 0; k < a.rank; ++k) {
      const auto x = a.factors.A.row(k), y = want[l].factors.A.row(k);
      worst_cos = std::min(worst_cos, std::abs(x.dot(y)) / (x.norm() * y.norm()));
    }
    // Applied: the layer carries A = the components, B = 0, s = α/r_l (or no adapter).
    CHECK(layers[l]->has_adapter() == (a.rank > 0));
    if (a.rank > 0) {
      ++with;
      CHECK(layers[l]->lora_A()->value() == a.factors.A);
      CHECK(layers[l]->lora_A()->grad().rows() == a.rank);
      CHECK(layers[l]->lora_B()->value().rows() == layers[l]->out_features());
      CHECK(layers[l]->lora_B()->value().cols() == a.rank);
      CHECK(layers[l]->lora_B()->value().norm() == 0);
      worst_s = std::max(worst_s, std::abs(layers[l]->scale() - 6.0 / 3.0));
    } else {
      ++without;
    }
  }
  std::printf("eva_init(model) vs eva_state on manual inputs: %td batches (converged %d), ranks equal, "
              "min |cos| of components %.15f; %d layers adapted, %d given rank 0\n",
              r.batches, int(r.converged), worst_cos, with, without);
  CHECK(worst_cos > 1 - 1e-9);
  CHECK(worst_s < 1e-15);
  // The adapted model still runs (and the ranks changed shape consistently).
  dw::autograd::tape<double> t;
  const auto b = data(0);
  CHECK_NOTHROW(m(t, b.ids, b.batch));
}

TEST_CASE("eva_init over nn::linear layers: converges, a concentrated spectrum takes the budget, rank 0 drops the adapter") {
  // Layer a sees rank-4 data with variances 16, 9, 6, 4 in a fixed subspace of R^20; layer
  // b sees isotropic data in R^20. Budget 2 + 2 = 4 of the 4 + 4 pooled ratios: a's four
  // (≈ 0.46, 0.26, 0.17, 0.11) beat b's (≈ 1/20 each): b gets rank 0.
  const MatD Wa = dwt::random<MatD>(5, 20, 1), Wb = dwt::random<MatD>(6, 20, 2);
  nn::linear<double> la("a", dw::view(Wa)), lb("b", dw::view(Wb));
  std::mt19937_64 g(3);
  la.attach(nn::adapter_kind::rslora, 2, 4.0, g);
  lb.attach(nn::adapter_kind::lora, 2, 4.0, g);
  const Eigen::HouseholderQR<MatD> qr(dwt::random<MatD>(20, 4, 4));
  const MatD basis = qr.householderQ() * MatD::Identity(20, 4);  // [20, 4] orthonormal
  std::vector<MatD> xa, xb;
  auto data = [&](index_t b) {
    std::mt19937_64 gb(100 + std::uint64_t(b));
    std::normal_distribution<double> nd;
    MatD Z(64, 4), N(64, 20);
    for (index_t i = 0; i < Z.size(); ++i) Z.data()[i] = nd(gb);
    for (index_t i = 0; i < N.size(); ++i) N.data()[i] = nd(gb);
    const Eigen::Vector4d sd(4, 3, std::sqrt(6.0), 2);
    xa.push_back(Z * sd.asDiagonal() * basis.transpose());
    xb.push_back(N);
    dw::eva_batch e;
    e.ids.assign(64, 0);  // one row per token: the mask's length
    e.batch = 1;
    return e;
  };
  dw::eva_model_options o;
  o.eva.alpha = 4.0;
  o.max_batches = 30;
  const auto r = dw::eva_init<double>(
      {&la, &lb}, data,
      [&](dw::autograd::tape<double>& t, const dw::eva_batch&) {
        la(t, t.frozen(xa.back()));
        lb(t, t.frozen(xb.back()));
      },
      o);
  std::printf("eva_init over two layers: %td batches, converged %d, ranks a %td, b %td\n", r.batches, int(r.converged),
              r.ranks[0], r.ranks[1]);
  CHECK(r.converged);
  CHECK(r.ranks[0] == 4);
  CHECK(r.ranks[1] == 0);
  CHECK(r.input_groups[0] != r.input_groups[1]);
  // a's components span the data's subspace (the projection onto it keeps their norm).
  const MatD& A = la.lora_A()->value();
  REQUIRE(A.rows() == r.ranks[0]);
  const double inside = (A * basis).norm() / A.norm();
  CHECK(inside > 1 - 1e-9);
  // rsLoRA: s = α_l/√rank_l with α_l = α·rank_l/r_l.
  CHECK(la.scale() == doctest::Approx(4.0 * double(r.ranks[0]) / 2.0 / std::sqrt(double(r.ranks[0]))));
  CHECK(lb.has_adapter() == (r.ranks[1] > 0));
  if (r.ranks[1] == 0) {
    // Without an adapter the layer is the frozen one.
    dw::autograd::tape<double> t;
    CHECK(dwt::rel_err(lb(t, t.frozen(xb[0])).value(), MatD(xb[0] * Wb.transpose())) < 1e-15);
  }
}

TEST_CASE("eva_init / eva_collect_inputs: errors") {
  const auto c = config();
  auto data = [&](index_t b) { return make_batch(b, 2, c); };
  {
    model_t m(c);
    dwt::check_throws_with<dw::argument_error>([&] { dw::eva_init(m, data, {}); }, {"eva_init", "no layers"});
  }
  {
    model_t m(c);
    m.attach(nn::adapter_kind::dora, 2, 4.0);
    dwt::check_throws_with<dw::argument_error>([&] { dw::eva_init(m, data, {}); }, {"'block0.q'", "DoRA"});
  }
  model_t m(c);
  m.attach(nn::adapter_kind::lora, 2, 4.0);
  auto b = data(0);
  b.labels.pop_back();
  dwt::check_throws_with<dw::shape_error>([&] { dw::eva_collect_inputs(m, b); }, {"eva_init", "labels for"});
  auto* q = m.adapted_layers()[0];
  q->set_forward_hook([](dw::autograd::tape<double>&, const dw::autograd::var<double>&,
                         const dw::autograd::var<double>& y) { return y; });
  dwt::check_throws_with<dw::argument_error>([&] { dw::eva_init(m, data, {}); },
                                            {"'block0.q'", "already has a forward hook"});
  q->clear_forward_hook();
  for (auto* l : m.adapted_layers()) CHECK_FALSE(l->has_forward_hook());  // the failed call left none behind
  // A forward pass that skips a layer.
  auto layers = m.adapted_layers();
  dwt::check_throws_with<dw::argument_error>(
      [&] {
        dw::eva_init<double>(
            layers, data, [&](dw::autograd::tape<double>& t, const dw::eva_batch&) { (*layers[0])(t, t.frozen(MatD(MatD::Ones(16, 12)))); },
            dw::eva_model_options{});
      },
      {"'block0.k'", "not run by the forward pass"});
  // Not converged within max_batches (τ = 1 cannot be met) and not allowed.
  dw::eva_model_options o;
  o.eva.tau = 1.0;
  o.max_batches = 2;
  dwt::check_throws_with<dw::argument_error>([&] { dw::eva_init(m, data, o); }, {"has not converged"});
}

TEST_CASE("eva_init on tiny_transformer<float>: runs, applies shapes consistent with the ranks") {
  const auto c = config();
  nn::tiny_transformer<float> m(c);
  m.attach(nn::adapter_kind::lora, 2, 4.0);
  dw::eva_model_options o;
  o.max_batches = 3;
  o.allow_unconverged = true;
  const auto r = dw::eva_init(m, [&](index_t b) { return make_batch(b, 4, c); }, o);
  index_t total = 0;
  for (std::size_t l = 0; l < r.ranks.size(); ++l) {
    total += r.ranks[l];
    CHECK(r.adapters[l].factors.A.rows() == r.ranks[l]);
  }
  CHECK(total == 2 * 12);
  CHECK(index_t(m.adapted_layers().size()) == index_t(std::count_if(r.ranks.begin(), r.ranks.end(), [](index_t k) { return k > 0; })));
}
