// Optimisers over autograd parameters (PyTorch's update rules): SGD with momentum and
// weight decay, AdamW (decoupled weight decay, bias-corrected moments), gradient
// clipping by global norm, and the warmup + cosine learning-rate schedule.
#pragma once

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
  }
  /// One update with learning rate lr·lr_factor (a schedule's factor).
  void step(double lr_factor = 1.0) {
    const T lr = T(o_.lr * lr_factor), mu = T(o_.momentum), wd = T(o_.weight_decay);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto* p = params_[i];
      if (!p->trainable()) continue;
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
    for (std::size_t i = 0; i < params_.size(); ++i) {
      m_[i].setZero(params_[i]->rows(), params_[i]->cols());
      v_[i].setZero(params_[i]->rows(), params_[i]->cols());
    }
  }

  void step(double lr_factor = 1.0) {
    ++t_;
    const double lr = o_.lr * lr_factor;
    const T b1 = T(o_.beta1), b2 = T(o_.beta2);
    const T c1 = T(1 - std::pow(o_.beta1, double(t_))), c2 = T(1 - std::pow(o_.beta2, double(t_)));
    const T step = T(lr) / c1, eps = T(o_.eps), decay = T(1 - lr * o_.weight_decay);
    const T rc2 = T(1) / std::sqrt(c2);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto* p = params_[i];
      if (!p->trainable()) continue;
      if (p->grad().rows() != m_[i].rows() || p->grad().cols() != m_[i].cols())
        throw shape_error("deltaw::optim::adamw: parameter '" + p->name() + "' changed shape since the optimiser was built");
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

 private:
  std::vector<parameter<T>*> params_;
  adamw_options o_;
  std::vector<dense<T>> m_, v_;
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
