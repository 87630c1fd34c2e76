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
//                                  of `chunk` (no out×in matrix is formed); per output
//                                  row group or (side input) per input column group
//   train::lora_prune_sparsity     the cubic schedule
//   train::mask_columns            y with some columns zeroed, as a tape op
//   train::lora_prune_coupling<T>  modules pruned together: attention_coupling (heads of
//                                  q, k, v rows + o's input columns), mlp_coupling (up /
//                                  gate rows + down's input columns), transformer_couplings
//                                  (both, for every block of nn::tiny_transformer)
//   train::lora_prune<T>           the method (after_backward: Ī; after_step: masking),
//                                  per layer or per coupling
// Physical slicing of the final masks and its safetensors file: train/lora_prune_export.hpp.
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
// reference's default; no global ranking across modules), and in couplings whether the
// input-side members (o, down) add to the group's importance (`score_input_side`, yes: the
// reference's attention group lists q, k, v and o) and whether each member is normalised
// before the sum (`normalize_per_member`, yes) or the sum after it.
// Couplings: a head group's Ī sums the members' I (q, k, v per output-row group, o per
// input-column group); masking zeroes the output-side members' channels in the forward
// pass (v's zero head reaches o as zero columns, up's zero channel reaches down through
// GELU as zero), so slicing o's and down's input columns away is exact. Without couplings
// every registered layer is pruned on its own output channels as before.
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

/// Which channels of a layer W [out, in] a mask removes: its output rows (q, k, v, up,
/// gate) or its input columns (o, down: the channels a coupled producer removed).
enum class prune_side { output, input };

struct lora_importance_options {
  /// Output rows per block: only [chunk, in] blocks of Ĝ and W' exist at a time.
  index_t chunk = 64;
  /// Channels summed per group (consecutive blocks: the heads of an attention projection);
  /// 1 = per channel. Must divide out (side output) or in (side input).
  index_t group_size = 1;
  /// output: I per output row (group of rows); input: I per input column (group of
  /// columns), Σ over all rows of |Ĝ ⊙ W'| in those columns.
  prune_side side = prune_side::output;
  /// c in Ĝ = g_B·A + B·g_A − c·g_B·g_A (UNVERIFIED; reference 1).
  double cross_weight = 1.0;
  /// A constant factor on Ĝ (UNVERIFIED; reference 1).
  double gradient_scale = 1.0;
};

/// I per group of one layer: Σ over the group's rows and all columns of |Ĝ ⊙ (W + s·B·A)|
/// (side input: over the group's columns and all rows), in double. W [out, in] (any
/// layout), B and g_B [out, r], A and g_A [r, in].
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
  const bool by_col = o.side == prune_side::input;
  const index_t channels = by_col ? in : out;
  if (o.group_size < 1 || channels % o.group_size != 0)
    throw argument_error(op + ": group_size " + std::to_string(o.group_size) + " does not divide " +
                         (by_col ? "in = " : "out = ") + std::to_string(channels));
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
  std::vector<double> I(std::size_t(channels / o.group_size), 0.0);
  std::vector<double> col(by_col ? std::size_t(in) : 0, 0.0);
  Md G, Wp;
  for (index_t o0 = 0; o0 < out; o0 += o.chunk) {
    const index_t c = std::min(o.chunk, out - o0);
    G.noalias() = left.middleRows(o0, c) * right;
    Wp.noalias() = left.block(o0, r, c, r) * Ad;
    for (index_t i = 0; i < c; ++i) {
      if (by_col) {
        for (index_t j = 0; j < in; ++j) col[std::size_t(j)] += std::abs(G(i, j) * (Wp(i, j) + double(W(o0 + i, j))));
        continue;
      }
      double acc = 0;
      for (index_t j = 0; j < in; ++j) acc += std::abs(G(i, j) * (Wp(i, j) + double(W(o0 + i, j))));
      I[std::size_t((o0 + i) / o.group_size)] += std::abs(o.gradient_scale) * acc;
    }
  }
  for (index_t j = 0; j < index_t(col.size()); ++j)
    I[std::size_t(j / o.group_size)] += std::abs(o.gradient_scale) * col[std::size_t(j)];
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
  /// Importance options; its group_size is the default for layers added without one
  /// (its side is set per member by the couplings).
  lora_importance_options importance;
  /// Couplings: input-side members (o, down) add their column importance to the group's
  /// sum (UNVERIFIED; the reference's attention group lists q, k, v and o). Off: they are
  /// pruned (sliced) with the group but do not score it.
  bool score_input_side = true;
  /// Couplings: each member's I is L2-normalised before the members are summed (as every
  /// module is normalised on its own); off: the sum is normalised (UNVERIFIED). No effect
  /// without `normalize` or for single-layer groups.
  bool normalize_per_member = true;
};

/// One module of a coupling group: its output rows or its input columns carry the group's
/// channels.
template <class T>
struct lora_prune_member {
  nn::linear<T>* layer = nullptr;
  prune_side side = prune_side::output;
  /// Whether its importance joins the group's sum (input-side members also need
  /// lora_prune_options::score_input_side).
  bool scored = true;
};

/// Modules whose channels are pruned together: group g is channels g·group_size …
/// (g+1)·group_size − 1 of every member (rows of output-side members, columns of
/// input-side ones); every member has the same channel count. During training only the
/// output-side members are masked (their outputs zeroed); an input-side member's columns
/// must then receive zeros (v → attention → o with whole heads, up → GELU / ReLU → down),
/// which is what makes physical slicing exact. At least one output-side member.
template <class T>
struct lora_prune_coupling {
  std::string name;
  index_t group_size = 1;
  std::vector<lora_prune_member<T>> members;
};

/// Heads of an attention block: q, k, v output rows and o's input columns in groups of
/// head_dim. Masking a head zeroes its q, k and v (v = 0 gives a zero head output), so o
/// sees zeros in those columns.
template <class T>
lora_prune_coupling<T> attention_coupling(std::string name, nn::linear<T>* q, nn::linear<T>* k, nn::linear<T>* v,
                                          nn::linear<T>* o, index_t head_dim) {
  return {std::move(name), head_dim,
          {{q, prune_side::output, true}, {k, prune_side::output, true}, {v, prune_side::output, true},
           {o, prune_side::input, true}}};
}

/// Hidden channels of an MLP: up's (and gate's, when not null) output rows with down's
/// input columns, one channel per group.
template <class T>
lora_prune_coupling<T> mlp_coupling(std::string name, nn::linear<T>* up, nn::linear<T>* gate, nn::linear<T>* down) {
  lora_prune_coupling<T> c{std::move(name), 1, {{up, prune_side::output, true}}};
  if (gate != nullptr) c.members.push_back({gate, prune_side::output, true});
  c.members.push_back({down, prune_side::input, true});
  return c;
}

/// The couplings of nn::transformer_block / nn::tiny_transformer: `projections` in groups
/// of six (q, k, v, o, up, down, as their projections() return them), heads of
/// d_model / heads channels; per block an attention and an MLP coupling.
template <class T>
std::vector<lora_prune_coupling<T>> transformer_couplings(const std::vector<nn::linear<T>*>& projections, index_t heads) {
  const std::string op = "deltaw::train::transformer_couplings";
  if (projections.size() % 6 != 0)
    throw argument_error(op + ": " + std::to_string(projections.size()) +
                         " projections; expected 6 per block (q, k, v, o, up, down)");
  if (heads < 1) throw argument_error(op + ": heads must be ≥ 1; got " + std::to_string(heads));
  std::vector<lora_prune_coupling<T>> out;
  for (std::size_t b = 0; b < projections.size(); b += 6) {
    const auto* q = projections[b];
    if (q == nullptr) throw argument_error(op + ": projection " + std::to_string(b) + " is null");
    if (q->out_features() % heads != 0)
      throw argument_error(op + ": '" + q->name() + "' has " + std::to_string(q->out_features()) +
                           " outputs, not a multiple of heads = " + std::to_string(heads));
    const std::string blk = "block" + std::to_string(b / 6);
    out.push_back(attention_coupling<T>(blk + ".attn", projections[b], projections[b + 1], projections[b + 2],
                                        projections[b + 3], q->out_features() / heads));
    out.push_back(mlp_coupling<T>(blk + ".mlp", projections[b + 4], nullptr, projections[b + 5]));
  }
  return out;
}

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

/// LoRAPrune over nn::linear layers with LoRA / rsLoRA adapters, each layer on its own
/// output channels or in coupling groups (lora_prune_coupling). Installs a forward hook on
/// every layer with an output-side mask (removed in the destructor); not copied or moved
/// (the hooks point at it). It must not outlive its layers.
///
/// Index conventions: group_size(i) … masked_columns(i) take a *unit* i: layer i with the
/// first constructor, coupling i with the second. layers(), write_pruned_weight(i, ·),
/// kept_outputs(i) and kept_inputs(i) take a layer i of layers() (with the first
/// constructor the two coincide).
template <class T>
class lora_prune : public method<T> {
 public:
  /// group_sizes: per layer (empty: options.importance.group_size for all).
  lora_prune(std::vector<nn::linear<T>*> layers, lora_prune_options o = {}, std::vector<index_t> group_sizes = {})
      : o_(o) {
    const std::string op = "deltaw::train::lora_prune";
    detail::check_lora_prune_options(o_, op);
    if (!group_sizes.empty() && group_sizes.size() != layers.size())
      throw argument_error(op + ": " + std::to_string(group_sizes.size()) + " group sizes for " +
                           std::to_string(layers.size()) + " layers");
    std::vector<lora_prune_coupling<T>> cs;
    for (std::size_t i = 0; i < layers.size(); ++i) {
      if (layers[i] == nullptr) throw argument_error(op + ": layer " + std::to_string(i) + " is null");
      const index_t g = group_sizes.empty() ? o_.importance.group_size : group_sizes[i];
      cs.push_back({layers[i]->name(), g, {{layers[i], prune_side::output, true}}});
    }
    build(cs, op);
  }

  /// Coupled pruning: one unit per coupling, its groups masked together on every member.
  /// (Options first, so that a braced list of layers never reads as couplings.)
  lora_prune(lora_prune_options o, const std::vector<lora_prune_coupling<T>>& couplings) : o_(o) {
    const std::string op = "deltaw::train::lora_prune(couplings)";
    detail::check_lora_prune_options(o_, op);
    coupled_ = true;
    build(couplings, op);
  }
  lora_prune(const lora_prune&) = delete;
  lora_prune& operator=(const lora_prune&) = delete;

  std::string name() const override { return "LoRAPrune"; }

  void after_backward(const step_context&) override {
    std::vector<std::vector<double>> fresh(us_.size());
    for (std::size_t u = 0; u < us_.size(); ++u) {
      auto& e = us_[u];
      fresh[u].assign(e.ema.size(), 0.0);
      for (const auto& m : e.members) {
        if (!m.scored || (m.side == prune_side::input && !o_.score_input_side)) continue;
        auto* l = layers_[m.layer];
        auto imp = o_.importance;
        imp.group_size = e.group_size;
        imp.side = m.side;
        auto I = lora_prune_importance<T>(l->weight(), l->lora_B()->value(), l->lora_A()->value(), l->scale(),
                                          l->lora_B()->grad(), l->lora_A()->grad(), imp);
        // A non-finite gradient skips the whole update (as the reference does).
        if (!normalize_in_place(I, o_.normalize && o_.normalize_per_member)) return;
        for (std::size_t g = 0; g < I.size(); ++g) fresh[u][g] += I[g];
      }
      if (!normalize_in_place(fresh[u], o_.normalize && !o_.normalize_per_member)) return;
    }
    for (std::size_t u = 0; u < us_.size(); ++u)
      for (std::size_t g = 0; g < fresh[u].size(); ++g)
        us_[u].ema[g] = o_.beta * us_[u].ema[g] + (1 - o_.beta) * fresh[u][g];
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
    for (auto& e : us_) {
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

  /// Applies layer i's masks for export: zeros the masked rows of W_copy (a caller-owned
  /// copy of the layer's W, [out, in]), of B and of the bias (output side) and the masked
  /// columns of W_copy and A (input side), so that the layer over W_copy without the hook
  /// computes what the masked layer computes (on inputs that are zero in those columns).
  void write_pruned_weight(index_t i, dense<T>& W_copy) {
    auto* l = layer_at(i, "write_pruned_weight");
    if (W_copy.rows() != l->out_features() || W_copy.cols() != l->in_features())
      throw shape_error("deltaw::train::lora_prune::write_pruned_weight: W_copy is " +
                        deltaw::detail::shape_str(W_copy.rows(), W_copy.cols()) + "; layer '" + l->name() + "' is " +
                        deltaw::detail::shape_str(l->out_features(), l->in_features()));
    const auto& s = sides_[std::size_t(i)];
    if (s.out_unit >= 0)
      for (auto c : us_[std::size_t(s.out_unit)].columns) {
        W_copy.row(c).setZero();
        l->lora_B()->value().row(c).setZero();
        if (l->bias()) l->bias()->value()(0, c) = T(0);
      }
    if (s.in_unit >= 0)
      for (auto c : us_[std::size_t(s.in_unit)].columns) {
        W_copy.col(c).setZero();
        l->lora_A()->value().col(c).setZero();
      }
  }

  /// The output rows (input columns) of layer i that stay: all but its unit's masked
  /// channels on that side, ascending.
  std::vector<index_t> kept_outputs(index_t i) const { return kept(i, true, "kept_outputs"); }
  std::vector<index_t> kept_inputs(index_t i) const { return kept(i, false, "kept_inputs"); }

  const lora_prune_options& options() const { return o_; }
  /// The distinct layers, in the order they first appear.
  const std::vector<nn::linear<T>*>& layers() const { return layers_; }
  index_t unit_count() const { return index_t(us_.size()); }
  /// The unit's name: the layer's name, or the coupling's.
  const std::string& unit_name(index_t i) const { return at(i, "unit_name").name; }
  index_t group_size(index_t i) const { return at(i, "group_size").group_size; }
  index_t group_count(index_t i) const { return index_t(at(i, "group_count").ema.size()); }
  /// The moving-average importance Ī of unit i, per group.
  const std::vector<double>& importance(index_t i) const { return at(i, "importance").ema; }
  /// 1 for each masked group of unit i.
  const std::vector<std::uint8_t>& masked(index_t i) const { return at(i, "masked").masked; }
  index_t masked_count(index_t i) const {
    const auto& m = at(i, "masked_count").masked;
    return index_t(std::count(m.begin(), m.end(), std::uint8_t(1)));
  }
  /// The channels of unit i that are masked: output columns of its output-side members
  /// (what the hook zeros), input columns of its input-side ones.
  const std::vector<index_t>& masked_columns(index_t i) const { return at(i, "masked_columns").columns; }
  /// The scheduled sparsity at the last event (0 before the first).
  double sparsity() const { return sparsity_; }
  index_t events() const { return events_; }
  index_t updates() const { return updates_; }

 private:
  struct member_ref {
    std::size_t layer;
    prune_side side;
    bool scored;
  };
  struct unit {
    std::string name;
    index_t group_size = 1;
    std::vector<member_ref> members;
    std::vector<double> ema;
    std::vector<std::uint8_t> masked;
    std::vector<index_t> columns;
  };
  struct layer_sides {
    std::ptrdiff_t out_unit = -1, in_unit = -1;
  };

  // Divides I by ‖I‖₂ + eps when `on`; false (nothing changed) when ‖I‖ is not finite.
  bool normalize_in_place(std::vector<double>& I, bool on) const {
    double n2 = 0;
    for (double v : I) n2 += v * v;
    if (!std::isfinite(n2)) return false;
    if (on)
      for (double& v : I) v /= std::sqrt(n2) + o_.eps;
    return true;
  }

  void build(const std::vector<lora_prune_coupling<T>>& cs, const std::string& op) {
    for (std::size_t u = 0; u < cs.size(); ++u) {
      const auto& c = cs[u];
      const std::string who = "coupling '" + c.name + "'";
      if (c.members.empty()) throw argument_error(op + ": " + who + " has no members");
      unit e;
      e.name = c.name;
      e.group_size = c.group_size;
      index_t channels = -1;
      bool has_output = false, has_scored = false;
      for (const auto& m : c.members) {
        auto* l = m.layer;
        if (l == nullptr) throw argument_error(op + ": " + who + " has a null layer");
        if (!l->has_adapter()) throw argument_error(op + ": layer '" + l->name() + "' has no adapter");
        if (l->kind() == nn::adapter_kind::dora)
          throw argument_error(op + ": layer '" + l->name() +
                               "' has a DoRA adapter; LoRAPrune's estimate is defined for LoRA / rsLoRA only");
        const bool out_side = m.side == prune_side::output;
        const index_t n = out_side ? l->out_features() : l->in_features();
        const std::string what = std::string(out_side ? "out" : "in") + " = " + std::to_string(n);
        if (c.group_size < 1 || n % c.group_size != 0)
          throw argument_error(op + ": layer '" + l->name() + "': group_size " + std::to_string(c.group_size) +
                               " does not divide " + what);
        if (channels >= 0 && n != channels)
          throw shape_error(op + ": " + who + ": layer '" + l->name() + "' (" +
                            deltaw::detail::shape_str(l->out_features(), l->in_features()) + ") has " + what +
                            " channels; the coupling's other members have " + std::to_string(channels));
        channels = n;
        has_output = has_output || out_side;
        has_scored = has_scored || (m.scored && (out_side || o_.score_input_side));
        std::size_t li = 0;
        while (li < layers_.size() && layers_[li] != l) ++li;
        if (li == layers_.size()) {
          layers_.push_back(l);
          sides_.push_back({});
        }
        auto& slot = out_side ? sides_[li].out_unit : sides_[li].in_unit;
        if (slot >= 0)
          throw argument_error(op + ": layer '" + l->name() + "' is listed twice on its " +
                               (out_side ? "output" : "input") + " side");
        slot = std::ptrdiff_t(u);
        e.members.push_back({li, m.side, m.scored});
      }
      if (!has_output)
        throw argument_error(op + ": " + who + " has no output-side member (nothing would be masked in training)");
      if (!has_scored) throw argument_error(op + ": " + who + " has no scored member");
      e.ema.assign(std::size_t(channels / e.group_size), 0.0);
      e.masked.assign(e.ema.size(), 0);
      us_.push_back(std::move(e));
    }
    std::vector<nn::linear<T>*> hooked;
    std::vector<std::size_t> unit_of;
    for (std::size_t li = 0; li < layers_.size(); ++li)
      if (sides_[li].out_unit >= 0) {
        hooked.push_back(layers_[li]);
        unit_of.push_back(std::size_t(sides_[li].out_unit));
      }
    // Refuses a layer that already has a hook (nothing installed then); removed with this.
    hooks_.emplace(
        hooked,
        [this, unit_of](std::size_t i, autograd::tape<T>&, const autograd::var<T>&, const autograd::var<T>& y) {
          const auto& cols = us_[unit_of[i]].columns;
          return cols.empty() ? y : mask_columns(y, cols);
        },
        "deltaw::train::lora_prune", "", this);
  }

  const unit& at(index_t i, const char* op) const {
    if (i < 0 || i >= index_t(us_.size()))
      throw argument_error(std::string("deltaw::train::lora_prune::") + op + (coupled_ ? ": coupling " : ": layer ") +
                           std::to_string(i) + " of " + std::to_string(us_.size()));
    return us_[std::size_t(i)];
  }
  nn::linear<T>* layer_at(index_t i, const char* op) const {
    if (i < 0 || i >= index_t(layers_.size()))
      throw argument_error(std::string("deltaw::train::lora_prune::") + op + ": layer " + std::to_string(i) + " of " +
                           std::to_string(layers_.size()));
    return layers_[std::size_t(i)];
  }
  std::vector<index_t> kept(index_t i, bool out_side, const char* op) const {
    auto* l = layer_at(i, op);
    const auto& s = sides_[std::size_t(i)];
    const std::ptrdiff_t u = out_side ? s.out_unit : s.in_unit;
    std::vector<std::uint8_t> drop(std::size_t(out_side ? l->out_features() : l->in_features()), 0);
    if (u >= 0)
      for (auto c : us_[std::size_t(u)].columns) drop[std::size_t(c)] = 1;
    std::vector<index_t> k;
    for (std::size_t c = 0; c < drop.size(); ++c)
      if (!drop[c]) k.push_back(index_t(c));
    return k;
  }

  lora_prune_options o_;
  bool coupled_ = false;
  std::vector<nn::linear<T>*> layers_;
  std::vector<layer_sides> sides_;
  std::vector<unit> us_;
  double sparsity_ = 0;
  index_t events_ = 0, updates_ = 0;
  std::optional<nn::layer_hooks<T>> hooks_;  // last: removed before the state it reads
};

}  // namespace train
DELTAW_NAMESPACE_END
