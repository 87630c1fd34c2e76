// SPDX-License-Identifier: MIT
// LoRA-FA (Zhang et al., 2023): A stays at its initial (random) value and only B trains,
// which halves the adapter's optimiser state and removes the activations A needs. With A
// fixed the best B-gradient in the sense of LoRA-Pro (the one whose update s·ΔB·A is
// closest to the full fine-tuning update) is the preconditioned
//
//   g_B ← (1/s²)·g_B·(A·Aᵀ + ε·I)⁻¹          (the inverse as pinv, linalg/sylvester.hpp)
//
// which PEFT's LoRA-FA optimiser also applies. The plain frozen-A variant of the
// original paper is precondition = false.
//
//   train::lora_fa<float> fa(model.adapted_layers());     // freezes every A now
//   optim::adamw<float> opt(model.trainable_parameters(), {...});   // B only
//   train::fit<float>(loss, opt, {&fa}, o);
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../linalg/sylvester.hpp"
#include "../nn/layers.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

struct lora_fa_options {
  /// ε of (A·Aᵀ + ε·I)⁻¹: the damping LoRA-Pro's reference uses for its inverses.
  double eps = 1e-8;
  /// Replace B's gradient by the preconditioned one (METHODS.md, PEFT's LoRA-FA
  /// optimiser); false trains B on its plain gradient (the original paper).
  bool precondition = true;
};

/// (1/s²)·g_B·pinv(A·Aᵀ + ε·I), computed in double: the LoRA-FA gradient of B [m, r]
/// given its LoRA gradient g_B [m, r] and the frozen A [r, n].
template <class T>
dense<T> lora_fa_gradient(const dense<T>& g_B, const dense<T>& A, double s, double eps = 1e-8) {
  constexpr const char* op = "deltaw::train::lora_fa_gradient";
  if (g_B.cols() != A.rows())
    throw shape_error(std::string(op) + ": g_B is " + deltaw::detail::shape_str(g_B.rows(), g_B.cols()) + " and A is " +
                      deltaw::detail::shape_str(A.rows(), A.cols()) + "; their rank dimensions differ");
  if (!std::isfinite(s) || s == 0) throw argument_error(std::string(op) + ": the scale must be finite and non-zero");
  const dense<double> a = A.template cast<double>();
  const dense<double> gram = a * a.transpose();
  const dense<double> pinv = linalg::symmetric_pinv<double>(gram, eps);
  return dense<T>(((1.0 / (s * s)) * (g_B.template cast<double>() * pinv)).template cast<T>());
}

template <class T>
class lora_fa : public method<T> {
 public:
  /// Freezes the A of every layer (set_trainable(false)) at construction, so build the
  /// optimiser from trainable_parameters() afterwards, or from any list: optimisers skip
  /// frozen parameters.
  explicit lora_fa(std::vector<nn::linear<T>*> layers, lora_fa_options o = {}) : layers_(std::move(layers)), o_(o) {
    constexpr const char* op = "deltaw::train::lora_fa";
    if (!std::isfinite(o.eps) || o.eps < 0)
      throw argument_error(std::string(op) + ": eps must be finite and ≥ 0; got " + std::to_string(o.eps));
    for (auto* l : layers_) {
      if (l == nullptr) throw argument_error(std::string(op) + ": null layer");
      if (!l->has_adapter()) throw argument_error(std::string(op) + ": layer '" + l->name() + "' has no adapter");
      if (l->kind() == nn::adapter_kind::dora)
        throw argument_error(std::string(op) + ": layer '" + l->name() +
                             "' carries DoRA; the preconditioner assumes W + s·B·A (LoRA or rsLoRA)");
      l->lora_A()->set_trainable(false);
      l->lora_A()->zero_grad();
    }
  }
  std::string name() const override { return "LoRA-FA"; }
  const lora_fa_options& options() const { return o_; }

  void after_backward(const step_context&) override {
    if (!o_.precondition) return;
    for (auto* l : layers_) {
      auto* B = l->lora_B();
      if (!B->trainable()) continue;
      B->grad() = lora_fa_gradient(B->grad(), l->lora_A()->value(), l->scale(), o_.eps);
    }
  }

 private:
  std::vector<nn::linear<T>*> layers_;
  lora_fa_options o_;
};

}  // namespace train
DELTAW_NAMESPACE_END
