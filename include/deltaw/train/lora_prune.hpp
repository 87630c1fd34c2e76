// SPDX-License-Identifier: MIT
// LoRAPrune (Zhang et al. 2023, arXiv:2305.18403, ACL 2024 Findings): structured pruning
// of the frozen model guided by the LoRA adapter's gradients only, so that the gradient
// of the big frozen W is never needed.
//
//   Ĝ = g_B·A + B·g_A − c·g_B·g_A          (g_B [out, r], g_A [r, in]: every term [out, in])
//   I_o = Σ_j |Ĝ_oj · W'_oj|,  W' = W + s·B·A   per output channel o (or per group of
//                                           `group_size` consecutive channels: a head)
//   Ī ← β·Ī + (1−β)·I/‖I‖₂                 per module, β = 0.9, Ī starts at 0
//
// Every `interval` steps the target fraction of each module's channels (groups) follows
// the cubic schedule, and the lowest-Ī channels not yet masked are masked until that
// fraction is reached. The mask acts on the layer's output through nn::linear's forward
// hook (a node that zeros the masked columns of y, bias included, with its VJP): W is
// never written during training; write_pruned_weight applies the final mask to a copy.
//
//   train::lora_prune_importance   I per channel / group of one LoRA layer, in row blocks
//                                  of `chunk` (no out×in matrix is formed)
//   train::lora_prune_sparsity     the cubic schedule
//   train::mask_columns            y with some columns zeroed, as a tape op
//   train::lora_prune<T>           the method (after_backward: Ī; after_step: masking)
//
// Ĝ is the first-order change of B·A under one gradient step on B and A (with the step
// size folded away); its rows for a masked channel are B_o·g_A (g_B's row is zero there).
//
// UNVERIFIED, as options (lora_prune_options): the weight c of the cross term g_B·g_A
// (1 as in the reference code; the expansion of (B − ηg_B)(A − ηg_A) gives η), a
// constant factor on Ĝ (`gradient_scale`, 1; e.g. s — it only scales I, and cancels in
// the L2 normalisation), the schedule's warm-up fractions (0, 0: the cubic ramp runs over
// the whole run, target reached at the last step), the last event (an extra event at the
// final step when total_steps is not a multiple of the interval), whether masked
// channels stay masked (yes; the reference multiplies Ī by the mask before sorting, which
// has the same effect), per-module ("local") selection of ⌊sparsity·groups⌋ channels (the
// reference's default; no global ranking across modules), and the coupling of modules:
// the reference sums Ī over q/k/v/o of a block and prunes o and down on their input side;
// here every registered layer is pruned on its own output channels (register q, k, v with
// group_size = head_dim to prune heads; o, down's input side is not pruned).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "../nn/layers.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

struct lora_importance_options {
  /// Output rows per block: only [chunk, in] blocks of Ĝ and W' exist at a time.
  index_t chunk = 64;
  /// Channels summed per group (consecutive blocks: the heads of an attention projection);
  /// 1 = per channel. Must divide out.
  index_t group_size = 1;
  /// c in Ĝ = g_B·A + B·g_A − c·g_B·g_A (UNVERIFIED; reference 1).
  double cross_weight = 1.0;
  /// A constant factor on Ĝ (UNVERIFIED; reference 1).
  double gradient_scale = 1.0;
};

/// I per group of one layer: Σ over the group's rows and all columns of |Ĝ ⊙ (W + s·B·A)|,
/// in double. W [out, in] (any layout), B and g_B [out, r], A and g_A [r, in].
template <class T, class MB, class MA, class MGB, class MGA>
std::vector<double> lora_prune_importance(matrix_view<const T> W, const MB& B, const MA& A, double s, const MGB& gB,
                                          const MGA& gA, const lora_importance_options& o = {}) {
  const std::string op = "deltaw::train::lora_prune_importance";
  const index_t out = W.rows(), in = W.cols(), r = A.rows();
  if (B.rows() != out || B.cols() != r || A.cols() != in || gB.rows() != out || gB.cols() != r || gA.rows() != r ||
      gA.cols() != in)
    throw shape_error(op + ": W " + deltaw::detail::shape_str(out, in) + ", B " +
                      deltaw::detail::shape_str(B.rows(), B.cols()) + ", A " +
                      deltaw::detail::shape_str(A.rows(), A.cols()) + ", g_B " +
                      deltaw::detail::shape_str(gB.rows(), gB.cols()) + ", g_A " +
                      deltaw::detail::shape_str(gA.rows(), gA.cols()) + " do not chain");
  if (o.chunk < 1) throw argument_error(op + ": chunk must be ≥ 1; got " + std::to_string(o.chunk));
  if (o.group_size < 1 || out % o.group_size != 0)
    throw argument_error(op + ": group_size " + std::to_string(o.group_size) + " does not divide out = " +
                         std::to_string(out));
  if (!std::isfinite(s) || !std::isfinite(o.cross_weight) || !std::isfinite(o.gradient_scale))
    throw non_finite_error(op + ": s, cross_weight and gradient_scale must be finite");
  using Md = dense<double>;
  // Factor-sized copies: Ĝ_blk = [g_B,blk | B_blk] · [A − c·g_A ; g_A], W'_blk = W_blk + s·B_blk·A.
  Md right(2 * r, in);
  right.topRows(r) = A.template cast<double>() - o.cross_weight * gA.template cast<double>();
  right.bottomRows(r) = gA.template cast<double>();
  Md left(out, 2 * r);
  left.leftCols(r) = gB.template cast<double>();
  left.rightCols(r) = B.template cast<double>();
  const Md Ad = s * A.template cast<double>();
  std::vector<double> I(std::size_t(out / o.group_size), 0.0);
  Md G, Wp;
  for (index_t o0 = 0; o0 < out; o0 += o.chunk) {
    const index_t c = std::min(o.chunk, out - o0);
    G.noalias() = left.middleRows(o0, c) * right;
    Wp.noalias() = left.block(o0, r, c, r) * Ad;
    for (index_t i = 0; i < c; ++i) {
      double acc = 0;
      for (index_t j = 0; j < in; ++j) acc += std::abs(G(i, j) * (Wp(i, j) + double(W(o0 + i, j))));
      I[std::size_t((o0 + i) / o.group_size)] += std::abs(o.gradient_scale) * acc;
    }
  }
  return I;
}

struct lora_prune_options {
  /// Fraction of each module's channels (groups) masked at the end, in [0, 1).
  double target_sparsity = 0.5;
  /// Steps between masking events.
  index_t interval = 10;
  /// Moving-average weight β of the old importance, in [0, 1).
  double beta = 0.9;
  /// Normalise each module's I by its L2 norm (+ eps) before the average.
  bool normalize = true;
  double eps = 1e-8;
  /// Fractions of the run before the ramp starts (sparsity 0) and after it ends (target).
  double initial_warmup = 0.0;
  double final_warmup = 0.0;
  /// Masked channels stay masked (else each event re-selects the lowest Ī among all).
  bool keep_masked = true;
  /// Also run an event at the last step, so that the target is reached when total_steps
  /// is not a multiple of interval.
  bool event_at_end = true;
  /// The run's length when fit does not know it (step_context::total_steps = 0).
  index_t total_steps = 0;
  /// Importance options; its group_size is the default for layers added without one.
  lora_importance_options importance;
};

namespace detail {
inline void check_lora_prune_options(const lora_prune_options& o, const std::string& op) {
  if (!(o.target_sparsity >= 0 && o.target_sparsity < 1))
    throw argument_error(op + ": target_sparsity must lie in [0, 1); got " + std::to_string(o.target_sparsity));
  if (o.interval < 1) throw argument_error(op + ": interval must be ≥ 1; got " + std::to_string(o.interval));
  if (!(o.beta >= 0 && o.beta < 1)) throw argument_error(op + ": beta must lie in [0, 1); got " + std::to_string(o.beta));
  if (!(o.initial_warmup >= 0 && o.final_warmup >= 0 && o.initial_warmup + o.final_warmup < 1))
    throw argument_error(op + ": need warm-up fractions ≥ 0 with initial + final < 1; got " +
                         std::to_string(o.initial_warmup) + " and " + std::to_string(o.final_warmup));
  if (o.total_steps < 0) throw argument_error(op + ": total_steps must be ≥ 0");
  if (!(o.eps >= 0)) throw argument_error(op + ": eps must be ≥ 0");
}
}  // namespace detail

/// The cubic schedule after `done` of `total` steps: 0 up to initial_warmup·total, the
/// target from (1 − final_warmup)·total on, in between target·(1 − (1 − p)³) with p the
/// fraction of the ramp done. Non-decreasing, never above the target.
inline double lora_prune_sparsity(const lora_prune_options& o, index_t done, index_t total) {
  detail::check_lora_prune_options(o, "deltaw::train::lora_prune_sparsity");
  if (total < 1) throw argument_error("deltaw::train::lora_prune_sparsity: total must be ≥ 1");
  const double t = double(done), T = double(total);
  const double t0 = o.initial_warmup * T, t1 = T - o.final_warmup * T;
  if (t <= t0) return 0.0;
  if (t >= t1) return o.target_sparsity;
  const double q = 1 - (t - t0) / (t1 - t0);
  return std::min(o.target_sparsity, o.target_sparsity * (1 - q * q * q));
}

/// y with the columns in `cols` set to 0; the VJP zeros the same columns of dL/dy.
template <class T>
autograd::var<T> mask_columns(const autograd::var<T>& y, std::vector<index_t> cols) {
  auto& t = autograd::detail::tape_of(y, "mask_columns");
  for (auto c : cols)
    if (c < 0 || c >= y.cols())
      throw argument_error("deltaw::train::mask_columns: column " + std::to_string(c) + " of " +
                           deltaw::detail::shape_str(y.rows(), y.cols()));
  dense<T> v = y.value();
  for (auto c : cols) v.col(c).setZero();
  const index_t iy = y.id();
  return t.record(
      "mask_columns", std::move(v), t.requires_grad(y),
      [iy, cols = std::move(cols)](autograd::tape<T>& t, index_t self) {
        if (!t.needs_grad(iy)) return;
        dense<T> g = t.upstream(self);
        for (auto c : cols) g.col(c).setZero();
        autograd::detail::accumulate(t, iy, g);
      },
      /*backward_reads_output=*/false);
}

/// LoRAPrune over a list of nn::linear layers with LoRA / rsLoRA adapters. Installs a
/// forward hook on each (removed in the destructor); not copied or moved (the hooks point
/// at it). It must not outlive its layers.
template <class T>
class lora_prune : public method<T> {
 public:
  /// group_sizes: per layer (empty: options.importance.group_size for all).
  lora_prune(std::vector<nn::linear<T>*> layers, lora_prune_options o = {}, std::vector<index_t> group_sizes = {})
      : o_(o), layers_(std::move(layers)) {
    const std::string op = "deltaw::train::lora_prune";
    detail::check_lora_prune_options(o_, op);
    if (!group_sizes.empty() && group_sizes.size() != layers_.size())
      throw argument_error(op + ": " + std::to_string(group_sizes.size()) + " group sizes for " +
                           std::to_string(layers_.size()) + " layers");
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      auto* l = layers_[i];
      if (l == nullptr) throw argument_error(op + ": layer " + std::to_string(i) + " is null");
      if (!l->has_adapter()) throw argument_error(op + ": layer '" + l->name() + "' has no adapter");
      if (l->kind() == nn::adapter_kind::dora)
        throw argument_error(op + ": layer '" + l->name() +
                             "' has a DoRA adapter; LoRAPrune's estimate is defined for LoRA / rsLoRA only");
      const index_t g = group_sizes.empty() ? o_.importance.group_size : group_sizes[i];
      if (g < 1 || l->out_features() % g != 0)
        throw argument_error(op + ": layer '" + l->name() + "': group_size " + std::to_string(g) +
                             " does not divide out = " + std::to_string(l->out_features()));
      for (std::size_t k = 0; k < i; ++k)
        if (layers_[k] == l) throw argument_error(op + ": layer '" + l->name() + "' is listed twice");
      entry e;
      e.group_size = g;
      e.ema.assign(std::size_t(l->out_features() / g), 0.0);
      e.masked.assign(e.ema.size(), 0);
      es_.push_back(std::move(e));
    }
    // Refuses a layer that already has a hook (nothing installed then); removed with this.
    hooks_.emplace(
        layers_,
        [this](std::size_t i, autograd::tape<T>&, const autograd::var<T>&, const autograd::var<T>& y) {
          return es_[i].columns.empty() ? y : mask_columns(y, es_[i].columns);
        },
        op, "", this);
  }
  lora_prune(const lora_prune&) = delete;
  lora_prune& operator=(const lora_prune&) = delete;

  std::string name() const override { return "LoRAPrune"; }

  void after_backward(const step_context&) override {
    std::vector<std::vector<double>> fresh(layers_.size());
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      auto* l = layers_[i];
      auto imp = o_.importance;
      imp.group_size = es_[i].group_size;
      fresh[i] = lora_prune_importance<T>(l->weight(), l->lora_B()->value(), l->lora_A()->value(), l->scale(),
                                          l->lora_B()->grad(), l->lora_A()->grad(), imp);
      double n2 = 0;
      for (double v : fresh[i]) n2 += v * v;
      // A non-finite gradient skips the whole update (as the reference does).
      if (!std::isfinite(n2)) return;
      if (o_.normalize)
        for (double& v : fresh[i]) v /= std::sqrt(n2) + o_.eps;
    }
    for (std::size_t i = 0; i < layers_.size(); ++i)
      for (std::size_t g = 0; g < fresh[i].size(); ++g)
        es_[i].ema[g] = o_.beta * es_[i].ema[g] + (1 - o_.beta) * fresh[i][g];
    ++updates_;
  }

  void after_step(const step_context& ctx) override {
    const index_t total = o_.total_steps > 0 ? o_.total_steps : ctx.total_steps;
    if (total <= 0)
      throw argument_error("deltaw::train::lora_prune: the run's length is unknown; set lora_prune_options::total_steps");
    const index_t done = ctx.step + 1;
    if (done % o_.interval != 0 && !(o_.event_at_end && done == total)) return;
    sparsity_ = lora_prune_sparsity(o_, std::min(done, total), total);
    ++events_;
    for (auto& e : es_) {
      const std::size_t n = e.ema.size();
      const std::size_t want = std::size_t(std::floor(sparsity_ * double(n)));
      std::vector<std::size_t> order(n);
      std::iota(order.begin(), order.end(), std::size_t(0));
      // Ties break by index so that the choice is deterministic.
      std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return e.ema[a] < e.ema[b]; });
      if (!o_.keep_masked) std::fill(e.masked.begin(), e.masked.end(), std::uint8_t(0));
      std::size_t have = std::size_t(std::count(e.masked.begin(), e.masked.end(), std::uint8_t(1)));
      for (std::size_t k = 0; k < n && have < want; ++k)
        if (!e.masked[order[k]]) {
          e.masked[order[k]] = 1;
          ++have;
        }
      e.columns.clear();
      for (std::size_t g = 0; g < n; ++g)
        if (e.masked[g])
          for (index_t c = 0; c < e.group_size; ++c) e.columns.push_back(index_t(g) * e.group_size + c);
    }
  }

  /// Applies layer i's mask for export: zeros the masked rows of W_copy (a caller-owned
  /// copy of the layer's W, [out, in]), of B and of the bias, so that the layer over
  /// W_copy without the hook computes what the masked layer computes.
  void write_pruned_weight(index_t i, dense<T>& W_copy) {
    const auto& e = at(i, "write_pruned_weight");
    auto* l = layers_[std::size_t(i)];
    if (W_copy.rows() != l->out_features() || W_copy.cols() != l->in_features())
      throw shape_error("deltaw::train::lora_prune::write_pruned_weight: W_copy is " +
                        deltaw::detail::shape_str(W_copy.rows(), W_copy.cols()) + "; layer '" + l->name() + "' is " +
                        deltaw::detail::shape_str(l->out_features(), l->in_features()));
    for (auto c : e.columns) {
      W_copy.row(c).setZero();
      l->lora_B()->value().row(c).setZero();
      if (l->bias()) l->bias()->value()(0, c) = T(0);
    }
  }

  const lora_prune_options& options() const { return o_; }
  const std::vector<nn::linear<T>*>& layers() const { return layers_; }
  index_t group_size(index_t i) const { return at(i, "group_size").group_size; }
  index_t group_count(index_t i) const { return index_t(at(i, "group_count").ema.size()); }
  /// The moving-average importance Ī of layer i, per group.
  const std::vector<double>& importance(index_t i) const { return at(i, "importance").ema; }
  /// 1 for each masked group of layer i.
  const std::vector<std::uint8_t>& masked(index_t i) const { return at(i, "masked").masked; }
  index_t masked_count(index_t i) const {
    const auto& m = at(i, "masked_count").masked;
    return index_t(std::count(m.begin(), m.end(), std::uint8_t(1)));
  }
  /// The output columns of layer i that the hook zeros.
  const std::vector<index_t>& masked_columns(index_t i) const { return at(i, "masked_columns").columns; }
  /// The scheduled sparsity at the last event (0 before the first).
  double sparsity() const { return sparsity_; }
  index_t events() const { return events_; }
  index_t updates() const { return updates_; }

 private:
  struct entry {
    index_t group_size = 1;
    std::vector<double> ema;
    std::vector<std::uint8_t> masked;
    std::vector<index_t> columns;
  };
  const entry& at(index_t i, const char* op) const {
    if (i < 0 || i >= index_t(es_.size()))
      throw argument_error(std::string("deltaw::train::lora_prune::") + op + ": layer " + std::to_string(i) + " of " +
                           std::to_string(es_.size()));
    return es_[std::size_t(i)];
  }

  lora_prune_options o_;
  std::vector<nn::linear<T>*> layers_;
  std::vector<entry> es_;
  double sparsity_ = 0;
  index_t events_ = 0, updates_ = 0;
  std::optional<nn::layer_hooks<T>> hooks_;  // last: removed before the state it reads
};

}  // namespace train
DELTAW_NAMESPACE_END
