// SPDX-License-Identifier: MIT
// ALLoRA (Huang and Balestriero, 2024): LoRA without dropout and without the scale s
// (s = 1), with an adaptive learning rate inversely proportional to the parameters'
// norm:
//
//   θ ← θ − η·g / √(‖θ_row‖² + 1/β²)
//
// so a factor at zero (B at init) moves at β·η and a large one slows down. The paper
// scales "the per-sample and per-parameter gradients"; which norm (per row of a factor
// or per whole factor) is UNVERIFIED, so it is an option:
//
//   granularity::row     (default, as METHODS.md reads it) one coefficient per row of
//                        each factor in PyTorch layout: a row of B [m, r] is one output
//                        feature's r coefficients, a row of A [r, n] one rank component.
//   granularity::tensor  one coefficient per factor, from its Frobenius norm.
//
// Where the coefficient is applied is an option too:
//
//   target::gradient (default) g ← g·c(θ) before the optimiser: exactly the rule above
//                    with plain SGD. AdamW normalises a gradient's scale away, so with
//                    AdamW this changes little.
//   target::update   the optimiser's whole step (including weight decay) is multiplied
//                    by c(θ) of the parameters before the step: an adaptive learning
//                    rate for any optimiser (the reading used with AdamW).
//
// deltaw's layers have no dropout, so "no dropout" holds already; set_unit_scale (on by
// default) sets s = 1 on every layer at construction.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../nn/layers.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

struct allora_options {
  enum class granularity { row, tensor };
  enum class target { gradient, update };
  /// β: the coefficient is at most β (at θ = 0). UNVERIFIED default.
  double beta = 1.0;
  granularity norm = granularity::row;
  target apply_to = target::gradient;
  /// ALLoRA trains with s = 1 ("scaling-free").
  bool set_unit_scale = true;
};

/// The coefficients c = 1/√(‖θ_row‖² + 1/β²) of θ [rows, cols]: a [rows, 1] column (the
/// same value in every row for granularity::tensor). Computed in double.
template <class T>
Eigen::VectorXd allora_coefficients(const dense<T>& theta, double beta, allora_options::granularity g) {
  const double floor = 1.0 / (beta * beta);
  Eigen::VectorXd c(theta.rows());
  if (g == allora_options::granularity::row) {
    for (index_t i = 0; i < theta.rows(); ++i)
      c(i) = 1.0 / std::sqrt(theta.row(i).template cast<double>().squaredNorm() + floor);
  } else {
    c.setConstant(1.0 / std::sqrt(theta.template cast<double>().squaredNorm() + floor));
  }
  return c;
}

template <class T>
class allora : public method<T> {
 public:
  explicit allora(std::vector<nn::linear<T>*> layers, allora_options o = {}) : layers_(std::move(layers)), o_(o) {
    constexpr const char* op = "deltaw::train::allora";
    if (!std::isfinite(o.beta) || o.beta <= 0)
      throw argument_error(std::string(op) + ": beta must be finite and > 0; got " + std::to_string(o.beta));
    for (auto* l : layers_) {
      if (l == nullptr) throw argument_error(std::string(op) + ": null layer");
      if (!l->has_adapter()) throw argument_error(std::string(op) + ": layer '" + l->name() + "' has no adapter");
      if (o.set_unit_scale) l->set_scale(1.0);
      for (auto* p : {l->lora_B(), l->lora_A()}) params_.push_back(p);
    }
    before_.resize(params_.size());
    coeff_.resize(params_.size());
  }
  std::string name() const override { return "ALLoRA"; }
  const allora_options& options() const { return o_; }

  void after_backward(const step_context&) override {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto* p = params_[i];
      if (!p->trainable()) continue;
      const Eigen::VectorXd c = allora_coefficients(p->value(), o_.beta, o_.norm);
      if (o_.apply_to == allora_options::target::gradient) {
        p->grad() = (c.template cast<T>().asDiagonal() * p->grad()).eval();
      } else {
        before_[i] = p->value();
        coeff_[i] = c;
      }
    }
  }
  void after_step(const step_context&) override {
    if (o_.apply_to != allora_options::target::update) return;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto* p = params_[i];
      if (!p->trainable() || before_[i].size() != p->size() || before_[i].rows() != p->rows()) continue;
      // θ ← θ₀ + c ⊙ (θ_after_optimiser − θ₀), c constant along each row.
      p->value() = before_[i] + (coeff_[i].template cast<T>().asDiagonal() * (p->value() - before_[i])).eval();
      before_[i].resize(0, 0);
    }
  }

 private:
  std::vector<nn::linear<T>*> layers_;
  allora_options o_;
  std::vector<autograd::parameter<T>*> params_;
  std::vector<dense<T>> before_;
  std::vector<Eigen::VectorXd> coeff_;
};

}  // namespace train
DELTAW_NAMESPACE_END
