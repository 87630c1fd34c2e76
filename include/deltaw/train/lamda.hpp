// SPDX-License-Identifier: MIT
// LaMDA (Azizi et al. 2024, arXiv:2406.12832): the core low-rank form ΔW = s·B·R·A with
// A frozen, the small core R [r, r] trained throughout, and B trained at first and then
// frozen column by column on a schedule ("gradual freezing"), so that the trainable
// parameter count shrinks from out·r + r² towards r².
//
//   train::lamda_adapter<T>   a frozen W with a B·R·A adapter (autograd::adapted_linear
//                             over deltaw::core_lora: no dense ΔW is formed)
//   train::lamda_frozen_count the schedule: how many columns of B are frozen after t steps
//   train::lamda<T>           the freezing as a training method, for any B parameters
//
// Freezing is exact: once a column is frozen its gradient is zeroed in after_backward (so
// clipping and the optimiser see none) and after every optimiser step its values are
// restored from the copy taken when it froze, so neither momentum nor decoupled weight
// decay can move it by a single bit. When every column of a B is frozen, B is marked
// non-trainable and the autograd stops computing its gradient.
//
// UNVERIFIED, as options (lamda_options): the shape of the schedule (reference default:
// geometric, freezing the fraction η = 0.3 of the still-trainable columns at each event,
// η taken from the reference code's "rate"; linear and cubic ramps are offered), the part
// of training over which it runs (default: from the start to 80% of the steps), the
// order in which columns freeze (default: leading columns first, i.e. column 0 first —
// with an SVD init these carry the largest singular values), and the init (the paper's
// SVD-based init of A and B is not reproduced here: A is U(±1/√in) and frozen, R = I,
// B = 0, so the layer starts equal to the frozen one; set the values to use another).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../autograd/adapters.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

enum class lamda_shape {
  geometric,  ///< events at regular intervals, each freezing ⌊rate·(trainable)⌋-ish (see lamda_frozen_count)
  linear,     ///< frozen count grows linearly from start to end
  cubic,      ///< frozen = (r − min)·(1 − (1 − p)³): fast at first, slow at the end
};
enum class lamda_order {
  leading_first,   ///< column 0 freezes first
  trailing_first,  ///< column r − 1 freezes first
};

struct lamda_options {
  lamda_shape shape = lamda_shape::geometric;
  /// Geometric: after event k, ⌊r·(1 − rate)ᵏ⌋ columns stay trainable (reference η = 0.3).
  double rate = 0.3;
  /// Fractions of the total steps where the schedule starts and where it is complete.
  double start = 0.0;
  double end = 0.8;
  /// Columns never frozen (0: B ends fully frozen).
  index_t min_trainable = 0;
  lamda_order order = lamda_order::leading_first;
  /// The run's length when fit does not know it (step_context::total_steps = 0).
  index_t total_steps = 0;
};

namespace detail {
inline void check_lamda_options(const lamda_options& o, const char* op) {
  if (!(o.start >= 0 && o.start <= o.end && o.end <= 1))
    throw argument_error(std::string(op) + ": need 0 ≤ start ≤ end ≤ 1; got start " + std::to_string(o.start) +
                         ", end " + std::to_string(o.end));
  if (o.shape == lamda_shape::geometric && !(o.rate > 0 && o.rate < 1))
    throw argument_error(std::string(op) + ": the geometric rate must lie in (0, 1); got " + std::to_string(o.rate));
  if (o.min_trainable < 0) throw argument_error(std::string(op) + ": min_trainable must be ≥ 0");
  if (o.total_steps < 0) throw argument_error(std::string(op) + ": total_steps must be ≥ 0");
}
}  // namespace detail

/// The number of B's r columns frozen once `done` of `total` steps have been taken.
/// Non-decreasing in `done`; 0 before start·total; r − min_trainable from end·total on.
inline index_t lamda_frozen_count(const lamda_options& o, index_t r, index_t done, index_t total) {
  detail::check_lamda_options(o, "deltaw::train::lamda_frozen_count");
  if (r < 1 || total < 1)
    throw argument_error("deltaw::train::lamda_frozen_count: need r ≥ 1 and total ≥ 1; got r " + std::to_string(r) +
                         ", total " + std::to_string(total));
  const index_t keep = std::min(o.min_trainable, r);
  const index_t most = r - keep;
  if (most == 0) return 0;
  const double t0 = o.start * double(total), t1 = o.end * double(total);
  const double t = double(done);
  if (t < t0) return 0;
  if (t >= t1) return most;
  const double p = t1 > t0 ? (t - t0) / (t1 - t0) : 1.0;
  switch (o.shape) {
    case lamda_shape::linear: return std::min(most, index_t(std::floor(double(most) * p)));
    case lamda_shape::cubic: return std::min(most, index_t(std::floor(double(most) * (1 - std::pow(1 - p, 3)))));
    case lamda_shape::geometric: {
      // K events evenly spaced in (t0, t1]; after event k, ⌊r·(1 − rate)ᵏ⌋ stay trainable.
      index_t K = 1;
      while (index_t(std::floor(double(r) * std::pow(1 - o.rate, double(K)))) > keep && K < 64) ++K;
      const index_t k = std::min(K, index_t(std::floor(p * double(K))));
      if (k >= K) return most;
      const index_t trainable = std::max(keep, index_t(std::floor(double(r) * std::pow(1 - o.rate, double(k)))));
      return r - trainable;
    }
  }
  return 0;
}

/// A frozen W [out, in] with a LaMDA adapter s·B·R·A: A [r, in] frozen, R [r, r], B [out, r].
template <class T>
class lamda_adapter {
 public:
  lamda_adapter(std::string name, matrix_view<const T> W, index_t r, double alpha, std::mt19937_64& g)
      : name_(std::move(name)), W_(W) {
    if (r < 1) throw rank_error("deltaw::train::lamda_adapter(" + name_ + "): the rank must be at least 1");
    if (!std::isfinite(alpha)) throw non_finite_error("deltaw::train::lamda_adapter(" + name_ + "): alpha must be finite");
    s_ = alpha / double(r);
    const index_t out = W.rows(), in = W.cols();
    std::uniform_real_distribution<double> u(-1 / std::sqrt(double(in)), 1 / std::sqrt(double(in)));
    dense<T> A(r, in);
    for (index_t i = 0; i < A.size(); ++i) A.data()[i] = T(u(g));
    B_ = std::make_unique<autograd::parameter<T>>(name_ + ".lamda_B", dense<T>::Zero(out, r));
    R_ = std::make_unique<autograd::parameter<T>>(name_ + ".lamda_R", dense<T>::Identity(r, r));
    A_ = std::make_unique<autograd::parameter<T>>(name_ + ".lamda_A", std::move(A));
    A_->set_trainable(false);
  }

  /// x·(W + s·B·R·A)ᵀ on x's tape.
  autograd::var<T> forward(const autograd::var<T>& x) const {
    auto& t = autograd::detail::tape_of(x, "lamda_adapter");
    const core_trainable tr{B_->trainable(), R_->trainable(), A_->trainable()};
    const double s = s_;
    return autograd::adapted_linear<T, 3>(
        x, W_, {t.param(*B_), t.param(*R_), t.param(*A_)},
        [s, tr](const auto& v) { return deltaw::core_lora(v[0], v[1], v[2], deltaw::scale(s), tr); },
        "lamda_adapter");
  }

  autograd::parameter<T>& B() { return *B_; }
  autograd::parameter<T>& R() { return *R_; }
  autograd::parameter<T>& A() { return *A_; }
  double scale() const { return s_; }
  index_t rank() const { return R_->rows(); }
  const std::string& name() const { return name_; }
  matrix_view<const T> weight() const { return W_; }
  /// The parameters an optimiser should hold: B and R (A is frozen).
  std::vector<autograd::parameter<T>*> parameters() { return {B_.get(), R_.get()}; }

 private:
  std::string name_;
  matrix_view<const T> W_;
  double s_ = 1;
  std::unique_ptr<autograd::parameter<T>> B_, R_, A_;
};

/// Gradual freezing of the columns of registered B parameters (any [out, r] parameter
/// whose columns are rank components: LaMDA's B, or a LoRA B).
template <class T>
class lamda : public method<T> {
 public:
  explicit lamda(lamda_options o = {}) : o_(o) { detail::check_lamda_options(o, "deltaw::train::lamda"); }
  std::string name() const override { return "LaMDA"; }

  /// Registers a B [out, r]; returns its index.
  index_t add(autograd::parameter<T>* B) {
    if (B == nullptr) throw argument_error("deltaw::train::lamda::add: null parameter");
    entry e;
    e.B = B;
    e.freeze_step.assign(std::size_t(B->cols()), -1);
    e.snapshot = B->value();
    bs_.push_back(std::move(e));
    return index_t(bs_.size()) - 1;
  }
  index_t add(lamda_adapter<T>& a) { return add(&a.B()); }

  /// Column c of B i is frozen.
  bool frozen(index_t i, index_t c) const { return freeze_step(i, c) >= 0; }
  /// The number of steps taken when column c of B i froze; −1 while it trains.
  index_t freeze_step(index_t i, index_t c) const {
    const auto& e = at(i, "freeze_step");
    if (c < 0 || c >= index_t(e.freeze_step.size()))
      throw argument_error("deltaw::train::lamda::freeze_step: column " + std::to_string(c) + " of " +
                           std::to_string(e.freeze_step.size()));
    return e.freeze_step[std::size_t(c)];
  }
  index_t frozen_count(index_t i) const {
    const auto& e = at(i, "frozen_count");
    return index_t(std::count_if(e.freeze_step.begin(), e.freeze_step.end(), [](index_t s) { return s >= 0; }));
  }
  const lamda_options& options() const { return o_; }

  void after_backward(const step_context&) override {
    for (auto& e : bs_) {
      if (!e.B->trainable() || e.B->grad().size() == 0) continue;
      for (std::size_t c = 0; c < e.freeze_step.size(); ++c)
        if (e.freeze_step[c] >= 0) e.B->grad().col(index_t(c)).setZero();
    }
  }

  void after_step(const step_context& ctx) override {
    const index_t total = o_.total_steps > 0 ? o_.total_steps : ctx.total_steps;
    if (total <= 0)
      throw argument_error("deltaw::train::lamda: the run's length is unknown; set lamda_options::total_steps");
    const index_t done = ctx.step + 1;
    for (auto& e : bs_) {
      auto& V = e.B->value();
      const index_t r = V.cols();
      if (index_t(e.freeze_step.size()) != r)
        throw shape_error("deltaw::train::lamda: B '" + e.B->name() + "' changed from " +
                          std::to_string(e.freeze_step.size()) + " to " + std::to_string(r) + " columns");
      // Undo whatever the optimiser did to frozen columns (momentum, weight decay).
      for (index_t c = 0; c < r; ++c)
        if (e.freeze_step[std::size_t(c)] >= 0) V.col(c) = e.snapshot.col(c);
      const index_t want = lamda_frozen_count(o_, r, done, total);
      index_t have = 0;
      for (auto s : e.freeze_step) have += s >= 0 ? 1 : 0;
      for (index_t k = 0; k < r && have < want; ++k) {
        const index_t c = o_.order == lamda_order::leading_first ? k : r - 1 - k;
        if (e.freeze_step[std::size_t(c)] >= 0) continue;
        e.freeze_step[std::size_t(c)] = done;
        e.snapshot.col(c) = V.col(c);
        ++have;
      }
      if (have == r) e.B->set_trainable(false);
    }
  }

 private:
  struct entry {
    autograd::parameter<T>* B = nullptr;
    std::vector<index_t> freeze_step;
    dense<T> snapshot;  // the frozen columns' values (other columns unused)
  };
  const entry& at(index_t i, const char* op) const {
    if (i < 0 || i >= index_t(bs_.size()))
      throw argument_error(std::string("deltaw::train::lamda::") + op + ": B " + std::to_string(i) + " of " +
                           std::to_string(bs_.size()));
    return bs_[std::size_t(i)];
  }

  lamda_options o_;
  std::vector<entry> bs_;
};

}  // namespace train
DELTAW_NAMESPACE_END
