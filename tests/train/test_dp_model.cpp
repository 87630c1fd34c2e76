// DP-SGD inside tiny_transformer through nn::linear's forward hook: against the ordinary
// batch gradient (no clipping, no noise), against each sample run alone through the model
// (per-sample gradients, clipping), noise from the seed, a train::fit run, and the errors.
#include <deltaw/nn/layers.hpp>
#include <deltaw/train/ffa_dp.hpp>
#include <deltaw/train/loop.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;
namespace op = deltaw::optim;
namespace tr = deltaw::train;
using deltaw::index_t;
using model_t = nn::tiny_transformer<double>;

namespace {
nn::transformer_config small_config() {
  nn::transformer_config c;
  c.vocab = 11;
  c.seq = 5;
  c.d_model = 8;
  c.heads = 2;
  c.d_ff = 12;
  c.layers = 2;
  c.seed = 3;
  return c;
}
// A model with FFA adapters (A frozen) and a random B, so that every layer's output and
// every later layer's gradient depend on the adapters.
std::unique_ptr<model_t> make_model(std::uint64_t b_seed = 7) {
  auto m = std::make_unique<model_t>(small_config());
  m->attach(nn::adapter_kind::lora, 2, 4.0);
  std::uint64_t i = 0;
  for (auto* l : m->adapted_layers()) {
    tr::ffa_init(*l, i, {5, 0});
    l->lora_B()->value() = 0.3 * dwt::random<MatD>(l->out_features(), 2, b_seed + i);
    ++i;
  }
  return m;
}
struct batch_data {
  std::vector<std::int64_t> ids, labels;
  index_t n = 0;
};
batch_data make_batch(index_t n, index_t seq, index_t vocab, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<std::int64_t> u(0, vocab - 1);
  batch_data b;
  b.n = n;
  for (index_t i = 0; i < n * seq; ++i) {
    b.ids.push_back(u(g));
    b.labels.push_back(u(g));
  }
  return b;
}
batch_data sample_of(const batch_data& b, index_t i, index_t seq) {
  batch_data s;
  s.n = 1;
  s.ids.assign(b.ids.begin() + i * seq, b.ids.begin() + (i + 1) * seq);
  s.labels.assign(b.labels.begin() + i * seq, b.labels.begin() + (i + 1) * seq);
  return s;
}
ag::var<double> model_loss(model_t& m, ag::tape<double>& t, const batch_data& b) {
  return ag::cross_entropy(m(t, b.ids, b.n), b.labels);
}
// Plain autograd: the gradient of every adapted layer's B for this batch.
std::vector<MatD> plain_grads(model_t& m, const batch_data& b) {
  auto layers = m.adapted_layers();
  for (auto* l : layers) l->lora_B()->zero_grad();
  ag::tape<double> t;
  t.backward(model_loss(m, t, b));
  std::vector<MatD> g;
  for (auto* l : layers) g.push_back(l->lora_B()->grad());
  return g;
}
// One DP step as train::fit runs it (release_values on).
double dp_step(model_t& m, tr::dp_sgd<double>& dp, const batch_data& b) {
  for (auto* l : m.adapted_layers()) l->lora_B()->zero_grad();
  tr::step_context ctx;
  dp.before_forward(ctx);
  ag::tape<double> t;
  t.set_release_values(true);
  auto loss = model_loss(m, t, b);
  const double v = loss.value()(0, 0);
  t.backward(loss);
  dp.after_backward(ctx);
  return v;
}
bool same_bits(const MatD& a, const MatD& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * std::size_t(a.size())) == 0;
}
}  // namespace

TEST_CASE("DP-SGD in tiny_transformer: sigma 0 and no clipping give the ordinary batch gradient of every B") {
  auto m = make_model();
  const auto c = m->config();
  const auto b = make_batch(4, c.seq, c.vocab, 11);
  const auto want = plain_grads(*m, b);

  tr::dp_sgd_options o;
  o.clip_norm = 1e6;
  o.noise_multiplier = 0;
  tr::dp_sgd<double> dp(*m, o);
  CHECK(dp.attached());
  CHECK(dp.options().rows_per_sample == c.seq);
  CHECK(dp.layers().size() == 12);
  dp_step(*m, dp, b);
  double worst = 0, smallest = 1e300;
  const auto layers = m->adapted_layers();
  for (std::size_t l = 0; l < layers.size(); ++l) {
    worst = std::max(worst, dwt::rel_err(layers[l]->lora_B()->grad(), want[l]));
    smallest = std::min(smallest, want[l].norm());
  }
  for (double f : dp.clip_factors()) CHECK(f == 1.0);
  std::printf("DP-SGD hooks in tiny_transformer (sigma 0, C 1e6) vs autograd batch gradient, 12 layers: max rel err %.2e\n",
              worst);
  CHECK(worst < 1e-12);
  CHECK(smallest > 1e-6);  // every layer's gradient is non-trivial
}

TEST_CASE("DP-SGD in tiny_transformer: per-sample gradients equal each sample run alone; clipped mean") {
  auto m = make_model();
  const auto c = m->config();
  const index_t N = 4;
  const auto b = make_batch(N, c.seq, c.vocab, 12);
  const auto layers = m->adapted_layers();
  const std::size_t L = layers.size();

  // Reference: each sample alone through the model (batch 1, its own mean cross-entropy).
  std::vector<std::vector<MatD>> g(static_cast<std::size_t>(N));
  std::vector<double> norms;
  for (index_t i = 0; i < N; ++i) {
    g[std::size_t(i)] = plain_grads(*m, sample_of(b, i, c.seq));
    double sq = 0;
    for (const auto& gl : g[std::size_t(i)]) sq += gl.squaredNorm();
    norms.push_back(std::sqrt(sq));
  }
  std::vector<double> sorted = norms;
  std::sort(sorted.begin(), sorted.end());
  const double C = 0.5 * (sorted[1] + sorted[2]);  // two samples clipped, two not

  tr::dp_sgd_options o;
  o.clip_norm = C;
  o.noise_multiplier = 0;
  o.keep_last_step = true;
  tr::dp_sgd<double> dp(*m, o);
  dp_step(*m, dp, b);

  double worst_g = 0, worst_n = 0;
  for (std::size_t l = 0; l < L; ++l)
    for (index_t i = 0; i < N; ++i)
      worst_g = std::max(worst_g, dwt::rel_err(dp.per_sample_grad(l, std::size_t(i)), g[std::size_t(i)][l]));
  for (index_t i = 0; i < N; ++i)
    worst_n = std::max(worst_n, std::abs(dp.sample_norms()[std::size_t(i)] - norms[std::size_t(i)]) / norms[std::size_t(i)]);
  std::printf("DP-SGD hook path per-sample gradients (12 layers x 4 samples) vs each sample alone: max rel err %.2e; "
              "norms %.2e\n",
              worst_g, worst_n);
  CHECK(worst_g < 1e-10);
  CHECK(worst_n < 1e-10);

  int clipped = 0;
  double worst = 0;
  for (std::size_t l = 0; l < L; ++l) {
    MatD want = MatD::Zero(g[0][l].rows(), g[0][l].cols());
    for (index_t i = 0; i < N; ++i) want += std::min(1.0, C / norms[std::size_t(i)]) * g[std::size_t(i)][l] / double(N);
    worst = std::max(worst, dwt::rel_err(layers[l]->lora_B()->grad(), want));
  }
  for (index_t i = 0; i < N; ++i) {
    clipped += norms[std::size_t(i)] > C;
    CHECK(dp.clip_factors()[std::size_t(i)] * dp.sample_norms()[std::size_t(i)] <= C * (1 + 1e-12));
  }
  CHECK(clipped == 2);
  std::printf("DP-SGD privatised gradient (C = %.3g, 2 of 4 clipped) vs sum of clipped independent gradients / N: "
              "max rel err %.2e\n",
              C, worst);
  CHECK(worst < 1e-10);
}

TEST_CASE("DP-SGD in tiny_transformer: the noise is sigma*C*z/N from the seed, bitwise reproducible") {
  const auto c = small_config();
  const auto b = make_batch(3, c.seq, c.vocab, 13);
  tr::dp_sgd_options o;
  o.clip_norm = 0.05;
  o.noise_multiplier = 1.7;
  o.seed = 99;
  auto run = [&](const tr::dp_sgd_options& opt, int steps) {
    auto m = make_model();
    tr::dp_sgd<double> dp(*m, opt);
    for (int k = 0; k < steps; ++k) dp_step(*m, dp, b);
    std::vector<MatD> out;
    for (auto* l : m->adapted_layers()) out.push_back(l->lora_B()->grad());
    return out;
  };
  const auto a = run(o, 2), a2 = run(o, 2);
  auto o0 = o;
  o0.noise_multiplier = 0;
  const auto clean = run(o0, 2);
  auto o1 = o;
  o1.seed = 100;
  const auto other = run(o1, 2);
  bool same = true, differs = true;
  double worst = 0;
  for (std::size_t l = 0; l < a.size(); ++l) {
    same = same && same_bits(a[l], a2[l]);
    differs = differs && !same_bits(a[l], other[l]);
    // Step 2 (counter 1) of layer l: stream (seed, 1·2¹⁶ + l).
    const deltaw::random_stream st{o.seed, (std::uint64_t(1) << 16) | std::uint64_t(l)};
    MatD z(a[l].rows(), a[l].cols());
    for (index_t j = 0; j < z.size(); ++j) z.data()[j] = o.noise_multiplier * o.clip_norm * double(st.normal(std::uint64_t(j))) / 3.0;
    worst = std::max(worst, dwt::rel_err(MatD(a[l] - clean[l]), z));
  }
  CHECK(same);
  CHECK(differs);
  std::printf("DP-SGD in tiny_transformer: noise vs sigma*C*z/N from Philox (seed, step, layer): max rel err %.2e\n", worst);
  CHECK(worst < 1e-12);
}

TEST_CASE("DP-SGD in tiny_transformer under train::fit: the loss decreases; evaluation passes are not captured") {
  auto m = make_model(0);
  for (auto* l : m->adapted_layers()) l->lora_B()->value().setZero();  // FFA's start
  const auto c = m->config();
  const auto b = make_batch(8, c.seq, c.vocab, 14);
  tr::dp_sgd_options o;
  o.clip_norm = 1.0;
  o.noise_multiplier = 0.3;
  o.seed = 1;
  tr::dp_sgd<double> dp(*m, o);
  std::vector<ag::parameter<double>*> bs;
  for (auto* l : m->adapted_layers()) bs.push_back(l->lora_B());
  op::adamw<double> opt(bs, {2e-2, 0.9, 0.999, 1e-8, 0.0});
  tr::fit_options fo;
  fo.steps = 40;
  fo.log_every = 0;
  const auto r = tr::fit<double>([&](ag::tape<double>& t, index_t) { return model_loss(*m, t, b); }, opt, {&dp}, fo);
  double tail = 0;
  for (std::size_t k = r.losses.size() - 5; k < r.losses.size(); ++k) tail += r.losses[k] / 5;
  std::printf("DP-SGD (sigma 0.3, C 1) fit on tiny_transformer, 40 steps: loss %.4f -> mean of last 5 %.4f\n",
              r.first_loss, tail);
  CHECK(tail < r.first_loss - 0.05);
  CHECK(dp.steps() == 40);

  // A no_grad evaluation pass with the hooks attached records no capture node (the same
  // tape as without hooks); a pass with gradients records one per layer.
  auto nodes = [&](bool grad) {
    ag::tape<double> t;
    ag::no_grad<double> ng(t);
    t.set_grad_enabled(grad);
    model_loss(*m, t, b);
    return t.size();
  };
  const index_t hooked = nodes(false), hooked_grad = nodes(true);
  dp.detach();
  const index_t plain = nodes(false);
  dp.attach();
  CHECK(hooked == plain);
  CHECK(hooked_grad == plain + 12);
  CHECK_NOTHROW(dp_step(*m, dp, b));
  CHECK(dp.steps() == 41);
}

TEST_CASE("DP-SGD hooks: errors, one hook per layer, detached on destruction") {
  // No adapter at all.
  {
    model_t bare(small_config());
    dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double> dp(bare, {}); }, {"dp_sgd", "no adapted layer"});
    auto ls = bare.projections();
    dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double> dp({ls[0]}, {}); },
                                                   {"'block0.q'", "needs a LoRA or rsLoRA adapter"});
  }
  // A trainable A (no ffa_init).
  {
    model_t m(small_config());
    m.attach(nn::adapter_kind::lora, 2, 4.0);
    dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double> dp(m, {}); }, {"'block0.q'", "trainable A"});
  }
  auto m = make_model();
  auto layers = m->adapted_layers();
  // Another trainable parameter of the model would leak.
  m->groups().head[0]->set_trainable(true);
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double> dp(*m, {}); },
                                                 {"'final_ln.weight'", "not the B of an adapted layer", "privatised"});
  m->groups().head[0]->set_trainable(false);
  for (auto* l : layers) CHECK_FALSE(l->has_forward_hook());  // the failed constructions left none
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double> dp({layers[0], layers[1], layers[0]}, {}); },
                                                 {"'block0.q'", "listed twice"});
  {
    tr::dp_sgd<double> dp(*m, {});
    for (auto* l : layers) CHECK(l->forward_hook_owner() == &dp);
    dwt::check_throws_with<deltaw::argument_error>([&] { dp.attach(); }, {"dp_sgd::attach", "already attached"});
    dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double> dp2(*m, {}); },
                                                   {"'block0.q'", "already has a forward hook", "another owner"});
    ag::tape<double> t;
    auto x = t.frozen(MatD(MatD::Ones(5, 8)));
    dwt::check_throws_with<deltaw::argument_error>([&] { dp.forward(t, 0, x); }, {"dp_sgd::forward", "hooks are attached"});
    // nn::linear itself: one hook per layer, named.
    dwt::check_throws_with<deltaw::argument_error>(
        [&] { layers[3]->set_forward_hook([](ag::tape<double>&, const ag::var<double>&, const ag::var<double>& y) { return y; }); },
        {"linear(block0.o)::set_forward_hook", "already has a forward hook", "another owner"});
    CHECK_FALSE(layers[3]->clear_forward_hook(&t));  // not the owner: nothing removed
    CHECK(layers[3]->has_forward_hook());
    dp.detach();
    for (auto* l : layers) CHECK_FALSE(l->has_forward_hook());
    dp.attach();
    CHECK(layers[3]->has_forward_hook());
  }
  for (auto* l : layers) CHECK_FALSE(l->has_forward_hook());  // the destructor detached

  // A hook returning y leaves the output bit for bit; one returning a recorded node
  // (here 2·y) replaces the layer's output.
  const auto b = make_batch(2, 5, 11, 15);
  ag::tape<double> t1, t2, t3;
  const MatD y1 = (*m)(t1, b.ids, b.n).value();
  layers.back()->set_forward_hook([](ag::tape<double>&, const ag::var<double>&, const ag::var<double>& y) { return y; });
  const MatD y2 = (*m)(t2, b.ids, b.n).value();
  CHECK(layers.back()->clear_forward_hook());
  layers.back()->set_forward_hook([](ag::tape<double>&, const ag::var<double>&, const ag::var<double>& y) {
    return ag::scale(y, 2.0);
  });
  const MatD y3 = (*m)(t3, b.ids, b.n).value();
  CHECK(layers.back()->clear_forward_hook());
  CHECK(same_bits(y1, y2));
  CHECK(dwt::rel_err(y1, y3) > 1e-3);
  dwt::check_throws_with<deltaw::argument_error>([&] { layers[0]->set_forward_hook(nullptr); }, {"empty hook"});
}
