// SPDX-License-Identifier: MIT
// O3-style orthogonal LoRA for sequential tasks: while training the adapter of the current
// task, penalise the overlap of its down-projection A_cur [r, in] with the frozen A's of
// the previous tasks,
//
//   R(A_cur) = λ · Σ_prev ‖A_prev · A_curᵀ‖_F²        (A only; λ = 0.1 by default)
//
// so that the new task's input subspace stays orthogonal to the earlier ones.
//
//   o3_penalty(A_cur, {A_prev...}, λ)   the regulariser as a tape op (value and VJP)
//   train::o3<T>                        a method: add_to_loss adds the penalty of every
//                                       registered module; finish_task() freezes the
//                                       current A's into the "previous" set
//
// The gradient is dR/dA_cur = 2λ · Σ_prev (A_prev·A_curᵀ)ᵀ·A_prev: r_prev × r × in work per
// previous adapter, nothing of size out × in. UNVERIFIED details, as options: whether the
// per-module penalties are summed (default) or averaged over the modules
// (o3_options::mean_over_modules), and whether the penalty is applied to B as well (not
// offered: the method's description says A only).
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "../autograd/ops.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace autograd {

/// λ·Σ_prev ‖A_prev·A_curᵀ‖_F² as a [1, 1] variable. A_prev are frozen views
/// [r_prev, in] (never copied: the caller keeps them alive until backward has run).
template <class T>
var<T> o3_penalty(const var<T>& A_cur, const std::vector<matrix_view<const T>>& prev, double weight = 0.1) {
  constexpr const char* op = "o3_penalty";
  auto& t = detail::tape_of(A_cur, op);
  if (!std::isfinite(weight))
    throw non_finite_error("deltaw::autograd::o3_penalty: the weight must be finite; got " + std::to_string(weight));
  const index_t in = A_cur.cols();
  for (std::size_t k = 0; k < prev.size(); ++k)
    if (prev[k].cols() != in)
      throw shape_error("deltaw::autograd::o3_penalty: A_cur is " + detail::shape_of(A_cur.rows(), in) +
                        " but previous adapter " + std::to_string(k) + " has A " +
                        detail::shape_of(prev[k].rows(), prev[k].cols()) + "; both need " + std::to_string(in) +
                        " columns");
  std::vector<dense<T>> scratch(prev.size());
  double v = 0;
  for (std::size_t k = 0; k < prev.size(); ++k) {
    const auto P = detail::map_view(prev[k], scratch[k]);
    const dense<T> M = P * A_cur.value().transpose();  // [r_prev, r]
    v += double(M.squaredNorm());
  }
  dense<T> y(1, 1);
  y(0, 0) = T(weight * v);
  const index_t ia = A_cur.id();
  return t.record("o3_penalty", std::move(y), t.requires_grad(A_cur) && !prev.empty(),
                  [ia, prev, weight](tape<T>& t, index_t self) {
                    const T g = T(2 * weight) * t.upstream(self)(0, 0);
                    const auto A = t.value_at(ia);
                    dense<T> dA = dense<T>::Zero(A.rows(), A.cols());
                    dense<T> scratch;
                    for (const auto& pv : prev) {
                      const auto P = detail::map_view(pv, scratch);
                      const dense<T> M = P * A.transpose();
                      dA.noalias() += M.transpose() * P;
                    }
                    detail::accumulate(t, ia, g * dA);
                  },
                  /*backward_reads_output=*/false);
}

}  // namespace autograd

namespace train {

struct o3_options {
  /// λ, the regulariser's weight (reference default 0.1).
  double weight = 0.1;
  /// Divide the summed penalty by the number of modules (UNVERIFIED; off = plain sum).
  bool mean_over_modules = false;
};

/// The O3 regulariser as a training method. Register each adapted module's current A
/// (a parameter) with add_module; after a task, finish_task() copies every current A into
/// that module's frozen "previous" list (the caller then re-initialises A and B for the
/// next task). Modules with no previous adapter contribute nothing.
template <class T>
class o3 : public method<T> {
 public:
  explicit o3(o3_options o = {}) : o_(o) {
    if (!std::isfinite(o.weight) || o.weight < 0)
      throw argument_error("deltaw::train::o3: the weight must be finite and ≥ 0; got " + std::to_string(o.weight));
  }
  std::string name() const override { return "O3"; }

  /// Registers a module by its current A [r, in]; returns the module's index.
  index_t add_module(autograd::parameter<T>* A_cur) {
    if (A_cur == nullptr) throw argument_error("deltaw::train::o3::add_module: null parameter");
    modules_.push_back({A_cur, {}});
    return index_t(modules_.size()) - 1;
  }
  /// Adds a frozen previous A for module i (copied; its columns must match A_cur's).
  void add_previous(index_t i, dense<T> A_prev) {
    auto& m = module_at(i, "add_previous");
    if (A_prev.cols() != m.current->cols())
      throw shape_error("deltaw::train::o3::add_previous: module " + std::to_string(i) + " has A " +
                        deltaw::detail::shape_str(m.current->rows(), m.current->cols()) + " but the previous A is " +
                        deltaw::detail::shape_str(A_prev.rows(), A_prev.cols()));
    m.previous.push_back(std::move(A_prev));
  }
  /// Freezes every module's current A into its previous list (end of a task).
  void finish_task() {
    for (auto& m : modules_) m.previous.push_back(m.current->value());
  }
  index_t module_count() const { return index_t(modules_.size()); }
  const std::vector<dense<T>>& previous(index_t i) const { return module_at(i, "previous").previous; }

  /// The regulariser of all modules on tape t (what add_to_loss adds).
  autograd::var<T> penalty(autograd::tape<T>& t) const {
    const double w = o_.weight / (o_.mean_over_modules && !modules_.empty() ? double(modules_.size()) : 1.0);
    autograd::var<T> total;
    bool any = false;
    for (const auto& m : modules_) {
      if (m.previous.empty()) continue;
      std::vector<matrix_view<const T>> prev;
      prev.reserve(m.previous.size());
      for (const auto& p : m.previous) prev.push_back(deltaw::view(p));
      auto r = autograd::o3_penalty(t.param(*m.current), prev, w);
      total = any ? autograd::add(total, r) : r;
      any = true;
    }
    if (!any) {
      dense<T> z = dense<T>::Zero(1, 1);
      return t.record("o3_penalty (no previous adapters)", std::move(z), false);
    }
    return total;
  }

  autograd::var<T> add_to_loss(const step_context&, autograd::tape<T>& t, const autograd::var<T>& loss) override {
    bool any = false;
    for (const auto& m : modules_) any = any || !m.previous.empty();
    if (!any || o_.weight == 0) return loss;
    return autograd::add(loss, penalty(t));
  }

 private:
  struct module {
    autograd::parameter<T>* current;
    std::vector<dense<T>> previous;
  };
  const module& module_at(index_t i, const char* op) const {
    if (i < 0 || i >= index_t(modules_.size()))
      throw argument_error(std::string("deltaw::train::o3::") + op + ": module " + std::to_string(i) + " of " +
                           std::to_string(modules_.size()));
    return modules_[std::size_t(i)];
  }
  module& module_at(index_t i, const char* op) { return const_cast<module&>(std::as_const(*this).module_at(i, op)); }

  o3_options o_;
  std::vector<module> modules_;
};

}  // namespace train
DELTAW_NAMESPACE_END
