// SPDX-License-Identifier: MIT
// CLoRA (Meral et al., 2024): several concept LoRAs composed at inference. Each LoRA has
// its own prompt (branch k); the cross-attention maps of the concept tokens in every
// branch are pulled together when they name the same concept and pushed apart otherwise
// by a contrastive loss whose gradient updates the latent, a few steps per denoising
// step; masks read off the maps then fuse the branches: each concept's region takes its
// LoRA's output, the rest the base branch's.
//
//   softmax_rows                 row-wise softmax, an autograd op
//   attention_maps               P = softmax(Q·Kᵀ/√d) [positions, tokens]: column j is
//                                token j's map over the latent's positions
//   contrastive_loss             InfoNCE over maps with cosine similarity, an autograd op
//   select_maps                  rows picked from several map matrices, an autograd op
//   composer                     the cross-attention layer of the latent over K concept
//                                LoRAs: optimise_latent, masks, fuse (the branches'
//                                attention outputs). The masks also drive a latent-side
//                                linear layer with each concept's LoRA behind its mask:
//                                serve::apply_masked (docs/serving.md).
//
// Setting. Here the denoiser is one cross-attention layer: latent z [positions, d] as
// queries (Q = z·W_qᵀ), branch k's prompt embeddings c_k [tokens, d] as keys and values
// (K_k = c_k·(W_k + ΔK_k)ᵀ, V_k = c_k·(W_v + ΔV_k)ᵀ, ΔK_0 = ΔV_0 = 0 for the base branch).
// The paper's model is Stable Diffusion's UNet; its loss, latent update and masks are
// reproduced on this layer. Choices the summary leaves open are options (UNVERIFIED):
//  - temperature τ of the loss (default 0.5) and whether every ordered positive pair counts
//    (default) or one anchor per concept;
//  - the latent update: `steps` plain gradient steps of size `step_size` on z;
//  - masks: each concept's maps min–max normalised over positions, the concept's map the
//    maximum over its (branch, token) entries; `hard` masks give each position to the
//    concept with the largest map when it is at least `threshold` (else to the base), soft
//    masks keep the normalised values where they reach `threshold` and rescale a position's
//    masks to sum to at most one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../autograd/ops.hpp"
#include "../backend/cpu/eigen_bridge.hpp"
#include "../autograd/tape.hpp"
#include "../expr/low_rank.hpp"

DELTAW_NAMESPACE_BEGIN
namespace papers {
namespace clora {

using autograd::parameter;
using autograd::tape;
using autograd::var;

/// y_i = softmax(x_i) for every row i (max-shifted). Backward: dx_i = y_i ⊙ (dy_i − ⟨dy_i, y_i⟩).
template <class T>
var<T> softmax_rows(const var<T>& x) {
  auto& t = autograd::detail::tape_of(x, "softmax_rows");
  dense<T> y = x.value();
  for (index_t i = 0; i < y.rows(); ++i) {
    if (y.cols() == 0) break;
    const T m = y.row(i).maxCoeff();
    y.row(i) = (y.row(i).array() - m).exp().matrix();
    y.row(i) /= y.row(i).sum();
  }
  const index_t ix = x.id();
  return t.record("softmax_rows", std::move(y), t.requires_grad(x), [ix](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    const auto Y = t.value_at(self);
    dense<T> dx = Y.cwiseProduct(g);
    for (index_t i = 0; i < dx.rows(); ++i) dx.row(i) -= dx.row(i).sum() * Y.row(i);
    autograd::detail::accumulate(t, ix, dx);
  }, /*backward_reads_output=*/true);
}

/// Cross-attention probabilities softmax(Q·Kᵀ/√d), Q [positions, d], K [tokens, d]: column j
/// is token j's attention map over the positions (what CLoRA's loss and masks read).
template <class T>
var<T> attention_maps(const var<T>& q, const var<T>& k) {
  return softmax_rows(autograd::scale(autograd::matmul_nt(q, k), 1.0 / std::sqrt(double(std::max<index_t>(1, q.cols())))));
}

/// Rows of attention maps picked from several map matrices: row i is column cols[i] of
/// P[which[i]] (P_k [positions, tokens]), transposed: [n, positions].
template <class T>
var<T> select_maps(const std::vector<var<T>>& P, std::span<const index_t> which, std::span<const index_t> cols) {
  constexpr const char* op = "deltaw::papers::clora::select_maps";
  if (P.empty() || which.size() != cols.size())
    throw argument_error(std::string(op) + ": " + std::to_string(P.size()) + " map matrices, " +
                         std::to_string(which.size()) + " picks and " + std::to_string(cols.size()) + " columns");
  auto& t = autograd::detail::tape_of(P[0], "select_maps");
  const index_t L = P[0].rows();
  bool grad = false;
  for (const auto& p : P) {
    if (p.owner() != &t || p.rows() != L)
      throw shape_error(std::string(op) + ": the map matrices must share one tape and " + std::to_string(L) + " rows");
    grad = grad || t.requires_grad(p);
  }
  dense<T> y(index_t(which.size()), L);
  for (std::size_t i = 0; i < which.size(); ++i) {
    if (which[i] < 0 || which[i] >= index_t(P.size()) || cols[i] < 0 || cols[i] >= P[std::size_t(which[i])].cols())
      throw argument_error(std::string(op) + ": pick " + std::to_string(i) + " (matrix " + std::to_string(which[i]) +
                           ", column " + std::to_string(cols[i]) + ") is out of range");
    y.row(index_t(i)) = P[std::size_t(which[i])].value().col(cols[i]).transpose();
  }
  std::vector<index_t> ids, w(which.begin(), which.end()), c(cols.begin(), cols.end());
  std::vector<index_t> widths;
  for (const auto& p : P) {
    ids.push_back(p.id());
    widths.push_back(p.cols());
  }
  return t.record("clora_select_maps", std::move(y), grad, [ids, w, c, widths, L](tape<T>& t, index_t self) {
    const auto& g = t.upstream(self);
    for (std::size_t k = 0; k < ids.size(); ++k) {
      if (!t.needs_grad(ids[k])) continue;
      dense<T> d = dense<T>::Zero(L, widths[k]);
      for (std::size_t i = 0; i < w.size(); ++i)
        if (w[i] == index_t(k)) d.col(c[i]) += g.row(index_t(i)).transpose();
      autograd::detail::accumulate(t, ids[k], d);
    }
  }, /*backward_reads_output=*/false);
}

struct contrastive_options {
  /// τ of exp(cos/τ) (UNVERIFIED; an option).
  double temperature = 0.5;
  /// Every ordered pair (i, p) of maps of one concept is a positive (true), or only the
  /// pairs whose anchor i is the concept's first map (false).
  bool all_pairs = true;
  /// A map whose norm is below this is an error (its cosine is undefined).
  double min_norm = 1e-12;
};

/// CLoRA's contrastive loss over maps M [n, L] (row i: one attention map over L positions),
/// labels[i] ∈ {0, 1, …} or −1 (not in the loss): with s_ij the cosine of rows i and j,
/// for every positive pair (i, p) (same concept, i ≠ p)
///   ℓ_ip = −log( e^{s_ip/τ} / (e^{s_ip/τ} + Σ_{n of another concept} e^{s_in/τ}) ),
/// averaged over the positive pairs: a [1, 1] loss (0 without positive pairs).
template <class T>
var<T> contrastive_loss(const var<T>& M, std::span<const index_t> labels, const contrastive_options& o = {}) {
  constexpr const char* op = "deltaw::papers::clora::contrastive_loss";
  auto& t = autograd::detail::tape_of(M, "contrastive_loss");
  const index_t n = M.rows();
  if (index_t(labels.size()) != n)
    throw shape_error(std::string(op) + ": " + std::to_string(labels.size()) + " concept labels for " +
                      std::to_string(n) + " maps (one per row)");
  if (!(o.temperature > 0.0)) throw argument_error(std::string(op) + ": the temperature must be positive");
  const dense<double> Md = M.value().template cast<double>();
  Eigen::VectorXd norms(n);
  dense<double> U = Md;
  for (index_t i = 0; i < n; ++i) {
    if (labels[std::size_t(i)] < -1)
      throw argument_error(std::string(op) + ": map " + std::to_string(i) + " has concept " +
                           std::to_string(labels[std::size_t(i)]) + " (labels are ≥ 0, or −1 for none)");
    norms(i) = Md.row(i).norm();
    if (labels[std::size_t(i)] >= 0 && !(norms(i) >= o.min_norm))
      throw argument_error(std::string(op) + ": map " + std::to_string(i) + " has norm " + std::to_string(norms(i)) +
                           "; its cosine similarity is undefined");
    if (norms(i) > 0) U.row(i) /= norms(i);
  }
  const dense<double> S = U * U.transpose();
  // G(i, j) = ∂loss/∂s_ij, filled pair by pair.
  dense<double> G = dense<double>::Zero(n, n);
  double total = 0.0;
  index_t pairs = 0;
  for (index_t i = 0; i < n; ++i) {
    const index_t ci = labels[std::size_t(i)];
    if (ci < 0) continue;
    if (!o.all_pairs) {
      bool is_first = true;
      for (index_t j = 0; j < i; ++j) is_first = is_first && labels[std::size_t(j)] != ci;
      if (!is_first) continue;
    }
    for (index_t p = 0; p < n; ++p) {
      if (p == i || labels[std::size_t(p)] != ci) continue;
      // log-sum-exp over the positive and i's negatives.
      double mx = S(i, p) / o.temperature;
      for (index_t m = 0; m < n; ++m)
        if (labels[std::size_t(m)] >= 0 && labels[std::size_t(m)] != ci) mx = std::max(mx, S(i, m) / o.temperature);
      double z = std::exp(S(i, p) / o.temperature - mx);
      for (index_t m = 0; m < n; ++m)
        if (labels[std::size_t(m)] >= 0 && labels[std::size_t(m)] != ci) z += std::exp(S(i, m) / o.temperature - mx);
      total += -(S(i, p) / o.temperature - mx) + std::log(z);
      G(i, p) += (std::exp(S(i, p) / o.temperature - mx) / z - 1.0) / o.temperature;
      for (index_t m = 0; m < n; ++m)
        if (labels[std::size_t(m)] >= 0 && labels[std::size_t(m)] != ci)
          G(i, m) += std::exp(S(i, m) / o.temperature - mx) / z / o.temperature;
      ++pairs;
    }
  }
  dense<T> y(1, 1);
  y(0, 0) = pairs ? T(total / double(pairs)) : T(0);
  if (pairs) G /= double(pairs);
  const index_t im = M.id();
  return t.record("clora_contrastive_loss", std::move(y), t.requires_grad(M),
                  [im, U, G, norms](tape<T>& t, index_t self) {
                    const double g = double(t.upstream(self)(0, 0));
                    // s_ij = u_i·u_j: ∂/∂u = (G + Gᵀ)·U; through u_i = m_i/‖m_i‖:
                    // ∂/∂m_i = (∂/∂u_i − (∂/∂u_i·u_i)·u_i)/‖m_i‖.
                    dense<double> dU = (G + G.transpose()) * U;
                    for (index_t i = 0; i < dU.rows(); ++i) {
                      if (norms(i) > 0) dU.row(i) = (dU.row(i) - dU.row(i).dot(U.row(i)) * U.row(i)) / norms(i);
                      else dU.row(i).setZero();
                    }
                    autograd::detail::accumulate(t, im, dense<T>((g * dU).template cast<T>()));
                  });
}

/// One concept token: branch k's prompt token j names concept c.
struct concept_token {
  index_t branch, token, concept_id;
};

struct mask_options {
  /// Normalised maps below this are background (the base branch's).
  double threshold = 0.5;
  /// Hard masks (each position to one concept, or to none) or soft masks.
  bool hard = true;
};

struct latent_options {
  index_t steps = 5;
  double step_size = 0.1;
  contrastive_options loss;
};

/// The cross-attention layer of the setting above over K concept LoRAs (branch 0 the base
/// prompt, branch k ≥ 1 LoRA k's), with frozen W_q, W_k, W_v [d, d] the caller owns.
template <class T>
class composer {
 public:
  struct branch {
    dense<T> prompt;                  // c_k [tokens, d]
    const low_rank<T>* key = nullptr;    // ΔK_k (null: none)
    const low_rank<T>* value = nullptr;  // ΔV_k (null: none)
  };

  composer(matrix_view<const T> Wq, matrix_view<const T> Wk, matrix_view<const T> Wv, std::vector<branch> branches,
           std::vector<concept_token> tokens)
      : Wq_(cpu::to_dense<T>(Wq)),
        Wk_(cpu::to_dense<T>(Wk)),
        Wv_(cpu::to_dense<T>(Wv)),
        branches_(std::move(branches)),
        tokens_(std::move(tokens)) {
    constexpr const char* op = "deltaw::papers::clora::composer";
    const index_t d = Wq.cols();
    for (const auto* W : {&Wq_, &Wk_, &Wv_})
      if (W->rows() != d || W->cols() != d)
        throw shape_error(std::string(op) + ": W_q, W_k and W_v must be [d, d] with d = " + std::to_string(d));
    if (branches_.empty()) throw argument_error(std::string(op) + ": no branch (branch 0 is the base prompt)");
    for (std::size_t k = 0; k < branches_.size(); ++k) {
      const auto& b = branches_[k];
      if (b.prompt.cols() != d)
        throw shape_error(std::string(op) + ": branch " + std::to_string(k) + "'s prompt has " +
                          std::to_string(b.prompt.cols()) + " features; W has " + std::to_string(d));
      for (const auto* l : {b.key, b.value})
        if (l && (l->rows() != d || l->cols() != d))
          throw shape_error(std::string(op) + ": branch " + std::to_string(k) + "'s LoRA is " +
                            deltaw::detail::shape_str(l->rows(), l->cols()) + "; W is " + deltaw::detail::shape_str(d, d));
    }
    for (const auto& c : tokens_) {
      if (c.branch < 0 || c.branch >= index_t(branches_.size()) || c.token < 0 ||
          c.token >= branches_[std::size_t(c.branch)].prompt.rows() || c.concept_id < 0)
        throw argument_error(std::string(op) + ": concept token (branch " + std::to_string(c.branch) + ", token " +
                             std::to_string(c.token) + ", concept " + std::to_string(c.concept_id) +
                             ") does not name a prompt token of a branch");
      concepts_ = std::max(concepts_, c.concept_id + 1);
    }
  }

  index_t concepts() const { return concepts_; }
  index_t branches() const { return index_t(branches_.size()); }

  /// The maps of every concept token, stacked [concept tokens, positions], for latent z.
  var<T> concept_maps(tape<T>& t, const var<T>& z) const {
    const auto q = autograd::matmul_nt(z, t.frozen(Wq_, "W_q"));
    std::vector<var<T>> P;
    for (index_t k = 0; k < branches(); ++k) P.push_back(attention_maps(q, t.record("K", branch_keys(k), false)));
    std::vector<index_t> which, cols;
    for (const auto& c : tokens_) {
      which.push_back(c.branch);
      cols.push_back(c.token);
    }
    return select_maps(P, which, cols);
  }

  /// The contrastive loss at latent z (a [1, 1] variable on t).
  var<T> loss(tape<T>& t, const var<T>& z, const contrastive_options& o = {}) const {
    std::vector<index_t> labels;
    for (const auto& c : tokens_) labels.push_back(c.concept_id);
    return contrastive_loss(concept_maps(t, z), labels, o);
  }

  /// `steps` gradient steps on z; returns the loss before each step and after the last.
  std::vector<double> optimise_latent(dense<T>& z, const latent_options& o = {}) const {
    std::vector<double> history;
    parameter<T> zp("latent", z);
    for (index_t s = 0; s <= o.steps; ++s) {
      tape<T> t;
      zp.zero_grad();
      const auto l = loss(t, t.param(zp), o.loss);
      history.push_back(double(l.value()(0, 0)));
      if (s == o.steps) break;
      t.backward(l);
      zp.value() -= T(o.step_size) * zp.grad();
    }
    z = zp.value();
    return history;
  }

  /// Masks [positions, concepts] from the maps at latent z (see the header).
  dense<T> masks(const dense<T>& z, const mask_options& o = {}) const {
    tape<T> t;
    autograd::no_grad<T> ng(t);
    const dense<T> maps = concept_maps(t, t.frozen(z, "z")).value();  // [concept tokens, positions]
    const index_t L = z.rows();
    dense<T> m = dense<T>::Zero(L, concepts_);
    for (std::size_t i = 0; i < tokens_.size(); ++i) {
      const auto row = maps.row(index_t(i));
      const T lo = row.minCoeff(), hi = row.maxCoeff();
      for (index_t p = 0; p < L; ++p) {
        const T v = hi > lo ? (row(p) - lo) / (hi - lo) : T(0);
        m(p, tokens_[i].concept_id) = std::max(m(p, tokens_[i].concept_id), v);
      }
    }
    for (index_t p = 0; p < L; ++p) {
      if (o.hard) {
        index_t best = -1;
        for (index_t c = 0; c < concepts_; ++c)
          if (m(p, c) >= T(o.threshold) && (best < 0 || m(p, c) > m(p, best))) best = c;
        m.row(p).setZero();
        if (best >= 0) m(p, best) = T(1);
      } else {
        for (index_t c = 0; c < concepts_; ++c)
          if (m(p, c) < T(o.threshold)) m(p, c) = T(0);
        const T s = m.row(p).sum();
        if (s > T(1)) m.row(p) /= s;
      }
    }
    return m;
  }

  /// Branch k's attention output softmax(Q·K_kᵀ/√d)·V_k [positions, d] at latent z.
  dense<T> branch_output(const dense<T>& z, index_t k) const {
    tape<T> t;
    autograd::no_grad<T> ng(t);
    const auto P = attention_maps(autograd::matmul_nt(t.frozen(z, "z"), t.frozen(Wq_, "W_q")),
                                  t.record("K", branch_keys(k), false));
    return P.value() * branch_values(k);
  }

  /// The fused output Σ_c diag(m_c)·O_{branch of c} + diag(1 − Σ_c m_c)·O_0, where concept
  /// c's branch is concept_branch[c] (its LoRA's).
  dense<T> fuse(const dense<T>& z, const dense<T>& m, std::span<const index_t> concept_branch) const {
    check_concept_branch(m, concept_branch, "deltaw::papers::clora::composer::fuse");
    const dense<T> O0 = branch_output(z, 0);
    dense<T> out = O0;
    for (index_t c = 0; c < concepts_; ++c) {
      const dense<T> Oc = branch_output(z, concept_branch[std::size_t(c)]);
      out += m.col(c).asDiagonal() * (Oc - O0);
    }
    return out;
  }

 private:
  /// c_k·(W + ΔW)ᵀ without forming ΔW: c_k·Wᵀ + s·(c_k·Aᵀ)·Bᵀ.
  static dense<T> project_prompt(const dense<T>& c, const dense<T>& W, const low_rank<T>* l) {
    dense<T> out = c * W.transpose();
    if (l) {
      const dense<T> B = cpu::to_dense<T>(l->B()), A = cpu::to_dense<T>(l->A());
      out += T(l->scale()) * ((c * A.transpose()) * B.transpose());
    }
    return out;
  }
  dense<T> branch_keys(index_t k) const {
    const auto& b = branches_[std::size_t(k)];
    return project_prompt(b.prompt, Wk_, b.key);
  }
  dense<T> branch_values(index_t k) const {
    const auto& b = branches_[std::size_t(k)];
    return project_prompt(b.prompt, Wv_, b.value);
  }
  void check_concept_branch(const dense<T>& m, std::span<const index_t> cb, const char* op) const {
    if (m.cols() != concepts_ || index_t(cb.size()) != concepts_)
      throw shape_error(std::string(op) + ": " + std::to_string(m.cols()) + " mask columns and " +
                        std::to_string(cb.size()) + " concept branches for " + std::to_string(concepts_) + " concepts");
    for (const index_t k : cb)
      if (k < 0 || k >= index_t(branches_.size()))
        throw argument_error(std::string(op) + ": concept branch " + std::to_string(k) + " outside [0, " +
                             std::to_string(branches_.size()) + ")");
  }

  dense<T> Wq_, Wk_, Wv_;
  std::vector<branch> branches_;
  std::vector<concept_token> tokens_;
  index_t concepts_ = 0;
};

}  // namespace clora
}  // namespace papers
DELTAW_NAMESPACE_END
