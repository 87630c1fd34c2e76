// FFA-LoRA (frozen random A, exact federated averaging of B) and DP-SGD on B: per-sample
// gradients against each sample's own autograd pass, clipping, noise statistics and
// reproducibility.
#include <deltaw/nn/layers.hpp>
#include <deltaw/train/ffa_dp.hpp>
#include <deltaw/train/loop.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../autograd/grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;
namespace op = deltaw::optim;
namespace tr = deltaw::train;
using deltaw::index_t;

// Every member compiles for float too (the tests below run in double).
template class deltaw::train::ffa_lora<float>;
template class deltaw::train::dp_sgd<float>;

namespace {
bool ffa_same_bits(const MatD& a, const MatD& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(double) * std::size_t(a.size())) == 0;
}
MatD rows_of(const MatD& m, index_t a, index_t n) { return m.middleRows(a, n); }
}  // namespace

TEST_CASE("FFA-LoRA: A regenerated from the seed and frozen, B zero; A never changes while B trains") {
  const MatD W = dwt::random<MatD>(5, 7, 1);
  nn::linear<double> layer("l", deltaw::view(W));
  std::mt19937_64 g(3);
  layer.attach(nn::adapter_kind::lora, 3, 6.0, g);
  layer.lora_B()->value() = dwt::random<MatD>(5, 3, 2);  // ffa_init must zero it
  tr::ffa_lora<double> ffa({&layer}, {42, 0});
  const MatD A = layer.lora_A()->value();
  CHECK(ffa_same_bits(A, tr::ffa_random_A<double>(3, 7, 42, 0)));
  CHECK_FALSE(ffa_same_bits(A, tr::ffa_random_A<double>(3, 7, 43, 0)));
  CHECK_FALSE(ffa_same_bits(A, tr::ffa_random_A<double>(3, 7, 42, 1)));
  CHECK(A.cwiseAbs().maxCoeff() < 1 / std::sqrt(7.0));
  CHECK(A.cwiseAbs().maxCoeff() > 0.5 / std::sqrt(7.0));
  CHECK(layer.lora_B()->value().norm() == 0);
  CHECK_FALSE(layer.lora_A()->trainable());
  CHECK(ffa.a_unchanged());

  // Train with both factors handed to the optimiser: only B moves.
  const MatD X = dwt::random<MatD>(8, 7, 4), Y = dwt::random<MatD>(8, 5, 5);
  op::adamw<double> opt({layer.lora_B(), layer.lora_A()}, {1e-2, 0.9, 0.999, 1e-8, 0.0});
  tr::fit_options o;
  o.steps = 20;
  o.log_every = 0;
  const auto r = tr::fit<double>(
      [&](ag::tape<double>& t, index_t) { return ag::mse(layer(t, t.frozen(X)), t.frozen(Y)); }, opt, {&ffa}, o);
  CHECK(r.final_loss < r.first_loss);
  CHECK(layer.lora_B()->value().norm() > 0);
  CHECK(ffa_same_bits(layer.lora_A()->value(), A));
  CHECK(ffa.a_unchanged());
}

TEST_CASE("FFA-LoRA: averaging the clients' B reproduces the exact average of their updates (dense, double)") {
  const index_t m = 9, n = 11, r = 4, K = 5;
  const MatD W = dwt::random<MatD>(m, n, 10);
  std::mt19937_64 g(11);
  std::vector<std::unique_ptr<nn::linear<double>>> clients;
  for (index_t k = 0; k < K; ++k) {
    clients.push_back(std::make_unique<nn::linear<double>>("q", deltaw::view(W)));
    clients.back()->attach(nn::adapter_kind::rslora, r, 8.0, g);
    tr::ffa_init(*clients.back(), 3, {77, 0});
    // Local training, simulated: each client ends with its own B.
    clients.back()->lora_B()->value() = dwt::random<MatD>(m, r, 100 + std::uint64_t(k));
  }
  nn::linear<double> server("q", deltaw::view(W));
  server.attach(nn::adapter_kind::rslora, r, 8.0, g);
  tr::ffa_init(server, 3, {77, 0});
  const std::vector<double> weights{1, 2, 3, 4, 5};  // e.g. sample counts
  std::vector<std::vector<nn::linear<double>*>> cl;
  for (auto& c : clients) cl.push_back({c.get()});
  tr::ffa_aggregate<double>(cl, {&server}, weights);

  // The reference: Σₖ pₖ·ΔWₖ, each ΔWₖ = s·Bₖ·Aₖ formed densely.
  const double s = server.scale();
  MatD want = MatD::Zero(m, n);
  for (index_t k = 0; k < K; ++k)
    want += (weights[std::size_t(k)] / 15.0) * s * clients[std::size_t(k)]->lora_B()->value() *
            clients[std::size_t(k)]->lora_A()->value();
  const MatD got = s * server.lora_B()->value() * server.lora_A()->value();
  const double err = dwt::rel_err(got, want);
  std::printf("FFA FedAvg of B vs average of dense updates: rel err %.2e\n", err);
  CHECK(err < 1e-14);
  CHECK(want.norm() > 0.1);

  // Without the shared A (plain LoRA, each client its own A), FedAvg of A and B apart
  // is far from the average update: the property is not a tautology.
  MatD Bbar = MatD::Zero(m, r), Abar = MatD::Zero(r, n), avg = MatD::Zero(m, n);
  for (index_t k = 0; k < K; ++k) {
    const MatD Ak = dwt::random<MatD>(r, n, 200 + std::uint64_t(k));
    const MatD& Bk = clients[std::size_t(k)]->lora_B()->value();
    const double p = weights[std::size_t(k)] / 15.0;
    Bbar += p * Bk;
    Abar += p * Ak;
    avg += p * s * Bk * Ak;
  }
  const double naive = dwt::rel_err(MatD(s * Bbar * Abar), avg);
  std::printf("FedAvg of B and A separately (distinct A): rel err %.2e\n", naive);
  CHECK(naive > 1e-2);

  // Clients whose A differ (another seed) are refused.
  nn::linear<double> stranger("q", deltaw::view(W));
  stranger.attach(nn::adapter_kind::rslora, r, 8.0, g);
  tr::ffa_init(stranger, 3, {78, 0});
  cl.push_back({&stranger});
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::ffa_aggregate<double>(cl, {&server}); },
                                                 {"ffa_aggregate", "client 5", "A", "same seed"});
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { tr::federated_average<double>({server.lora_B()->view()}, {1.0, 2.0}); }, {"2 weights for 1 clients"});
}

namespace {
// A two-layer model y = gelu(x·W1'ᵀ)·W2'ᵀ with FFA layers; sample i's loss is
// Σ R_i ⊙ gelu(y_i) over its rows (so the batch loss is the plain sum: loss_weight 1).
struct two_layer {
  MatD W1 = dwt::random<MatD>(5, 6, 20), W2 = dwt::random<MatD>(4, 5, 21);
  nn::linear<double> l1{"l1", deltaw::view(W1)}, l2{"l2", deltaw::view(W2)};
  two_layer() {
    std::mt19937_64 g(22);
    l1.attach(nn::adapter_kind::lora, 3, 3.0, g);
    l2.attach(nn::adapter_kind::lora, 2, 4.0, g);
    tr::ffa_init(l1, 0, {5, 0});
    tr::ffa_init(l2, 1, {5, 0});
    l1.lora_B()->value() = dwt::random<MatD>(5, 3, 23);
    l2.lora_B()->value() = dwt::random<MatD>(4, 2, 24);
  }
};
}  // namespace

TEST_CASE("DP-SGD: per-sample gradients equal each sample's own autograd gradient; clipping; mean of clipped") {
  two_layer net;
  const std::vector<index_t> offs{0, 2, 5, 6, 9};  // four samples of 2, 3, 1, 3 rows
  const index_t N = 4;
  const MatD X = dwt::random<MatD>(9, 6, 30), R = dwt::random<MatD>(9, 4, 31);

  // Reference: every sample alone through the autograd, the gradients of both B.
  std::vector<MatD> g1, g2;
  std::vector<double> norms;
  for (index_t i = 0; i < N; ++i) {
    const index_t a = offs[std::size_t(i)], k = offs[std::size_t(i) + 1] - a;
    const MatD Xi = rows_of(X, a, k), Ri = rows_of(R, a, k);
    net.l1.lora_B()->zero_grad();
    net.l2.lora_B()->zero_grad();
    ag::tape<double> t;
    auto y = net.l2(t, ag::gelu(net.l1(t, t.frozen(Xi))));
    t.backward(ag::weighted_sum(ag::gelu(y), Ri));
    g1.push_back(net.l1.lora_B()->grad());
    g2.push_back(net.l2.lora_B()->grad());
    norms.push_back(std::sqrt(g1.back().squaredNorm() + g2.back().squaredNorm()));
  }
  std::vector<double> sorted = norms;
  std::sort(sorted.begin(), sorted.end());
  const double C = 0.5 * (sorted[1] + sorted[2]);  // two samples clipped, two not

  tr::dp_sgd_options o;
  o.clip_norm = C;
  o.noise_multiplier = 0;
  o.loss_weight = 1;
  tr::dp_sgd<double> dp({&net.l1, &net.l2}, o);
  dp.set_sample_offsets(offs);
  tr::step_context ctx;
  dp.before_forward(ctx);
  ag::tape<double> t;
  auto x = t.frozen(X);
  auto h = dp.forward(t, 0, x);
  auto hg = ag::gelu(h);
  auto y = dp.forward(t, 1, hg);
  t.backward(ag::weighted_sum(ag::gelu(y), R));

  // The per-sample machinery of one layer, from the batch's X and dY.
  const auto ps2 = tr::lora_per_sample_grad_B<double>(MatD(hg.value()), t.grad(y),
                                                        net.l2.lora_A()->value(), net.l2.scale(), offs);
  const auto ps1 = tr::lora_per_sample_grad_B<double>(X, t.grad(h), net.l1.lora_A()->value(), net.l1.scale(), offs);
  double worst = 0;
  for (index_t i = 0; i < N; ++i) {
    worst = std::max(worst, dwt::rel_err(ps1[std::size_t(i)], g1[std::size_t(i)]));
    worst = std::max(worst, dwt::rel_err(ps2[std::size_t(i)], g2[std::size_t(i)]));
  }
  std::printf("DP-SGD per-sample gradients of B vs per-sample autograd: max rel err %.2e\n", worst);
  CHECK(worst < 1e-13);

  dp.after_backward(ctx);
  MatD want1 = MatD::Zero(5, 3), want2 = MatD::Zero(4, 2);
  int clipped = 0;
  for (index_t i = 0; i < N; ++i) {
    const double c = std::min(1.0, C / norms[std::size_t(i)]);
    clipped += c < 1;
    // The clipped per-sample gradient (both layers) has norm ≤ C.
    const double cn = c * norms[std::size_t(i)];
    CHECK(cn <= C * (1 + 1e-12));
    CHECK(dp.sample_norms()[std::size_t(i)] == doctest::Approx(norms[std::size_t(i)]).epsilon(1e-12));
    CHECK(dp.clip_factors()[std::size_t(i)] * dp.sample_norms()[std::size_t(i)] <= C * (1 + 1e-12));
    want1 += c * g1[std::size_t(i)] / double(N);
    want2 += c * g2[std::size_t(i)] / double(N);
  }
  CHECK(clipped == 2);
  const double e = std::max(dwt::rel_err(net.l1.lora_B()->grad(), want1), dwt::rel_err(net.l2.lora_B()->grad(), want2));
  std::printf("DP-SGD (sigma 0) privatised gradient vs mean of clipped per-sample autograd gradients: rel err %.2e\n", e);
  CHECK(e < 1e-13);

  // Refusals: a trainable A would not be privatised.
  net.l1.lora_A()->set_trainable(true);
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double>({&net.l1}, o); }, {"trainable A", "'l1'"});
  o.clip_norm = 0;
  dwt::check_throws_with<deltaw::argument_error>([&] { tr::dp_sgd<double>({&net.l2}, o); }, {"clip_norm"});
}

TEST_CASE("DP-SGD noise: mean 0 and standard deviation sigma*C/N per entry, independent across steps, bitwise reproducible") {
  const MatD W = dwt::random<MatD>(64, 6, 40);
  nn::linear<double> layer("l", deltaw::view(W));
  std::mt19937_64 g(41);
  layer.attach(nn::adapter_kind::lora, 8, 8.0, g);
  tr::ffa_init(layer, 0, {9, 0});
  tr::dp_sgd_options o;
  o.clip_norm = 0.7;
  o.noise_multiplier = 1.3;
  o.seed = 2024;
  o.rows_per_sample = 2;  // 8 rows = N = 4 samples
  const double N = 4, sd = o.noise_multiplier * o.clip_norm / N;
  // Zero output gradients: the privatised gradient is the noise alone.
  using io = tr::dp_sgd<double>::io_pair;
  const std::vector<std::vector<io>> zero{{io{dwt::random<MatD>(8, 6, 42), MatD::Zero(8, 64)}}};

  const int steps = 100;
  tr::dp_sgd<double> a({&layer}, o);
  std::vector<MatD> draws;
  for (int k = 0; k < steps; ++k) {
    a.privatise(zero);
    draws.push_back(layer.lora_B()->grad());
  }
  double n = 0, s1 = 0, s2 = 0, lag = 0;
  for (int k = 0; k < steps; ++k)
    for (index_t j = 0; j < draws[0].size(); ++j) {
      const double z = draws[std::size_t(k)].data()[j] / sd;
      n += 1;
      s1 += z;
      s2 += z * z;
      if (k > 0) lag += z * draws[std::size_t(k - 1)].data()[j] / sd;
    }
  const double mean = s1 / n, var = s2 / n - mean * mean, corr = lag / (n - double(draws[0].size()));
  std::printf("DP-SGD noise over %.0f draws: mean %.4f (bound %.4f), std/(sigma*C/N) %.4f (bound 1 +- %.4f), lag-1 corr %.4f\n",
              n, mean, 5 / std::sqrt(n), std::sqrt(var), 5 / std::sqrt(2 * n), corr);
  // 5-sigma bounds: the mean of n standard normals has sd 1/√n, the sample std ≈ 1/√(2n).
  CHECK(std::abs(mean) < 5 / std::sqrt(n));
  CHECK(std::abs(std::sqrt(var) - 1) < 5 / std::sqrt(2 * n));
  CHECK(std::abs(corr) < 5 / std::sqrt(n));

  // The same seed reproduces every step bit for bit; another seed does not.
  tr::dp_sgd<double> b({&layer}, o);
  bool same = true;
  for (int k = 0; k < steps; ++k) {
    b.privatise(zero);
    same = same && ffa_same_bits(layer.lora_B()->grad(), draws[std::size_t(k)]);
  }
  CHECK(same);
  o.seed = 2025;
  tr::dp_sgd<double> c({&layer}, o);
  c.privatise(zero);
  CHECK_FALSE(ffa_same_bits(layer.lora_B()->grad(), draws[0]));
}

TEST_CASE("FFA-LoRA + DP-SGD through train::fit: learns a rank-r target update under small noise") {
  const index_t in = 8, out = 6, r = 2, batch = 16;
  const MatD W = dwt::random<MatD>(out, in, 50);
  nn::linear<double> layer("l", deltaw::view(W));
  std::mt19937_64 g(51);
  layer.attach(nn::adapter_kind::lora, r, 2.0, g);
  tr::ffa_lora<double> ffa({&layer}, {12, 0});
  // The target differs from W by s·B*·A with FFA's own A: reachable by training B alone.
  const MatD Bstar = dwt::random<MatD>(out, r, 52);
  const MatD Wt = W + layer.scale() * Bstar * layer.lora_A()->value();
  tr::dp_sgd_options o;
  o.clip_norm = 1.0;
  o.noise_multiplier = 0.05;
  o.rows_per_sample = 1;
  o.seed = 3;
  tr::dp_sgd<double> dp({&layer}, o);
  op::adamw<double> opt(ffa.parameters(), {3e-2, 0.9, 0.999, 1e-8, 0.0});
  tr::fit_options fo;
  fo.steps = 300;
  fo.log_every = 0;
  MatD X, Y;  // outlive the loss function: the tape views them until the step ends
  const auto res = tr::fit<double>(
      [&](ag::tape<double>& t, index_t step) {
        X = dwt::random<MatD>(batch, in, 1000 + std::uint64_t(step));
        Y = X * Wt.transpose();
        // mse over batch·out entries = (1/N)·Σᵢ mse(row i): the default loss weight 1/N.
        return ag::mse(dp.forward(t, 0, t.frozen(X)), t.frozen(Y));
      },
      opt, {&ffa, &dp}, fo);
  std::printf("FFA + DP-SGD fit: loss %.4f -> %.5f in %td steps\n", res.first_loss, res.final_loss, res.steps_run);
  CHECK(res.final_loss < 0.05 * res.first_loss);
  CHECK(dp.steps() == 300);
  CHECK(ffa.a_unchanged());
}
