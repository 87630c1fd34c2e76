// SPDX-License-Identifier: MIT
// Trans-LoRA: a LoRA trained on a source tiny transformer (d_model 32) is moved to a
// target tiny transformer of another width (d_model 48, other random "pretrained"
// weights) without the training data. Only 16 real sequences are observed: a Markov
// generator is fitted to them, a discriminator trained on them filters its samples, and
// the target's new adapter (LoRA, then LoKr) is distilled from the source model + LoRA on
// the kept synthetic sequences. The task: next-token prediction on sequences of a sparse
// Markov chain (each token has 3 successors); the table compares the target's task loss
// on held-out real sequences with training the target's LoRA on the real data.
#include <deltaw/papers/trans_lora.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace ag = deltaw::autograd;
namespace nn = deltaw::nn;
namespace tl = deltaw::papers::trans_lora;
using deltaw::index_t;

namespace {
using model_t = nn::tiny_transformer<float>;

// The real data: a Markov chain where token u goes to succ[u][k] with probability p[k].
struct task {
  index_t vocab = 32, seq = 16;
  std::vector<std::array<std::int64_t, 3>> succ;
  std::array<double, 3> p{0.6, 0.3, 0.1};
  explicit task(std::uint64_t seed) {
    std::mt19937_64 g(seed);
    std::vector<std::int64_t> perm(static_cast<std::size_t>(vocab));
    succ.resize(std::size_t(vocab));
    for (int k = 0; k < 3; ++k) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), g);
      for (index_t u = 0; u < vocab; ++u) succ[std::size_t(u)][std::size_t(k)] = perm[std::size_t(u)];
    }
  }
  std::vector<std::int64_t> sample(index_t n, std::mt19937_64& g) const {
    std::vector<std::int64_t> ids;
    std::uniform_int_distribution<std::int64_t> start(0, vocab / 2 - 1);  // starts in the first half only
    std::discrete_distribution<int> next(p.begin(), p.end());
    for (index_t b = 0; b < n; ++b) {
      std::int64_t tok = start(g);
      for (index_t i = 0; i < seq; ++i) {
        ids.push_back(tok);
        tok = succ[std::size_t(tok)][std::size_t(next(g))];
      }
    }
    return ids;
  }
};

tl::sequence_model<float> as_model(model_t& m) {
  return [&m](ag::tape<float>& t, const std::vector<std::int64_t>& ids, index_t b) { return m(t, ids, b); };
}
double elapsed(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main() {
  const task tk(3);
  std::mt19937_64 g(17);
  const index_t n_full = 512, n_obs = 16, n_test = 128, n_syn = 2048, n_neg = 2048;
  const auto full = tk.sample(n_full, g);
  const std::vector<std::int64_t> observed(full.begin(), full.begin() + n_obs * tk.seq);
  const auto test = tk.sample(n_test, g);
  const double entropy = -(0.6 * std::log(0.6) + 0.3 * std::log(0.3) + 0.1 * std::log(0.1));

  const nn::transformer_config src_cfg{tk.vocab, tk.seq, 32, 4, 64, 2, 5}, tgt_cfg{tk.vocab, tk.seq, 48, 4, 96, 2, 9};
  tl::distil_options train;
  train.steps = 250;
  train.batch = 16;
  train.lr = 3e-3;

  auto t0 = std::chrono::steady_clock::now();
  model_t source(src_cfg);
  source.attach(nn::adapter_kind::lora, 8, 16.0);
  tl::train_next_token(as_model(source), source.trainable_parameters(), full, n_full, tk.seq, train);
  std::printf("source (d_model 32) + LoRA r 8 trained on %td real sequences in %.1f s\n", n_full, elapsed(t0));

  // Generator fitted to the 16 observed sequences; discriminator: observed vs synthetic.
  const auto gen = tl::sequence_generator::fit(observed, n_obs, tk.seq, tk.vocab, {tl::generator_kind::markov, 0.05});
  tl::discriminator<float> disc(tk.vocab, tk.seq, {0, true, 200, 5e-2, 1e-3, 1});  // logistic regression
  const auto disc_train = gen.sample(n_neg, g);
  // Balance the classes: the observed set repeated to the synthetic count.
  std::vector<std::int64_t> real_rep;
  for (index_t k = 0; k < n_neg / n_obs; ++k) real_rep.insert(real_rep.end(), observed.begin(), observed.end());
  disc.fit(real_rep, n_neg, disc_train, n_neg);
  const auto syn = gen.sample(n_syn, g);
  index_t kept = 0;
  const auto filtered = tl::filter_synthetic(disc, syn, n_syn, tk.seq, kept);
  // How much of each synthetic set follows the real chain (every transition a real one).
  auto in_support = [&](const std::vector<std::int64_t>& ids, index_t n) {
    index_t ok = 0;
    for (index_t b = 0; b < n; ++b) {
      bool good = ids[std::size_t(b * tk.seq)] < tk.vocab / 2;
      for (index_t i = 1; i < tk.seq && good; ++i) {
        const auto& s = tk.succ[std::size_t(ids[std::size_t(b * tk.seq + i - 1)])];
        const auto x = ids[std::size_t(b * tk.seq + i)];
        good = s[0] == x || s[1] == x || s[2] == x;
      }
      ok += good;
    }
    return n == 0 ? 0.0 : 100.0 * double(ok) / double(n);
  };
  const auto p_test = disc.prob_real(test, n_test);
  std::printf("synthetic: %td sequences, %.1f%% on the real chain; the discriminator keeps %td, %.1f%% on the chain; "
              "mean P(real) on held-out real %.2f\n",
              n_syn, in_support(syn, n_syn), kept, in_support(filtered, kept),
              std::accumulate(p_test.begin(), p_test.end(), 0.0) / double(n_test));

  struct row {
    const char* what;
    double loss;
    index_t params;
  };
  std::vector<row> rows;
  auto lora_params = [](model_t& m) {
    index_t n = 0;
    for (auto* p : m.trainable_parameters()) n += p->size();
    return n;
  };
  rows.push_back({"source + LoRA (teacher, d_model 32)", tl::task_loss(as_model(source), test, n_test, tk.seq), lora_params(source)});
  {
    model_t target(tgt_cfg);
    rows.push_back({"target base, no adapter", tl::task_loss(as_model(target), test, n_test, tk.seq), 0});
  }
  auto fresh_lora = [&]() {
    auto m = std::make_unique<model_t>(tgt_cfg);
    m->attach(nn::adapter_kind::lora, 8, 16.0);
    return m;
  };
  {
    auto m = fresh_lora();
    tl::train_next_token(as_model(*m), m->trainable_parameters(), full, n_full, tk.seq, train);
    rows.push_back({"target LoRA trained on 512 real sequences", tl::task_loss(as_model(*m), test, n_test, tk.seq), lora_params(*m)});
  }
  {
    auto m = fresh_lora();
    tl::train_next_token(as_model(*m), m->trainable_parameters(), observed, n_obs, tk.seq, train);
    rows.push_back({"target LoRA trained on the 16 observed", tl::task_loss(as_model(*m), test, n_test, tk.seq), lora_params(*m)});
  }
  {
    auto m = fresh_lora();
    tl::distil(as_model(*m), as_model(source), m->trainable_parameters(), syn, n_syn, tk.seq, train);
    rows.push_back({"Trans-LoRA, LoRA, unfiltered synthetic", tl::task_loss(as_model(*m), test, n_test, tk.seq), lora_params(*m)});
  }
  {
    auto m = fresh_lora();
    t0 = std::chrono::steady_clock::now();
    tl::distil(as_model(*m), as_model(source), m->trainable_parameters(), filtered, kept, tk.seq, train);
    rows.push_back({"Trans-LoRA, LoRA, filtered synthetic", tl::task_loss(as_model(*m), test, n_test, tk.seq), lora_params(*m)});
    std::printf("distillation into the target's LoRA: %td steps in %.1f s\n", train.steps, elapsed(t0));
  }
  {
    model_t m(tgt_cfg);
    tl::lokr_hooks<float> lokr(m.projections(), 4, 8.0, 3);
    tl::distil(as_model(m), as_model(source), lokr.parameters(), filtered, kept, tk.seq, train);
    rows.push_back({"Trans-LoRA, LoKr r 4, filtered synthetic", tl::task_loss(as_model(m), test, n_test, tk.seq), lokr.parameter_count()});
  }
  std::printf("\nnext-token loss on %td held-out real sequences (chain entropy %.3f, uniform %.3f):\n", n_test, entropy,
              std::log(double(tk.vocab)));
  std::printf("| %-42s | %9s | %8s |\n", "model", "task loss", "params");
  std::printf("|%s|%s|%s|\n", std::string(44, '-').c_str(), std::string(11, '-').c_str(), std::string(10, '-').c_str());
  for (const auto& r : rows) std::printf("| %-42s | %9.3f | %8td |\n", r.what, r.loss, r.params);
  return 0;
}
