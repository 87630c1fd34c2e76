// SPDX-License-Identifier: MIT
// LoRA-Pro (Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", 2024).
//
// A LoRA step changes the merged weight W' = W + s·B·A by the "equivalent gradient"
// g̃ = s·B·g_A + s·g_B·A. LoRA-Pro replaces the LoRA gradients g_Aᴸ = s·Bᵀ·G and
// g_Bᴸ = s·G·Aᵀ (G = ∂L/∂W') by the ones whose g̃ is closest to G:
//
//   g_A = (1/s²)·(BᵀB)⁻¹·g_Aᴸ + X·A
//   g_B = (1/s²)·(I − P_B)·g_Bᴸ·(AAᵀ)⁻¹ − B·X,          P_B = B·(BᵀB)⁻¹·Bᵀ
//
// so that g̃ = P_B·G + G·P_A − P_B·G·P_A, the projection of G onto the tangent space of
// rank-r matrices at B·A, whatever the r × r matrix X. X is then chosen to keep (g_A, g_B)
// closest to (g_Aᴸ, g_Bᴸ): the Sylvester equation
//
//   BᵀB·X + X·AAᵀ = −(1/s²)·(BᵀB)⁻¹·g_Aᴸ·Aᵀ
//
// solved through symmetric eigendecompositions (linalg/sylvester.hpp). Inverses are
// pinv(M + δ·I) with δ = 1e-8, as in the reference. No m × m or m × n matrix is formed
// except by the functions whose names end in _dense and by the full-moment optimiser.
//
// Two ways to train with it:
//
//  * train::lora_pro<T> (a method): after each backward pass it rewrites the adapters'
//    gradients to (g_A, g_B); any optimiser then steps on them. With AdamW this is the
//    reference's "efficient" mode (moments of the factors' size).
//  * train::lora_pro_adamw<T> (an optimiser): the reference's "full" mode, AdamW moments of
//    the full size m × n on g̃ for every layer; the Adam direction m̂/(√v̂ + ε) is projected
//    back onto the factors by the same adjustment. It reads the plain LoRA gradients that
//    backward leaves, so train::fit drives it with no method at all:
//
//      train::lora_pro_adamw<float> opt(model.adapted_layers(), {.lr = 1e-3});
//      train::fit<float>(loss, opt, {}, o);           // prints its state's size once
//
//    Weight decay scales A and B by √(1 − lr·wd) each (B·A by 1 − lr·wd); the reference
//    also decays the frozen base W by 1 − lr·wd, which here is the option
//    decay_base_weight, given the caller's mutable views of the layers' W (layers hold W
//    read-only; without such a view the option throws argument_error naming the layer).
//
//    It replaces the optimiser rather than hooking a method into a plain one, because
//    the update needs the moments, the learning rate and its schedule together; a
//    method that stepped by itself and zeroed the gradients would duplicate the
//    schedule and fight the optimiser's weight decay.
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "../linalg/sylvester.hpp"
#include "../nn/layers.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

struct lora_pro_options {
  /// How X is chosen: the Sylvester solution (the reference's default, the closest
  /// (g_A, g_B) to the LoRA gradients), zero, or the reference's "symmetry" heuristic
  /// X = −½·(1/s²)·(BᵀB)⁻¹·Bᵀ·g_Bᴸ·AAᵀ. g̃ is the same for every choice.
  enum class x_choice { sylvester, zero, symmetry };
  x_choice x = x_choice::sylvester;
  /// δ of pinv(BᵀB + δ·I) and pinv(AAᵀ + δ·I).
  double delta = 1e-8;
};

/// The adjusted gradients of one layer and the X used.
template <class T>
struct lora_pro_gradients {
  dense<T> g_A;  // [r, n]
  dense<T> g_B;  // [m, r]
  dense<T> X;    // [r, r]
};

/// A rank-2r matrix as a factored pair U·V (U [m, 2r], V [2r, n]).
template <class T>
struct factored_matrix {
  dense<T> U, V;
};

namespace detail {
template <class T>
void check_lora_pro_shapes(const dense<T>& B, const dense<T>& A, const dense<T>& gA, const dense<T>& gB, double s,
                           const char* op) {
  if (B.cols() != A.rows() || gA.rows() != A.rows() || gA.cols() != A.cols() || gB.rows() != B.rows() ||
      gB.cols() != B.cols())
    throw shape_error(std::string(op) + ": B " + deltaw::detail::shape_str(B.rows(), B.cols()) + ", A " +
                      deltaw::detail::shape_str(A.rows(), A.cols()) + ", g_A " +
                      deltaw::detail::shape_str(gA.rows(), gA.cols()) + ", g_B " +
                      deltaw::detail::shape_str(gB.rows(), gB.cols()) +
                      " do not fit (need B [m, r], A [r, n], g_A like A, g_B like B)");
  if (!std::isfinite(s) || s == 0) throw argument_error(std::string(op) + ": the scale must be finite and non-zero");
}
}  // namespace detail

/// LoRA-Pro's (g_A, g_B) from the LoRA gradients g_Aᴸ = s·Bᵀ·G, g_Bᴸ = s·G·Aᵀ of one
/// layer W + s·B·A. The r × r algebra (Gram matrices, inverses, Sylvester) runs in
/// double; O((m + n)·r²) work.
template <class T>
lora_pro_gradients<T> lora_pro_adjust(const dense<T>& B, const dense<T>& A, const dense<T>& g_A_lora,
                                      const dense<T>& g_B_lora, double s, lora_pro_options o = {}) {
  constexpr const char* op = "deltaw::train::lora_pro_adjust";
  detail::check_lora_pro_shapes(B, A, g_A_lora, g_B_lora, s, op);
  if (!std::isfinite(o.delta) || o.delta < 0)
    throw argument_error(std::string(op) + ": delta must be finite and ≥ 0; got " + std::to_string(o.delta));
  const dense<double> b = B.template cast<double>(), a = A.template cast<double>();
  const dense<double> ga = g_A_lora.template cast<double>(), gb = g_B_lora.template cast<double>();
  const double is2 = 1.0 / (s * s);
  const dense<double> btb = b.transpose() * b, aat = a * a.transpose();
  const dense<double> btb_inv = linalg::symmetric_pinv<double>(btb, o.delta);
  const dense<double> aat_inv = linalg::symmetric_pinv<double>(aat, o.delta);
  dense<double> new_a = is2 * (btb_inv * ga);
  // (I − P_B)·g_Bᴸ without the m × m projector.
  const dense<double> bt_gb = b.transpose() * gb;
  dense<double> new_b = is2 * ((gb - b * (btb_inv * bt_gb)) * aat_inv);
  dense<double> x;
  switch (o.x) {
    case lora_pro_options::x_choice::sylvester:
      x = linalg::solve_sylvester_symmetric<double>(btb, aat, dense<double>(-is2 * (btb_inv * ga * a.transpose())));
      break;
    case lora_pro_options::x_choice::symmetry:
      x = -0.5 * is2 * (btb_inv * bt_gb * aat);
      break;
    case lora_pro_options::x_choice::zero:
      x = dense<double>::Zero(b.cols(), b.cols());
      break;
  }
  new_a += x * a;
  new_b -= b * x;
  return {new_a.template cast<T>(), new_b.template cast<T>(), x.template cast<T>()};
}

/// The equivalent full gradient g̃ = s·B·g_A + s·g_B·A as a factored pair:
/// U = [s·B, s·g_B] [m, 2r], V = [g_A; A] [2r, n].
template <class T>
factored_matrix<T> lora_pro_equivalent_gradient(const dense<T>& B, const dense<T>& A, const dense<T>& g_A,
                                                const dense<T>& g_B, double s) {
  detail::check_lora_pro_shapes(B, A, g_A, g_B, s, "deltaw::train::lora_pro_equivalent_gradient");
  const index_t m = B.rows(), r = B.cols(), n = A.cols();
  factored_matrix<T> f;
  f.U.resize(m, 2 * r);
  f.U.leftCols(r) = T(s) * B;
  f.U.rightCols(r) = T(s) * g_B;
  f.V.resize(2 * r, n);
  f.V.topRows(r) = g_A;
  f.V.bottomRows(r) = A;
  return f;
}

/// The same g̃ as a dense [m, n] matrix (memory m·n; for tests and the full-moment mode).
template <class T>
dense<T> lora_pro_equivalent_gradient_dense(const dense<T>& B, const dense<T>& A, const dense<T>& g_A,
                                            const dense<T>& g_B, double s) {
  const auto f = lora_pro_equivalent_gradient(B, A, g_A, g_B, s);
  return f.U * f.V;
}

namespace detail {
template <class T>
void check_lora_pro_layer(nn::linear<T>* l, const char* op) {
  if (l == nullptr) throw argument_error(std::string(op) + ": null layer");
  if (!l->has_adapter()) throw argument_error(std::string(op) + ": layer '" + l->name() + "' has no adapter");
  if (l->kind() == nn::adapter_kind::dora)
    throw argument_error(std::string(op) + ": layer '" + l->name() +
                         "' carries DoRA; LoRA-Pro assumes W + s·B·A (LoRA or rsLoRA)");
}
}  // namespace detail

/// The method: rewrites the gradients of every layer's A and B to LoRA-Pro's after each
/// backward pass (both factors must be trainable).
template <class T>
class lora_pro : public method<T> {
 public:
  explicit lora_pro(std::vector<nn::linear<T>*> layers, lora_pro_options o = {}) : layers_(std::move(layers)), o_(o) {
    for (auto* l : layers_) detail::check_lora_pro_layer(l, "deltaw::train::lora_pro");
  }
  std::string name() const override { return "LoRA-Pro"; }
  const lora_pro_options& options() const { return o_; }

  void after_backward(const step_context&) override {
    for (auto* l : layers_) {
      auto *A = l->lora_A(), *B = l->lora_B();
      if (!A->trainable() || !B->trainable())
        throw argument_error("deltaw::train::lora_pro: layer '" + l->name() + "' has a frozen factor; LoRA-Pro trains both");
      auto g = lora_pro_adjust(B->value(), A->value(), A->grad(), B->grad(), l->scale(), o_);
      A->grad() = std::move(g.g_A);
      B->grad() = std::move(g.g_B);
    }
  }

 private:
  std::vector<nn::linear<T>*> layers_;
  lora_pro_options o_;
};

struct lora_pro_adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  /// Decoupled decay: A and B are multiplied by √(1 − lr·wd) each, so B·A decays by
  /// (1 − lr·wd) as in the reference.
  double weight_decay = 0;
  /// Also decay the frozen base weight, W ← (1 − lr·wd)·W, as the reference does, so the
  /// effective W + s·B·A decays by (1 − lr·wd) as full AdamW's weight would. Off by
  /// default: layers hold W as a read-only view, so this needs the caller's mutable view
  /// of each layer's W (the constructor's base_weights; the layer keeps reading that
  /// memory, so the forward pass sees the decayed W). Merged or saved adapters then no
  /// longer describe the change from the original W alone.
  bool decay_base_weight = false;
  /// The adjustment used to project the Adam direction back onto the factors.
  lora_pro_options adjust{};
  /// Where the size of the full-size state is printed at construction (null: silent).
  std::FILE* report = stdout;
};

/// LoRA-Pro with full-size AdamW moments (the reference's "full" mode). Per step and
/// layer: g̃ from the LoRA gradients (dense m × n), m ← β₁m + (1−β₁)g̃,
/// v ← β₂v + (1−β₂)g̃², D = m̂/(√v̂ + ε), then (g_A, g_B) = lora_pro_adjust of
/// (s·Bᵀ·D, s·D·Aᵀ), and A ← √(1−lr·wd)·A − lr·g_A, B likewise (and, with
/// decay_base_weight, W ← (1−lr·wd)·W). State: 2·m·n values per layer, reported by
/// state_bytes().
template <class T>
class lora_pro_adamw {
 public:
  /// base_weights: with decay_base_weight, one mutable view per layer of the very memory
  /// the layer reads as W (same data, shape and strides); otherwise empty.
  lora_pro_adamw(std::vector<nn::linear<T>*> layers, lora_pro_adamw_options o,
                 std::vector<matrix_view<T>> base_weights = {})
      : layers_(std::move(layers)), o_(o), base_(std::move(base_weights)) {
    constexpr const char* op = "deltaw::train::lora_pro_adamw";
    if (!std::isfinite(o.lr) || o.lr < 0 || !std::isfinite(o.eps) || o.eps < 0 || !std::isfinite(o.weight_decay) ||
        o.weight_decay < 0)
      throw argument_error(std::string(op) + ": lr, eps and weight_decay must be finite and ≥ 0");
    if (!(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1))
      throw argument_error(std::string(op) + ": betas must lie in [0, 1)");
    for (auto* l : layers_) {
      detail::check_lora_pro_layer(l, op);
      params_.push_back(l->lora_B());
      params_.push_back(l->lora_A());
      m_.push_back(dense<T>::Zero(l->out_features(), l->in_features()));
      v_.push_back(dense<T>::Zero(l->out_features(), l->in_features()));
    }
    if (!o.decay_base_weight && !base_.empty())
      throw argument_error(std::string(op) + ": base_weights given but decay_base_weight is off");
    if (o.decay_base_weight) {
      for (std::size_t i = 0; i < layers_.size(); ++i) {
        const auto w = layers_[i]->weight();
        if (i >= base_.size() || base_[i].data() == nullptr)
          throw argument_error(std::string(op) + ": decay_base_weight needs a mutable view of layer '" +
                               layers_[i]->name() + "''s base weight W " + deltaw::detail::shape_str(w.rows(), w.cols()) +
                               ", which the layer holds read-only; pass it in base_weights (one per layer, " +
                               std::to_string(layers_.size()) + " in all; got " + std::to_string(base_.size()) + ")");
        const auto& b = base_[i];
        if (b.data() != w.data() || b.rows() != w.rows() || b.cols() != w.cols() || b.row_stride() != w.row_stride() ||
            b.col_stride() != w.col_stride())
          throw argument_error(std::string(op) + ": base_weights[" + std::to_string(i) + "] " +
                               deltaw::detail::shape_str(b.rows(), b.cols()) + " is not the memory layer '" +
                               layers_[i]->name() + "' reads as W " + deltaw::detail::shape_str(w.rows(), w.cols()) +
                               " (same data, shape and strides needed)");
      }
      if (base_.size() != layers_.size())
        throw argument_error(std::string(op) + ": " + std::to_string(base_.size()) + " base_weights for " +
                             std::to_string(layers_.size()) + " layers");
    }
    steps_.assign(layers_.size(), 0);
    if (o.report)
      std::fprintf(o.report, "LoRA-Pro full-size AdamW moments: %zu layers, %td bytes (%.2f MiB) of m×n state\n",
                   layers_.size(), state_bytes(), double(state_bytes()) / (1024.0 * 1024.0));
  }

  /// Bytes of the two full-size moments over all layers: 2·Σ m·n·sizeof(T).
  index_t state_bytes() const {
    index_t n = 0;
    for (std::size_t i = 0; i < m_.size(); ++i) n += m_[i].size() + v_[i].size();
    return n * index_t(sizeof(T));
  }
  const dense<T>& first_moment(std::size_t layer) const { return m_.at(layer); }
  const dense<T>& second_moment(std::size_t layer) const { return v_.at(layer); }

  void step(double lr_factor = 1.0) {
    const double lr = o_.lr * lr_factor;
    const T b1 = T(o_.beta1), b2 = T(o_.beta2), eps = T(o_.eps);
    lora_pro_options equiv = o_.adjust;
    equiv.x = lora_pro_options::x_choice::zero;  // g̃ does not depend on X
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      auto* l = layers_[i];
      auto *A = l->lora_A(), *B = l->lora_B();
      if (!A->trainable() || !B->trainable())
        throw argument_error("deltaw::train::lora_pro_adamw: layer '" + l->name() +
                             "' has a frozen factor; LoRA-Pro trains both");
      const double s = l->scale();
      const auto g = lora_pro_adjust(B->value(), A->value(), A->grad(), B->grad(), s, equiv);
      const dense<T> gt = lora_pro_equivalent_gradient_dense(B->value(), A->value(), g.g_A, g.g_B, s);
      const double n = double(++steps_[i]);
      const T c1 = T(1 - std::pow(o_.beta1, n)), rc2 = T(1 / std::sqrt(1 - std::pow(o_.beta2, n)));
      auto m = m_[i].array();
      auto v = v_[i].array();
      m = b1 * m + (T(1) - b1) * gt.array();
      v = b2 * v + (T(1) - b2) * gt.array().square();
      const dense<T> D = ((m / c1) / (v.sqrt() * rc2 + eps)).matrix();
      const dense<T> gA_l = T(s) * (B->value().transpose() * D);
      const dense<T> gB_l = T(s) * (D * A->value().transpose());
      const auto u = lora_pro_adjust(B->value(), A->value(), gA_l, gB_l, s, o_.adjust);
      const T decay = T(std::sqrt(1 - lr * o_.weight_decay));
      A->value() = decay * A->value() - T(lr) * u.g_A;
      B->value() = decay * B->value() - T(lr) * u.g_B;
      if (o_.decay_base_weight && o_.weight_decay != 0) {
        const T d = T(1 - lr * o_.weight_decay);
        const auto& w = base_[i];
        for (index_t r = 0; r < w.rows(); ++r)
          for (index_t c = 0; c < w.cols(); ++c) w(r, c) *= d;
      }
    }
  }
  void zero_grad() { autograd::zero_grad(params_); }
  const std::vector<autograd::parameter<T>*>& parameters() const { return params_; }
  const lora_pro_adamw_options& options() const { return o_; }

 private:
  std::vector<nn::linear<T>*> layers_;
  lora_pro_adamw_options o_;
  std::vector<autograd::parameter<T>*> params_;
  std::vector<matrix_view<T>> base_;
  std::vector<dense<T>> m_, v_;
  std::vector<index_t> steps_;
};

}  // namespace train
DELTAW_NAMESPACE_END
