// SPDX-License-Identifier: MIT
// Masked composition of LoRA adapters as an op of deltaw's tape (autograd/): gradients for
// the input, the per-token weights and every adapter's factors, from
// serve::masked_backward. For training gates or CLoRA-style fusion weights.
#pragma once

#include <vector>

#include "../autograd/tape.hpp"
#include "masked.hpp"

DELTAW_NAMESPACE_BEGIN
namespace serve {

/// One LoRA adapter on a tape: ΔW = scale·B·A with B [out, r], A [r, in].
template <class T>
struct lora_vars {
  autograd::var<T> B, A;
  double scale = 1.0;
};

/// y = x·Wᵀ + Σ_k diag(m(:, k))·x·(s_k·B_k·A_k)ᵀ on the tape. W [out, in] is frozen (a view
/// the caller keeps alive), x [tokens, in], m [tokens, K]; any of x, m, B_k, A_k may
/// require a gradient.
template <class T>
autograd::var<T> masked_lora(const matrix_view<const T>& W, const autograd::var<T>& x, const autograd::var<T>& m,
                             const std::vector<lora_vars<T>>& adapters) {
  constexpr const char* op = "deltaw::serve::masked_lora";
  if (x.owner() == nullptr || x.owner() != m.owner())
    throw autograd::autograd_error(std::string(op) + ": x and m belong to different tapes");
  auto& t = *x.owner();
  struct ids {
    index_t B, A;
    double s;
  };
  std::vector<ids> ad;
  bool needs = t.requires_grad(x) || t.requires_grad(m);
  for (const auto& a : adapters) {
    if (a.B.owner() != &t || a.A.owner() != &t)
      throw autograd::autograd_error(std::string(op) + ": an adapter's factors belong to another tape");
    ad.push_back({a.B.id(), a.A.id(), a.scale});
    needs = needs || t.requires_grad(a.B) || t.requires_grad(a.A);
  }
  auto view_of = [](const autograd::cmap<T>& v) {
    return matrix_view<const T>(v.data(), v.rows(), v.cols(), v.outerStride(), 1);
  };
  auto loras = [view_of](autograd::tape<T>& tp, const std::vector<ids>& ad) {
    std::vector<low_rank<T>> u;
    u.reserve(ad.size());
    for (const auto& a : ad)
      u.emplace_back(held_matrix<T>{view_of(tp.value_at(a.B)), nullptr}, held_matrix<T>{view_of(tp.value_at(a.A)), nullptr},
                     a.s);
    return u;
  };
  dense<T> y(x.rows(), W.rows());
  apply_masked(W, loras(t, ad), view_of(m.value()), view_of(x.value()), y);
  const index_t ix = x.id(), im = m.id();
  return t.record("masked_lora", std::move(y), needs, [W, ad, ix, im, view_of, loras](autograd::tape<T>& tp, index_t self) {
    const auto u = loras(tp, ad);
    const auto X = view_of(tp.value_at(ix));
    const auto M = view_of(tp.value_at(im));
    const auto& G = tp.upstream(self);
    masked_grads<T> g;
    dense<T> dX, dM;
    std::vector<dense<T>> dB(ad.size()), dA(ad.size());
    if (tp.needs_grad(ix)) {
      dX.setZero(X.rows(), X.cols());
      g.dX = deltaw::view(dX);
    }
    if (tp.needs_grad(im)) {
      dM.setZero(M.rows(), M.cols());
      g.dM = deltaw::view(dM);
    }
    g.factors.resize(ad.size());
    for (std::size_t k = 0; k < ad.size(); ++k) {
      const bool nb = tp.needs_grad(ad[k].B), na = tp.needs_grad(ad[k].A);
      if (!nb && !na) continue;
      g.factors[k].resize(2);
      if (nb) {
        dB[k].setZero(u[k].B().rows(), u[k].B().cols());
        g.factors[k][0] = deltaw::view(dB[k]);
      }
      if (na) {
        dA[k].setZero(u[k].A().rows(), u[k].A().cols());
        g.factors[k][1] = deltaw::view(dA[k]);
      }
    }
    masked_backward<T>(W, u, M, X, matrix_view<const T>(G.data(), G.rows(), G.cols()), g);
    auto add = [&](index_t id, const dense<T>& d) {
      auto [buf, fresh] = tp.grad_slot(id);
      if (fresh) *buf = d;
      else *buf += d;
    };
    if (tp.needs_grad(ix)) add(ix, dX);
    if (tp.needs_grad(im)) add(im, dM);
    for (std::size_t k = 0; k < ad.size(); ++k) {
      if (tp.needs_grad(ad[k].B)) add(ad[k].B, dB[k]);
      if (tp.needs_grad(ad[k].A)) add(ad[k].A, dA[k]);
    }
  }, /*backward_reads_output=*/false);
}

}  // namespace serve
DELTAW_NAMESPACE_END
