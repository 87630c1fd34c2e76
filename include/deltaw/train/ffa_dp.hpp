// SPDX-License-Identifier: MIT
// FFA-LoRA (Sun, Li, Ding, Liu, "Improving LoRA in Privacy-preserving Federated Learning",
// ICLR 2024): A random and frozen, B zero-initialised and trained. Three pieces:
//
//   ffa_random_A / ffa_init / ffa_lora   A regenerated from (seed, layer index) by Philox:
//                                        every client gets the same A without sending it
//   federated_average / ffa_aggregate    FedAvg of the clients' B. Because A is shared,
//                                        Σₖ pₖ·s·Bₖ·A = s·(Σₖ pₖBₖ)·A: averaging B is the
//                                        exact average of the updates (with A trained too,
//                                        avg(B)·avg(A) ≠ avg(B·A))
//   dp_sgd                               DP-SGD (Abadi et al., CCS 2016) on B: per-sample
//                                        gradients clipped to C, summed, Gaussian noise of
//                                        standard deviation σ·C added, divided by the batch
//                                        size N: g̃ = (Σᵢ gᵢ·min(1, C/‖gᵢ‖) + σC·z) / N
//
// Per-sample gradients of B are cheap for a LoRA layer y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ: with
// Zᵢ = Xᵢ·Aᵀ [tᵢ, r], gᵢ = s·dYᵢᵀ·Zᵢ [out, r]. The clipped sum is one GEMM,
// s·dYᵀ·(c ⊙ Z), c the per-row clip factor of each row's sample; the norms need gᵢ once
// each (O(rows·out·r) in all, the cost of the batch gradient). No out × in matrix is
// formed.
//
// dp_sgd sees a layer's input and output gradient either through dp_sgd::forward (the
// caller runs the layer through it) or through a forward hook on nn::linear (attach(), or
// the constructor from a tiny_transformer, whose forward pass calls its projections
// itself); the hooks come off in detach() and the destructor.
//
// Limits (documented in docs/training.md): dp_sgd privatises the B of the layers it is
// given. Any other trainable parameter would leak: the constructor refuses layers with a
// trainable A or bias, or a DoRA adapter, and a model with any other trainable parameter.
// No privacy accountant (ε, δ) is included. The batch loss must be a weighted sum of
// per-sample losses, L = w·Σᵢ ℓᵢ (w = 1/N for a mean); set dp_sgd_options::loss_weight
// otherwise. A token-mean cross-entropy is such a mean over samples only when every
// sample counts the same number of tokens (no label −100): otherwise w = 1/(tokens kept
// in the batch) depends on the other samples and the clipping bound no longer holds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "../core/random.hpp"
#include "../nn/layers.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

// ---------------------------------------------------------------------------------------
// FFA-LoRA: the frozen random A.

struct ffa_options {
  std::uint64_t seed = 0;
  /// A's entries are U(−bound, bound) from Philox; 0 → 1/√in, PEFT's kaiming-uniform
  /// bound (a = √5), which the paper keeps. UNVERIFIED whether the reference code draws
  /// another law (e.g. Gaussian); the bound is the option.
  double a_bound = 0;
};

/// The FFA A of one layer: [r, in], entry k = bound·U(−1, 1) of Philox stream
/// (seed, tensor). Exact draws (bits_to_uniform_pm1), so any machine regenerates the same
/// bits from the seed.
template <class T>
dense<T> ffa_random_A(index_t r, index_t in, std::uint64_t seed, std::uint64_t tensor, double bound = 0) {
  if (r < 1 || in < 1)
    throw shape_error("deltaw::train::ffa_random_A: A must be at least [1, 1]; got " + deltaw::detail::shape_str(r, in));
  if (!(bound >= 0) || !std::isfinite(bound))
    throw argument_error("deltaw::train::ffa_random_A: bound must be finite and ≥ 0; got " + std::to_string(bound));
  if (bound == 0) bound = 1.0 / std::sqrt(double(in));
  dense<T> A(r, in);
  basis_entries e{random_stream{seed, tensor}, basis_law::uniform, bound, 0.0};
  fill_entries<T>(e, 0, std::uint64_t(A.size()), A.data());
  return A;
}

/// Puts an adapted layer into FFA form: A := ffa_random_A(seed, tensor), frozen; B := 0,
/// trainable. The layer's output equals the frozen layer's until B moves.
template <class T>
void ffa_init(nn::linear<T>& layer, std::uint64_t tensor, const ffa_options& o = {}) {
  if (!layer.has_adapter())
    throw argument_error("deltaw::train::ffa_init: layer '" + layer.name() + "' has no adapter (attach one first)");
  if (layer.kind() == nn::adapter_kind::dora)
    throw argument_error("deltaw::train::ffa_init: layer '" + layer.name() + "' is DoRA; FFA-LoRA needs LoRA or rsLoRA");
  auto* A = layer.lora_A();
  A->value() = ffa_random_A<T>(A->rows(), A->cols(), o.seed, tensor, o.a_bound);
  A->set_trainable(false);
  A->zero_grad();
  layer.lora_B()->value().setZero();
  layer.lora_B()->set_trainable(true);
}

/// FFA-LoRA over a list of adapted layers (layer i uses Philox tensor i). It changes
/// nothing during training (A is frozen, so the tape computes no gradient for it); the
/// method object remembers the seed so that A can be regenerated and checked.
template <class T>
class ffa_lora : public method<T> {
 public:
  ffa_lora(std::vector<nn::linear<T>*> layers, ffa_options o = {}) : layers_(std::move(layers)), o_(o) {
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      if (layers_[i] == nullptr) throw argument_error("deltaw::train::ffa_lora: null layer " + std::to_string(i));
      ffa_init(*layers_[i], std::uint64_t(i), o_);
    }
  }
  std::string name() const override { return "FFA-LoRA"; }
  /// Layer i's A as it must be (regenerated from the seed).
  dense<T> expected_A(std::size_t i) const {
    const auto* A = layers_.at(i)->lora_A();
    return ffa_random_A<T>(A->rows(), A->cols(), o_.seed, std::uint64_t(i), o_.a_bound);
  }
  /// Whether every layer's A still equals its regenerated value bit for bit.
  bool a_unchanged() const {
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const dense<T> want = expected_A(i);
      const auto& have = layers_[i]->lora_A()->value();
      if (std::memcmp(want.data(), have.data(), sizeof(T) * std::size_t(want.size())) != 0) return false;
    }
    return true;
  }
  /// The trainable parameters (the B of every layer): what the optimiser gets.
  std::vector<autograd::parameter<T>*> parameters() const {
    std::vector<autograd::parameter<T>*> out;
    for (auto* l : layers_) out.push_back(l->lora_B());
    return out;
  }
  const std::vector<nn::linear<T>*>& layers() const { return layers_; }

 private:
  std::vector<nn::linear<T>*> layers_;
  ffa_options o_;
};

// ---------------------------------------------------------------------------------------
// Federated averaging.

namespace detail {
inline std::vector<double> fedavg_weights(std::size_t k, const std::vector<double>& w, const char* op) {
  if (k == 0) throw argument_error(std::string(op) + ": no clients");
  if (w.empty()) return std::vector<double>(k, 1.0 / double(k));
  if (w.size() != k)
    throw argument_error(std::string(op) + ": " + std::to_string(w.size()) + " weights for " + std::to_string(k) +
                         " clients");
  double sum = 0;
  for (double x : w) {
    if (!(x >= 0) || !std::isfinite(x))
      throw argument_error(std::string(op) + ": client weights must be finite and ≥ 0; got " + std::to_string(x));
    sum += x;
  }
  if (sum <= 0) throw argument_error(std::string(op) + ": the client weights sum to 0");
  std::vector<double> p(k);
  for (std::size_t i = 0; i < k; ++i) p[i] = w[i] / sum;
  return p;
}
}  // namespace detail

/// FedAvg of the clients' B: Σₖ pₖ·Bₖ with pₖ = weightₖ / Σ weight (equal when empty,
/// e.g. the clients' sample counts otherwise). Accumulated in double.
template <class T>
dense<T> federated_average(const std::vector<matrix_view<const T>>& Bs, const std::vector<double>& weights = {}) {
  constexpr const char* op = "deltaw::train::federated_average";
  const auto p = detail::fedavg_weights(Bs.size(), weights, op);
  const index_t m = Bs[0].rows(), r = Bs[0].cols();
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> acc =
      Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>::Zero(m, r);
  for (std::size_t k = 0; k < Bs.size(); ++k) {
    const auto& B = Bs[k];
    if (B.rows() != m || B.cols() != r)
      throw shape_error(std::string(op) + ": client " + std::to_string(k) + "'s B is " +
                        deltaw::detail::shape_str(B.rows(), B.cols()) + " but client 0's is " +
                        deltaw::detail::shape_str(m, r));
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < r; ++j) acc(i, j) += p[k] * double(B(i, j));
  }
  return acc.template cast<T>();
}

/// FFA aggregation of whole models: clients[k][l] is layer l of client k; server[l]
/// receives B = Σₖ pₖ·Bₖ. Every client's A must equal the server's bit for bit (the same
/// seed), and the scales must agree: otherwise averaging B is not the average update and
/// this throws argument_error.
template <class T>
void ffa_aggregate(const std::vector<std::vector<nn::linear<T>*>>& clients, const std::vector<nn::linear<T>*>& server,
                   const std::vector<double>& weights = {}) {
  constexpr const char* op = "deltaw::train::ffa_aggregate";
  const auto p = detail::fedavg_weights(clients.size(), weights, op);
  (void)p;
  for (std::size_t k = 0; k < clients.size(); ++k)
    if (clients[k].size() != server.size())
      throw argument_error(std::string(op) + ": client " + std::to_string(k) + " has " +
                           std::to_string(clients[k].size()) + " layers, the server " + std::to_string(server.size()));
  for (std::size_t l = 0; l < server.size(); ++l) {
    auto* s = server[l];
    if (s == nullptr || !s->has_adapter()) throw argument_error(std::string(op) + ": server layer " + std::to_string(l) + " has no adapter");
    const auto& As = s->lora_A()->value();
    std::vector<matrix_view<const T>> Bs;
    for (std::size_t k = 0; k < clients.size(); ++k) {
      auto* c = clients[k][l];
      if (c == nullptr || !c->has_adapter())
        throw argument_error(std::string(op) + ": client " + std::to_string(k) + " layer " + std::to_string(l) +
                             " has no adapter");
      const auto& Ac = c->lora_A()->value();
      if (Ac.rows() != As.rows() || Ac.cols() != As.cols() ||
          std::memcmp(Ac.data(), As.data(), sizeof(T) * std::size_t(As.size())) != 0)
        throw argument_error(std::string(op) + ": client " + std::to_string(k) + "'s A of layer '" + c->name() +
                             "' differs from the server's; FFA-LoRA's exact aggregation needs one shared A (the same seed)");
      if (c->scale() != s->scale())
        throw argument_error(std::string(op) + ": client " + std::to_string(k) + "'s scale of layer '" + c->name() +
                             "' is " + std::to_string(c->scale()) + ", the server's " + std::to_string(s->scale()));
      Bs.push_back(c->lora_B()->view());
    }
    s->lora_B()->value() = federated_average<T>(Bs, weights);
  }
}

// ---------------------------------------------------------------------------------------
// DP-SGD on B.

/// Per-sample gradients of B for one LoRA layer: rows [offsets[i], offsets[i+1]) of X
/// [rows, in] and dY [rows, out] belong to sample i; gᵢ = s·dYᵢᵀ·(Xᵢ·Aᵀ) [out, r]. For
/// tests and small batches (it returns N matrices; dp_sgd does not).
template <class T, class MX, class MY>
std::vector<dense<T>> lora_per_sample_grad_B(const MX& X, const MY& dY, const dense<T>& A, double s,
                                             const std::vector<index_t>& offsets) {
  constexpr const char* op = "deltaw::train::lora_per_sample_grad_B";
  if (X.cols() != A.cols())
    throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) + " but A is " +
                      deltaw::detail::shape_str(A.rows(), A.cols()));
  if (dY.rows() != X.rows())
    throw shape_error(std::string(op) + ": X has " + std::to_string(X.rows()) + " rows, dY " + std::to_string(dY.rows()));
  if (offsets.size() < 2 || offsets.front() != 0 || offsets.back() != X.rows())
    throw argument_error(std::string(op) + ": sample offsets must run from 0 to the " + std::to_string(X.rows()) + " rows");
  const dense<T> Z = X * A.transpose();
  std::vector<dense<T>> g;
  for (std::size_t i = 0; i + 1 < offsets.size(); ++i) {
    const index_t a = offsets[i], n = offsets[i + 1] - a;
    if (n < 0) throw argument_error(std::string(op) + ": sample offsets must not decrease");
    g.push_back(T(s) * dY.middleRows(a, n).transpose() * Z.middleRows(a, n));
  }
  return g;
}

struct dp_sgd_options {
  double clip_norm = 1.0;         ///< C
  double noise_multiplier = 1.0;  ///< σ: the noise has standard deviation σ·C per entry (before ÷N)
  std::uint64_t seed = 0;
  /// Rows of X per sample (e.g. the sequence length); 0 → call set_sample_offsets every step.
  index_t rows_per_sample = 0;
  /// The batch loss is L = w·Σᵢ ℓᵢ; 0 → w = 1/N (the mean of the per-sample losses).
  double loss_weight = 0;
  /// Keep the last step's per-layer Z and dY after privatising (until the next
  /// before_forward) so that per_sample_grad() can return the per-sample gradients; costs
  /// the memory of one step's captures. For tests and diagnostics.
  bool keep_last_step = false;
};

/// DP-SGD on the B of FFA/LoRA layers as a training method. Either, inside loss_fn:
///   auto y = dp.forward(t, 0, x);     // instead of layer(t, x): records X·Aᵀ and, in
///                                     // the backward sweep, dY
/// or with hooks: dp.attach() (or the tiny_transformer constructor, which attaches) and
/// the model's usual loss_fn; every forward pass (with gradients enabled) of a layer is
/// captured. After backward, dp replaces every B's gradient by the privatised one. Leave
/// fit_options::clip_norm at 0 (the clipping is per sample here). The object must not
/// outlive its layers (it clears their hooks on destruction); it is neither copied nor
/// moved (the hooks point at it).
///
/// Noise: entry j of layer l at the k-th privatised step (k counts after_backward calls
/// since construction) is σ·C·z, z = Philox normal of stream (seed, k·2¹⁶ + l), element j:
/// the run is bitwise reproducible from the seed on one platform (normal() goes through
/// libm; see core/random.hpp).
template <class T>
class dp_sgd : public method<T> {
 public:
  dp_sgd(std::vector<nn::linear<T>*> layers, dp_sgd_options o) : layers_(std::move(layers)), o_(o) {
    constexpr const char* op = "deltaw::train::dp_sgd";
    if (!(o.clip_norm > 0) || !std::isfinite(o.clip_norm))
      throw argument_error(std::string(op) + ": clip_norm must be finite and > 0; got " + std::to_string(o.clip_norm));
    if (!(o.noise_multiplier >= 0) || !std::isfinite(o.noise_multiplier))
      throw argument_error(std::string(op) + ": noise_multiplier must be finite and ≥ 0; got " +
                           std::to_string(o.noise_multiplier));
    if (!(o.loss_weight >= 0) || !std::isfinite(o.loss_weight))
      throw argument_error(std::string(op) + ": loss_weight must be finite and ≥ 0; got " + std::to_string(o.loss_weight));
    if (o.rows_per_sample < 0) throw argument_error(std::string(op) + ": rows_per_sample must be ≥ 0");
    if (layers_.size() >= (std::size_t(1) << 16)) throw argument_error(std::string(op) + ": at most 65535 layers");
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      auto* l = layers_[i];
      if (l == nullptr) throw argument_error(std::string(op) + ": null layer " + std::to_string(i));
      if (!l->has_adapter() || l->kind() == nn::adapter_kind::dora)
        throw argument_error(std::string(op) + ": layer '" + l->name() + "' needs a LoRA or rsLoRA adapter");
      if (l->lora_A()->trainable())
        throw argument_error(std::string(op) + ": layer '" + l->name() +
                             "' has a trainable A, whose gradient would not be privatised (freeze it: ffa_init)");
      if (l->bias() && l->bias()->trainable())
        throw argument_error(std::string(op) + ": layer '" + l->name() + "' has a trainable bias, which would not be privatised");
    }
    for (std::size_t i = 0; i < layers_.size(); ++i)
      for (std::size_t j = 0; j < i; ++j)
        if (layers_[i] == layers_[j])
          throw argument_error(std::string(op) + ": layer '" + layers_[i]->name() + "' is listed twice (" +
                               std::to_string(j) + " and " + std::to_string(i) + ")");
    uses_.resize(layers_.size());
  }

  /// DP-SGD on every adapted layer of a tiny_transformer, hooks attached: train::fit with
  /// the model's usual loss (e.g. cross_entropy(model(t, ids, batch), labels)) then
  /// privatises each B. A sample is one sequence: rows_per_sample defaults to the model's
  /// seq. Throws if the model has no adapted layer or any trainable parameter other than
  /// those layers' B (embedding, norms, head, A, bias: they would not be privatised).
  dp_sgd(nn::tiny_transformer<T>& model, dp_sgd_options o)
      : dp_sgd(model_layers(model), with_rows(o, model.config().seq)) {
    std::vector<const autograd::parameter<T>*> bs;
    for (auto* l : layers_) bs.push_back(l->lora_B());
    for (auto* p : model.trainable_parameters())
      if (std::find(bs.begin(), bs.end(), p) == bs.end())
        throw argument_error("deltaw::train::dp_sgd: the model's parameter '" + p->name() +
                             "' is trainable but is not the B of an adapted layer; its gradient would not be "
                             "privatised (freeze it)");
    attach();
  }
  ~dp_sgd() override { detach(); }
  dp_sgd(const dp_sgd&) = delete;
  dp_sgd& operator=(const dp_sgd&) = delete;

  std::string name() const override { return "DP-SGD"; }

  /// Installs a forward hook on every layer: each forward pass with gradients enabled
  /// records X·Aᵀ and, in the backward sweep, dY (as forward() does). Throws if attached
  /// already, or if a layer has another owner's hook (nothing is installed then).
  void attach() {
    constexpr const char* op = "deltaw::train::dp_sgd::attach";
    if (hooks_) throw argument_error(std::string(op) + ": the hooks are already attached");
    hooks_.emplace(
        layers_,
        [this](std::size_t i, autograd::tape<T>& t, const autograd::var<T>& x, const autograd::var<T>& y) {
          // Evaluation passes (no_grad) have no backward sweep to capture.
          return t.grad_enabled() && t.requires_grad(y) ? capture(t, i, x, y) : y;
        },
        op, " from another owner", this);
  }
  /// Removes the hooks this object installed (those still there); a no-op when detached.
  void detach() noexcept { hooks_.reset(); }
  bool attached() const { return hooks_.has_value(); }
  const std::vector<nn::linear<T>*>& layers() const { return layers_; }

  /// Runs layer i on x and records what the per-sample gradients need: Z = X·Aᵀ now
  /// ([rows, r], so X itself need not outlive the sweep), and dY when the backward sweep
  /// passes the output (an identity node whose closure copies its upstream gradient;
  /// it works with the tape's release_values mode, which train::fit turns on).
  autograd::var<T> forward(autograd::tape<T>& t, std::size_t i, const autograd::var<T>& x) {
    if (i >= layers_.size())
      throw argument_error("deltaw::train::dp_sgd::forward: layer " + std::to_string(i) + " of " +
                           std::to_string(layers_.size()));
    if (hooks_)
      throw argument_error("deltaw::train::dp_sgd::forward: the hooks are attached, which capture layer '" +
                           layers_[i]->name() + "' already; call the layer itself (or detach())");
    return capture(t, i, x, (*layers_[i])(t, x));
  }
  /// Sample boundaries of this step's rows: 0 = o₀ < o₁ < … < o_N = rows.
  void set_sample_offsets(std::vector<index_t> offsets) { offsets_ = std::move(offsets); }

  void before_forward(const step_context&) override {
    for (auto& u : uses_) u.clear();
    last_.clear();
  }
  void after_backward(const step_context&) override {
    // A use whose output the sweep never reached has dY = 0.
    for (std::size_t l = 0; l < layers_.size(); ++l)
      for (auto& u : uses_[l])
        if (u.dY.size() == 0) u.dY.setZero(u.Z.rows(), layers_[l]->out_features());
    privatise_z(uses_);
    if (o_.keep_last_step) {
      last_ = std::move(uses_);
      uses_.assign(layers_.size(), {});
    }
    for (auto& u : uses_) u.clear();
  }

  /// Sample i's gradient of layer l's B at the last privatised step, before clipping and
  /// noise: gᵢ = (s/w)·Σ_uses dYᵢᵀ·(Xᵢ·Aᵀ), the gradient of ℓᵢ alone. Needs
  /// dp_sgd_options::keep_last_step (and a step run through after_backward).
  dense<T> per_sample_grad(std::size_t l, std::size_t i) const {
    constexpr const char* op = "deltaw::train::dp_sgd::per_sample_grad";
    if (!o_.keep_last_step) throw argument_error(std::string(op) + ": set dp_sgd_options::keep_last_step");
    if (last_.size() != layers_.size()) throw argument_error(std::string(op) + ": no step was kept");
    if (l >= layers_.size() || i + 1 >= last_offs_.size())
      throw argument_error(std::string(op) + ": layer " + std::to_string(l) + " of " + std::to_string(layers_.size()) +
                           ", sample " + std::to_string(i) + " of " + std::to_string(last_offs_.size() - 1));
    const index_t a = last_offs_[i], n = last_offs_[i + 1] - a;
    dense<T> g = dense<T>::Zero(layers_[l]->out_features(), layers_[l]->lora_A()->rows());
    const T s = T(layers_[l]->scale() / last_w_);
    for (const auto& u : last_[l]) g.noalias() += s * u.dY.middleRows(a, n).transpose() * u.Z.middleRows(a, n);
    return g;
  }

  /// One layer use's input X [rows, in] and output gradient dY [rows, out].
  struct io_pair {
    dense<T> X;
    dense<T> dY;
  };
  /// The core, without a tape: inputs[l] are layer l's uses this step; writes every B's
  /// gradient (zero for a layer with no use, plus noise) and advances the noise counter.
  void privatise(const std::vector<std::vector<io_pair>>& inputs) {
    if (inputs.size() != layers_.size())
      throw argument_error("deltaw::train::dp_sgd: inputs for " + std::to_string(inputs.size()) + " layers, expected " +
                           std::to_string(layers_.size()));
    std::vector<std::vector<zd>> z(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const auto& A = layers_[l]->lora_A()->value();
      for (const auto& u : inputs[l]) {
        if (u.X.cols() != A.cols())
          throw shape_error("deltaw::train::dp_sgd: layer '" + layers_[l]->name() + "' got X " +
                            deltaw::detail::shape_str(u.X.rows(), u.X.cols()) + " for A " +
                            deltaw::detail::shape_str(A.rows(), A.cols()));
        z[l].push_back({dense<T>(u.X * A.transpose()), u.dY});
      }
    }
    privatise_z(z);
  }

  /// The per-sample gradient norms of the last step, before clipping (all layers jointly).
  const std::vector<double>& sample_norms() const { return norms_; }
  /// The clip factors min(1, C/‖gᵢ‖) of the last step.
  const std::vector<double>& clip_factors() const { return factors_; }
  /// Privatised steps so far (the noise counter).
  index_t steps() const { return count_; }
  const dp_sgd_options& options() const { return o_; }

 private:
  // One use of a layer in a step: Z = X·Aᵀ [rows, r] and the output gradient dY [rows, out].
  struct zd {
    dense<T> Z;
    dense<T> dY;
  };

  void privatise_z(const std::vector<std::vector<zd>>& in) {
    constexpr const char* op = "deltaw::train::dp_sgd";
    index_t rows = -1;
    for (std::size_t l = 0; l < in.size(); ++l)
      for (const auto& u : in[l]) {
        if (rows >= 0 && u.Z.rows() != rows)
          throw shape_error(std::string(op) + ": layer uses with different row counts (" + std::to_string(rows) + " and " +
                            std::to_string(u.Z.rows()) + ")");
        rows = u.Z.rows();
        if (u.dY.rows() != u.Z.rows() || u.dY.cols() != layers_[l]->out_features())
          throw shape_error(std::string(op) + ": layer '" + layers_[l]->name() + "' got dY " +
                            deltaw::detail::shape_str(u.dY.rows(), u.dY.cols()) + " for " + std::to_string(u.Z.rows()) +
                            " rows and " + std::to_string(layers_[l]->out_features()) + " outputs");
      }
    if (rows < 0) throw argument_error(std::string(op) + ": no layer was used this step (call dp_sgd::forward)");
    const auto offs = sample_offsets(rows);
    const std::size_t N = offs.size() - 1;
    const double w = o_.loss_weight > 0 ? o_.loss_weight : 1.0 / double(N);
    last_offs_ = offs;
    last_w_ = w;
    // Per-sample squared norms, summed over layers and uses: gᵢ = (s/w)·Σ_uses dYᵢᵀ·Zᵢ.
    std::vector<double> sq(N, 0.0);
    dense<T> g;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      if (in[l].empty()) continue;
      const index_t out = layers_[l]->out_features(), r = layers_[l]->lora_A()->rows();
      const T s = T(layers_[l]->scale() / w);
      for (std::size_t i = 0; i < N; ++i) {
        const index_t a = offs[i], n = offs[i + 1] - a;
        g.setZero(out, r);
        for (const auto& u : in[l]) g.noalias() += s * u.dY.middleRows(a, n).transpose() * u.Z.middleRows(a, n);
        sq[i] += g.template cast<double>().squaredNorm();
      }
    }
    norms_.resize(N);
    factors_.resize(N);
    for (std::size_t i = 0; i < N; ++i) {
      norms_[i] = std::sqrt(sq[i]);
      factors_[i] = norms_[i] > o_.clip_norm ? o_.clip_norm / norms_[i] : 1.0;
    }
    // Σᵢ cᵢ·gᵢ = (s/w)·Σ_uses dYᵀ·(c ⊙ Z): one GEMM a use. Then (· + σC·z)/N.
    const double noise_sd = o_.noise_multiplier * o_.clip_norm;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      auto* B = layers_[l]->lora_B();
      dense<T>& G = B->grad();
      G.setZero(B->rows(), B->cols());
      const T s = T(layers_[l]->scale() / w);
      for (const auto& u : in[l]) {
        dense<T> cz = u.Z;
        for (std::size_t i = 0; i < N; ++i) cz.middleRows(offs[i], offs[i + 1] - offs[i]) *= T(factors_[i]);
        G.noalias() += s * u.dY.transpose() * cz;
      }
      if (noise_sd > 0) {
        const random_stream st{o_.seed, (std::uint64_t(count_) << 16) | std::uint64_t(l)};
        for (index_t j = 0; j < G.size(); ++j) G.data()[j] += T(noise_sd * double(st.normal(std::uint64_t(j))));
      }
      G *= T(1.0 / double(N));
    }
    ++count_;
  }

  // Records Z = X·Aᵀ of layer i's use now and an identity node after y whose closure
  // copies dY (it works with release_values, which train::fit turns on).
  autograd::var<T> capture(autograd::tape<T>& t, std::size_t i, const autograd::var<T>& x, const autograd::var<T>& y) {
    const std::size_t k = uses_[i].size();
    uses_[i].push_back({dense<T>(x.value() * layers_[i]->lora_A()->value().transpose()), dense<T>()});
    const index_t iy = y.id();
    return t.record(
        "dp_sgd capture", dense<T>(y.value()), t.requires_grad(y),
        [this, i, k, iy](autograd::tape<T>& tp, index_t self) {
          const auto& g = tp.upstream(self);
          uses_[i][k].dY = g;
          autograd::detail::accumulate(tp, iy, g);
        },
        /*backward_reads_output=*/false);
  }
  static std::vector<nn::linear<T>*> model_layers(nn::tiny_transformer<T>& model) {
    auto ls = model.adapted_layers();
    if (ls.empty())
      throw argument_error("deltaw::train::dp_sgd: the model has no adapted layer (attach adapters and freeze A: ffa_init)");
    return ls;
  }
  static dp_sgd_options with_rows(dp_sgd_options o, index_t seq) {
    if (o.rows_per_sample == 0) o.rows_per_sample = seq;
    return o;
  }

  std::vector<index_t> sample_offsets(index_t rows) const {
    constexpr const char* op = "deltaw::train::dp_sgd";
    std::vector<index_t> offs;
    if (o_.rows_per_sample > 0) {
      if (rows % o_.rows_per_sample != 0 || rows == 0)
        throw shape_error(std::string(op) + ": " + std::to_string(rows) + " rows are not a positive multiple of rows_per_sample " +
                          std::to_string(o_.rows_per_sample));
      for (index_t a = 0; a <= rows; a += o_.rows_per_sample) offs.push_back(a);
    } else {
      offs = offsets_;
      if (offs.size() < 2 || offs.front() != 0 || offs.back() != rows)
        throw argument_error(std::string(op) + ": sample offsets must run from 0 to the " + std::to_string(rows) +
                             " rows of this step (set_sample_offsets, or rows_per_sample)");
      for (std::size_t i = 0; i + 1 < offs.size(); ++i)
        if (offs[i + 1] <= offs[i]) throw argument_error(std::string(op) + ": sample offsets must increase");
    }
    return offs;
  }

  std::vector<nn::linear<T>*> layers_;
  dp_sgd_options o_;
  std::vector<std::vector<zd>> uses_, last_;
  std::vector<index_t> offsets_, last_offs_;
  double last_w_ = 1.0;
  std::optional<nn::layer_hooks<T>> hooks_;  // set while attached
  std::vector<double> norms_, factors_;
  index_t count_ = 0;
};

}  // namespace train
DELTAW_NAMESPACE_END
