// SPDX-License-Identifier: MIT
// Flat-LoRA (Li et al., "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape",
// ICML 2025) and LoRA-GGPO (Chang et al., "LoRA-GGPO: Mitigating Double Descent in LoRA
// Fine-Tuning via Gradient-Guided Perturbation Optimization", 2025): a random perturbation
// of the merged weight W' = W + s·B·A around each step, so that the adapter is trained on
// the expected loss over a neighbourhood of W' in the full weight space.
//
//   before_forward   ε_ij ~ N(0, σ_i²), σ_i = c(t)·ρ/√n·‖W'_i‖ (row norm, n = in
//                    features), c(t) = (1 − cos(π·t/T))/2; W ← W + ε. Perturbing W
//                    perturbs W' by the same ε (the adapter still adds s·B·A).
//   after_backward   W ← W − ε and W is exactly what it was before, bit for bit.
//
// ε is never stored: entry (i, j) is σ_i·z with z the Philox normal of stream
// (seed, step·2¹⁶ + target) at element i·n + j, regenerated when the perturbation is
// removed; only σ_i (one double per row) is kept across the step.
//
// Exact removal. fl(fl(w + e) − e) is not always w (when |e| ≫ |w|, or when w + e moves
// to another binade, bits of w are lost), so subtraction alone is not exact. Two schemes:
//   restore_mode::patch (default)  while perturbing, compute r = fl(w' − e) exactly as the
//       removal will, and keep (column, w) for the entries where r ≠ w bit for bit; the
//       removal subtracts e everywhere and writes those entries back. Per row, when the
//       patches would cost more than the row (4 + sizeof(T) bytes a patch), the whole
//       original row is kept instead. Memory ≤ the save scheme's + 8 bytes a row; with
//       ρ = 0.05 about 12% of float entries need a patch, ≈ 1 byte an entry in all
//       (the test prints the figures).
//   restore_mode::save             copy the touched rows (all of them) before perturbing
//       and copy them back: out·in·sizeof(T) bytes per target, a second copy of W.
// Both are exact because the removal's subtraction is the same IEEE operation on the
// same two stored operands (e is written to a buffer by a non-inlined function, so no
// multiply-add contraction can differ between the two places).
//
// LoRA-GGPO mixes a gradient norm into σ_i. Its exact weights are UNVERIFIED; here
//   σ_i = c(t)·ρ/√n·(α·‖W'_i‖ + (1 − α)·κ·ḡ_i),
// ḡ_i an EMA (β) of the row norms of Ĝ = g_B·A + B·g_A (the gradient of W' projected to
// the adapter's tangent space, read at the perturbed point after backward), and
// κ = ‖W'‖_F / ‖ḡ‖₂ so that both terms carry the weight's scale. Before the first
// gradient, and for a target without an adapter, ḡ = 0 (plain weight norms, times α).
// α, β and whether κ normalises are options.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <numbers>
#include <string>
#include <vector>

#include "../core/random.hpp"
#include "../nn/layers.hpp"
#include "method.hpp"

DELTAW_NAMESPACE_BEGIN
namespace train {

enum class restore_mode { patch, save };

struct flat_lora_options {
  /// ρ, the relative noise level. Default 0.05: UNVERIFIED (the value the Flat-LoRA
  /// reference code uses for its σ as far as we know; tune it).
  double rho = 0.05;
  std::uint64_t seed = 0;
  /// T of the ramp c(t) = (1 − cos(π·min(t, T)/T))/2; 0 → the loop's total_steps; when
  /// both are 0, c = 1.
  index_t ramp_steps = 0;
  /// false → c(t) = 1 at every step.
  bool cosine_ramp = true;
  restore_mode restore = restore_mode::patch;
  /// LoRA-GGPO: mix the gradient's row norms into σ_i (all UNVERIFIED; see the header).
  bool ggpo = false;
  double ggpo_alpha = 0.5;       ///< α, the weight-norm share
  double ggpo_beta = 0.9;        ///< β, EMA of the gradient row norms
  bool ggpo_normalise = true;    ///< κ = ‖W'‖_F / ‖ḡ‖₂ (false → κ = 1)
};

/// A weight to perturb: mutable memory (the frozen W a layer views) and, when the layer
/// carries a LoRA adapter, the layer (for s·B·A in W' and, with GGPO, its gradients).
template <class T>
struct perturb_target {
  matrix_view<T> W;
  nn::linear<T>* layer = nullptr;
};

/// The targets of a tiny transformer: every projection's frozen weight with its layer.
template <class T>
std::vector<perturb_target<T>> flat_targets(nn::tiny_transformer<T>& model) {
  auto ls = model.projections();
  auto ws = model.projection_weights();
  std::vector<perturb_target<T>> out;
  for (std::size_t i = 0; i < ls.size(); ++i) out.push_back({deltaw::view(*ws[i]), ls[i]});
  return out;
}

namespace detail {
/// e[j] = σ·z(first + j) in T. Not inlined: e goes through memory, so the perturbation
/// and its removal subtract the same stored operands (no FMA contraction of σ·z + w).
template <class T>
[[gnu::noinline]] void fill_noise_row(const random_stream& st, std::uint64_t first, index_t n, double sigma, T* e) {
  for (index_t j = 0; j < n; ++j) e[j] = T(sigma * double(st.normal(first + std::uint64_t(j))));
}
template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}
}  // namespace detail

template <class T>
class flat_lora : public method<T> {
 public:
  flat_lora(std::vector<perturb_target<T>> targets, flat_lora_options o = {}) : t_(std::move(targets)), o_(o) {
    constexpr const char* op = "deltaw::train::flat_lora";
    if (!(o.rho >= 0) || !std::isfinite(o.rho))
      throw argument_error(std::string(op) + ": rho must be finite and ≥ 0; got " + std::to_string(o.rho));
    if (o.ramp_steps < 0) throw argument_error(std::string(op) + ": ramp_steps must be ≥ 0");
    if (!(o.ggpo_alpha >= 0 && o.ggpo_alpha <= 1))
      throw argument_error(std::string(op) + ": ggpo_alpha must lie in [0, 1]; got " + std::to_string(o.ggpo_alpha));
    if (!(o.ggpo_beta >= 0 && o.ggpo_beta < 1))
      throw argument_error(std::string(op) + ": ggpo_beta must lie in [0, 1); got " + std::to_string(o.ggpo_beta));
    if (t_.size() >= (std::size_t(1) << 16)) throw argument_error(std::string(op) + ": at most 65535 targets");
    for (std::size_t l = 0; l < t_.size(); ++l) {
      const auto& tg = t_[l];
      if (tg.W.empty()) throw argument_error(std::string(op) + ": target " + std::to_string(l) + " is empty");
      if (o.restore == restore_mode::patch && double(tg.W.rows()) * double(tg.W.cols()) >= 4294967295.0)
        throw argument_error(std::string(op) + ": target " + std::to_string(l) +
                             " has 2³² entries or more; the patch log indexes with 32 bits (use restore_mode::save)");
      if (tg.layer) {
        if (tg.layer->out_features() != tg.W.rows() || tg.layer->in_features() != tg.W.cols())
          throw shape_error(std::string(op) + ": target " + std::to_string(l) + " is " +
                            deltaw::detail::shape_str(tg.W.rows(), tg.W.cols()) + " but layer '" + tg.layer->name() +
                            "' is " + deltaw::detail::shape_str(tg.layer->out_features(), tg.layer->in_features()));
        const auto lw = tg.layer->weight();
        if (lw.data() != tg.W.data() || lw.row_stride() != tg.W.row_stride() || lw.col_stride() != tg.W.col_stride())
          throw argument_error(std::string(op) + ": target " + std::to_string(l) + " is not the memory layer '" +
                               tg.layer->name() + "' views; perturbing it would not change the layer");
        if (tg.layer->weight_parameter() != nullptr)
          throw argument_error(std::string(op) + ": layer '" + tg.layer->name() +
                               "' trains its own copy of W (make_weight_trainable); perturbing the frozen memory would "
                               "not change it");
        if (tg.layer->has_adapter() && tg.layer->kind() == nn::adapter_kind::dora)
          throw argument_error(std::string(op) + ": layer '" + tg.layer->name() + "' is DoRA (W' is not W + s·B·A)");
      }
    }
    const std::size_t L = t_.size();
    sigma_.resize(L);
    undo_.resize(L);
    saved_.resize(L);
    gbar_.resize(L);
  }
  std::string name() const override { return o_.ggpo ? "LoRA-GGPO" : "Flat-LoRA"; }

  /// c(t) for a step of a run of `total` steps.
  double ramp(index_t step, index_t total) const {
    if (!o_.cosine_ramp) return 1.0;
    const index_t T_ = o_.ramp_steps > 0 ? o_.ramp_steps : total;
    if (T_ <= 0) return 1.0;
    const double x = double(std::min(step, T_)) / double(T_);
    return 0.5 * (1 - std::cos(std::numbers::pi * x));
  }

  void before_forward(const step_context& ctx) override { perturb(ctx.step, ramp(ctx.step, ctx.total_steps)); }
  void after_backward(const step_context&) override {
    if (o_.ggpo) update_grad_norms();
    restore();
  }

  /// Perturbs every target with the noise of `step` at ramp value c (public for tests and
  /// for loops other than train::fit). Throws if already perturbed.
  void perturb(index_t step, double c) {
    if (perturbed_)
      throw argument_error("deltaw::train::flat_lora::perturb: the weights are already perturbed (restore first)");
    step_ = step;
    patched_entries_ = 0;
    whole_rows_ = 0;
    for (auto& u : undo_) u.clear();
    if (!(c > 0) || o_.rho == 0) {
      for (auto& s : sigma_) s.clear();
      return;  // nothing to do, nothing to undo
    }
    std::vector<T> e, w0;
    std::vector<std::uint32_t> cols;
    for (std::size_t l = 0; l < t_.size(); ++l) {
      auto& W = t_[l].W;
      const index_t m = W.rows(), n = W.cols();
      sigma_[l] = compute_sigmas(l, c);
      auto& u = undo_[l];
      if (o_.restore == restore_mode::save) {
        saved_[l].resize(m, n);
        for (index_t i = 0; i < m; ++i)
          for (index_t j = 0; j < n; ++j) saved_[l](i, j) = W(i, j);
      } else {
        u.vbeg.assign(1, 0);
        u.cbeg.assign(1, 0);
      }
      const random_stream st = stream(l);
      e.resize(std::size_t(n));
      w0.resize(std::size_t(n));
      for (index_t i = 0; i < m; ++i) {
        detail::fill_noise_row<T>(st, std::uint64_t(i) * std::uint64_t(n), n, sigma_[l][std::size_t(i)], e.data());
        cols.clear();
        for (index_t j = 0; j < n; ++j) {
          T& w = W(i, j);
          w0[std::size_t(j)] = w;
          const T w1 = w + e[std::size_t(j)];
          w = w1;
          // The removal computes exactly this subtraction on the same stored operands.
          const T r = w1 - e[std::size_t(j)];
          if (!detail::same_bits(r, w0[std::size_t(j)])) cols.push_back(std::uint32_t(j));
        }
        if (o_.restore == restore_mode::save) continue;
        // Per row, the cheaper of the sparse patch (4 + sizeof(T) bytes an entry) and the
        // whole original row (sizeof(T) an entry).
        if (cols.size() * (sizeof(std::uint32_t) + sizeof(T)) < std::size_t(n) * sizeof(T)) {
          for (auto j : cols) u.val.push_back(w0[j]);
          u.col.insert(u.col.end(), cols.begin(), cols.end());
          patched_entries_ += index_t(cols.size());
        } else {
          u.val.insert(u.val.end(), w0.begin(), w0.end());
          ++whole_rows_;
        }
        u.vbeg.push_back(std::uint32_t(u.val.size()));
        u.cbeg.push_back(std::uint32_t(u.col.size()));
      }
    }
    perturbed_ = true;
  }

  /// Removes the perturbation exactly (no-op when none is applied).
  void restore() {
    if (!perturbed_) return;
    std::vector<T> e;
    for (std::size_t l = 0; l < t_.size(); ++l) {
      auto& W = t_[l].W;
      const index_t m = W.rows(), n = W.cols();
      if (o_.restore == restore_mode::save) {
        for (index_t i = 0; i < m; ++i)
          for (index_t j = 0; j < n; ++j) W(i, j) = saved_[l](i, j);
        continue;
      }
      const auto& u = undo_[l];
      const random_stream st = stream(l);
      e.resize(std::size_t(n));
      for (index_t i = 0; i < m; ++i) {
        const std::size_t v0 = u.vbeg[std::size_t(i)], v1 = u.vbeg[std::size_t(i) + 1];
        const std::size_t c0 = u.cbeg[std::size_t(i)], c1 = u.cbeg[std::size_t(i) + 1];
        if (c0 == c1 && v1 - v0 == std::size_t(n)) {  // a whole saved row
          for (index_t j = 0; j < n; ++j) W(i, j) = u.val[v0 + std::size_t(j)];
          continue;
        }
        detail::fill_noise_row<T>(st, std::uint64_t(i) * std::uint64_t(n), n, sigma_[l][std::size_t(i)], e.data());
        for (index_t j = 0; j < n; ++j) {
          T& w = W(i, j);
          w = w - e[std::size_t(j)];
        }
        for (std::size_t k = 0; k < c1 - c0; ++k) W(i, index_t(u.col[c0 + k])) = u.val[v0 + k];
      }
    }
    for (auto& u : undo_) u.clear();
    perturbed_ = false;
  }

  bool perturbed() const { return perturbed_; }
  /// σ_i of target l at the last perturbation (empty when c(t) = 0).
  const std::vector<double>& sigmas(std::size_t l) const { return sigma_.at(l); }
  /// Entries kept as sparse patches, and rows kept whole, at the last perturbation
  /// (patch mode).
  index_t patched_entries() const { return patched_entries_; }
  index_t whole_rows() const { return whole_rows_; }
  /// Bytes held across the step to undo it exactly: σ (8 per row), and the patches
  /// (column + value, row offsets) or the saved rows.
  std::size_t restore_bytes() const {
    std::size_t b = 0;
    for (std::size_t l = 0; l < t_.size(); ++l) {
      b += sigma_[l].size() * sizeof(double);
      b += undo_[l].bytes();
      if (o_.restore == restore_mode::save && perturbed_) b += std::size_t(saved_[l].size()) * sizeof(T);
    }
    return b;
  }
  /// GGPO's EMA of the gradient row norms of target l (empty before the first gradient).
  const std::vector<double>& grad_row_norms(std::size_t l) const { return gbar_.at(l); }
  const flat_lora_options& options() const { return o_; }

 private:
  // The patch scheme's record of one target: row i's original values are
  // val[vbeg[i] .. vbeg[i+1]); with columns col[cbeg[i] .. cbeg[i+1]) they are sparse
  // patches, without columns and n of them the whole row.
  struct undo_log {
    std::vector<std::uint32_t> col;
    std::vector<T> val;
    std::vector<std::uint32_t> vbeg, cbeg;
    void clear() {
      col.clear();
      val.clear();
      vbeg.clear();
      cbeg.clear();
    }
    std::size_t bytes() const {
      return col.size() * sizeof(std::uint32_t) + val.size() * sizeof(T) + (vbeg.size() + cbeg.size()) * sizeof(std::uint32_t);
    }
  };
  random_stream stream(std::size_t l) const {
    return random_stream{o_.seed, (std::uint64_t(step_) << 16) | std::uint64_t(l)};
  }

  /// Row norms of W' = W + s·B·A in double, row by row (O(in·r) memory).
  std::vector<double> merged_row_norms(std::size_t l) const {
    const auto& W = t_[l].W;
    const index_t m = W.rows(), n = W.cols();
    std::vector<double> out(static_cast<std::size_t>(m));
    auto* layer = t_[l].layer;
    const bool ad = layer && layer->has_adapter();
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> Ad, Bd;
    if (ad) {
      Ad = layer->lora_A()->value().template cast<double>();
      Bd = layer->lora_B()->value().template cast<double>();
    }
    Eigen::RowVectorXd row(n);
    for (index_t i = 0; i < m; ++i) {
      if (ad)
        row.noalias() = layer->scale() * Bd.row(i) * Ad;
      else
        row.setZero();
      for (index_t j = 0; j < n; ++j) row(j) += double(W(i, j));
      out[std::size_t(i)] = row.norm();
    }
    return out;
  }

  std::vector<double> compute_sigmas(std::size_t l, double c) const {
    const auto nrm = merged_row_norms(l);
    const double base = c * o_.rho / std::sqrt(double(t_[l].W.cols()));
    std::vector<double> s(nrm.size());
    const auto& g = gbar_[l];
    if (!o_.ggpo) {
      for (std::size_t i = 0; i < s.size(); ++i) s[i] = base * nrm[i];
      return s;
    }
    double kappa = 1.0;
    if (o_.ggpo_normalise && !g.empty()) {
      double wf = 0, gf = 0;
      for (std::size_t i = 0; i < s.size(); ++i) {
        wf += nrm[i] * nrm[i];
        gf += g[i] * g[i];
      }
      kappa = gf > 0 ? std::sqrt(wf / gf) : 0.0;
    }
    for (std::size_t i = 0; i < s.size(); ++i)
      s[i] = base * (o_.ggpo_alpha * nrm[i] + (g.empty() ? 0.0 : (1 - o_.ggpo_alpha) * kappa * g[i]));
    return s;
  }

  /// ‖Ĝ_i‖ for Ĝ = g_B·A + B·g_A without forming Ĝ: with K = [A; g_A] (2r × in) and
  /// u_i = [g_B,i, B_i], ‖Ĝ_i‖² = u_i·(K·Kᵀ)·u_iᵀ.
  void update_grad_norms() {
    for (std::size_t l = 0; l < t_.size(); ++l) {
      auto* layer = t_[l].layer;
      if (!layer || !layer->has_adapter()) continue;
      using MD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      const MD A = layer->lora_A()->value().template cast<double>();
      const MD B = layer->lora_B()->value().template cast<double>();
      const index_t r = A.rows();
      MD gA = layer->lora_A()->grad().template cast<double>();
      MD gB = layer->lora_B()->grad().template cast<double>();
      if (gA.rows() != r || gA.cols() != A.cols()) gA.setZero(r, A.cols());
      if (gB.rows() != B.rows() || gB.cols() != r) gB.setZero(B.rows(), r);
      MD K(2 * r, A.cols());
      K << A, gA;
      const MD M = K * K.transpose();
      MD U(B.rows(), 2 * r);
      U << gB, B;
      const MD UM = U * M;
      auto& g = gbar_[l];
      const bool first = g.empty();
      g.resize(std::size_t(B.rows()), 0.0);
      for (index_t i = 0; i < B.rows(); ++i) {
        const double v = std::sqrt(std::max(0.0, UM.row(i).dot(U.row(i))));
        g[std::size_t(i)] = first ? v : o_.ggpo_beta * g[std::size_t(i)] + (1 - o_.ggpo_beta) * v;
      }
    }
  }

  std::vector<perturb_target<T>> t_;
  flat_lora_options o_;
  std::vector<std::vector<double>> sigma_;
  std::vector<undo_log> undo_;
  std::vector<dense<T>> saved_;
  std::vector<std::vector<double>> gbar_;
  index_t step_ = 0;
  index_t patched_entries_ = 0, whole_rows_ = 0;
  bool perturbed_ = false;
};

}  // namespace train
DELTAW_NAMESPACE_END
