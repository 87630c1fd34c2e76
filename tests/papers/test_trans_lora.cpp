// Trans-LoRA (deltaw/papers/trans_lora.hpp): the generator against counting and its
// samples' frequencies, the KD loss against a direct double computation and central
// differences (alone and through a tiny transformer's LoRA), LoKr hooks (start equal to
// the base, gradients by central differences), the discriminator's filter on a chain
// with known support, and a distillation between two tiny transformers of different
// widths (LoRA and LoKr targets) against the base and the teacher.
#include <deltaw/autograd/gradcheck.hpp>
#include <deltaw/papers/trans_lora.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <utility>
#include <vector>

namespace trans_lora_test {
namespace ag = deltaw::autograd;
namespace nn = deltaw::nn;
namespace tl = deltaw::papers::trans_lora;
using deltaw::index_t;
using MatD = deltaw::dense<double>;

MatD random_matrix(index_t r, index_t c, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  MatD m(r, c);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}

// A chain where token u goes to succ[u][0] (p 0.7) or succ[u][1] (p 0.3); starts uniform
// over the first half of the vocabulary.
struct chain {
  index_t vocab, seq;
  std::vector<std::array<std::int64_t, 2>> succ;
  chain(index_t v, index_t s, std::uint64_t seed) : vocab(v), seq(s), succ(static_cast<std::size_t>(v)) {
    std::mt19937_64 g(seed);
    for (int k = 0; k < 2; ++k) {
      std::vector<std::int64_t> perm(static_cast<std::size_t>(v));
      for (index_t i = 0; i < v; ++i) perm[std::size_t(i)] = i;
      std::shuffle(perm.begin(), perm.end(), g);
      for (index_t u = 0; u < v; ++u) succ[std::size_t(u)][std::size_t(k)] = perm[std::size_t(u)];
    }
    for (index_t u = 0; u < v; ++u)  // two distinct successors
      if (succ[std::size_t(u)][0] == succ[std::size_t(u)][1]) succ[std::size_t(u)][1] = (succ[std::size_t(u)][1] + 1) % v;
  }
  std::vector<std::int64_t> sample(index_t n, std::mt19937_64& g) const {
    std::uniform_int_distribution<std::int64_t> start(0, vocab / 2 - 1);
    std::bernoulli_distribution second(0.3);
    std::vector<std::int64_t> ids;
    for (index_t b = 0; b < n; ++b) {
      std::int64_t tok = start(g);
      for (index_t i = 0; i < seq; ++i) {
        ids.push_back(tok);
        tok = succ[std::size_t(tok)][second(g) ? 1 : 0];
      }
    }
    return ids;
  }
  double in_support(const std::vector<std::int64_t>& ids, index_t n) const {
    index_t ok = 0;
    for (index_t b = 0; b < n; ++b) {
      bool good = ids[std::size_t(b * seq)] < vocab / 2;
      for (index_t i = 1; i < seq && good; ++i) {
        const auto& s = succ[std::size_t(ids[std::size_t(b * seq + i - 1)])];
        good = s[0] == ids[std::size_t(b * seq + i)] || s[1] == ids[std::size_t(b * seq + i)];
      }
      ok += good;
    }
    return n == 0 ? 0.0 : double(ok) / double(n);
  }
};

tl::sequence_model<double> as_model(nn::tiny_transformer<double>& m) {
  return [&m](ag::tape<double>& t, const std::vector<std::int64_t>& ids, index_t b) { return m(t, ids, b); };
}
}  // namespace trans_lora_test

TEST_CASE("trans_lora: the generator's tables are the smoothed counts; samples follow them") {
  using namespace trans_lora_test;
  const index_t V = 4, seq = 5, n = 3;
  const std::vector<std::int64_t> ids{0, 1, 2, 1, 2, /**/ 3, 3, 0, 1, 1, /**/ 0, 2, 2, 1, 0};
  const double k = 0.5;
  // Counted independently with maps.
  std::map<std::pair<std::int64_t, std::int64_t>, double> trans;
  std::map<std::int64_t, double> start, from;
  std::map<std::pair<index_t, std::int64_t>, double> pos;
  for (index_t b = 0; b < n; ++b) {
    start[ids[std::size_t(b * seq)]] += 1;
    for (index_t i = 0; i < seq; ++i) pos[{i, ids[std::size_t(b * seq + i)]}] += 1;
    for (index_t i = 1; i < seq; ++i) {
      trans[{ids[std::size_t(b * seq + i - 1)], ids[std::size_t(b * seq + i)]}] += 1;
      from[ids[std::size_t(b * seq + i - 1)]] += 1;
    }
  }
  const auto mk = tl::sequence_generator::fit(ids, n, seq, V, {tl::generator_kind::markov, k});
  const auto pp = tl::sequence_generator::fit(ids, n, seq, V, {tl::generator_kind::per_position, k});
  for (std::int64_t u = 0; u < V; ++u) {
    CHECK(mk.start()(0, u) == doctest::Approx((start[u] + k) / (double(n) + k * double(V))).epsilon(1e-14));
    for (std::int64_t v = 0; v < V; ++v)
      CHECK(mk.table()(u, v) == doctest::Approx((trans[{u, v}] + k) / (from[u] + k * double(V))).epsilon(1e-14));
  }
  for (index_t i = 0; i < seq; ++i)
    for (std::int64_t v = 0; v < V; ++v)
      CHECK(pp.table()(i, v) == doctest::Approx((pos[{i, v}] + k) / (double(n) + k * double(V))).epsilon(1e-14));
  // log_prob of the first sequence by hand.
  const double lp = std::log(mk.start()(0, 0)) + std::log(mk.table()(0, 1)) + std::log(mk.table()(1, 2)) +
                    std::log(mk.table()(2, 1)) + std::log(mk.table()(1, 2));
  CHECK(mk.log_prob(ids.data()) == doctest::Approx(lp).epsilon(1e-13));

  // Samples: empirical transition and position frequencies within 4σ of the tables.
  std::mt19937_64 g(5);
  const index_t ns = 4000;
  const auto s = mk.sample(ns, g);
  MatD cnt = MatD::Zero(V, V);
  for (index_t b = 0; b < ns; ++b)
    for (index_t i = 1; i < seq; ++i) cnt(index_t(s[std::size_t(b * seq + i - 1)]), index_t(s[std::size_t(b * seq + i)])) += 1;
  double worst = 0;
  for (index_t u = 0; u < V; ++u) {
    const double tot = cnt.row(u).sum();
    REQUIRE(tot > 500);
    for (index_t v = 0; v < V; ++v) {
      const double p = mk.table()(u, v), sd = std::sqrt(p * (1 - p) / tot);
      worst = std::max(worst, std::abs(cnt(u, v) / tot - p) / sd);
    }
  }
  CHECK(worst < 4.5);
  const auto sp = pp.sample(ns, g);
  MatD pc = MatD::Zero(seq, V);
  for (index_t b = 0; b < ns; ++b)
    for (index_t i = 0; i < seq; ++i) pc(i, index_t(sp[std::size_t(b * seq + i)])) += 1;
  for (index_t i = 0; i < seq; ++i)
    for (index_t v = 0; v < V; ++v) {
      const double p = pp.table()(i, v), sd = std::sqrt(p * (1 - p) / double(ns));
      CHECK(std::abs(pc(i, v) / double(ns) - p) < 4.5 * sd);
    }
  CHECK_THROWS_AS(tl::sequence_generator::fit({0, 1, 9}, 1, 3, V), deltaw::argument_error);
  CHECK_THROWS_AS(tl::sequence_generator::fit({0, 1}, 1, 3, V), deltaw::shape_error);
}

TEST_CASE("trans_lora: the KD loss against a direct computation and central differences") {
  using namespace trans_lora_test;
  const index_t n = 5, V = 7;
  const MatD teacher = random_matrix(n, V, 11, 3.0);
  for (double tau : {1.0, 2.5}) {
    ag::parameter<double> S("student", random_matrix(n, V, 12, 3.0));
    // Reference: Σ p·(log p − log q) with softmaxes by Eigen arrays, τ² / n.
    double ref = 0;
    for (index_t i = 0; i < n; ++i) {
      const Eigen::ArrayXd a = teacher.row(i).transpose().array() / tau, b = S.value().row(i).transpose().array() / tau;
      const Eigen::ArrayXd p = a.exp() / a.exp().sum(), q = b.exp() / b.exp().sum();
      ref += (p * (p.log() - q.log())).sum();
    }
    ref *= tau * tau / double(n);
    ag::tape<double> t;
    const auto l = tl::kd_kl_loss(t.param(S), teacher, tau);
    CHECK(l.value()(0, 0) == doctest::Approx(ref).epsilon(1e-12));
    const auto rep = ag::gradcheck([&](ag::tape<double>& tt) { return tl::kd_kl_loss(tt.param(S), teacher, tau); }, {&S});
    std::printf("gradcheck kd_kl_loss tau %.1f: max rel err %.2e\n", tau, rep.max_rel_error);
    CHECK(rep.max_rel_error < 1e-7);
    CHECK(rep.min_grad_norm > 1e-3);
  }
  // Student = teacher (up to a per-row shift): zero loss and zero gradient.
  ag::parameter<double> S("student", teacher);
  S.value().row(2).array() += 4.0;
  ag::tape<double> t;
  const auto l = tl::kd_kl_loss(t.param(S), teacher, 1.5);
  t.backward(l);
  CHECK(std::abs(l.value()(0, 0)) < 1e-12);
  CHECK(S.grad().cwiseAbs().maxCoeff() < 1e-12);
  ag::tape<double> t2;
  CHECK_THROWS_AS(tl::kd_kl_loss(t2.param(S), MatD(n, V + 1), 1.0), deltaw::shape_error);
  CHECK_THROWS_AS(tl::kd_kl_loss(t2.param(S), teacher, 0.0), deltaw::argument_error);
}

TEST_CASE("trans_lora: KD through a tiny transformer's LoRA and through LoKr hooks, by central differences") {
  using namespace trans_lora_test;
  const nn::transformer_config sc{6, 3, 4, 2, 6, 1, 21}, tc{6, 3, 6, 2, 8, 1, 22};
  nn::tiny_transformer<double> source(sc), target(tc);
  source.attach(nn::adapter_kind::lora, 1, 2.0);
  std::uint64_t seed = 30;
  for (auto* l : source.adapted_layers()) l->lora_B()->value() = random_matrix(l->out_features(), 1, ++seed, 0.5);
  const std::vector<std::int64_t> ids{0, 3, 5, 2, 2, 1};
  const MatD teacher = tl::predict_logits(as_model(source), ids, 2, 3);
  CHECK(teacher.rows() == 6);

  // LoRA target (B random so that every factor has a gradient).
  {
    nn::tiny_transformer<double> m(tc);
    m.attach(nn::adapter_kind::lora, 1, 2.0);
    for (auto* l : m.adapted_layers()) l->lora_B()->value() = random_matrix(l->out_features(), 1, ++seed, 0.5);
    const auto rep = ag::gradcheck(
        [&](ag::tape<double>& t) { return tl::kd_kl_loss(m(t, ids, 2), teacher, 2.0); }, m.trainable_parameters());
    std::printf("gradcheck KD through tiny transformer LoRA: %td entries, max rel err %.2e\n", rep.entries, rep.max_rel_error);
    CHECK(rep.max_rel_error < 1e-6);
    CHECK(rep.min_grad_norm > 0);
  }
  // LoKr target through hooks: starts equal to the base model (w1 = 0); then w1 random.
  {
    const MatD base = tl::predict_logits(as_model(target), ids, 2, 3);
    auto lokr = std::make_unique<tl::lokr_hooks<double>>(target.projections(), 2, 4.0, 5);
    CHECK(tl::predict_logits(as_model(target), ids, 2, 3).isApprox(base, 1e-15));
    for (auto* p : lokr->parameters())
      if (p->name().find("lokr_w1") != std::string::npos) p->value() = random_matrix(p->rows(), p->cols(), ++seed, 0.5);
    const MatD moved = tl::predict_logits(as_model(target), ids, 2, 3);
    CHECK((moved - base).norm() > 1e-3);
    const auto rep = ag::gradcheck(
        [&](ag::tape<double>& t) { return tl::kd_kl_loss(target(t, ids, 2), teacher, 1.0); }, lokr->parameters());
    std::printf("gradcheck KD through tiny transformer LoKr hooks: %td entries, max rel err %.2e\n", rep.entries,
                rep.max_rel_error);
    CHECK(rep.max_rel_error < 1e-6);
    CHECK(rep.min_grad_norm > 0);
    lokr.reset();  // hooks removed: the base model again
    CHECK(tl::predict_logits(as_model(target), ids, 2, 3).isApprox(base, 1e-15));
    // A layer with a LoRA is refused.
    target.attach(nn::adapter_kind::lora, 1, 1.0);
    CHECK_THROWS_AS(tl::lokr_hooks<double>(target.projections(), 2, 4.0), deltaw::argument_error);
  }
}

TEST_CASE("trans_lora: discriminator filter and distillation between widths (LoRA and LoKr targets)") {
  using namespace trans_lora_test;
  const chain ch(10, 8, 4);
  std::mt19937_64 g(9);
  const index_t n_full = 256, n_obs = 12, n_test = 64, n_syn = 256, n_neg = 1020;
  const auto full = ch.sample(n_full, g);
  const std::vector<std::int64_t> observed(full.begin(), full.begin() + n_obs * ch.seq);
  const auto test = ch.sample(n_test, g);

  // Generator + discriminator: the filter raises the share of sequences on the real chain.
  const auto gen = tl::sequence_generator::fit(observed, n_obs, ch.seq, ch.vocab, {tl::generator_kind::markov, 0.05});
  tl::discriminator<double> disc(ch.vocab, ch.seq, {0, true, 200, 5e-2, 1e-3, 2});
  const auto neg = gen.sample(n_neg, g);
  std::vector<std::int64_t> pos;  // the observed set repeated to balance the classes
  for (index_t k = 0; k < n_neg / n_obs; ++k) pos.insert(pos.end(), observed.begin(), observed.end());
  disc.fit(pos, n_neg, neg, n_neg);
  const auto syn = gen.sample(n_syn, g);
  index_t kept = 0;
  const auto filtered = tl::filter_synthetic(disc, syn, n_syn, ch.seq, kept);
  // P(real) of the synthetic sequences on the chain against those off it, and of held-out real ones.
  const auto ps = disc.prob_real(syn, n_syn), pr = disc.prob_real(test, n_test);
  double on = 0, off = 0, n_on = 0, mean_real = 0;
  for (index_t b = 0; b < n_syn; ++b) {
    const std::vector<std::int64_t> one(syn.begin() + b * ch.seq, syn.begin() + (b + 1) * ch.seq);
    const bool ok = ch.in_support(one, 1) > 0.5;
    (ok ? on : off) += ps[std::size_t(b)];
    n_on += ok;
  }
  on /= n_on;
  off /= double(n_syn) - n_on;
  for (double p : pr) mean_real += p / double(n_test);
  const double share_all = 1 - ch.in_support(syn, n_syn), share_kept = 1 - ch.in_support(filtered, kept);
  std::printf("trans_lora filter: %.1f%% of synthetic off the chain, %.1f%% of the %td kept; mean P(real): synthetic on "
              "the chain %.2f, off it %.2f, held-out real %.2f\n",
              100 * share_all, 100 * share_kept, kept, on, off, mean_real);
  CHECK(kept >= 16);
  CHECK(share_kept < 0.6 * share_all);
  CHECK(on > off + 0.2);
  CHECK(mean_real > off + 0.1);

  // Source (d_model 8) + LoRA on the real data; targets of width 12.
  const nn::transformer_config sc{ch.vocab, ch.seq, 8, 2, 16, 1, 41}, tc{ch.vocab, ch.seq, 12, 2, 24, 1, 42};
  tl::distil_options o;
  o.steps = 120;
  o.batch = 8;
  o.lr = 1e-2;
  nn::tiny_transformer<double> source(sc);
  source.attach(nn::adapter_kind::lora, 4, 8.0);
  tl::train_next_token(as_model(source), source.trainable_parameters(), full, n_full, ch.seq, o);
  const double teacher_loss = tl::task_loss(as_model(source), test, n_test, ch.seq);
  nn::tiny_transformer<double> base(tc);
  const double base_loss = tl::task_loss(as_model(base), test, n_test, ch.seq);

  nn::tiny_transformer<double> lora_t(tc);
  lora_t.attach(nn::adapter_kind::lora, 4, 8.0);
  const auto hist = tl::distil(as_model(lora_t), as_model(source), lora_t.trainable_parameters(), filtered, kept, ch.seq, o);
  const double lora_loss = tl::task_loss(as_model(lora_t), test, n_test, ch.seq);

  nn::tiny_transformer<double> lokr_t(tc);
  tl::lokr_hooks<double> lokr(lokr_t.projections(), 2, 4.0, 7);
  tl::distil(as_model(lokr_t), as_model(source), lokr.parameters(), filtered, kept, ch.seq, o);
  const double lokr_loss = tl::task_loss(as_model(lokr_t), test, n_test, ch.seq);
  std::printf("trans_lora task loss: teacher %.3f, target base %.3f, Trans-LoRA LoRA %.3f, LoKr %.3f (KD loss %.3f -> %.3f)\n",
              teacher_loss, base_loss, lora_loss, lokr_loss, hist.front(), hist.back());
  CHECK(hist.back() < 0.5 * hist.front());
  CHECK(teacher_loss < 0.7 * base_loss);
  // The distilled targets recover most of the teacher's gain over the base.
  CHECK(base_loss - lora_loss > 0.6 * (base_loss - teacher_loss));
  CHECK(base_loss - lokr_loss > 0.4 * (base_loss - teacher_loss));
}
