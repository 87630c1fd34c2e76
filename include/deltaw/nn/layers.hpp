// SPDX-License-Identifier: MIT
// The layers a tiny transformer and an MLP need, over autograd tapes. Frozen weights are
// views of memory the caller (or the model object) owns: layers never copy them.
//
//   linear          frozen W (view) + optional bias + optional LoRA / rsLoRA / DoRA adapter
//                   + an optional forward hook (DP-SGD's capture, EVA's input collection)
//   embedding       a token table (frozen view or trainable parameter)
//   layer_norm, rms_norm
//   transformer_block   pre-norm: x + attn(ln1(x)), then x + mlp(ln2(x)) (GELU MLP)
//   tiny_transformer    embedding + positional embedding, blocks, final norm, head
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../autograd/adapters.hpp"

DELTAW_NAMESPACE_BEGIN
namespace nn {

using autograd::parameter;
using autograd::tape;
using autograd::var;

/// Uniform(−bound, bound) entries from a seeded generator.
template <class T>
dense<T> uniform(index_t rows, index_t cols, double bound, std::mt19937_64& g) {
  std::uniform_real_distribution<double> u(-bound, bound);
  dense<T> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = T(u(g));
  return m;
}

enum class adapter_kind { lora, rslora, dora };

/// A linear layer y = x·Wᵀ (+ b) over a frozen W [out, in], with an optional adapter.
template <class T>
class linear {
 public:
  linear() = default;
  linear(std::string name, matrix_view<const T> W) : name_(std::move(name)), W_(W) {}

  const std::string& name() const { return name_; }
  matrix_view<const T> weight() const { return W_; }
  index_t in_features() const { return W_.cols(); }
  index_t out_features() const { return W_.rows(); }

  /// A bias [1, out]; frozen unless trainable.
  void set_bias(dense<T> b, bool trainable = false) {
    if (b.rows() != 1 || b.cols() != out_features())
      throw shape_error("deltaw::nn::linear(" + name_ + ")::set_bias: the bias is " +
                        deltaw::detail::shape_str(b.rows(), b.cols()) + "; expected [1, " +
                        std::to_string(out_features()) + "]");
    bias_ = std::make_unique<parameter<T>>(name_ + ".bias", std::move(b));
    bias_->set_trainable(trainable);
  }

  /// Attaches an adapter of rank r with PEFT's default init: A kaiming-uniform (a = √5,
  /// i.e. U(±1/√in)), B = 0, so the layer starts equal to the frozen one; s = α/r
  /// (rsLoRA: α/√r). DoRA's magnitude starts at the row norms of W.
  void attach(adapter_kind kind, index_t r, double alpha, std::mt19937_64& g) {
    if (r < 1) throw rank_error("deltaw::nn::linear(" + name_ + ")::attach: the rank must be at least 1; got " + std::to_string(r));
    kind_ = kind;
    s_ = kind == adapter_kind::rslora ? alpha / std::sqrt(double(r)) : alpha / double(r);
    B_ = std::make_unique<parameter<T>>(name_ + ".lora_B", dense<T>::Zero(out_features(), r));
    A_ = std::make_unique<parameter<T>>(name_ + ".lora_A", uniform<T>(r, in_features(), 1.0 / std::sqrt(double(in_features())), g));
    if (kind == adapter_kind::dora) {
      dense<T> m(1, out_features());
      for (index_t o = 0; o < out_features(); ++o) {
        double sq = 0;
        for (index_t j = 0; j < in_features(); ++j) sq += double(W_(o, j)) * double(W_(o, j));
        m(0, o) = T(std::sqrt(sq));
      }
      m_ = std::make_unique<parameter<T>>(name_ + ".magnitude", std::move(m));
    }
  }
  bool has_adapter() const { return B_ != nullptr; }
  adapter_kind kind() const { return kind_; }
  double scale() const { return s_; }
  /// Changes the adapter's scale s (ALLoRA trains with s = 1; IncreLoRA rescales as the
  /// rank grows).
  void set_scale(double s) {
    if (!std::isfinite(s))
      throw non_finite_error("deltaw::nn::linear(" + name_ + ")::set_scale: the scale must be finite");
    s_ = s;
  }

  /// Full fine-tuning: the weight becomes a trainable parameter. This copies W once (the
  /// weight is what changes); the caller's memory is no longer read by this layer.
  void make_weight_trainable() {
    if (!Wp_) {
      dense<T> w(out_features(), in_features());
      for (index_t o = 0; o < out_features(); ++o)
        for (index_t j = 0; j < in_features(); ++j) w(o, j) = W_(o, j);
      Wp_ = std::make_unique<parameter<T>>(name_ + ".weight", std::move(w));
    }
    Wp_->set_trainable(true);
  }
  /// The trainable copy of W made by make_weight_trainable() (null before).
  parameter<T>* weight_parameter() { return Wp_.get(); }
  parameter<T>* lora_B() { return B_.get(); }
  parameter<T>* lora_A() { return A_.get(); }
  parameter<T>* magnitude() { return m_.get(); }
  parameter<T>* bias() { return bias_.get(); }

  var<T> operator()(tape<T>& t, const var<T>& x) const {
    var<T> y;
    if (Wp_ && !B_) {
      y = autograd::matmul_nt(x, t.param(*Wp_));
    } else if (Wp_) {
      throw argument_error("deltaw::nn::linear(" + name_ + "): a trainable weight together with an adapter is not supported");
    } else if (!B_) {
      y = autograd::linear(x, W_);
    } else if (kind_ == adapter_kind::dora) {
      y = autograd::dora_linear(x, W_, t.param(*B_), t.param(*A_), t.param(*m_), s_);
    } else {
      y = autograd::lora_linear(x, W_, t.param(*B_), t.param(*A_), s_);
    }
    if (bias_) y = autograd::add_bias(y, t.param(*bias_));
    if (hook_) y = hook_(t, x, y);
    return y;
  }

  /// A forward hook: called by operator() after the layer computed y (bias included),
  /// with the layer's input x and output y on the same tape; what it returns is the
  /// layer's output. It may return y itself (a hook that only reads x or y: EVA's input
  /// collection) or a node recorded on the tape that passes y through, whose backward
  /// closure sees dL/dy (DP-SGD's capture of the output gradient). It runs under no_grad
  /// too (t.grad_enabled() tells). One hook per layer: setting a second one throws, so two
  /// users cannot silently replace each other's; `owner` is a tag (e.g. the object that
  /// installed it) that clear_forward_hook(owner) checks. The hook must not outlive what
  /// it captures: its owner clears it (dp_sgd does so on destruction). Without a hook the
  /// forward pass pays one test of an empty std::function.
  using forward_hook = std::function<var<T>(tape<T>&, const var<T>& x, const var<T>& y)>;
  void set_forward_hook(forward_hook h, const void* owner = nullptr) {
    if (!h) throw argument_error("deltaw::nn::linear(" + name_ + ")::set_forward_hook: empty hook (use clear_forward_hook)");
    if (hook_)
      throw argument_error("deltaw::nn::linear(" + name_ + ")::set_forward_hook: the layer already has a forward hook" +
                           (hook_owner_ == owner ? std::string(" from the same owner (attached twice?)")
                                                 : std::string(" from another owner")) +
                           "; clear it first");
    hook_ = std::move(h);
    hook_owner_ = owner;
  }
  /// Removes the hook. With an owner, only that owner's hook (returns whether it removed one).
  bool clear_forward_hook(const void* owner = nullptr) {
    if (!hook_ || (owner != nullptr && owner != hook_owner_)) return false;
    hook_ = nullptr;
    hook_owner_ = nullptr;
    return true;
  }
  bool has_forward_hook() const { return bool(hook_); }
  const void* forward_hook_owner() const { return hook_ ? hook_owner_ : nullptr; }

  /// Removes the adapter (B, A, magnitude): the layer is the frozen one again (EVA gives a
  /// layer rank 0 this way).
  void remove_adapter() {
    B_.reset();
    A_.reset();
    m_.reset();
  }

  /// The trainable parameters (weight when trainable, adapter factors, bias when trainable).
  void collect(std::vector<parameter<T>*>& out, bool only_trainable = true) {
    for (auto* p : {Wp_.get(), B_.get(), A_.get(), m_.get(), bias_.get()})
      if (p && (p->trainable() || !only_trainable)) out.push_back(p);
  }

 private:
  std::string name_;
  matrix_view<const T> W_;
  std::unique_ptr<parameter<T>> bias_;
  std::unique_ptr<parameter<T>> B_, A_, m_;
  std::unique_ptr<parameter<T>> Wp_;  // full fine-tuning only
  adapter_kind kind_ = adapter_kind::lora;
  double s_ = 1.0;
  forward_hook hook_;
  const void* hook_owner_ = nullptr;
};

/// Forward hooks on a set of layers for as long as this object lives: hook(i, tape, x, y)
/// runs for layers[i] (see linear::set_forward_hook). Every layer is checked before any
/// hook is installed, so a layer that already has one throws argument_error
/// "<op>: layer '<name>' already has a forward hook<hint>; clear it first" and nothing is
/// installed. The hooks carry `owner` (default: this object) and the destructor removes
/// exactly those. Used by DP-SGD, LoRAPrune and EVA's input collection.
template <class T>
class layer_hooks {
 public:
  using hook_fn = std::function<var<T>(std::size_t, tape<T>&, const var<T>&, const var<T>&)>;
  layer_hooks(std::vector<linear<T>*> layers, hook_fn hook, const std::string& op, const std::string& hint = "",
              const void* owner = nullptr)
      : layers_(std::move(layers)), owner_(owner ? owner : this) {
    for (auto* l : layers_)
      if (l->has_forward_hook())
        throw argument_error(op + ": layer '" + l->name() + "' already has a forward hook" + hint + "; clear it first");
    for (std::size_t i = 0; i < layers_.size(); ++i)
      layers_[i]->set_forward_hook(
          [hook, i](tape<T>& t, const var<T>& x, const var<T>& y) { return hook(i, t, x, y); }, owner_);
  }
  ~layer_hooks() {
    for (auto* l : layers_) l->clear_forward_hook(owner_);
  }
  layer_hooks(const layer_hooks&) = delete;
  layer_hooks& operator=(const layer_hooks&) = delete;

 private:
  std::vector<linear<T>*> layers_;
  const void* owner_;
};

/// LayerNorm with γ [1, d] (ones) and β [1, d] (zeros), frozen unless made trainable.
template <class T>
class layer_norm {
 public:
  layer_norm() = default;
  layer_norm(std::string name, index_t d, double eps = 1e-5)
      : gamma_(std::make_unique<parameter<T>>(name + ".weight", dense<T>::Ones(1, d))),
        beta_(std::make_unique<parameter<T>>(name + ".bias", dense<T>::Zero(1, d))),
        eps_(eps) {
    gamma_->set_trainable(false);
    beta_->set_trainable(false);
  }
  parameter<T>& gamma() { return *gamma_; }
  parameter<T>& beta() { return *beta_; }
  void set_trainable(bool on) {
    gamma_->set_trainable(on);
    beta_->set_trainable(on);
  }
  var<T> operator()(tape<T>& t, const var<T>& x) const {
    return autograd::layer_norm(x, t.param(*gamma_), t.param(*beta_), eps_);
  }
  void collect(std::vector<parameter<T>*>& out, bool only_trainable = true) {
    for (auto* p : {gamma_.get(), beta_.get()})
      if (p->trainable() || !only_trainable) out.push_back(p);
  }

 private:
  std::unique_ptr<parameter<T>> gamma_, beta_;
  double eps_ = 1e-5;
};

/// RMSNorm with γ [1, d] (ones), frozen unless made trainable.
template <class T>
class rms_norm {
 public:
  rms_norm() = default;
  rms_norm(std::string name, index_t d, double eps = 1e-6)
      : gamma_(std::make_unique<parameter<T>>(name + ".weight", dense<T>::Ones(1, d))), eps_(eps) {
    gamma_->set_trainable(false);
  }
  parameter<T>& gamma() { return *gamma_; }
  var<T> operator()(tape<T>& t, const var<T>& x) const { return autograd::rms_norm(x, t.param(*gamma_), eps_); }
  void collect(std::vector<parameter<T>*>& out, bool only_trainable = true) {
    if (gamma_->trainable() || !only_trainable) out.push_back(gamma_.get());
  }

 private:
  std::unique_ptr<parameter<T>> gamma_;
  double eps_ = 1e-6;
};

/// The shape of a tiny decoder-only transformer.
struct transformer_config {
  index_t vocab = 64;
  index_t seq = 32;
  index_t d_model = 64;
  index_t heads = 4;
  index_t d_ff = 256;
  index_t layers = 2;
  std::uint64_t seed = 1;
};

/// A pre-norm transformer block over frozen weights the caller owns.
template <class T>
class transformer_block {
 public:
  transformer_block(const std::string& name, const transformer_config& c, const std::vector<const dense<T>*>& w)
      : ln1_(name + ".ln1", c.d_model),
        ln2_(name + ".ln2", c.d_model),
        q_(name + ".q", deltaw::view(*w[0])),
        k_(name + ".k", deltaw::view(*w[1])),
        v_(name + ".v", deltaw::view(*w[2])),
        o_(name + ".o", deltaw::view(*w[3])),
        up_(name + ".up", deltaw::view(*w[4])),
        down_(name + ".down", deltaw::view(*w[5])),
        heads_(c.heads) {}

  var<T> operator()(tape<T>& t, const var<T>& x, index_t batch, index_t seq) const {
    const auto h = ln1_(t, x);
    const auto a = autograd::causal_attention(q_(t, h), k_(t, h), v_(t, h), batch, seq, heads_);
    const auto x1 = autograd::add(x, o_(t, a));
    const auto m = down_(t, autograd::gelu(up_(t, ln2_(t, x1))));
    return autograd::add(x1, m);
  }

  std::vector<linear<T>*> projections() { return {&q_, &k_, &v_, &o_, &up_, &down_}; }
  /// Full fine-tuning of the block: its norms and projection weights become trainable.
  void make_fully_trainable() {
    ln1_.set_trainable(true);
    ln2_.set_trainable(true);
    for (auto* l : projections()) l->make_weight_trainable();
  }
  void collect(std::vector<parameter<T>*>& out, bool only_trainable = true) {
    ln1_.collect(out, only_trainable);
    ln2_.collect(out, only_trainable);
    for (auto* l : projections()) l->collect(out, only_trainable);
  }

 private:
  layer_norm<T> ln1_, ln2_;
  linear<T> q_, k_, v_, o_, up_, down_;
  index_t heads_;
};

/// A tiny decoder-only transformer. It owns its (frozen, random "pretrained") weights;
/// layers view them. Tokens in, logits [batch·seq, vocab] out.
template <class T>
class tiny_transformer {
 public:
  explicit tiny_transformer(transformer_config c) : c_(c), final_ln_("final_ln", c.d_model) {
    if (c.d_model % c.heads != 0)
      throw shape_error("deltaw::nn::tiny_transformer: d_model " + std::to_string(c.d_model) +
                        " is not a multiple of heads " + std::to_string(c.heads));
    std::mt19937_64 g(c.seed);
    tok_ = uniform<T>(c.vocab, c.d_model, 1.0, g);
    pos_ = uniform<T>(c.seq, c.d_model, 0.5, g);
    head_ = uniform<T>(c.vocab, c.d_model, 1.0 / std::sqrt(double(c.d_model)), g);
    const double bd = 1.0 / std::sqrt(double(c.d_model)), bf = 1.0 / std::sqrt(double(c.d_ff));
    weights_.reserve(std::size_t(6 * c.layers));
    for (index_t l = 0; l < c.layers; ++l) {
      for (int i = 0; i < 4; ++i) weights_.push_back(std::make_unique<dense<T>>(uniform<T>(c.d_model, c.d_model, bd, g)));
      weights_.push_back(std::make_unique<dense<T>>(uniform<T>(c.d_ff, c.d_model, bd, g)));
      weights_.push_back(std::make_unique<dense<T>>(uniform<T>(c.d_model, c.d_ff, bf, g)));
      std::vector<const dense<T>*> w;
      for (int i = 0; i < 6; ++i) w.push_back(weights_[std::size_t(6 * l + i)].get());
      blocks_.push_back(std::make_unique<transformer_block<T>>("block" + std::to_string(l), c, w));
    }
    head_layer_ = linear<T>("head", deltaw::view(std::as_const(head_)));
  }

  const transformer_config& config() const { return c_; }

  /// Attaches an adapter to every attention and MLP projection.
  void attach(adapter_kind kind, index_t r, double alpha) {
    std::mt19937_64 g(c_.seed + 1000);
    for (auto& b : blocks_)
      for (auto* l : b->projections()) l->attach(kind, r, alpha, g);
  }

  /// ids: batch·seq token ids (row b·seq + i is token i of sequence b).
  var<T> operator()(tape<T>& t, const std::vector<std::int64_t>& ids, index_t batch) const {
    if (index_t(ids.size()) != batch * c_.seq)
      throw shape_error("deltaw::nn::tiny_transformer: " + std::to_string(ids.size()) + " token ids for batch " +
                        std::to_string(batch) + " × seq " + std::to_string(c_.seq));
    std::vector<std::int64_t> positions(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) positions[i] = std::int64_t(i % std::size_t(c_.seq));
    auto x = autograd::add(autograd::embedding(tok_p_ ? t.param(*tok_p_) : t.frozen(tok_, "tok_emb"), ids),
                           autograd::embedding(pos_p_ ? t.param(*pos_p_) : t.frozen(pos_, "pos_emb"), positions));
    for (const auto& b : blocks_) x = (*b)(t, x, batch, c_.seq);
    return head_layer_(t, final_ln_(t, x));
  }

  /// Every projection of every block (adapted or not), block by block in the order
  /// q, k, v, o, up, down.
  std::vector<linear<T>*> projections() {
    std::vector<linear<T>*> out;
    for (auto& b : blocks_)
      for (auto* l : b->projections()) out.push_back(l);
    return out;
  }
  /// The projections that carry an adapter.
  std::vector<linear<T>*> adapted_layers() {
    std::vector<linear<T>*> out;
    for (auto* l : projections())
      if (l->has_adapter()) out.push_back(l);
    return out;
  }
  /// The frozen weights the projections view, in the order of projections(): what a
  /// weight perturbation (Flat-LoRA) or a merge writes into.
  std::vector<dense<T>*> projection_weights() {
    std::vector<dense<T>*> out;
    for (auto& w : weights_) out.push_back(w.get());
    return out;
  }

  /// Full fine-tuning: embeddings, every norm, projection and the head become trainable
  /// parameters (copies of the frozen weights, made once). Do not combine with adapters.
  void make_fully_trainable() {
    if (!tok_p_) tok_p_ = std::make_unique<parameter<T>>("tok_emb", tok_);
    if (!pos_p_) pos_p_ = std::make_unique<parameter<T>>("pos_emb", pos_);
    for (auto& b : blocks_) b->make_fully_trainable();
    final_ln_.set_trainable(true);
    head_layer_.make_weight_trainable();
  }

  /// The trainable parameters by layer, for layer-wise strategies (LISA): the embedding
  /// (token and position tables), each block, and the head (final norm and output layer).
  struct parameter_groups {
    std::vector<parameter<T>*> embedding;
    std::vector<std::vector<parameter<T>*>> blocks;
    std::vector<parameter<T>*> head;
  };
  /// Every parameter whether currently trainable or not (so that a strategy can switch
  /// them), grouped by layer. Frozen views are not parameters and do not appear.
  parameter_groups groups() {
    parameter_groups g;
    for (auto* p : {tok_p_.get(), pos_p_.get()})
      if (p) g.embedding.push_back(p);
    for (auto& b : blocks_) {
      std::vector<parameter<T>*> ps;
      b->collect(ps, false);
      g.blocks.push_back(std::move(ps));
    }
    final_ln_.collect(g.head, false);
    head_layer_.collect(g.head, false);
    return g;
  }

  std::vector<parameter<T>*> trainable_parameters() {
    std::vector<parameter<T>*> out;
    for (auto* p : {tok_p_.get(), pos_p_.get()})
      if (p && p->trainable()) out.push_back(p);
    for (auto& b : blocks_) b->collect(out);
    final_ln_.collect(out);
    head_layer_.collect(out);
    return out;
  }
  /// Bytes of frozen weights (embeddings, projections, head).
  index_t frozen_bytes() const {
    index_t n = tok_.size() + pos_.size() + head_.size();
    for (const auto& w : weights_) n += w->size();
    return n * index_t(sizeof(T));
  }

 private:
  transformer_config c_;
  dense<T> tok_, pos_, head_;
  std::unique_ptr<parameter<T>> tok_p_, pos_p_;  // full fine-tuning only
  std::vector<std::unique_ptr<dense<T>>> weights_;
  std::vector<std::unique_ptr<transformer_block<T>>> blocks_;
  layer_norm<T> final_ln_;
  linear<T> head_layer_;
};

}  // namespace nn
DELTAW_NAMESPACE_END
