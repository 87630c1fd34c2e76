// SPDX-License-Identifier: MIT
// DiffoRA-style learnable module gates (DiffoRA, 2025; see docs/training.md): every
// adapted (layer, module) gets a scalar gate on its adapter's output,
//
//   y = x·Wᵀ + g·Δ(x),   g = σ(z/τ) while relaxed (z a trainable logit),
//
// trained jointly with the adapters; then the gates are binarised: the top-k modules by
// gate value keep their adapter (g = 1), the others are removed (g = 0: the adapter is not
// even evaluated, so its contribution is exactly zero) and their adapter parameters are
// frozen.
//
//   autograd::gate_mul(x, g)           g·x for a [1, 1] variable g (value and VJP)
//   autograd::sigmoid_gate(x, z, τ)    σ(z/τ)·x
//   autograd::lora_delta(x, B, A, s)   s·(x·Aᵀ)·Bᵀ, a LoRA adapter's output alone
//   train::diffora<T>                  the gates as a training method
//
// What the method description fixes: one gate per (layer, module), a continuous
// relaxation, binarisation to the top modules. Everything else is UNVERIFIED and an
// option (diffora_options): the relaxation (sigmoid with temperature τ = 1), the initial
// logit (0: g = 0.5), when to binarise (after half of the steps), how many modules to keep
// (half, rounded up), whether a kept gate becomes exactly 1 (default) or keeps its last
// relaxed value as a constant, and whether the gates train in the same optimiser as the
// adapters (they do here: add gate_parameters() to it; the paper's bi-level search is
// not reproduced).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "../autograd/adapters.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace autograd {

/// g·x with g a [1, 1] variable: dx = g·dY, dg = Σ dY ⊙ x.
template <class T>
var<T> gate_mul(const var<T>& x, const var<T>& g) {
  auto& t = detail::same_tape(x, g, "gate_mul");
  if (g.rows() != 1 || g.cols() != 1)
    throw shape_error("deltaw::autograd::gate_mul: the gate is " + detail::shape_of(g.rows(), g.cols()) +
                      "; expected a scalar [1, 1]");
  const T gv = g.value()(0, 0);
  dense<T> y = gv * x.value();
  const index_t ix = x.id(), ig = g.id();
  return t.record("gate_mul", std::move(y), t.requires_grad(x) || t.requires_grad(g), [ix, ig](tape<T>& t, index_t self) {
    const auto& dY = t.upstream(self);
    if (t.needs_grad(ix)) detail::accumulate(t, ix, t.value_at(ig)(0, 0) * dY);
    if (t.needs_grad(ig)) {
      dense<T> dg(1, 1);
      dg(0, 0) = dY.cwiseProduct(t.value_at(ix)).sum();
      detail::accumulate(t, ig, dg);
    }
  }, /*backward_reads_output=*/false);
}

/// σ(z/τ)·x with z a [1, 1] logit: the relaxed gate. dz = σ'(z/τ)/τ · Σ dY ⊙ x.
template <class T>
var<T> sigmoid_gate(const var<T>& x, const var<T>& z, double temperature = 1.0) {
  auto& t = detail::same_tape(x, z, "sigmoid_gate");
  if (!(temperature > 0) || !std::isfinite(temperature))
    throw argument_error("deltaw::autograd::sigmoid_gate: the temperature must be finite and > 0; got " +
                         std::to_string(temperature));
  if (z.rows() != 1 || z.cols() != 1)
    throw shape_error("deltaw::autograd::sigmoid_gate: the logit is " + detail::shape_of(z.rows(), z.cols()) +
                      "; expected a scalar [1, 1]");
  dense<T> g(1, 1);
  g(0, 0) = T(1 / (1 + std::exp(-double(z.value()(0, 0)) / temperature)));
  const index_t iz = z.id();
  auto gv = t.record("sigmoid", std::move(g), t.requires_grad(z), [iz, temperature](tape<T>& t, index_t self) {
    const double s = double(t.value_at(self)(0, 0));
    dense<T> dz(1, 1);
    dz(0, 0) = T(double(t.upstream(self)(0, 0)) * s * (1 - s) / temperature);
    detail::accumulate(t, iz, dz);
  });
  return gate_mul(x, gv);
}

/// A LoRA adapter's output alone, s·(x·Aᵀ)·Bᵀ (B [out, r], A [r, in]): tokens × r
/// intermediates only.
template <class T>
var<T> lora_delta(const var<T>& x, const var<T>& B, const var<T>& A, double s) {
  return scale(matmul_nt(matmul_nt(x, A), B), s);
}

}  // namespace autograd

namespace train {

/// What a kept gate becomes at binarisation.
enum class diffora_kept_gate {
  one,             ///< exactly 1: the kept adapter's output passes unscaled (default)
  frozen_relaxed,  ///< its last σ(z/τ), now a constant (keeps the function continuous)
};

struct diffora_options {
  double init_logit = 0.0;    ///< z at the start (σ = 0.5)
  double temperature = 1.0;   ///< τ in σ(z/τ)
  index_t keep = -1;          ///< modules kept at binarisation; −1: half, rounded up
  double binarise_at = 0.5;   ///< fraction of fit's steps after which to binarise; < 0: only by binarise()
  diffora_kept_gate kept_gate = diffora_kept_gate::one;
  bool freeze_dropped = true; ///< set the dropped modules' adapter parameters non-trainable
};

/// Learnable gates over registered modules. Usage per module i in the forward pass:
///   y = gates.forward(i, t, linear(x, W), [&] { return lora_delta(x, B, A, s); });
/// The gate parameters (logits, [1, 1] each) belong in the optimiser with the adapters.
template <class T>
class diffora : public method<T> {
 public:
  explicit diffora(diffora_options o = {}) : o_(o) {
    if (!(o.temperature > 0) || !std::isfinite(o.temperature))
      throw argument_error("deltaw::train::diffora: the temperature must be finite and > 0; got " +
                           std::to_string(o.temperature));
    if (!std::isfinite(o.init_logit))
      throw argument_error("deltaw::train::diffora: init_logit must be finite");
    if (!std::isfinite(o.binarise_at) || o.binarise_at > 1)
      throw argument_error("deltaw::train::diffora: binarise_at must be ≤ 1 (< 0 disables it); got " +
                           std::to_string(o.binarise_at));
  }
  diffora(const diffora&) = delete;  // the optimiser holds pointers to the logits
  diffora& operator=(const diffora&) = delete;
  std::string name() const override { return "DiffoRA"; }

  /// Registers a module by the parameters of its adapter (frozen if it is dropped) and
  /// creates its gate logit; returns the module's index.
  index_t add_module(std::string module_name, std::vector<autograd::parameter<T>*> adapter_params = {}) {
    if (binarised_) throw argument_error("deltaw::train::diffora::add_module: the gates are already binarised");
    for (auto* p : adapter_params)
      if (p == nullptr) throw argument_error("deltaw::train::diffora::add_module: null adapter parameter");
    dense<T> z(1, 1);
    z(0, 0) = T(o_.init_logit);
    mods_.push_back({std::make_unique<autograd::parameter<T>>(module_name + ".gate_logit", std::move(z)),
                     std::move(adapter_params), true, 1.0});
    return index_t(mods_.size()) - 1;
  }
  index_t module_count() const { return index_t(mods_.size()); }
  autograd::parameter<T>& logit(index_t i) { return *at(i, "logit").logit; }
  std::vector<autograd::parameter<T>*> gate_parameters() {
    std::vector<autograd::parameter<T>*> ps;
    for (auto& m : mods_) ps.push_back(m.logit.get());
    return ps;
  }

  bool binarised() const { return binarised_; }
  /// Before binarisation every module is active; after it, the kept ones.
  bool kept(index_t i) const { return at(i, "kept").kept; }
  /// The gate's current value: σ(z/τ) while relaxed; after binarisation 0 for dropped
  /// modules and 1 (or the frozen relaxed value) for kept ones.
  double gate_value(index_t i) const {
    const auto& m = at(i, "gate_value");
    if (!binarised_) return relaxed(m);
    return m.kept ? m.frozen_gate : 0.0;
  }

  /// The gated adapter output g·Δ (relaxed) or Δ·(kept gate) after binarisation. For a
  /// dropped module use forward(), which skips the adapter entirely.
  autograd::var<T> gate(index_t i, autograd::tape<T>& t, const autograd::var<T>& delta) {
    auto& m = at(i, "gate");
    if (!binarised_) return autograd::sigmoid_gate(delta, t.param(*m.logit), o_.temperature);
    if (!m.kept) {
      // Exactly zero, recorded without a backward: the adapter gets no gradient.
      dense<T> z = dense<T>::Zero(delta.rows(), delta.cols());
      return t.record("diffora dropped module", std::move(z), false);
    }
    return m.frozen_gate == 1.0 ? delta : autograd::scale(delta, m.frozen_gate);
  }

  /// base + gate·delta(); a dropped module returns `base` itself without calling delta.
  template <class DeltaFn>
  autograd::var<T> forward(index_t i, autograd::tape<T>& t, const autograd::var<T>& base, DeltaFn&& delta) {
    auto& m = at(i, "forward");
    if (binarised_ && !m.kept) return base;
    return autograd::add(base, gate(i, t, delta()));
  }

  /// Binarises now: keeps the `keep` modules with the largest gate values (ties: the
  /// lower index), drops the rest; the logits stop training. Returns the kept indices in
  /// increasing order.
  std::vector<index_t> binarise(index_t keep) {
    constexpr const char* op = "deltaw::train::diffora::binarise";
    if (binarised_) throw argument_error(std::string(op) + ": already binarised");
    const index_t n = module_count();
    if (keep < 0 || keep > n)
      throw argument_error(std::string(op) + ": keep must lie in [0, " + std::to_string(n) + "]; got " +
                           std::to_string(keep));
    std::vector<index_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), index_t(0));
    std::vector<double> g(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) g[std::size_t(i)] = relaxed(mods_[std::size_t(i)]);
    std::stable_sort(order.begin(), order.end(),
                     [&](index_t a, index_t b) { return g[std::size_t(a)] > g[std::size_t(b)]; });
    std::vector<index_t> kept(order.begin(), order.begin() + keep);
    std::sort(kept.begin(), kept.end());
    for (auto& m : mods_) m.kept = false;
    for (index_t i : kept) {
      auto& m = mods_[std::size_t(i)];
      m.kept = true;
      m.frozen_gate = o_.kept_gate == diffora_kept_gate::one ? 1.0 : g[std::size_t(i)];
    }
    for (auto& m : mods_) {
      m.logit->set_trainable(false);
      if (!m.kept && o_.freeze_dropped)
        for (auto* p : m.adapter) p->set_trainable(false);
    }
    binarised_ = true;
    return kept;
  }
  /// The default number kept: options().keep, or half the modules rounded up.
  index_t default_keep() const { return o_.keep >= 0 ? std::min(o_.keep, module_count()) : (module_count() + 1) / 2; }
  const diffora_options& options() const { return o_; }

  void after_step(const step_context& ctx) override {
    if (binarised_ || o_.binarise_at < 0 || ctx.total_steps <= 0) return;
    const index_t at_step = std::max<index_t>(1, index_t(std::llround(o_.binarise_at * double(ctx.total_steps))));
    if (ctx.step + 1 == at_step) binarise(default_keep());
  }

 private:
  struct module {
    std::unique_ptr<autograd::parameter<T>> logit;
    std::vector<autograd::parameter<T>*> adapter;
    bool kept;
    double frozen_gate;
  };
  double relaxed(const module& m) const {
    return 1 / (1 + std::exp(-double(m.logit->value()(0, 0)) / o_.temperature));
  }
  const module& at(index_t i, const char* op) const {
    if (i < 0 || i >= module_count())
      throw argument_error(std::string("deltaw::train::diffora::") + op + ": module " + std::to_string(i) + " of " +
                           std::to_string(module_count()));
    return mods_[std::size_t(i)];
  }
  module& at(index_t i, const char* op) { return const_cast<module&>(std::as_const(*this).at(i, op)); }

  diffora_options o_;
  std::vector<module> mods_;
  bool binarised_ = false;
};

}  // namespace train
DELTAW_NAMESPACE_END
