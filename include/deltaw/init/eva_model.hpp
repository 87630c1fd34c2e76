// SPDX-License-Identifier: MIT
// EVA (init/eva.hpp) from a model's own forward passes, as PEFT does it with forward hooks:
// every adapted nn::linear gets a forward hook that hands its input rows to EVA's
// incremental PCA, the model runs batches under no_grad until every layer's components
// converged (or max_batches), and the result initialises the layers' adapters.
//
//   eva_collect_inputs(model, batch)     one forward pass; each adapted layer's input rows
//                                        kept by the token mask (labels ≠ −100, attention
//                                        mask ≠ 0: eva_token_mask)
//   eva_init(model, data, options)       the whole fit; data(b) gives batch b (cycle your
//                                        data to let EVA run until convergence)
//   eva_init(layers, data, forward, o)   the same for any model built of nn::linear
//
// Input groups (layers that see identical inputs share one PCA, e.g. q, k, v) are found
// in the first batch: layers whose hook received the same tape node. PEFT finds them by
// hashing the inputs; the node identity is exact and costs nothing.
//
// Applying the result: A = the EVA components [rank_l, in], B = 0 [out, rank_l],
// s = α_l/rank_l for LoRA (α_l = α·rank_l/r_l, so s = α/r_l) and α_l/√rank_l for rsLoRA;
// a layer given rank 0 loses its adapter (nn::linear::remove_adapter). DoRA is refused
// (its magnitude would have to follow). r_l is the rank the layer carries on entry. A
// layer used more than once in a forward pass contributes its first use. The hooks are
// installed for the duration of the call only; a layer that has a hook already (e.g. an
// attached dp_sgd) is refused.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "../nn/layers.hpp"
#include "eva.hpp"

DELTAW_NAMESPACE_BEGIN

/// One batch of token data for EVA: ids as tiny_transformer takes them (batch·seq), and
/// per token the labels (−100 = not used by EVA; empty: every token kept) and the
/// attention mask (0 = padding; empty: none).
struct eva_batch {
  std::vector<std::int64_t> ids;
  index_t batch = 0;
  std::vector<std::int64_t> labels;
  std::vector<std::int64_t> attention_mask;
};

/// Options of eva_init.
struct eva_model_options {
  eva_options eva;                 ///< ρ, τ, whitening, α, power iterations, seed
  index_t max_batches = 100;       ///< stop here even if not converged
  bool allow_unconverged = false;  ///< return (and apply) a result that has not converged
  bool apply = true;               ///< write A, B = 0 and s into the layers
};

/// What eva_init found: one adapter per layer (in the order of the layers), the input
/// group of each layer (layers with the same group shared one PCA), the batches used and
/// whether every layer converged.
template <class T>
struct eva_model_result {
  std::vector<eva_adapter<T>> adapters;
  std::vector<std::string> input_groups;
  std::vector<index_t> ranks;
  index_t batches = 0;
  bool converged = false;
};

namespace detail {

/// EVA's keep mask of a batch (all ones when it has neither labels nor attention mask).
inline std::vector<std::uint8_t> eva_batch_mask(const eva_batch& b) {
  const std::size_t n = b.ids.size();
  if (!b.labels.empty() && b.labels.size() != n)
    throw shape_error("deltaw::eva_init: " + std::to_string(b.labels.size()) + " labels for " + std::to_string(n) +
                      " token ids");
  if (!b.attention_mask.empty() && b.attention_mask.size() != n)
    throw shape_error("deltaw::eva_init: " + std::to_string(b.attention_mask.size()) + " attention-mask entries for " +
                      std::to_string(n) + " token ids");
  if (!b.labels.empty()) return eva_token_mask(b.labels, b.attention_mask);
  std::vector<std::uint8_t> keep(n, 1);
  for (std::size_t i = 0; i < b.attention_mask.size(); ++i) keep[i] = b.attention_mask[i] != 0 ? 1 : 0;
  return keep;
}

/// Hooks for the duration of one forward pass: on_input(l, tape, x) for each use of
/// layer l; the layer's output passes through unchanged.
template <class T, class F>
nn::layer_hooks<T> eva_hooks(const std::vector<nn::linear<T>*>& layers, F on_input) {
  return nn::layer_hooks<T>(
      layers,
      [on_input](std::size_t l, autograd::tape<T>& t, const autograd::var<T>& x, const autograd::var<T>& y) {
        on_input(l, t, x);
        return y;
      },
      "deltaw::eva_init", " (e.g. an attached dp_sgd)");
}

template <class T>
void eva_check_layers(const std::vector<nn::linear<T>*>& layers, const char* op) {
  if (layers.empty()) throw argument_error(std::string(op) + ": no layers (attach adapters first)");
  for (std::size_t i = 0; i < layers.size(); ++i) {
    auto* l = layers[i];
    if (l == nullptr) throw argument_error(std::string(op) + ": null layer " + std::to_string(i));
    if (!l->has_adapter())
      throw argument_error(std::string(op) + ": layer '" + l->name() + "' has no adapter (attach one: its rank is r_l)");
    if (l->kind() == nn::adapter_kind::dora)
      throw argument_error(std::string(op) + ": layer '" + l->name() + "' is DoRA; EVA here initialises LoRA or rsLoRA");
    for (std::size_t j = 0; j < i; ++j)
      if (layers[j] == l) throw argument_error(std::string(op) + ": layer '" + l->name() + "' is listed twice");
  }
}

template <class T>
void eva_check_rows(const nn::linear<T>& l, index_t rows, std::size_t tokens) {
  if (rows != index_t(tokens))
    throw shape_error("deltaw::eva_init: layer '" + l.name() + "' got " + std::to_string(rows) + " input rows for " +
                      std::to_string(tokens) + " tokens; EVA needs one row per token");
}

}  // namespace detail

/// One forward pass of `forward(tape, batch)` under no_grad with hooks on `layers`: each
/// layer's input rows (first use) kept by the batch's token mask, in token order. With
/// `nodes`, also each layer's input tape node (layers with the same node see the same input:
/// eva_init's input groups).
template <class T, class Forward>
std::vector<dense<T>> eva_collect_inputs(const std::vector<nn::linear<T>*>& layers, Forward&& forward, const eva_batch& b,
                                         std::vector<index_t>* nodes = nullptr) {
  detail::eva_check_layers(layers, "deltaw::eva_collect_inputs");
  const auto keep = detail::eva_batch_mask(b);
  index_t kept = 0;
  for (auto k : keep) kept += k;
  std::vector<dense<T>> out(layers.size());
  std::vector<std::uint8_t> seen(layers.size(), 0);
  if (nodes) nodes->assign(layers.size(), -1);
  {
    const auto hooks = detail::eva_hooks<T>(layers, [&](std::size_t l, autograd::tape<T>&, const autograd::var<T>& x) {
      if (seen[l]) return;
      seen[l] = 1;
      if (nodes) (*nodes)[l] = x.id();
      const auto X = x.value();
      detail::eva_check_rows(*layers[l], X.rows(), keep.size());
      out[l].resize(kept, X.cols());
      for (index_t i = 0, o = 0; i < X.rows(); ++i)
        if (keep[std::size_t(i)]) out[l].row(o++) = X.row(i);
    });
    autograd::tape<T> t;
    autograd::no_grad<T> ng(t);
    forward(t, b);
  }
  for (std::size_t l = 0; l < layers.size(); ++l)
    if (!seen[l])
      throw argument_error("deltaw::eva_collect_inputs: layer '" + layers[l]->name() + "' was not run by the forward pass");
  return out;
}

/// The same for a tiny_transformer's adapted layers.
template <class T>
std::vector<dense<T>> eva_collect_inputs(nn::tiny_transformer<T>& model, const eva_batch& b) {
  return eva_collect_inputs<T>(
      model.adapted_layers(), [&model](autograd::tape<T>& t, const eva_batch& bb) { model(t, bb.ids, bb.batch); }, b);
}

namespace detail {
/// EVA's layer list: each layer's sizes and rank r_l, its input group named after the tape
/// node its input came from (layers fed the same node share one PCA); the group names are
/// also appended to `groups`.
template <class T>
std::vector<eva_layer> eva_layer_spec(const std::vector<nn::linear<T>*>& layers, const std::vector<index_t>& nodes,
                                      std::vector<std::string>& groups) {
  std::vector<eva_layer> spec;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    groups.push_back("node " + std::to_string(nodes[l]));
    spec.push_back({layers[l]->name(), layers[l]->in_features(), layers[l]->out_features(), layers[l]->lora_A()->rows(),
                    groups.back()});
  }
  return spec;
}

/// Writes eva_init's result into the layers: A, B = 0 and the scale, or no adapter (rank 0).
template <class T>
void eva_apply(const std::vector<nn::linear<T>*>& layers, const eva_model_result<T>& res) {
  for (std::size_t l = 0; l < layers.size(); ++l) {
    auto* layer = layers[l];
    const auto& a = res.adapters[l];
    if (!a.has_adapter()) {
      layer->remove_adapter();
      continue;
    }
    layer->lora_A()->value() = a.factors.A;
    layer->lora_A()->zero_grad();
    layer->lora_B()->value() = a.factors.B;
    layer->lora_B()->zero_grad();
    layer->set_scale(layer->kind() == nn::adapter_kind::rslora ? a.alpha / std::sqrt(double(a.rank)) : a.factors.s);
  }
}
}  // namespace detail

/// EVA over `layers` (each with an adapter whose rank is its r_l), fed by forward passes
/// `forward(tape, data(b))` under no_grad, b = 0, 1, …, until convergence or max_batches.
/// Throws argument_error if not converged (unless allow_unconverged), as eva_state::result.
template <class T, class Data, class Forward>
eva_model_result<T> eva_init(const std::vector<nn::linear<T>*>& layers, Data&& data, Forward&& forward,
                             const eva_model_options& o) {
  constexpr const char* op = "deltaw::eva_init";
  detail::eva_check_layers(layers, op);
  if (o.max_batches < 1) throw argument_error(std::string(op) + ": max_batches must be ≥ 1");
  const std::size_t L = layers.size();

  // Batch 0: the inputs are copied (the state needs the input groups before it can take
  // them) and the groups read off the tape nodes the hooks received.
  const eva_batch b0 = data(index_t(0));
  const auto keep0 = detail::eva_batch_mask(b0);
  std::vector<dense<T>> first(L);
  std::vector<index_t> node(L, -1);
  {
    const auto hooks = detail::eva_hooks<T>(layers, [&](std::size_t l, autograd::tape<T>&, const autograd::var<T>& x) {
      if (node[l] >= 0) return;
      node[l] = x.id();
      detail::eva_check_rows(*layers[l], x.rows(), keep0.size());
      first[l] = x.value();
    });
    autograd::tape<T> t;
    autograd::no_grad<T> ng(t);
    forward(t, b0);
  }
  for (std::size_t l = 0; l < L; ++l)
    if (node[l] < 0) throw argument_error(std::string(op) + ": layer '" + layers[l]->name() + "' was not run by the forward pass");
  eva_model_result<T> res;
  eva_state state(detail::eva_layer_spec(layers, node, res.input_groups), o.eva);
  for (std::size_t l = 0; l < L; ++l) state.observe(l, first[l], keep0);
  first.clear();
  state.end_batch();
  res.batches = 1;

  // Later batches: the hooks hand the inputs straight to the state (no copy).
  while (!state.done() && res.batches < o.max_batches) {
    const eva_batch b = data(res.batches);
    const auto keep = detail::eva_batch_mask(b);
    std::vector<std::uint8_t> seen(L, 0);
    {
      const auto hooks = detail::eva_hooks<T>(layers, [&](std::size_t l, autograd::tape<T>&, const autograd::var<T>& x) {
        if (seen[l]) return;
        seen[l] = 1;
        detail::eva_check_rows(*layers[l], x.rows(), keep.size());
        if (state.needs_input(l)) state.observe(l, x.value(), keep);
      });
      autograd::tape<T> t;
      autograd::no_grad<T> ng(t);
      forward(t, b);
    }
    for (std::size_t l = 0; l < L; ++l)
      if (!seen[l] && state.needs_input(l))
        throw argument_error(std::string(op) + ": layer '" + layers[l]->name() + "' was not run by the forward pass of batch " +
                             std::to_string(res.batches));
    state.end_batch();
    ++res.batches;
  }
  res.converged = state.done();
  res.adapters = state.result<T>(o.allow_unconverged);
  res.ranks = state.ranks();
  if (o.apply) detail::eva_apply(layers, res);
  return res;
}


/// EVA over a tiny_transformer's adapted layers; data(b) returns batch b (an eva_batch).
template <class T, class Data>
eva_model_result<T> eva_init(nn::tiny_transformer<T>& model, Data&& data, const eva_model_options& o) {
  return eva_init<T>(
      model.adapted_layers(), std::forward<Data>(data),
      [&model](autograd::tape<T>& t, const eva_batch& b) { model(t, b.ids, b.batch); }, o);
}

DELTAW_NAMESPACE_END
