// SPDX-License-Identifier: MIT
// A training method (LoRA+, LoRA-FA, ALLoRA, LoRA-Pro, Flat-LoRA, LISA, …) as a set of
// hooks around one optimisation step. train::fit (train/loop.hpp) calls them in this
// order for every step:
//
//   before_forward(ctx)             perturb weights (Flat-LoRA), choose layers (LISA)
//   loss = loss_fn(tape, step)
//   loss = add_to_loss(ctx, tape, loss)   regularisers on the tape (O3)
//   tape.backward(loss)
//   after_backward(ctx)             remove perturbations, rewrite gradients (LoRA-FA,
//                                   LoRA-Pro, ALLoRA), read them (IncreLoRA scores)
//   clip, optimiser step, zero_grad
//   after_step(ctx)                 structural changes (LaMDA freezing, IncreLoRA growth)
//
// Methods that need no hook leave it as the default (nothing). A method holds pointers
// to the layers and parameters it acts on; it does not own them.
#pragma once

#include <limits>
#include <string>

#include "../autograd/tape.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

/// What a hook may read about the step in progress.
struct step_context {
  index_t step = 0;          // 0-based
  index_t total_steps = 0;   // as configured in fit_options (0 when unknown)
  double lr_factor = 1.0;    // the schedule's factor for this step
  double loss = std::numeric_limits<double>::quiet_NaN();  // set after the forward pass
};

template <class T>
class method {
 public:
  virtual ~method() = default;
  virtual std::string name() const = 0;
  virtual void before_forward(const step_context&) {}
  virtual autograd::var<T> add_to_loss(const step_context&, autograd::tape<T>&, const autograd::var<T>& loss) {
    return loss;
  }
  virtual void after_backward(const step_context&) {}
  virtual void after_step(const step_context&) {}
};

}  // namespace train
DELTAW_NAMESPACE_END
