// SPDX-License-Identifier: MIT
// EVA, "Explained Variance Adaptation" (Paischer et al. 2024, arXiv:2410.07170), as PEFT's
// `init_lora_weights="eva"` does it.
//
// For every adapted layer, a mean-centred incremental PCA of the layer's inputs (tokens
// with label −100 and padded tokens dropped) with k_l = round(ρ·r_l) components
// (linalg/incremental_pca.hpp: randomized SVD, q = 2k, 4 power iterations, sign fixed by
// V). After each batch a component counts as converged when its cosine similarity with the
// previous batch's estimate is ≥ τ; a layer stops receiving inputs once its first rank_l
// components converged (it resumes if a later redistribution asks for more). After each
// batch the ranks are redistributed: all layers' explained-variance ratios (the first k_l
// of each) are pooled and the Σ r_l largest kept; a layer's count is its new rank rank_l
// (0: no adapter; at most k_l). Finally A = the first rank_l components (÷ √singular value
// when whitening), B = 0, α_l = α·rank_l/r_l so that α_l/rank_l = α/r_l is unchanged.
//
// Layers that see identical inputs (q, k, v of one attention block) share one PCA: the
// caller names them with the same `input_group`; PEFT finds such groups by hashing the
// first batch's inputs, which the caller here knows without hashing. Each member still
// takes part in the pooled redistribution with its own copy of the group's ratios (as PEFT).
//
// Here the caller runs its forward passes and hands each layer's input to `observe` (the
// callback of eva_fit does this once per batch); init/eva_model.hpp does it for models
// built of nn::linear, with forward hooks that collect the inputs (as PEFT).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "../linalg/incremental_pca.hpp"
#include "factors.hpp"

DELTAW_NAMESPACE_BEGIN

/// One adapted layer for EVA.
struct eva_layer {
  std::string name;
  index_t in_features = 0;
  index_t out_features = 0;
  index_t rank = 8;           ///< r_l before redistribution (PEFT's r or rank_pattern)
  std::string input_group;    ///< layers with the same non-empty group see identical inputs
};

/// Options of EVA (PEFT's EvaConfig defaults).
struct eva_options {
  double rho = 2.0;        ///< components per layer k_l = round(ρ·r_l); the most a layer can get
  double tau = 0.99;       ///< cosine-similarity threshold of convergence
  bool whiten = false;     ///< divide A's rows by √(singular value)
  double alpha = 8.0;      ///< α (PEFT's lora_alpha); α_l = α·rank_l/r_l
  index_t power_iterations = 4;
  std::uint64_t seed = 0;
};

/// EVA's global rank redistribution as a standalone tool. ratios[l] are layer l's
/// explained-variance ratios (non-increasing), max_components[l] how many of them take
/// part (k_l), budget the total rank Σ r_l. Pools the first k_l ratios of every layer,
/// keeps the `budget` largest (ties: the earlier layer, then the earlier component) and
/// returns each layer's count. Throws if the pool holds fewer than `budget` values.
inline std::vector<index_t> eva_rank_allocation(const std::vector<Eigen::VectorXd>& ratios,
                                                const std::vector<index_t>& max_components, index_t budget) {
  constexpr const char* op = "deltaw::eva_rank_allocation";
  if (ratios.size() != max_components.size())
    throw shape_error(std::string(op) + ": " + std::to_string(ratios.size()) + " layers of ratios but " +
                      std::to_string(max_components.size()) + " component counts");
  struct entry {
    double v;
    std::size_t layer;
    index_t j;
  };
  std::vector<entry> pool;
  for (std::size_t l = 0; l < ratios.size(); ++l) {
    const index_t k = max_components[l];
    if (k < 0 || k > ratios[l].size())
      throw argument_error(std::string(op) + ": layer " + std::to_string(l) + " asks for " + std::to_string(k) +
                           " components but has " + std::to_string(ratios[l].size()) + " ratios");
    for (index_t j = 0; j < k; ++j) {
      if (!std::isfinite(ratios[l](j)))
        throw non_finite_error(std::string(op) + ": layer " + std::to_string(l) + " has a non-finite ratio at " +
                               std::to_string(j));
      pool.push_back({ratios[l](j), l, j});
    }
  }
  if (budget < 0 || budget > index_t(pool.size()))
    throw rank_error(std::string(op) + ": the rank budget " + std::to_string(budget) + " must be in [0, " +
                     std::to_string(pool.size()) + "] (the pooled components)");
  std::stable_sort(pool.begin(), pool.end(), [](const entry& a, const entry& b) { return a.v > b.v; });
  std::vector<index_t> counts(ratios.size(), 0);
  for (index_t i = 0; i < budget; ++i) ++counts[pool[std::size_t(i)].layer];
  return counts;
}

/// Keep-mask of the tokens EVA uses: label ≠ −100 and, when given, attention_mask ≠ 0.
inline std::vector<std::uint8_t> eva_token_mask(std::span<const std::int64_t> labels,
                                                std::span<const std::int64_t> attention_mask = {}) {
  if (!attention_mask.empty() && attention_mask.size() != labels.size())
    throw shape_error("deltaw::eva_token_mask: " + std::to_string(labels.size()) + " labels but " +
                      std::to_string(attention_mask.size()) + " attention-mask entries");
  std::vector<std::uint8_t> keep(labels.size());
  for (std::size_t i = 0; i < labels.size(); ++i)
    keep[i] = labels[i] != -100 && (attention_mask.empty() || attention_mask[i] != 0) ? 1 : 0;
  return keep;
}

/// EVA's result for one layer: rank_l (0 = no adapter), α_l, and the LoRA factors
/// A [rank_l, in] (components), B = 0 [out, rank_l], s = α_l/rank_l (= α/r_l).
template <class T>
struct eva_adapter {
  std::string name;
  index_t rank = 0;
  double alpha = 0.0;
  lora_factors<T> factors;
  bool has_adapter() const { return rank > 0; }
};

/// The state of an EVA fit: one incremental PCA per input group, the convergence flags and
/// the current rank distribution. Per batch: observe() each layer's input (layers with
/// needs_input() false may be skipped), then end_batch(); stop when done().
class eva_state {
 public:
  eva_state(std::vector<eva_layer> layers, eva_options opt) : layers_(std::move(layers)), opt_(opt) {
    constexpr const char* op = "deltaw::eva_state";
    if (layers_.empty()) throw argument_error(std::string(op) + ": no layers");
    if (!(std::isfinite(opt_.rho) && opt_.rho >= 1.0))
      throw argument_error(std::string(op) + ": ρ must be ≥ 1 (each layer needs at least r_l components); got " +
                           std::to_string(opt_.rho));
    if (!(opt_.tau > 0.0 && opt_.tau <= 1.0))
      throw argument_error(std::string(op) + ": τ must be in (0, 1]; got " + std::to_string(opt_.tau));
    if (!std::isfinite(opt_.alpha)) throw non_finite_error(std::string(op) + ": α must be finite");
    std::map<std::string, std::size_t> group_index;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const auto& L = layers_[l];
      if (L.rank < 1 || L.in_features < 1 || L.out_features < 1)
        throw rank_error(std::string(op) + ": layer '" + L.name + "' needs rank ≥ 1 and positive sizes; got rank " +
                         std::to_string(L.rank) + ", W " + detail::shape_str(L.out_features, L.in_features));
      const index_t k = index_t(std::lround(double(L.rank) * opt_.rho));
      if (k > L.in_features)
        throw rank_error(std::string(op) + ": layer '" + L.name + "' asks for round(ρ·r) = " + std::to_string(k) +
                         " components of " + std::to_string(L.in_features) + " input features");
      max_components_.push_back(k);
      budget_ += L.rank;
      std::size_t g;
      const auto it = L.input_group.empty() ? group_index.end() : group_index.find(L.input_group);
      if (it != group_index.end()) {
        g = it->second;
        if (layers_[groups_[g].members.front()].in_features != L.in_features)
          throw shape_error(std::string(op) + ": layers '" + layers_[groups_[g].members.front()].name + "' and '" + L.name +
                            "' share input group '" + L.input_group + "' but have different input sizes");
      } else {
        g = groups_.size();
        groups_.push_back(group{});
        if (!L.input_group.empty()) group_index[L.input_group] = g;
      }
      groups_[g].members.push_back(l);
      group_of_.push_back(g);
    }
    // A group computes as many components as its largest member needs (as PEFT).
    for (auto& G : groups_) {
      index_t k = 0;
      for (std::size_t l : G.members) k = std::max(k, max_components_[l]);
      for (std::size_t l : G.members) max_components_[l] = k;
      G.pca = incremental_pca(k, ipca_options{.power_iterations = opt_.power_iterations, .seed = opt_.seed});
      G.converged.assign(std::size_t(k), 0);
    }
    ranks_ = max_components_;  // until the first redistribution every component is needed
  }

  std::size_t layer_count() const { return layers_.size(); }
  const eva_layer& layer(std::size_t l) const { return layers_.at(l); }
  /// Σ r_l, the total rank the redistribution keeps.
  index_t budget() const { return budget_; }
  /// k_l = round(ρ·r_l), raised to the largest in the layer's input group.
  index_t max_components(std::size_t l) const { return max_components_.at(l); }
  /// The current rank distribution (after the last end_batch).
  const std::vector<index_t>& ranks() const { return ranks_; }
  /// The PCA of layer l's input group.
  const incremental_pca& pca(std::size_t l) const { return groups_.at(group_of_.at(l)).pca; }
  /// Whether layer l's input is wanted in this batch (its group has not converged and has
  /// not been given this batch's input yet).
  bool needs_input(std::size_t l) const {
    const auto& G = groups_.at(group_of_.at(l));
    return G.active && !G.fed;
  }
  /// Batches ended so far.
  index_t batches() const { return batches_; }
  /// Batches in which group of layer l skipped its update (fewer kept tokens than components).
  index_t skipped(std::size_t l) const { return groups_.at(group_of_.at(l)).skipped; }
  /// True when every layer's first rank_l components have converged.
  bool done() const {
    return std::none_of(groups_.begin(), groups_.end(), [](const group& G) { return G.active; });
  }

  /// Hands layer l's input X [tokens, in] (rows with keep = 0 dropped) to its group's PCA,
  /// unless the group has converged or was already fed in this batch. A batch with fewer
  /// kept tokens than components is skipped for that group (as PEFT).
  template <class M>
  void observe(std::size_t l, const M& X, std::span<const std::uint8_t> keep = {}) {
    auto& G = groups_.at(group_of_.at(l));
    const auto v = view(X);
    if (v.cols() != layers_[l].in_features)
      throw shape_error("deltaw::eva_state::observe: layer '" + layers_[l].name + "' has " +
                        std::to_string(layers_[l].in_features) + " input features; got X " +
                        detail::shape_str(v.rows(), v.cols()));
    if (!G.active || G.fed) return;
    G.fed = true;
    index_t kept = v.rows();
    if (!keep.empty()) kept = index_t(std::count_if(keep.begin(), keep.end(), [](std::uint8_t k) { return k != 0; }));
    if (kept < G.pca.n_components()) {
      ++G.skipped;
      return;
    }
    const bool had = G.pca.fitted();
    incremental_pca::matrix prev;
    if (had) prev = G.pca.components();
    G.pca.partial_fit(X, keep);
    if (!had) return;
    // Per component: cosine similarity with the previous batch's estimate (signs are fixed
    // by V, so a flipped estimate would not count as converged).
    const auto& C = G.pca.components();
    for (index_t c = 0; c < C.rows(); ++c) {
      const double cs = C.row(c).dot(prev.row(c)) / (C.row(c).norm() * prev.row(c).norm());
      G.converged[std::size_t(c)] = cs >= opt_.tau ? 1 : 0;
    }
  }

  /// Ends a batch: redistributes the ranks (once every group has components) and decides
  /// which groups still need inputs.
  void end_batch() {
    ++batches_;
    for (auto& G : groups_) G.fed = false;
    const bool all_fitted =
        std::all_of(groups_.begin(), groups_.end(), [](const group& G) { return G.pca.fitted(); });
    if (all_fitted) {
      std::vector<Eigen::VectorXd> ratios;
      for (std::size_t l = 0; l < layers_.size(); ++l) ratios.push_back(pca(l).explained_variance_ratio());
      ranks_ = eva_rank_allocation(ratios, max_components_, budget_);
    }
    for (auto& G : groups_) G.active = !group_converged(G);
  }

  /// The adapters: A = the first rank_l components (÷ √singular value when whitening),
  /// B = 0, α_l = α·rank_l/r_l. Throws if a layer with rank_l > 0 has not converged,
  /// unless allow_unconverged (e.g. after a batch limit).
  template <class T = float>
  std::vector<eva_adapter<T>> result(bool allow_unconverged = false) const {
    std::vector<eva_adapter<T>> out;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const auto& G = groups_[group_of_[l]];
      const index_t r = ranks_[l];
      if (r > 0 && !G.pca.fitted())
        throw argument_error("deltaw::eva_state::result: layer '" + layers_[l].name + "' has seen no batch");
      if (!allow_unconverged)
        for (index_t c = 0; c < r; ++c)
          if (!G.converged[std::size_t(c)])
            throw argument_error("deltaw::eva_state::result: layer '" + layers_[l].name + "' was given rank " +
                                 std::to_string(r) + " but its component " + std::to_string(c) +
                                 " has not converged (cosine similarity < τ); feed more batches or pass "
                                 "allow_unconverged = true");
      eva_adapter<T> a;
      a.name = layers_[l].name;
      a.rank = r;
      a.alpha = opt_.alpha * double(r) / double(layers_[l].rank);
      a.factors.s = r > 0 ? a.alpha / double(r) : 0.0;
      a.factors.B = dense<T>::Zero(layers_[l].out_features, r);
      a.factors.A.resize(r, layers_[l].in_features);
      for (index_t c = 0; c < r; ++c) {
        const double w = opt_.whiten ? 1.0 / std::sqrt(G.pca.singular_values()(c)) : 1.0;
        a.factors.A.row(c) = (w * G.pca.components().row(c)).template cast<T>();
      }
      out.push_back(std::move(a));
    }
    return out;
  }

 private:
  struct group {
    std::vector<std::size_t> members;
    incremental_pca pca{1};
    std::vector<std::uint8_t> converged;
    bool active = true;
    bool fed = false;
    index_t skipped = 0;
  };

  bool group_converged(const group& G) const {
    index_t need = 0;
    for (std::size_t l : G.members) need = std::max(need, ranks_[l]);
    for (index_t c = 0; c < need; ++c)
      if (!G.converged[std::size_t(c)]) return false;
    return true;
  }

  std::vector<eva_layer> layers_;
  eva_options opt_;
  std::vector<index_t> max_components_;
  std::vector<index_t> ranks_;
  std::vector<group> groups_;
  std::vector<std::size_t> group_of_;
  index_t budget_ = 0;
  index_t batches_ = 0;
};

/// Runs EVA: feed(batch, state) runs one forward pass and calls state.observe(l, X_l, keep)
/// for the layers with state.needs_input(l); end_batch() follows each call, until done() or
/// max_batches (PEFT cycles its data loader until convergence). Returns the batches used.
template <class Feed>
index_t eva_fit(eva_state& state, Feed&& feed, index_t max_batches) {
  index_t b = 0;
  while (!state.done() && b < max_batches) {
    feed(b, state);
    state.end_batch();
    ++b;
  }
  return b;
}

DELTAW_NAMESPACE_END
