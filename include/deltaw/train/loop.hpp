// SPDX-License-Identifier: MIT
// The training loop: a loss function (the model and the data source together), an
// optimiser and any number of methods (train/method.hpp), with a progress line.
//
//   train::fit_options o;  o.steps = 300;  o.log_every = 25;  o.target_loss = 0.5;
//   auto r = train::fit<float>(
//       [&](autograd::tape<float>& t, index_t step) { auto b = data(step); return loss(model(t, b)); },
//       opt, {&lora_fa}, o);
//   // r.final_loss, r.steps_to_target, r.seconds, r.losses
//
// The optimiser is any type with step(double lr_factor), zero_grad() and parameters()
// (optim::adamw, optim::sgd, or a method's own). The loss printed and compared with the
// target is an exponential moving average of the per-step loss (smoothing 0 turns it
// off), so that one lucky batch does not count as reaching the target.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "../optim/optim.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

struct fit_options {
  index_t steps = 100;
  /// The learning-rate factor per step (e.g. optim::warmup_cosine); constant 1 when empty.
  std::function<double(index_t)> schedule;
  /// Clip the global gradient norm to this value; 0 disables clipping.
  double clip_norm = 0;
  /// Progress line every log_every steps (and at the last step); 0 silences the loop.
  index_t log_every = 10;
  /// Tokens (or samples) per step, for the throughput in the progress line.
  index_t tokens_per_step = 0;
  /// The smoothed loss to reach; NaN disables the target.
  double target_loss = std::numeric_limits<double>::quiet_NaN();
  bool stop_at_target = false;
  /// EMA weight of the previous smoothed loss, in [0, 1).
  double smoothing = 0.9;
  /// Prefix of the progress line (e.g. the method's name).
  std::string label;
  std::FILE* out = stdout;
};

struct fit_result {
  index_t steps_run = 0;
  /// First step (1-based count of steps taken) at which the smoothed loss reached the
  /// target; −1 if it never did.
  index_t steps_to_target = -1;
  double first_loss = std::numeric_limits<double>::quiet_NaN();
  double final_loss = std::numeric_limits<double>::quiet_NaN();       // last step's loss
  double final_smoothed = std::numeric_limits<double>::quiet_NaN();   // its moving average
  double seconds = 0;
  std::vector<double> losses;
};

namespace detail {
inline void check_fit_options(const fit_options& o) {
  if (o.steps < 0) throw argument_error("deltaw::train::fit: steps must be ≥ 0; got " + std::to_string(o.steps));
  if (!(o.smoothing >= 0 && o.smoothing < 1))
    throw argument_error("deltaw::train::fit: smoothing must lie in [0, 1); got " + std::to_string(o.smoothing));
  if (!(o.clip_norm >= 0) || !std::isfinite(o.clip_norm))
    throw argument_error("deltaw::train::fit: clip_norm must be finite and ≥ 0; got " + std::to_string(o.clip_norm));
  if (o.log_every < 0) throw argument_error("deltaw::train::fit: log_every must be ≥ 0");
}
}  // namespace detail

/// Runs o.steps optimisation steps. loss_fn(tape&, step) builds the scalar loss of one
/// batch on the tape it is given. Throws non_finite_error, naming the step, when the
/// loss stops being finite.
template <class T, class LossFn, class Optimiser>
fit_result fit(LossFn&& loss_fn, Optimiser& opt, const std::vector<method<T>*>& methods, const fit_options& o) {
  detail::check_fit_options(o);
  for (auto* m : methods)
    if (m == nullptr) throw argument_error("deltaw::train::fit: null method");
  fit_result r;
  r.losses.reserve(std::size_t(o.steps));
  const auto t0 = std::chrono::steady_clock::now();
  auto window = t0;
  index_t window_steps = 0;
  double smoothed = std::numeric_limits<double>::quiet_NaN();
  for (index_t step = 0; step < o.steps; ++step) {
    step_context ctx;
    ctx.step = step;
    ctx.total_steps = o.steps;
    ctx.lr_factor = o.schedule ? o.schedule(step) : 1.0;
    for (auto* m : methods) m->before_forward(ctx);
    autograd::tape<T> t;
    t.set_release_values(true);  // activations die as the backward sweep passes them
    autograd::var<T> loss = loss_fn(t, step);
    ctx.loss = double(loss.value()(0, 0));
    if (!std::isfinite(ctx.loss))
      throw non_finite_error("deltaw::train::fit: the loss is not finite at step " + std::to_string(step) +
                             (o.label.empty() ? "" : " (" + o.label + ")"));
    for (auto* m : methods) loss = m->add_to_loss(ctx, t, loss);
    t.backward(loss);
    for (auto* m : methods) m->after_backward(ctx);
    double gnorm = std::numeric_limits<double>::quiet_NaN();
    if (o.clip_norm > 0) gnorm = optim::clip_grad_norm(opt.parameters(), o.clip_norm);
    opt.step(ctx.lr_factor);
    opt.zero_grad();
    for (auto* m : methods) m->after_step(ctx);

    r.losses.push_back(ctx.loss);
    if (step == 0) r.first_loss = ctx.loss;
    smoothed = step == 0 ? ctx.loss : o.smoothing * smoothed + (1 - o.smoothing) * ctx.loss;
    r.steps_run = step + 1;
    ++window_steps;
    const bool reached = std::isfinite(o.target_loss) && smoothed <= o.target_loss && r.steps_to_target < 0;
    if (reached) r.steps_to_target = step + 1;
    const bool last = step + 1 == o.steps || (reached && o.stop_at_target);
    if (o.out && o.log_every > 0 && ((step + 1) % o.log_every == 0 || last || step == 0)) {
      const auto now = std::chrono::steady_clock::now();
      const double sec = std::chrono::duration<double>(now - window).count();
      std::fprintf(o.out, "%s%sstep %5td  loss %.4f  (avg %.4f)", o.label.c_str(), o.label.empty() ? "" : "  ",
                   step + 1, ctx.loss, smoothed);
      if (std::isfinite(gnorm)) std::fprintf(o.out, "  |grad| %.3f", gnorm);
      if (o.tokens_per_step > 0 && sec > 0)
        std::fprintf(o.out, "  %8.0f tokens/s", double(o.tokens_per_step * window_steps) / sec);
      std::fprintf(o.out, "\n");
      std::fflush(o.out);
      window = now;
      window_steps = 0;
    }
    if (reached && o.stop_at_target) break;
  }
  r.final_loss = r.losses.empty() ? r.final_loss : r.losses.back();
  r.final_smoothed = smoothed;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace train
DELTAW_NAMESPACE_END
