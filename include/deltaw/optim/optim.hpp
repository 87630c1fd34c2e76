// SPDX-License-Identifier: MIT
// Optimisers over autograd parameters (PyTorch's update rules): SGD with momentum and
// weight decay, AdamW (decoupled weight decay, bias-corrected moments), gradient
// clipping by global norm, and the warmup + cosine learning-rate schedule.
#pragma once

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <vector>

#include "../autograd/tape.hpp"

DELTAW_NAMESPACE_BEGIN
namespace optim {

using autograd::parameter;

namespace detail {
inline void check_finite_positive(double v, const char* op, const char* what, bool allow_zero = true) {
  if (!std::isfinite(v) || v < 0 || (!allow_zero && v == 0))
    throw argument_error(std::string(op) + ": " + what + " must be finite and " + (allow_zero ? "≥ 0" : "> 0") +
                         "; got " + std::to_string(v));
}
template <class T>
void check_params(const std::vector<parameter<T>*>& ps, const char* op) {
  for (auto* p : ps)
    if (p == nullptr) throw argument_error(std::string(op) + ": null parameter");
}
// Resizes M to [rows, cols], keeping the block both shapes share (top-left) and zeroing
// the rest: a parameter that grew by appended rows or columns keeps its old entries' state.
template <class T>
void resize_keep(dense<T>& M, index_t rows, index_t cols) {
  if (M.rows() == rows && M.cols() == cols) return;
  dense<T> N = dense<T>::Zero(rows, cols);
  const index_t r = std::min(rows, index_t(M.rows())), c = std::min(cols, index_t(M.cols()));
  N.topLeftCorner(r, c) = M.topLeftCorner(r, c);
  M = std::move(N);
}
template <class T>
std::size_t index_of(const std::vector<parameter<T>*>& ps, const parameter<T>* p, const char* cls, const char* op) {
  for (std::size_t i = 0; i < ps.size(); ++i)
    if (ps[i] == p) return i;
  throw argument_error(std::string(cls) + op + ": parameter '" + (p ? p->name() : "null") +
                       "' is not one of this optimiser's");
}
}  // namespace detail

struct sgd_options {
  double lr = 1e-2;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;  // L2 added to the gradient (PyTorch's SGD)
  bool nesterov = false;
};

/// SGD: g ← g + wd·θ; b ← μ·b + (1 − dampening)·g (b = g at the first step);
/// θ ← θ − lr·(nesterov ? g + μ·b : b).
template <class T>
class sgd {
 public:
  sgd(std::vector<parameter<T>*> params, sgd_options o) : params_(std::move(params)), o_(o) {
    detail::check_params(params_, "deltaw::optim::sgd");
    detail::check_finite_positive(o.lr, "deltaw::optim::sgd", "lr");
    detail::check_finite_positive(o.momentum, "deltaw::optim::sgd", "momentum");
    detail::check_finite_positive(o.weight_decay, "deltaw::optim::sgd", "weight_decay");
    buf_.resize(params_.size());
    lr_scale_.assign(params_.size(), 1.0);
  }
  /// Multiplies the learning rate of one parameter (LoRA+: λ for B).
  void set_lr_scale(const parameter<T>* p, double scale) {
    detail::check_finite_positive(scale, "deltaw::optim::sgd::set_lr_scale", "scale");
    lr_scale_[detail::index_of(params_, p, "deltaw::optim::sgd::", "set_lr_scale")] = scale;
  }
  /// Forgets the momentum buffer of one parameter.
  void reset_state(const parameter<T>* p) {
    buf_[detail::index_of(params_, p, "deltaw::optim::sgd::", "reset_state")].resize(0, 0);
  }
  /// Sizes the momentum buffer of one parameter to its current shape, keeping the entries
  /// both shapes share (top-left block) and zeroing the rest (a parameter that grew by
  /// appended rows or columns: IncreLoRA). A parameter with no buffer yet keeps none. The
  /// new entries' buffer starts at zero, so their first update is (1 − dampening)·g, not g.
  void resize_state(const parameter<T>* p) {
    auto& b = buf_[detail::index_of(params_, p, "deltaw::optim::sgd::", "resize_state")];
    if (b.size() != 0) detail::resize_keep(b, p->rows(), p->cols());
  }
  /// One update with learning rate lr·lr_factor (a schedule's factor).
  void step(double lr_factor = 1.0) {
    const T mu = T(o_.momentum), wd = T(o_.weight_decay);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto* p = params_[i];
      if (!p->trainable()) continue;
      const T lr = T(o_.lr * lr_factor * lr_scale_[i]);
      if (buf_[i].size() != 0 && (buf_[i].rows() != p->rows() || buf_[i].cols() != p->cols()))
        throw shape_error("deltaw::optim::sgd: parameter '" + p->name() +
                          "' changed shape since its momentum was recorded (call reset_state for it)");
      dense<T> g = p->grad();
      if (wd != T(0)) g += wd * p->value();
      if (mu != T(0)) {
        if (buf_[i].size() == 0)
          buf_[i] = g;
        else
          buf_[i] = mu * buf_[i] + T(1 - o_.dampening) * g;
        if (o_.nesterov)
          g += mu * buf_[i];
        else
          g = buf_[i];
      }
      p->value() -= lr * g;
    }
  }
  void zero_grad() { autograd::zero_grad(params_); }
  const std::vector<parameter<T>*>& parameters() const { return params_; }

 private:
  std::vector<parameter<T>*> params_;
  sgd_options o_;
  std::vector<dense<T>> buf_;
  std::vector<double> lr_scale_;
};

struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // decoupled: θ ← θ − lr·wd·θ
};

/// AdamW (Loshchilov & Hutter; PyTorch's torch.optim.AdamW):
/// θ ← θ(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
/// θ ← θ − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).
template <class T>
class adamw {
 public:
  adamw(std::vector<parameter<T>*> params, adamw_options o) : params_(std::move(params)), o_(o) {
    constexpr const char* op = "deltaw::optim::adamw";
    detail::check_params(params_, op);
    detail::check_finite_positive(o.lr, op, "lr");
    detail::check_finite_positive(o.weight_decay, op, "weight_decay");
    detail::check_finite_positive(o.eps, op, "eps");
    if (!(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1))
      throw argument_error(std::string(op) + ": betas must lie in [0, 1); got (" + std::to_string(o.beta1) + ", " +
                           std::to_string(o.beta2) + ")");
    m_.resize(params_.size());
    v_.resize(params_.size());
    steps_.assign(params_.size(), 0);
    lr_scale_.assign(params_.size(), 1.0);
    for (std::size_t i = 0; i < params_.size(); ++i) reset_state(i);
  }

  /// Multiplies the learning rate of one parameter (LoRA+: λ for B).
  void set_lr_scale(const parameter<T>* p, double scale) {
    detail::check_finite_positive(scale, "deltaw::optim::adamw::set_lr_scale", "scale");
    lr_scale_[index_of(p, "set_lr_scale")] = scale;
  }
  double lr_scale(const parameter<T>* p) const { return lr_scale_[index_of(p, "lr_scale")]; }
  /// Forgets the moments of one parameter and sizes them to its current shape (LISA's
  /// newly activated layers, a parameter whose rank grew).
  void reset_state(const parameter<T>* p) { reset_state(index_of(p, "reset_state")); }
  /// Sizes the moments of one parameter to its current shape, keeping the entries both
  /// shapes share (top-left block: old rows and columns of a parameter that grew by
  /// appended ones, as IncreLoRA's B, e, A) bit for bit and zeroing the rest. The
  /// parameter's step count is kept, so the old entries continue exactly as without the
  /// change, and the new entries' zero moments are bias-corrected with that count (as
  /// PyTorch's per-parameter step would), not as a fresh AdamW's: under a constant
  /// gradient their steps are (1−β₁ᵏ)/√(1−β₂ᵏ) · √(1−β₂ᵗ)/(1−β₁ᵗ) of a fresh AdamW's at
  /// their k-th step (t = count + k): 0.48 at k = 1 after 10 steps, but 2.5 at k = 1 and
  /// up to 5.2 near k = 10 after 1000 steps (back under 1.7 by k = 300). reset_state
  /// restarts the whole parameter instead.
  void resize_state(const parameter<T>* p) {
    const std::size_t i = index_of(p, "resize_state");
    detail::resize_keep(m_[i], p->rows(), p->cols());
    detail::resize_keep(v_[i], p->rows(), p->cols());
  }
  /// The number of steps this parameter's moments have seen (its bias-correction count).
  index_t state_steps(const parameter<T>* p) const { return steps_[index_of(p, "state_steps")]; }
  /// The first and second moments of a parameter (read-only; for tests and reports).
  const dense<T>& first_moment(const parameter<T>* p) const { return m_[index_of(p, "first_moment")]; }
  const dense<T>& second_moment(const parameter<T>* p) const { return v_[index_of(p, "second_moment")]; }

  void step(double lr_factor = 1.0) {
    ++t_;
    const T b1 = T(o_.beta1), b2 = T(o_.beta2);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto* p = params_[i];
      if (!p->trainable()) continue;
      if (p->grad().rows() != m_[i].rows() || p->grad().cols() != m_[i].cols())
        throw shape_error("deltaw::optim::adamw: parameter '" + p->name() +
                          "' changed shape since the optimiser was built (call reset_state for it)");
      // Bias correction counts this parameter's own steps, so that a state reset (LISA,
      // rank growth) restarts it as a fresh AdamW would.
      const double n = double(++steps_[i]);
      const double lr = o_.lr * lr_factor * lr_scale_[i];
      const T c1 = T(1 - std::pow(o_.beta1, n)), c2 = T(1 - std::pow(o_.beta2, n));
      const T step = T(lr) / c1, eps = T(o_.eps), decay = T(1 - lr * o_.weight_decay);
      const T rc2 = T(1) / std::sqrt(c2);
      auto th = p->value().array();
      auto g = p->grad().array();
      auto m = m_[i].array();
      auto v = v_[i].array();
      // One fused pass per parameter.
      for (index_t k = 0; k < p->size(); ++k) {
        const T gk = g.data()[k];
        T& mk = m.data()[k];
        T& vk = v.data()[k];
        mk = b1 * mk + (T(1) - b1) * gk;
        vk = b2 * vk + (T(1) - b2) * gk * gk;
        T& x = th.data()[k];
        x = x * decay - step * mk / (std::sqrt(vk) * rc2 + eps);
      }
    }
  }
  void zero_grad() { autograd::zero_grad(params_); }
  index_t steps() const { return t_; }
  const std::vector<parameter<T>*>& parameters() const { return params_; }
  const adamw_options& options() const { return o_; }

 private:
  std::size_t index_of(const parameter<T>* p, const char* op) const {
    return detail::index_of(params_, p, "deltaw::optim::adamw::", op);
  }
  void reset_state(std::size_t i) {
    m_[i].setZero(params_[i]->rows(), params_[i]->cols());
    v_[i].setZero(params_[i]->rows(), params_[i]->cols());
    steps_[i] = 0;
  }

  std::vector<parameter<T>*> params_;
  adamw_options o_;
  std::vector<dense<T>> m_, v_;
  std::vector<index_t> steps_;
  std::vector<double> lr_scale_;
  index_t t_ = 0;
};

/// Scales all gradients so that their global L2 norm is at most max_norm (PyTorch's
/// clip_grad_norm_); returns the norm before clipping.
template <class T>
double clip_grad_norm(const std::vector<parameter<T>*>& ps, double max_norm) {
  detail::check_finite_positive(max_norm, "deltaw::optim::clip_grad_norm", "max_norm", false);
  double sq = 0;
  for (auto* p : ps)
    if (p->trainable()) sq += p->grad().template cast<double>().squaredNorm();
  const double norm = std::sqrt(sq);
  if (!std::isfinite(norm))
    throw non_finite_error("deltaw::optim::clip_grad_norm: the gradient norm is not finite");
  if (norm > max_norm) {
    const T c = T(max_norm / (norm + 1e-6));
    for (auto* p : ps)
      if (p->trainable()) p->grad() *= c;
  }
  return norm;
}

/// Linear warmup over `warmup` steps, then a cosine decay to min_factor at `total`:
/// the factor to multiply the base learning rate by at step t (0-based).
struct warmup_cosine {
  index_t warmup = 0;
  index_t total = 1;
  double min_factor = 0.0;

  warmup_cosine(index_t warmup_steps, index_t total_steps, double min_f = 0.0)
      : warmup(warmup_steps), total(total_steps), min_factor(min_f) {
    if (warmup_steps < 0 || total_steps < 1 || warmup_steps > total_steps)
      throw argument_error("deltaw::optim::warmup_cosine: need 0 ≤ warmup ≤ total and total ≥ 1; got warmup " +
                           std::to_string(warmup_steps) + ", total " + std::to_string(total_steps));
  }
  double operator()(index_t t) const {
    if (t < warmup) return double(t + 1) / double(warmup);
    if (t >= total) return min_factor;
    const double span = double(std::max<index_t>(total - warmup, 1));
    const double progress = double(t - warmup) / span;
    return min_factor + (1 - min_factor) * 0.5 * (1 + std::cos(std::numbers::pi * progress));
  }
};

}  // namespace optim
DELTAW_NAMESPACE_END
