// SPDX-License-Identifier: MIT
// LISA (Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large
// Language Model Fine-Tuning", 2024): full-parameter AdamW, but at any time only γ
// randomly chosen body layers (transformer blocks) are trainable; the embedding and the
// head always are. Every K steps a new set of γ blocks is drawn uniformly without
// replacement; the optimiser state of a block that becomes active is reset (its moments
// from an earlier period describe weights that have since been frozen and a loss that
// has moved on). Frozen blocks collect no gradient (the tape skips them), which is where
// the memory saving comes from; their AdamW moments are kept but not used.
//
// Draws: period p = ⌊step/K⌋ chooses its blocks from Philox stream (seed, p) by a partial
// Fisher–Yates shuffle with 64-bit draws, so the schedule is a pure function of the seed
// and reproducible in any order.
//
// UNVERIFIED: whether the reference resets the state of a block that stays active from one
// period to the next (here: no, reset_state_of = newly_active; all_active resets every
// active block at each period start; none keeps all state).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../core/random.hpp"
#include "../optim/optim.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

enum class lisa_reset { newly_active, all_active, none };

struct lisa_options {
  index_t active_layers = 2;  ///< γ
  index_t period = 20;        ///< K
  std::uint64_t seed = 0;
  lisa_reset reset = lisa_reset::newly_active;
};

/// The γ of L blocks active in period p: sorted, distinct, uniform over the γ-subsets.
inline std::vector<index_t> lisa_choose(index_t L, index_t gamma, std::uint64_t seed, std::uint64_t period) {
  if (gamma < 0 || gamma > L)
    throw argument_error("deltaw::train::lisa_choose: γ = " + std::to_string(gamma) + " active layers of " +
                         std::to_string(L));
  std::vector<index_t> idx(static_cast<std::size_t>(L));
  for (index_t i = 0; i < L; ++i) idx[std::size_t(i)] = i;
  const random_stream st{seed, period};
  for (index_t j = 0; j < gamma; ++j) {
    const std::uint64_t u =
        (std::uint64_t(st.bits(2 * std::uint64_t(j))) << 32) | std::uint64_t(st.bits(2 * std::uint64_t(j) + 1));
    // Bias of the modulo ≤ L/2⁶⁴: negligible.
    const index_t k = j + index_t(u % std::uint64_t(L - j));
    std::swap(idx[std::size_t(j)], idx[std::size_t(k)]);
  }
  std::vector<index_t> out(idx.begin(), idx.begin() + gamma);
  std::sort(out.begin(), out.end());
  return out;
}

/// LISA over parameter groups. Optimiser: anything with reset_state(const parameter<T>*)
/// (optim::adamw, optim::sgd). The groups of a tiny_transformer come from groups() after
/// make_fully_trainable(): lisa<float> m(model.groups(), opt, {}).
template <class T, class Optimiser = optim::adamw<T>>
class lisa : public method<T> {
 public:
  using params = std::vector<autograd::parameter<T>*>;

  lisa(params embedding, std::vector<params> blocks, params head, Optimiser& opt, lisa_options o = {})
      : emb_(std::move(embedding)), blocks_(std::move(blocks)), head_(std::move(head)), opt_(&opt), o_(o) {
    constexpr const char* op = "deltaw::train::lisa";
    if (o.period < 1) throw argument_error(std::string(op) + ": period K must be ≥ 1; got " + std::to_string(o.period));
    if (o.active_layers < 0 || o.active_layers > index_t(blocks_.size()))
      throw argument_error(std::string(op) + ": γ = " + std::to_string(o.active_layers) + " active layers of " +
                           std::to_string(blocks_.size()) + " blocks");
    for (const auto* g : {&emb_, &head_})
      for (auto* p : *g)
        if (p == nullptr) throw argument_error(std::string(op) + ": null parameter");
    for (const auto& b : blocks_)
      for (auto* p : b)
        if (p == nullptr) throw argument_error(std::string(op) + ": null parameter");
    active_flag_.assign(blocks_.size(), false);
    counts_.assign(blocks_.size(), 0);
  }
  template <class Groups>
  lisa(const Groups& g, Optimiser& opt, lisa_options o = {}) : lisa(g.embedding, g.blocks, g.head, opt, o) {}

  std::string name() const override { return "LISA"; }

  void before_forward(const step_context& ctx) override {
    const index_t p = ctx.step / o_.period;
    if (started_ && p == period_) return;
    activate(p);
  }

  /// Switches to the blocks of period p (public for loops other than train::fit).
  void activate(index_t p) {
    const auto chosen = lisa_choose(index_t(blocks_.size()), o_.active_layers, o_.seed, std::uint64_t(p));
    std::vector<bool> now(blocks_.size(), false);
    for (index_t b : chosen) now[std::size_t(b)] = true;
    for (std::size_t b = 0; b < blocks_.size(); ++b) {
      const bool reset = now[b] && (o_.reset == lisa_reset::all_active ||
                                    (o_.reset == lisa_reset::newly_active && !(started_ && active_flag_[b])));
      for (auto* q : blocks_[b]) {
        q->set_trainable(now[b]);
        if (reset) opt_->reset_state(q);
      }
      if (now[b]) ++counts_[b];
    }
    for (const auto* g : {&emb_, &head_})
      for (auto* q : *g) q->set_trainable(true);
    active_flag_ = now;
    active_ = chosen;
    period_ = p;
    started_ = true;
    ++periods_;
  }

  /// The active blocks (sorted) of the current period.
  const std::vector<index_t>& active() const { return active_; }
  /// How many periods each block has been active in so far.
  const std::vector<index_t>& activation_counts() const { return counts_; }
  index_t periods() const { return periods_; }
  index_t current_period() const { return period_; }
  const lisa_options& options() const { return o_; }

 private:
  params emb_;
  std::vector<params> blocks_;
  params head_;
  Optimiser* opt_;
  lisa_options o_;
  std::vector<bool> active_flag_;
  std::vector<index_t> active_;
  std::vector<index_t> counts_;
  index_t period_ = -1;
  index_t periods_ = 0;
  bool started_ = false;
};

}  // namespace train
DELTAW_NAMESPACE_END
