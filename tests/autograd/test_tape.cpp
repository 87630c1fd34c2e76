// Tape semantics: accumulation and zeroing, retained graphs, no-grad evaluation, and the
// errors for misuse (each a specific deltaw exception with a readable message).
#include <deltaw/nn/layers.hpp>

#include <thread>

#include "grad_util.hpp"

using namespace dwag;
namespace nn = deltaw::nn;

TEST_CASE("tape: gradients accumulate across backward passes until zeroed") {
  P w("w", dwt::random<MatD>(3, 2, 1));
  const MatD X = dwt::random<MatD>(4, 3, 2), R = dwt::random<MatD>(4, 2, 3);
  auto run = [&] {
    ag::tape<double> t;
    t.backward(ag::weighted_sum(ag::matmul(t.frozen(X), t.param(w)), R));
  };
  run();
  const MatD g1 = w.grad();
  CHECK(dwt::rel_err(g1, MatD(X.transpose() * R)) < 1e-14);
  run();
  CHECK(dwt::rel_err(w.grad(), MatD(2 * g1)) < 1e-14);
  w.zero_grad();
  CHECK(w.grad().norm() == 0.0);
}

TEST_CASE("tape: retain_graph allows a second backward; a parameter used twice sums its gradients") {
  P w("w", dwt::random<MatD>(2, 2, 1));
  ag::tape<double> t;
  const auto a = t.param(w);
  const auto y = ag::sum(ag::add(a, ag::matmul(a, a)));
  t.backward(y, true);
  const MatD g1 = w.grad();
  // d/dW Σ(W + W·W) = 1 + 1·Wᵀ + Wᵀ·1
  const MatD ones = MatD::Ones(2, 2);
  CHECK(dwt::rel_err(g1, MatD(ones + ones * w.value().transpose() + w.value().transpose() * ones)) < 1e-14);
  t.backward(y);
  CHECK(dwt::rel_err(w.grad(), MatD(2 * g1)) < 1e-14);
}

TEST_CASE("tape: no_grad evaluates values without recording") {
  P w("w", dwt::random<MatD>(2, 3, 1));
  ag::tape<double> t;
  {
    ag::no_grad<double> ng(t);
    const auto y = ag::sum(ag::gelu(t.param(w)));
    CHECK_FALSE(t.requires_grad(y));
    dwt::check_throws_with<ag::autograd_error>([&] { t.backward(y); }, {"backward", "does not depend"});
  }
  CHECK(t.grad_enabled());
  const auto y = ag::sum(t.param(w));
  CHECK(t.requires_grad(y));
}

TEST_CASE("tape: input leaves view caller memory and receive a gradient") {
  const MatD X = dwt::random<MatD>(3, 2, 1), R = dwt::random<MatD>(3, 2, 2);
  ag::tape<double> t;
  const auto x = t.input(X);
  CHECK(x.value().data() == X.data());
  t.backward(ag::weighted_sum(ag::scale(x, 3.0), R));
  CHECK(dwt::rel_err(t.grad(x), MatD(3 * R)) < 1e-15);
}

TEST_CASE("errors: backward twice without retaining") {
  P w("w", dwt::random<MatD>(2, 2, 1));
  ag::tape<double> t;
  const auto y = ag::sum(t.param(w));
  t.backward(y);
  dwt::check_throws_with<ag::autograd_error>([&] { t.backward(y); },
                                             {"deltaw::autograd::backward", "already consumed", "retain_graph"});
}

TEST_CASE("errors: the gradient of a frozen view") {
  const MatD W = dwt::random<MatD>(2, 2, 1);
  P w("w", dwt::random<MatD>(2, 2, 2));
  ag::tape<double> t;
  const auto f = t.frozen(W, "W_frozen");
  t.backward(ag::sum(ag::matmul(f, t.param(w))));
  dwt::check_throws_with<ag::autograd_error>([&] { (void)t.grad(f); }, {"deltaw::autograd::grad", "W_frozen", "frozen view"});
  // and of a frozen parameter
  P fz("fz", dwt::random<MatD>(2, 2, 3));
  fz.set_trainable(false);
  ag::tape<double> t2;
  const auto vf = t2.param(fz);
  t2.backward(ag::sum(ag::matmul(vf, t2.param(w))));
  dwt::check_throws_with<ag::autograd_error>([&] { (void)t2.grad(vf); }, {"does not require a gradient"});
  CHECK(fz.grad().norm() == 0.0);
}

TEST_CASE("errors: shape-mismatched losses and a non-scalar backward") {
  ag::tape<double> t;
  P a("a", dwt::random<MatD>(3, 2, 1));
  const MatD b = dwt::random<MatD>(2, 3, 2);
  dwt::check_throws_with<deltaw::shape_error>([&] { (void)ag::mse(t.param(a), t.frozen(b)); },
                                              {"deltaw::autograd::mse", "[3, 2]", "[2, 3]"});
  dwt::check_throws_with<deltaw::shape_error>(
      [&] { (void)ag::cross_entropy(t.param(a), std::vector<std::int64_t>{0, 1}); },
      {"deltaw::autograd::cross_entropy", "[3, 2]", "2 labels"});
  dwt::check_throws_with<deltaw::argument_error>(
      [&] { (void)ag::cross_entropy(t.param(a), std::vector<std::int64_t>{0, 5, 1}); },
      {"cross_entropy", "label 5", "row 1"});
  dwt::check_throws_with<deltaw::shape_error>([&] { t.backward(t.param(a)); },
                                              {"deltaw::autograd::backward", "scalar [1, 1]", "[3, 2]"});
  dwt::check_throws_with<deltaw::shape_error>([&] { (void)ag::weighted_sum(t.param(a), b); }, {"weighted_sum", "[3, 2]"});
  dwt::check_throws_with<deltaw::shape_error>(
      [&] { (void)ag::lora_linear(t.param(a), deltaw::view(b), t.param(a), t.param(a), 1.0); },
      {"lora_linear", "[3, 2]"});
  ag::tape<double> other;
  dwt::check_throws_with<ag::autograd_error>([&] { (void)ag::add(t.param(a), other.param(a)); }, {"different tapes"});
}

TEST_CASE("tape: release_values frees activations during backward without changing any gradient") {
  nn::transformer_config c{7, 4, 8, 2, 12, 2, 5};
  nn::tiny_transformer<double> model(c);
  model.attach(nn::adapter_kind::lora, 2, 4.0);
  auto params = model.trainable_parameters();
  std::uint64_t seed = 1;
  for (auto* p : params)
    if (p->name().find("lora_B") != std::string::npos) p->value() = 0.3 * dwt::random<MatD>(p->rows(), p->cols(), seed++);
  const std::vector<std::int64_t> ids{1, 4, 6, 0, 2, 2, 3, 5}, labels{4, 6, 1, ag::ignore_label, 2, 5, 0, 1};
  std::vector<MatD> want;
  double want_loss = 0;
  for (bool release : {false, true}) {
    for (auto* p : params) p->zero_grad();
    ag::tape<double> t;
    t.set_release_values(release);
    const auto logits = model(t, ids, 2);
    const auto loss = ag::cross_entropy(logits, labels);
    t.backward(loss);
    CHECK(loss.value()(0, 0) > 0);  // the loss keeps its value
    if (!release) {
      want_loss = loss.value()(0, 0);
      for (auto* p : params) want.push_back(p->grad());
      CHECK(logits.value().rows() == 8);
      continue;
    }
    CHECK(loss.value()(0, 0) == want_loss);
    for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i]->grad() == want[i]);  // bit for bit
    dwt::check_throws_with<ag::autograd_error>([&] { (void)logits.value(); }, {"value", "freed", "release_values"});
    CHECK(logits.rows() == 8);  // shapes stay known
  }
  // With retain_graph nothing is freed, so a second backward still works.
  ag::tape<double> t;
  t.set_release_values(true);
  const auto loss = ag::cross_entropy(model(t, ids, 2), labels);
  t.backward(loss, /*retain_graph=*/true);
  t.backward(loss);
}

TEST_CASE("buffer_pool: recycles by element count, bounded by the high-water mark, oldest evicted first") {
  ag::buffer_pool<double> pool;
  const auto min = ag::buffer_pool<double>::min_elements;
  auto a = pool.take(64, 96);
  auto b = pool.take(64, 96);
  CHECK(pool.stats().misses == 2);
  CHECK(pool.stats().lent_bytes == 2 * 64 * 96 * sizeof(double));
  const double* pa = a.data();
  const double* pb = b.data();
  pool.give(std::move(a));
  CHECK(a.size() == 0);
  // Same element count, another shape: the same allocation comes back, reshaped.
  auto c = pool.take(96, 64);
  CHECK(c.data() == pa);
  CHECK(c.rows() == 96);
  CHECK(c.cols() == 64);
  CHECK(pool.stats().hits == 1);
  // Small buffers are not pooled (nor counted).
  auto s = pool.take(2, min / 4);
  pool.give(std::move(s));
  CHECK(pool.stats().idle_buffers == 0);
  CHECK(pool.stats().hits + pool.stats().misses == 3);
  pool.give(std::move(c));
  pool.give(std::move(b));
  CHECK(pool.stats().idle_buffers == 2);
  CHECK(pool.stats().lent_bytes == 0);
  // A foreign buffer beyond the high-water mark (two buffers): the longest-idle one goes.
  MatD foreign(64, 96);
  const double* pf = foreign.data();
  pool.give(std::move(foreign));
  CHECK(pool.stats().idle_buffers == 2);
  CHECK(pool.stats().idle_bytes == 2 * 64 * 96 * sizeof(double));
  // Most recently given first: the foreign one, then b's (a's was evicted).
  auto d = pool.take(64, 96);
  auto e = pool.take(64, 96);
  CHECK(d.data() == pf);
  CHECK(e.data() == pb);
  pool.give(std::move(d));
  pool.give(std::move(e));
  pool.set_max_idle_bytes(64 * 96 * sizeof(double));
  CHECK(pool.stats().idle_buffers == 1);
  pool.clear();
  CHECK(pool.stats().idle_bytes == 0);
  // A new shape: idle buffers are freed until idle + lent fit under the high-water mark,
  // so the pool never raises the peak above the largest working set it served.
  ag::buffer_pool<double> p2;
  auto x = p2.take(128, 96), y = p2.take(128, 96);
  p2.give(std::move(x));
  p2.give(std::move(y));
  CHECK(p2.stats().idle_buffers == 2);
  auto z = p2.take(128, 48);  // half a buffer: one idle buffer must go
  CHECK(p2.stats().idle_buffers == 1);
  CHECK(p2.stats().idle_bytes + p2.stats().lent_bytes <= p2.stats().lent_high_water);
  auto w = p2.take(128, 200);  // above the mark on its own: every idle buffer goes
  CHECK(p2.stats().idle_buffers == 0);
  CHECK(p2.stats().misses == 4);
  p2.give(std::move(z));
  p2.give(std::move(w));
  CHECK(p2.stats().idle_buffers == 2);
}

TEST_CASE("buffer_pool: shared by threads, the counts stay consistent") {
  ag::buffer_pool<float> pool;
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&pool, k] {
      std::mt19937_64 g{std::uint64_t(k)};
      for (int i = 0; i < 200; ++i) {
        const Eigen::Index rows = 64 * (1 + Eigen::Index(g() % 3));
        auto m = pool.take(rows, 128);
        m.setConstant(float(k));
        REQUIRE(m(rows - 1, 127) == float(k));
        pool.give(std::move(m));
      }
    });
  for (auto& t : threads) t.join();
  const auto st = pool.stats();
  CHECK(st.hits + st.misses == 800);
  CHECK(st.lent_bytes == 0);       // every buffer came back
  CHECK(st.idle_bytes <= st.lent_high_water);  // the bound held
  CHECK(st.lent_high_water <= 4 * 192 * 128 * sizeof(float));
}

TEST_CASE("tape: a reset tape reuses its buffers; gradients equal a fresh tape's bit for bit") {
  // Shapes above buffer_pool::min_elements, so that values, saved state and gradients pool.
  const Eigen::Index batch = 2, seq = 40, heads = 2;
  const MatD X = dwt::random<MatD>(batch * seq, 96, 1), R = dwt::random<MatD>(batch * seq, 64, 2);
  const MatD W = dwt::random<MatD>(64, 96, 3), W2 = dwt::random<MatD>(64, 64, 7), bias = dwt::random<MatD>(1, 64, 4);
  P B("B", MatD(0.3 * dwt::random<MatD>(64, 4, 5))), A("A", MatD(0.3 * dwt::random<MatD>(4, 96, 6)));
  P gm("gamma", MatD(MatD::Ones(1, 64))), be("beta", MatD(MatD::Zero(1, 64)));
  const deltaw::vector_view<const double> bv(bias.data(), 64);
  auto step = [&](ag::tape<double>& t) {
    for (auto* p : {&B, &A, &gm, &be}) p->zero_grad();
    const auto x = t.frozen(X);
    const auto h = ag::layer_norm(ag::lora_linear(x, deltaw::view(W), t.param(B), t.param(A), 0.5, bv), t.param(gm),
                                  t.param(be));
    const auto a = ag::causal_attention(h, ag::gelu(h), ag::linear(h, deltaw::view(W2), bv), batch,
                                        seq, heads);
    const auto loss = ag::weighted_sum(ag::add(a, h), R);
    t.backward(loss);
    return std::vector<MatD>{B.grad(), A.grad(), gm.grad(), be.grad(), MatD(loss.value())};
  };
  std::vector<MatD> want;
  {
    ag::tape<double> fresh;
    want = step(fresh);
  }
  for (bool release : {false, true}) {
    ag::tape<double> t(std::make_shared<ag::buffer_pool<double>>());
    t.set_release_values(release);
    CHECK(step(t) == want);
    const auto first = t.pool()->stats();
    CHECK(first.misses > 0);
    t.reset();
    CHECK(step(t) == want);  // bit for bit: recycled buffers are fully written
    const auto second = t.pool()->stats();
    INFO("release_values " << release << ": misses " << first.misses << " -> " << second.misses << ", hits "
                           << second.hits);
    CHECK(second.misses == first.misses);  // the second step allocates nothing the pool holds
    CHECK(second.hits >= first.misses);
  }
  // Tapes sharing one pool (a layer-by-layer forward): the second tape is served by the first's buffers.
  auto pool = std::make_shared<ag::buffer_pool<double>>();
  {
    ag::tape<double> t1(pool);
    CHECK(step(t1) == want);
  }
  const auto misses = pool->stats().misses;
  {
    ag::tape<double> t2(pool);
    CHECK(step(t2) == want);
  }
  CHECK(pool->stats().misses == misses);
  CHECK(pool->stats().lent_bytes == 0);  // everything came back
  // Tapes built without a pool share this thread's: a fresh tape per step reuses the last one's buffers.
  ag::default_pool<double>()->clear();
  { ag::tape<double> t; CHECK(step(t) == want); CHECK(t.pool() == ag::default_pool<double>()); }
  const auto m1 = ag::default_pool<double>()->stats().misses;
  { ag::tape<double> t; CHECK(step(t) == want); }
  CHECK(ag::default_pool<double>()->stats().misses == m1);
  const auto* here = ag::default_pool<double>().get();
  std::thread([&] {
    ag::tape<double> t;
    CHECK(t.pool().get() != here);
    CHECK(t.pool()->stats().hits == 0);  // another thread, another pool
  }).join();
  dwt::check_throws_with<ag::autograd_error>([] { ag::tape<double> t(nullptr); }, {"pool", "null"});
}

TEST_CASE("linear with a frozen bias: value and input gradient against the dense reference") {
  const MatD W = dwt::random<MatD>(5, 4, 1), X = dwt::random<MatD>(3, 4, 2), R = dwt::random<MatD>(3, 5, 3);
  const MatD bias = dwt::random<MatD>(5, 1, 4), B = dwt::random<MatD>(5, 2, 5), A = dwt::random<MatD>(2, 4, 6);
  const MatD ref = (X * W.transpose()).rowwise() + bias.col(0).transpose();
  const deltaw::vector_view<const double> bv(bias.data(), 5);
  P px("x", X), pB("B", B), pA("A", A);
  ag::tape<double> t;
  const auto y = ag::linear(t.param(px), deltaw::view(W), bv);
  CHECK(dwt::rel_err(MatD(y.value()), ref) < 1e-14);
  t.backward(ag::weighted_sum(y, R));
  CHECK(dwt::rel_err(px.grad(), MatD(R * W)) < 1e-14);  // the bias does not change dx
  // A strided bias (a column of a row-major matrix) and the adapted forms.
  const MatD BB = (MatD(5, 2) << bias, bias).finished();
  const deltaw::vector_view<const double> strided(BB.data() + 1, 5, 2);
  ag::tape<double> t2;
  const auto y2 = ag::lora_linear(t2.frozen(X), deltaw::view(W), t2.param(pB), t2.param(pA), 0.5, strided);
  const MatD ref2 = (X * (W + 0.5 * B * A).transpose()).rowwise() + bias.col(0).transpose();
  CHECK(dwt::rel_err(MatD(y2.value()), ref2) < 1e-14);
  CHECK(dwt::rel_err(MatD(ag::linear(t2.frozen(X), deltaw::view(W), strided).value()), ref) < 1e-14);
  dwt::check_throws_with<deltaw::shape_error>(
      [&] { (void)ag::linear(t2.frozen(X), deltaw::view(W), deltaw::vector_view<const double>(bias.data(), 4)); },
      {"linear", "bias", "4 entries", "5 output rows"});
}
