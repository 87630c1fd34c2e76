// SPDX-License-Identifier: MIT
// AdaLoRA's importance-based rank allocation (Zhang et al. 2023; PEFT 0.21's RankAllocator
// and AdaLoraModel.update_and_allocate / forward), for adapters ΔW = s·B·diag(E)·A
// (expr/adalora.hpp) whose factors are autograd parameters.
//
//   sensitivity     I(p) = |p ⊙ ∂L/∂p|          (element-wise, every entry of A, E, B)
//   smoothing       Ī ← β₁·Ī + (1 − β₁)·I,   Ū ← β₂·Ū + (1 − β₂)·|I − Ī|   (Ī the updated one)
//   triplet score   S_i = Ī·Ū(E_i) + mean_j Ī·Ū(A_ij) + mean_o Ī·Ū(B_oi)
//   budget          b(t) = b₀ for t ≤ tinit; b_T for t > T − tfinal; else
//                   ⌊(b₀ − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋, masking when
//                   t mod deltaT = 0 (b₀ = Σ init ranks, b_T = target_r × modules)
//   masking         the k = b₀ − b(t) smallest scores give the threshold; every triplet whose
//                   score is ≤ it gets E_i = 0 (ties prune together, as torch.kthvalue + ≤)
//   regulariser     orth_reg_weight · mean over the A's and B's of ‖A·Aᵀ − I‖_F, ‖Bᵀ·B − I‖_F
//
// Hooks (train/method.hpp), mirroring PEFT's documented loop (backward, optimiser step,
// update_and_allocate(step), zero_grad): after_backward keeps a copy of the gradients;
// after_step, with the parameters already updated, computes I = |p_new ⊙ grad| as PEFT does,
// then: for t < T − tfinal update the EMAs and mask when the schedule says so; at
// t = T − tfinal mask to b_T, record the final rank pattern and forget the EMAs; after that
// re-apply the final mask every step (PEFT's mask_using_rank_pattern). add_to_loss adds the
// orthogonality regulariser. Steps are the 0-based step_context::step.
//
// Pruned triplets stay in the tensors with E_i = 0 during training (as in PEFT);
// rank_pattern() gives the masks to write with io::peft_structured_adapter::add_adalora
// (which keeps only the true ones, as PEFT's save does).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "../autograd/ops.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace autograd {

/// weight · mean over the matrices of ‖M − I‖_F, M = P·Pᵀ for each `rows` factor (A [r, in])
/// and Pᵀ·P for each `cols` factor (B [out, r]), as a [1, 1] variable (AdaLoRA's
/// orthogonality regulariser). d‖M − I‖/dA = 2·(A·Aᵀ − I)·A / ‖·‖, d/dB = 2·B·(BᵀB − I) / ‖·‖
/// (0 where the norm is 0).
template <class T>
var<T> adalora_orth_penalty(const std::vector<var<T>>& rows, const std::vector<var<T>>& cols, double weight) {
  if (rows.empty() && cols.empty())
    throw argument_error("deltaw::autograd::adalora_orth_penalty: no factors");
  auto& t = detail::tape_of(rows.empty() ? cols.front() : rows.front(), "adalora_orth_penalty");
  const double n = double(rows.size() + cols.size());
  double v = 0;
  bool grad = false;
  auto norm_of = [](const dense<T>& M) {
    dense<T> D = M;
    D.diagonal().array() -= T(1);
    return std::pair<dense<T>, double>(D, std::sqrt(double(D.squaredNorm())));
  };
  for (const auto& a : rows) {
    v += norm_of(dense<T>(a.value() * a.value().transpose())).second;
    grad = grad || t.requires_grad(a);
  }
  for (const auto& b : cols) {
    v += norm_of(dense<T>(b.value().transpose() * b.value())).second;
    grad = grad || t.requires_grad(b);
  }
  dense<T> y(1, 1);
  y(0, 0) = T(weight * v / n);
  std::vector<index_t> ir, ic;
  for (const auto& a : rows) ir.push_back(a.id());
  for (const auto& b : cols) ic.push_back(b.id());
  return t.record("adalora_orth_penalty", std::move(y), grad,
                  [ir, ic, weight, n, norm_of](tape<T>& t, index_t self) {
                    const double g = weight / n * double(t.upstream(self)(0, 0));
                    for (index_t id : ir) {
                      const dense<T> A = t.value_at(id);
                      const auto [D, nrm] = norm_of(dense<T>(A * A.transpose()));
                      if (nrm > 0) detail::accumulate(t, id, dense<T>(T(2 * g / nrm) * (D * A)));
                    }
                    for (index_t id : ic) {
                      const dense<T> B = t.value_at(id);
                      const auto [D, nrm] = norm_of(dense<T>(B.transpose() * B));
                      if (nrm > 0) detail::accumulate(t, id, dense<T>(T(2 * g / nrm) * (B * D)));
                    }
                  },
                  /*backward_reads_output=*/false);
}

}  // namespace autograd

namespace train {

/// AdaLoraConfig's schedule fields (PEFT's defaults; total_step is required).
struct adalora_options {
  index_t target_r = 8;  ///< average rank per module at the end
  index_t tinit = 0, tfinal = 0, deltaT = 1;
  index_t total_step = 0;
  double beta1 = 0.85, beta2 = 0.85;
  double orth_reg_weight = 0.5;
};

/// PEFT's budget_schedule: the budget at `step` and whether to mask then.
inline std::pair<index_t, bool> adalora_budget(const adalora_options& o, index_t init_budget, index_t target_budget,
                                               index_t step) {
  if (step <= o.tinit) return {init_budget, false};
  if (step > o.total_step - o.tfinal) return {target_budget, true};
  const double mul = 1.0 - double(step - o.tinit) / double(o.total_step - o.tfinal - o.tinit);
  const auto b = index_t(std::floor(double(init_budget - target_budget) * mul * mul * mul + double(target_budget)));
  return {b, step % o.deltaT == 0};
}

template <class T>
class adalora : public method<T> {
 public:
  explicit adalora(adalora_options o) : o_(o) {
    constexpr const char* op = "deltaw::train::adalora";
    if (o.total_step < 1) throw argument_error(std::string(op) + ": total_step must be ≥ 1 (as AdaLoraConfig requires)");
    if (o.tinit >= o.total_step - o.tfinal)
      throw argument_error(std::string(op) + ": tinit = " + std::to_string(o.tinit) + " leaves no budgeting phase before " +
                           "total_step − tfinal = " + std::to_string(o.total_step - o.tfinal));
    if (o.deltaT < 1 || o.target_r < 0) throw argument_error(std::string(op) + ": deltaT must be ≥ 1 and target_r ≥ 0");
    if (!(o.beta1 > 0 && o.beta1 < 1) || !(o.beta2 > 0 && o.beta2 < 1))
      throw argument_error(std::string(op) + ": beta1 and beta2 must lie in (0, 1)");
    if (!(o.orth_reg_weight >= 0)) throw argument_error(std::string(op) + ": orth_reg_weight must be ≥ 0");
  }
  std::string name() const override { return "AdaLoRA"; }

  /// Registers one adapted layer by its parameters A [r, in], E [r, 1] (or [1, r]), B [out, r].
  index_t add(std::string name, autograd::parameter<T>* A, autograd::parameter<T>* E, autograd::parameter<T>* B) {
    constexpr const char* op = "deltaw::train::adalora::add";
    if (!A || !E || !B) throw argument_error(std::string(op) + ": null parameter");
    const index_t r = A->rows();
    if (B->cols() != r || E->size() != r || (E->rows() != 1 && E->cols() != 1))
      throw shape_error(std::string(op) + ": \"" + name + "\" has A " + deltaw::detail::shape_str(A->rows(), A->cols()) +
                        ", E " + deltaw::detail::shape_str(E->rows(), E->cols()) + ", B " +
                        deltaw::detail::shape_str(B->rows(), B->cols()) + "; they must share r");
    module m;
    m.name = std::move(name);
    m.p = {A, E, B};
    m.mask.assign(std::size_t(r), true);
    mods_.push_back(std::move(m));
    init_budget_ += r;
    return index_t(mods_.size()) - 1;
  }

  index_t init_budget() const { return init_budget_; }
  index_t target_budget() const { return o_.target_r * index_t(mods_.size()); }
  std::pair<index_t, bool> budget(index_t step) const { return adalora_budget(o_, init_budget_, target_budget(), step); }
  /// Module i's current mask over its triplets (true: kept).
  const std::vector<bool>& mask(index_t i) const { return mods_.at(std::size_t(i)).mask; }
  /// Module i's triplet scores S (as of the last update).
  std::vector<double> scores(index_t i) const { return triplet_scores(mods_.at(std::size_t(i))); }
  /// name + ".lora_E" → mask, as PEFT records rank_pattern (empty before the first masking).
  std::vector<std::pair<std::string, std::vector<bool>>> rank_pattern() const {
    std::vector<std::pair<std::string, std::vector<bool>>> out;
    if (!masked_) return out;
    for (const auto& m : mods_) out.emplace_back(m.name + ".lora_E", m.mask);
    return out;
  }
  index_t kept(index_t i) const {
    const auto& m = mask(i);
    return index_t(std::count(m.begin(), m.end(), true));
  }

  autograd::var<T> add_to_loss(const step_context&, autograd::tape<T>& t, const autograd::var<T>& loss) override {
    if (o_.orth_reg_weight == 0 || mods_.empty()) return loss;
    std::vector<autograd::var<T>> rows, cols;
    for (auto& m : mods_) {
      rows.push_back(t.param(*m.p[0]));
      cols.push_back(t.param(*m.p[2]));
    }
    return autograd::add(loss, autograd::adalora_orth_penalty(rows, cols, o_.orth_reg_weight));
  }
  void after_backward(const step_context&) override {
    for (auto& m : mods_)
      for (std::size_t k = 0; k < 3; ++k) m.grad[k] = m.p[k]->grad();
  }
  void after_step(const step_context& c) override {
    const index_t T_end = o_.total_step - o_.tfinal;
    if (c.step < T_end) {
      update_importance();
      const auto [b, now] = budget(c.step);
      if (now) mask_to_budget(b);
    } else if (c.step == T_end) {
      mask_to_budget(target_budget());
      for (auto& m : mods_) m.ema_ipt = m.ema_unc = {};
    } else {
      apply_masks();
    }
  }

 private:
  struct module {
    std::string name;
    std::array<autograd::parameter<T>*, 3> p{};  // A, E, B
    std::array<dense<T>, 3> grad;
    std::array<dense<double>, 3> ema_ipt, ema_unc;
    std::vector<bool> mask;
  };

  void update_importance() {
    for (auto& m : mods_)
      for (std::size_t k = 0; k < 3; ++k) {
        const auto& v = m.p[k]->value();
        if (m.grad[k].size() != v.size()) continue;  // no backward seen yet
        if (m.ema_ipt[k].size() != v.size()) {
          m.ema_ipt[k] = dense<double>::Zero(v.rows(), v.cols());
          m.ema_unc[k] = dense<double>::Zero(v.rows(), v.cols());
        }
        const dense<double> ipt = (v.template cast<double>().array() * m.grad[k].template cast<double>().array()).abs().matrix();
        m.ema_ipt[k] = o_.beta1 * m.ema_ipt[k] + (1 - o_.beta1) * ipt;
        m.ema_unc[k] = o_.beta2 * m.ema_unc[k] + (1 - o_.beta2) * (ipt - m.ema_ipt[k]).cwiseAbs();
      }
  }
  std::vector<double> triplet_scores(const module& m) const {
    const index_t r = m.p[0]->rows();
    std::vector<double> s(std::size_t(r), 0.0);
    if (m.ema_ipt[0].size() == 0 || m.ema_ipt[1].size() == 0 || m.ema_ipt[2].size() == 0) return s;
    const dense<double> eA = m.ema_ipt[0].cwiseProduct(m.ema_unc[0]);
    const dense<double> eE = m.ema_ipt[1].cwiseProduct(m.ema_unc[1]);
    const dense<double> eB = m.ema_ipt[2].cwiseProduct(m.ema_unc[2]);
    for (index_t i = 0; i < r; ++i) {
      const double e = eE.rows() == 1 ? eE(0, i) : eE(i, 0);
      const double a = eA.cols() > 0 ? eA.row(i).mean() : 0.0;
      const double b = eB.rows() > 0 ? eB.col(i).mean() : 0.0;
      s[std::size_t(i)] = e + a + b;
    }
    return s;
  }
  void mask_to_budget(index_t budget) {
    std::vector<std::vector<double>> sc;
    std::vector<double> all;
    for (const auto& m : mods_) {
      sc.push_back(triplet_scores(m));
      all.insert(all.end(), sc.back().begin(), sc.back().end());
    }
    const index_t k = init_budget_ - budget;
    if (k >= 1 && k <= index_t(all.size())) {
      std::nth_element(all.begin(), all.begin() + (k - 1), all.end());
      const double threshold = all[std::size_t(k - 1)];
      for (std::size_t j = 0; j < mods_.size(); ++j)
        for (std::size_t i = 0; i < sc[j].size(); ++i) mods_[j].mask[i] = !(sc[j][i] <= threshold);
    } else {
      for (auto& m : mods_) std::fill(m.mask.begin(), m.mask.end(), true);
    }
    masked_ = true;
    apply_masks();
  }
  void apply_masks() {
    for (auto& m : mods_) {
      auto& E = m.p[1]->value();
      for (std::size_t i = 0; i < m.mask.size(); ++i)
        if (!m.mask[i]) (E.rows() == 1 ? E(0, index_t(i)) : E(index_t(i), 0)) = T(0);
    }
  }

  adalora_options o_;
  std::vector<module> mods_;
  index_t init_budget_ = 0;
  bool masked_ = false;
};

}  // namespace train
DELTAW_NAMESPACE_END
