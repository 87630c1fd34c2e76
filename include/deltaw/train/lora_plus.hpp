// SPDX-License-Identifier: MIT
// LoRA+ (Hayou, Ghosh and Yu, 2024): the adapter's B learns λ times faster than A. It is
// an optimiser setting, not a gradient rewrite, so it is a function that configures an
// optimiser with per-parameter learning-rate scales (optim::adamw, optim::sgd):
//
//   optim::adamw<float> opt(model.trainable_parameters(), {2e-4, 0.9, 0.999, 1e-8, 0});
//   train::apply_lora_plus(opt, model.adapted_layers(), {16.0});   // lr_B = 16·lr
//
// It holds no state, so no train::method is needed for train::fit.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../nn/layers.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

struct lora_plus_options {
  /// λ = lr_B / lr_A. The paper recommends λ ≈ 2⁴ for most tasks (16 is the default
  /// of its reference code); the best value is task dependent.
  double ratio = 16.0;
};

/// Sets lr_scale(B) = ratio for the B of every adapted layer (A keeps its scale). The
/// optimiser must hold every such B (it throws argument_error, naming the parameter,
/// otherwise); layers without an adapter are rejected.
template <class T, class Optimiser>
void apply_lora_plus(Optimiser& opt, const std::vector<nn::linear<T>*>& layers, lora_plus_options o = {}) {
  if (!std::isfinite(o.ratio) || o.ratio <= 0)
    throw argument_error("deltaw::train::apply_lora_plus: ratio must be finite and > 0; got " + std::to_string(o.ratio));
  for (auto* l : layers) {
    if (l == nullptr) throw argument_error("deltaw::train::apply_lora_plus: null layer");
    if (!l->has_adapter())
      throw argument_error("deltaw::train::apply_lora_plus: layer '" + l->name() + "' has no adapter");
    opt.set_lr_scale(l->lora_B(), o.ratio);
  }
}

}  // namespace train
DELTAW_NAMESPACE_END
