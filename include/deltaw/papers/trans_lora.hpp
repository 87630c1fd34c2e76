// SPDX-License-Identifier: MIT
// Trans-LoRA (Wang et al., 2024): moving a LoRA from a source base model to a different
// target base model without the original training data. The source model + its adapter is
// the teacher; the target base gets a new adapter trained by knowledge distillation on
// synthetic inputs, drawn from a generator fitted to a small observed subset of the task's
// data and filtered by a discriminator trained to tell real from synthetic.
//
//   sequence_generator     synthetic token sequences fitted to a few observed ones
//   discriminator<T>       a small classifier (real vs synthetic) trained with autograd
//   filter_synthetic       keeps the synthetic sequences the discriminator takes for real
//   kd_kl_loss             τ²·mean KL(softmax(teacher/τ) ‖ softmax(student/τ)), an autograd op
//   distil                 adapter training of a student on the teacher's outputs
//   lokr_hooks<T>          LoKr adapters on nn::linear layers (a target of another update type)
//
// What the paper leaves open or does differently, and the choices made here (options):
//  - The paper's generator is the source LLM itself, prompted with the observed samples
//    (UNVERIFIED for this library: no LLM here). deltaw fits an explicit model to the
//    observed sequences instead: a first-order Markov chain (start distribution and
//    transition matrix, add-k smoothed; generator_kind::markov, the default) or an
//    independent categorical per position (generator_kind::per_position). Both are
//    maximum-likelihood counts, so they can be checked by counting.
//  - The paper's discriminator is an LLM fine-tuned for real-vs-synthetic classification.
//    deltaw's is a one-hidden-layer MLP (or logistic regression with hidden = 0) on the
//    sequence's token histogram and bigram histogram, trained by cross-entropy on the
//    observed real sequences against an equal number of fresh synthetic ones
//    (UNVERIFIED sizes, as options). A synthetic sequence is kept when the discriminator's
//    probability of "real" is at least `threshold` (default 0.5: "classified as real").
//  - KD loss: KL on the teacher's softened distribution when the vocabularies match (τ²
//    scaling as Hinton et al., so that the gradient does not shrink with τ); otherwise
//    cross-entropy on the teacher's argmax (kd_target::teacher_argmax).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../backend/cpu/kron.hpp"
#include "../backend/cpu/kron_vjp.hpp"
#include "../expr/kron.hpp"
#include "../nn/layers.hpp"
#include "../optim/optim.hpp"

DELTAW_NAMESPACE_BEGIN
namespace papers {
namespace trans_lora {

using autograd::parameter;
using autograd::tape;
using autograd::var;

namespace detail {
inline void check_ids(const std::vector<std::int64_t>& ids, index_t n, index_t seq, index_t vocab, const char* op) {
  if (n < 0 || seq < 1 || index_t(ids.size()) != n * seq)
    throw shape_error(std::string(op) + ": " + std::to_string(ids.size()) + " token ids for " + std::to_string(n) +
                      " sequences × length " + std::to_string(seq));
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      throw argument_error(std::string(op) + ": token " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                           " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}
/// Draws an index from unnormalised non-negative weights.
inline std::int64_t draw(const double* w, index_t n, std::mt19937_64& g) {
  double total = 0;
  for (index_t i = 0; i < n; ++i) total += w[i];
  double u = std::uniform_real_distribution<double>(0.0, total)(g);
  for (index_t i = 0; i < n; ++i) {
    u -= w[i];
    if (u < 0) return std::int64_t(i);
  }
  return std::int64_t(n - 1);
}
}  // namespace detail

// ---------------------------------------------------------------------------------------
// Generator of synthetic inputs
// ---------------------------------------------------------------------------------------

enum class generator_kind {
  markov,        ///< start distribution + transition matrix (first-order Markov chain)
  per_position,  ///< an independent categorical distribution at each position
};

struct generator_options {
  generator_kind kind = generator_kind::markov;
  /// Add-k smoothing of every count (k > 0 lets the generator propose unseen tokens and
  /// transitions, which the discriminator then has to catch).
  double smoothing = 0.1;
};

/// A model of token sequences of a fixed length fitted to observed sequences by counting.
class sequence_generator {
 public:
  sequence_generator() = default;

  /// Fits to `n` observed sequences of length `seq` (ids row by row) over `vocab` tokens.
  static sequence_generator fit(const std::vector<std::int64_t>& ids, index_t n, index_t seq, index_t vocab,
                                generator_options o = {}) {
    constexpr const char* op = "deltaw::papers::trans_lora::sequence_generator::fit";
    if (vocab < 1) throw argument_error(std::string(op) + ": the vocabulary must have at least one token");
    if (n < 1) throw argument_error(std::string(op) + ": at least one observed sequence is needed");
    if (!(o.smoothing >= 0) || !std::isfinite(o.smoothing))
      throw argument_error(std::string(op) + ": the smoothing must be finite and >= 0; got " + std::to_string(o.smoothing));
    detail::check_ids(ids, n, seq, vocab, op);
    sequence_generator s;
    s.o_ = o;
    s.seq_ = seq;
    s.vocab_ = vocab;
    if (o.kind == generator_kind::markov) {
      s.start_ = dense<double>::Constant(1, vocab, o.smoothing);
      s.trans_ = dense<double>::Constant(vocab, vocab, o.smoothing);
      for (index_t b = 0; b < n; ++b) {
        const auto* row = ids.data() + b * seq;
        s.start_(0, index_t(row[0])) += 1;
        for (index_t i = 1; i < seq; ++i) s.trans_(index_t(row[i - 1]), index_t(row[i])) += 1;
      }
      normalise_rows(s.start_);
      normalise_rows(s.trans_);
    } else {
      s.trans_ = dense<double>::Constant(seq, vocab, o.smoothing);
      for (index_t b = 0; b < n; ++b)
        for (index_t i = 0; i < seq; ++i) s.trans_(i, index_t(ids[std::size_t(b * seq + i)])) += 1;
      normalise_rows(s.trans_);
    }
    return s;
  }

  /// n sequences of length seq(), row by row.
  std::vector<std::int64_t> sample(index_t n, std::mt19937_64& g) const {
    if (vocab_ == 0) throw argument_error("deltaw::papers::trans_lora::sequence_generator::sample: the generator is not fitted");
    std::vector<std::int64_t> out;
    out.reserve(std::size_t(n * seq_));
    for (index_t b = 0; b < n; ++b) {
      if (o_.kind == generator_kind::markov) {
        std::int64_t tok = detail::draw(start_.data(), vocab_, g);
        out.push_back(tok);
        for (index_t i = 1; i < seq_; ++i) {
          tok = detail::draw(trans_.data() + index_t(tok) * vocab_, vocab_, g);
          out.push_back(tok);
        }
      } else {
        for (index_t i = 0; i < seq_; ++i) out.push_back(detail::draw(trans_.data() + i * vocab_, vocab_, g));
      }
    }
    return out;
  }

  /// Log-likelihood of one sequence (length seq()) under the fitted model.
  double log_prob(const std::int64_t* ids) const {
    double lp = 0;
    for (index_t i = 0; i < seq_; ++i) {
      const double p = o_.kind == generator_kind::markov
                           ? (i == 0 ? start_(0, index_t(ids[0])) : trans_(index_t(ids[i - 1]), index_t(ids[i])))
                           : trans_(i, index_t(ids[i]));
      lp += std::log(p);
    }
    return lp;
  }

  /// Markov: the start distribution [1, vocab]. Empty for per_position.
  const dense<double>& start() const { return start_; }
  /// Markov: the transition matrix [vocab, vocab] (row = previous token); per_position:
  /// the distribution of each position [seq, vocab].
  const dense<double>& table() const { return trans_; }
  index_t seq() const { return seq_; }
  index_t vocab() const { return vocab_; }
  const generator_options& options() const { return o_; }

 private:
  static void normalise_rows(dense<double>& m) {
    for (index_t r = 0; r < m.rows(); ++r) {
      const double s = m.row(r).sum();
      if (s > 0) m.row(r) /= s;
      else m.row(r).setConstant(1.0 / double(m.cols()));  // an unseen previous token, no smoothing
    }
  }
  generator_options o_;
  index_t seq_ = 0, vocab_ = 0;
  dense<double> start_, trans_;
};

// ---------------------------------------------------------------------------------------
// Discriminator
// ---------------------------------------------------------------------------------------

struct discriminator_options {
  index_t hidden = 32;   ///< 0: logistic regression on the features
  bool bigrams = true;   ///< append the bigram histogram (vocab² features) to the token histogram
  index_t steps = 300;   ///< full-batch AdamW steps
  double lr = 1e-2;
  double weight_decay = 1e-3;
  std::uint64_t seed = 1;
};

/// Features of sequences [n, vocab (+ vocab²)]: token frequencies (count / seq) and, with
/// bigrams, transition frequencies (count / (seq − 1)).
template <class T>
dense<T> sequence_features(const std::vector<std::int64_t>& ids, index_t n, index_t seq, index_t vocab, bool bigrams) {
  detail::check_ids(ids, n, seq, vocab, "deltaw::papers::trans_lora::sequence_features");
  dense<T> f = dense<T>::Zero(n, vocab + (bigrams ? vocab * vocab : 0));
  for (index_t b = 0; b < n; ++b) {
    const auto* row = ids.data() + b * seq;
    for (index_t i = 0; i < seq; ++i) f(b, index_t(row[i])) += T(1.0 / double(seq));
    if (bigrams && seq > 1)
      for (index_t i = 1; i < seq; ++i) f(b, vocab + index_t(row[i - 1]) * vocab + index_t(row[i])) += T(1.0 / double(seq - 1));
  }
  return f;
}

/// Real-vs-synthetic classifier: logits = W2·relu(W1·f + b1) + b2 (class 1 = real).
template <class T>
class discriminator {
 public:
  discriminator(index_t vocab, index_t seq, discriminator_options o = {}) : vocab_(vocab), seq_(seq), o_(o) {
    constexpr const char* op = "deltaw::papers::trans_lora::discriminator";
    if (vocab < 1 || seq < 1 || o.hidden < 0 || o.steps < 0)
      throw argument_error(std::string(op) + ": vocab and seq must be >= 1 and hidden, steps >= 0; got vocab " +
                           std::to_string(vocab) + ", seq " + std::to_string(seq) + ", hidden " + std::to_string(o.hidden) +
                           ", steps " + std::to_string(o.steps));
    const index_t F = vocab + (o.bigrams ? vocab * vocab : 0);
    std::mt19937_64 g(o.seed);
    const index_t h = o.hidden == 0 ? 2 : o.hidden;
    // Logistic regression starts at zero (a feature never seen in training then adds
    // nothing to a score); the MLP's first layer needs a random start.
    W1_ = std::make_unique<parameter<T>>(
        "disc.W1", o.hidden == 0 ? dense<T>(dense<T>::Zero(h, F)) : nn::uniform<T>(h, F, 1.0 / std::sqrt(double(F)), g));
    b1_ = std::make_unique<parameter<T>>("disc.b1", dense<T>::Zero(1, h));
    if (o.hidden > 0) {
      W2_ = std::make_unique<parameter<T>>("disc.W2", nn::uniform<T>(2, h, 1.0 / std::sqrt(double(h)), g));
      b2_ = std::make_unique<parameter<T>>("disc.b2", dense<T>::Zero(1, 2));
    }
  }

  /// Logits [n, 2] of feature rows on tape t.
  var<T> logits(tape<T>& t, const var<T>& features) const {
    auto z = autograd::add_bias(autograd::matmul_nt(features, t.param(*W1_)), t.param(*b1_));
    if (o_.hidden == 0) return z;
    return autograd::add_bias(autograd::matmul_nt(autograd::relu(z), t.param(*W2_)), t.param(*b2_));
  }

  /// Trains on real sequences (label 1) against synthetic ones (label 0); returns the
  /// final training loss.
  double fit(const std::vector<std::int64_t>& real, index_t n_real, const std::vector<std::int64_t>& synthetic,
             index_t n_syn) {
    const auto fr = sequence_features<T>(real, n_real, seq_, vocab_, o_.bigrams);
    const auto fs = sequence_features<T>(synthetic, n_syn, seq_, vocab_, o_.bigrams);
    dense<T> f(n_real + n_syn, fr.cols());
    f.topRows(n_real) = fr;
    f.bottomRows(n_syn) = fs;
    std::vector<std::int64_t> labels(std::size_t(n_real + n_syn), 0);
    std::fill(labels.begin(), labels.begin() + n_real, 1);
    auto ps = parameters();
    optim::adamw<T> opt(ps, {o_.lr, 0.9, 0.999, 1e-8, o_.weight_decay});
    double last = 0;
    for (index_t s = 0; s < o_.steps; ++s) {
      tape<T> t;
      const auto loss = autograd::cross_entropy(logits(t, t.frozen(f, "features")), labels);
      t.backward(loss);
      opt.step();
      opt.zero_grad();
      last = double(loss.value()(0, 0));
    }
    return last;
  }

  /// P(real) of each sequence.
  std::vector<double> prob_real(const std::vector<std::int64_t>& ids, index_t n) const {
    const auto f = sequence_features<T>(ids, n, seq_, vocab_, o_.bigrams);
    tape<T> t;
    autograd::no_grad<T> ng(t);
    const auto L = logits(t, t.frozen(f, "features")).value();
    std::vector<double> p(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) p[std::size_t(i)] = 1.0 / (1.0 + std::exp(double(L(i, 0)) - double(L(i, 1))));
    return p;
  }

  std::vector<parameter<T>*> parameters() {
    std::vector<parameter<T>*> out{W1_.get(), b1_.get()};
    if (W2_) {
      out.push_back(W2_.get());
      out.push_back(b2_.get());
    }
    return out;
  }

 private:
  index_t vocab_, seq_;
  discriminator_options o_;
  std::unique_ptr<parameter<T>> W1_, b1_, W2_, b2_;
};

/// The synthetic sequences whose P(real) ≥ threshold (row by row); `kept` gets their count.
template <class T>
std::vector<std::int64_t> filter_synthetic(const discriminator<T>& d, const std::vector<std::int64_t>& ids, index_t n,
                                           index_t seq, index_t& kept, double threshold = 0.5) {
  const auto p = d.prob_real(ids, n);
  std::vector<std::int64_t> out;
  kept = 0;
  for (index_t i = 0; i < n; ++i)
    if (p[std::size_t(i)] >= threshold) {
      out.insert(out.end(), ids.begin() + i * seq, ids.begin() + (i + 1) * seq);
      ++kept;
    }
  return out;
}

// ---------------------------------------------------------------------------------------
// Knowledge-distillation loss
// ---------------------------------------------------------------------------------------

/// τ²·(1/n)·Σᵢ KL(pᵢ ‖ qᵢ) with p = softmax(teacher/τ), q = softmax(student/τ):
/// autograd::softmax_kl (the op moved there, shared with CBQ's window objective).
template <class T>
var<T> kd_kl_loss(const var<T>& student, const dense<T>& teacher, double temperature = 1.0) {
  return autograd::softmax_kl(student, teacher, temperature);
}

/// The teacher's argmax of each row (labels for kd_target::teacher_argmax).
template <class T>
std::vector<std::int64_t> argmax_labels(const dense<T>& logits) {
  std::vector<std::int64_t> out(static_cast<std::size_t>(logits.rows()));
  for (index_t i = 0; i < logits.rows(); ++i) {
    Eigen::Index a = 0;
    logits.row(i).maxCoeff(&a);
    out[std::size_t(i)] = std::int64_t(a);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Distillation and task training
// ---------------------------------------------------------------------------------------

enum class kd_target {
  kl,              ///< KL on the teacher's softened distribution (vocabularies match)
  teacher_argmax,  ///< cross-entropy on the teacher's argmax token
};

struct distil_options {
  index_t steps = 200;
  index_t batch = 16;
  double lr = 3e-3;
  double weight_decay = 0.0;
  double temperature = 1.0;
  double clip = 1.0;  ///< gradient-norm clipping (0: none)
  kd_target target = kd_target::kl;
  std::uint64_t seed = 1;
};

/// Model call: logits [batch·seq, vocab] of `batch` sequences (ids row by row) on a tape.
template <class T>
using sequence_model = std::function<var<T>(tape<T>&, const std::vector<std::int64_t>&, index_t)>;

/// Logits of all n sequences, in chunks of `chunk`, without recording gradients.
template <class T>
dense<T> predict_logits(const sequence_model<T>& model, const std::vector<std::int64_t>& ids, index_t n, index_t seq,
                        index_t chunk = 64) {
  dense<T> out;
  for (index_t b0 = 0; b0 < n; b0 += chunk) {
    const index_t nb = std::min(chunk, n - b0);
    const std::vector<std::int64_t> part(ids.begin() + b0 * seq, ids.begin() + (b0 + nb) * seq);
    tape<T> t;
    autograd::no_grad<T> ng(t);
    const auto L = model(t, part, nb).value();
    if (b0 == 0) out.resize(n * seq, L.cols());
    out.middleRows(b0 * seq, nb * seq) = L;
  }
  return out;
}

/// Distils `teacher` into the trainable `params` of `student` on n sequences (the
/// filtered synthetic set): minibatches drawn with replacement, AdamW; the teacher's
/// logits are computed once. Returns the loss of each step.
template <class T>
std::vector<double> distil(const sequence_model<T>& student, const sequence_model<T>& teacher,
                           const std::vector<parameter<T>*>& params, const std::vector<std::int64_t>& ids, index_t n,
                           index_t seq, distil_options o = {}) {
  constexpr const char* op = "deltaw::papers::trans_lora::distil";
  if (n < 1) throw argument_error(std::string(op) + ": no sequences to distil on (did the filter keep none?)");
  if (index_t(ids.size()) != n * seq)
    throw shape_error(std::string(op) + ": " + std::to_string(ids.size()) + " ids for " + std::to_string(n) + " × " +
                      std::to_string(seq));
  const dense<T> TL = predict_logits(teacher, ids, n, seq);
  optim::adamw<T> opt(params, {o.lr, 0.9, 0.999, 1e-8, o.weight_decay});
  std::mt19937_64 g(o.seed);
  std::uniform_int_distribution<index_t> pick(0, n - 1);
  std::vector<double> hist;
  const index_t V = TL.cols();
  for (index_t s = 0; s < o.steps; ++s) {
    std::vector<std::int64_t> b;
    dense<T> tb(o.batch * seq, V);
    for (index_t k = 0; k < o.batch; ++k) {
      const index_t i = pick(g);
      b.insert(b.end(), ids.begin() + i * seq, ids.begin() + (i + 1) * seq);
      tb.middleRows(k * seq, seq) = TL.middleRows(i * seq, seq);
    }
    tape<T> t;
    const auto logits = student(t, b, o.batch);
    const auto loss = o.target == kd_target::kl ? kd_kl_loss(logits, tb, o.temperature)
                                                : autograd::cross_entropy(logits, argmax_labels(tb));
    t.backward(loss);
    if (o.clip > 0) optim::clip_grad_norm(params, o.clip);
    opt.step();
    opt.zero_grad();
    hist.push_back(double(loss.value()(0, 0)));
  }
  return hist;
}

/// Next-token labels of sequences (the last position of each is ignored).
inline std::vector<std::int64_t> next_token_labels(const std::vector<std::int64_t>& ids, index_t n, index_t seq) {
  std::vector<std::int64_t> out(ids.size());
  for (index_t b = 0; b < n; ++b)
    for (index_t i = 0; i < seq; ++i)
      out[std::size_t(b * seq + i)] = i + 1 < seq ? ids[std::size_t(b * seq + i + 1)] : autograd::ignore_label;
  return out;
}

/// Supervised next-token training on real sequences (the "train on the real data"
/// reference of the paper's comparison). Same optimiser and minibatching as distil.
template <class T>
std::vector<double> train_next_token(const sequence_model<T>& model, const std::vector<parameter<T>*>& params,
                                     const std::vector<std::int64_t>& ids, index_t n, index_t seq, distil_options o = {}) {
  if (n < 1) throw argument_error("deltaw::papers::trans_lora::train_next_token: no sequences");
  optim::adamw<T> opt(params, {o.lr, 0.9, 0.999, 1e-8, o.weight_decay});
  std::mt19937_64 g(o.seed);
  std::uniform_int_distribution<index_t> pick(0, n - 1);
  std::vector<double> hist;
  for (index_t s = 0; s < o.steps; ++s) {
    std::vector<std::int64_t> b;
    for (index_t k = 0; k < o.batch; ++k) {
      const index_t i = pick(g);
      b.insert(b.end(), ids.begin() + i * seq, ids.begin() + (i + 1) * seq);
    }
    tape<T> t;
    const auto loss = autograd::cross_entropy(model(t, b, o.batch), next_token_labels(b, o.batch, seq));
    t.backward(loss);
    if (o.clip > 0) optim::clip_grad_norm(params, o.clip);
    opt.step();
    opt.zero_grad();
    hist.push_back(double(loss.value()(0, 0)));
  }
  return hist;
}

/// The task loss: mean next-token cross-entropy of the model on n real sequences.
template <class T>
double task_loss(const sequence_model<T>& model, const std::vector<std::int64_t>& ids, index_t n, index_t seq) {
  const auto L = predict_logits(model, ids, n, seq);
  tape<T> t;
  autograd::no_grad<T> ng(t);
  return double(autograd::cross_entropy(t.frozen(L, "logits"), next_token_labels(ids, n, seq)).value()(0, 0));
}

// ---------------------------------------------------------------------------------------
// LoKr target adapters on nn::linear layers
// ---------------------------------------------------------------------------------------

/// LoKr adapters ΔW = (α/r)·w1 ⊗ (w2_a·w2_b) on a set of nn::linear layers that carry no
/// adapter of their own, installed as forward hooks: each hooked layer's output becomes
/// x·(W + ΔW)ᵀ (+ its bias), differentiated through LoKr's VJP (never a dense ΔW).
/// Shapes as PEFT's LoKr with a dense w1 and a rank-r w2: out = a·b, in = c·d
/// (lokr_factorization), w1 [a, c], w2_a [b, r], w2_b [r, d]. Init as PEFT: w1 = 0, w2_a
/// and w2_b kaiming-uniform (a = √5), so the layers start equal to the frozen ones.
/// The layer's own x·Wᵀ is still computed and then replaced (one extra base product per
/// hooked layer). The hooks are removed on destruction; the object must outlive every
/// forward pass.
template <class T>
class lokr_hooks {
 public:
  lokr_hooks(std::vector<nn::linear<T>*> layers, index_t r, double alpha, std::uint64_t seed = 1)
      : layers_(std::move(layers)), s_(alpha / double(r)) {
    constexpr const char* op = "deltaw::papers::trans_lora::lokr_hooks";
    if (r < 1) throw rank_error(std::string(op) + ": r must be at least 1; got " + std::to_string(r));
    std::mt19937_64 g(seed);
    for (auto* l : layers_) {
      if (l->has_adapter())
        throw argument_error(std::string(op) + ": layer '" + l->name() + "' already has an adapter; LoKr replaces none");
      const auto [a, b] = lokr_factorization(l->out_features());
      const auto [c, d] = lokr_factorization(l->in_features());
      factors f;
      f.w1 = std::make_unique<parameter<T>>(l->name() + ".lokr_w1", dense<T>::Zero(a, c));
      f.w2a = std::make_unique<parameter<T>>(l->name() + ".lokr_w2_a", nn::uniform<T>(b, r, 1.0 / std::sqrt(double(r)), g));
      f.w2b = std::make_unique<parameter<T>>(l->name() + ".lokr_w2_b", nn::uniform<T>(r, d, 1.0 / std::sqrt(double(d)), g));
      f_.push_back(std::move(f));
    }
    hooks_ = std::make_unique<nn::layer_hooks<T>>(
        layers_,
        [this](std::size_t i, tape<T>& t, const var<T>& x, const var<T>&) {
          const auto& f = f_[i];
          const double s = s_;
          auto y = autograd::adapted_linear<T, 3>(
              x, layers_[i]->weight(), {t.param(*f.w1), t.param(*f.w2a), t.param(*f.w2b)},
              [s](const auto& v) { return deltaw::kron(v[0], deltaw::kron_factor(v[1], v[2]), deltaw::scale(s)); },
              "lokr_linear");
          if (auto* b = layers_[i]->bias()) y = autograd::add_bias(y, t.param(*b));
          return y;
        },
        op);
  }
  lokr_hooks(const lokr_hooks&) = delete;
  lokr_hooks& operator=(const lokr_hooks&) = delete;

  std::vector<parameter<T>*> parameters() {
    std::vector<parameter<T>*> out;
    for (auto& f : f_)
      for (auto* p : {f.w1.get(), f.w2a.get(), f.w2b.get()}) out.push_back(p);
    return out;
  }
  index_t parameter_count() {
    index_t n = 0;
    for (auto* p : parameters()) n += p->size();
    return n;
  }

 private:
  struct factors {
    std::unique_ptr<parameter<T>> w1, w2a, w2b;
  };
  std::vector<nn::linear<T>*> layers_;
  double s_;
  std::vector<factors> f_;
  std::unique_ptr<nn::layer_hooks<T>> hooks_;
};

}  // namespace trans_lora
}  // namespace papers
DELTAW_NAMESPACE_END
