// SPDX-License-Identifier: MIT
// Trains LoRA adapters on a frozen tiny transformer (random "pretrained" weights) with
// deltaw's autograd: the attention and MLP projections get rank-8 LoRA, everything else
// stays frozen (views, never copied). The data is generated here: sequences that follow a
// fixed permutation of the vocabulary (token t+1 = π(token t)), so the adapters must learn
// π through the frozen network. Prints step, loss, tokens/s; then accuracy under no_grad.
#include <deltaw/nn/layers.hpp>
#include <deltaw/optim/optim.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

namespace ag = deltaw::autograd;
namespace nn = deltaw::nn;
namespace op = deltaw::optim;

namespace {
struct batch {
  std::vector<std::int64_t> ids, labels;
};

batch make_batch(const std::vector<std::int64_t>& perm, std::int64_t n, std::int64_t seq, std::mt19937_64& g) {
  batch b;
  std::uniform_int_distribution<std::int64_t> start(0, std::int64_t(perm.size()) - 1);
  for (std::int64_t s = 0; s < n; ++s) {
    std::int64_t tok = start(g);
    for (std::int64_t i = 0; i < seq; ++i) {
      b.ids.push_back(tok);
      tok = perm[std::size_t(tok)];
      // the last position has no next token in the sequence: ignored by the loss
      b.labels.push_back(i + 1 < seq ? tok : ag::ignore_label);
    }
  }
  return b;
}
}  // namespace

int main() {
  const nn::transformer_config cfg{/*vocab*/ 32, /*seq*/ 32, /*d_model*/ 64, /*heads*/ 4, /*d_ff*/ 128, /*layers*/ 2,
                                   /*seed*/ 7};
  const std::int64_t batch_size = 16, steps = 150;
  nn::tiny_transformer<float> model(cfg);
  model.attach(nn::adapter_kind::lora, 8, 16.0);
  auto params = model.trainable_parameters();
  std::size_t n_train = 0;
  for (auto* p : params) n_train += std::size_t(p->size());
  std::printf("tiny transformer: vocab %td, seq %td, d_model %td, heads %td, d_ff %td, layers %td\n", cfg.vocab, cfg.seq,
              cfg.d_model, cfg.heads, cfg.d_ff, cfg.layers);
  std::printf("frozen weights %.1f KiB (viewed), trainable LoRA parameters %zu in %zu tensors\n",
              double(model.frozen_bytes()) / 1024.0, n_train, params.size());

  std::mt19937_64 g(11);
  std::vector<std::int64_t> perm(std::size_t(cfg.vocab));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), g);

  op::adamw<float> opt(params, {3e-3, 0.9, 0.999, 1e-8, 0.0});
  const op::warmup_cosine sched(10, steps, 0.1);
  const auto t0 = std::chrono::steady_clock::now();
  auto window = t0;
  double first_loss = 0, last_loss = 0;
  for (std::int64_t step = 0; step < steps; ++step) {
    const auto b = make_batch(perm, batch_size, cfg.seq, g);
    ag::tape<float> t;
    const auto loss = ag::cross_entropy(model(t, b.ids, batch_size), b.labels);
    t.backward(loss);
    const double gnorm = op::clip_grad_norm(params, 1.0);
    opt.step(sched(step));
    opt.zero_grad();
    last_loss = loss.value()(0, 0);
    if (step == 0) first_loss = last_loss;
    if (step % 15 == 0 || step == steps - 1) {
      const auto now = std::chrono::steady_clock::now();
      const double sec = std::chrono::duration<double>(now - window).count();
      const double toks = double(batch_size * cfg.seq) * (step == 0 ? 1 : 15);
      std::printf("step %4td  loss %.4f  |grad| %.3f  lr %.2e  %8.0f tokens/s\n", step, last_loss, gnorm,
                  3e-3 * sched(step), toks / sec);
      window = now;
    }
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Evaluation without recording a backward pass.
  const auto b = make_batch(perm, 32, cfg.seq, g);
  ag::tape<float> t;
  ag::no_grad<float> ng(t);
  const double acc = ag::accuracy(model(t, b.ids, 32), b.labels);
  std::printf("trained %td steps in %.1f s: loss %.3f -> %.3f (uniform guess %.3f); held-out next-token accuracy %.1f%%\n",
              steps, total, first_loss, last_loss, std::log(double(cfg.vocab)), 100.0 * acc);
  return last_loss < first_loss ? 0 : 1;
}
