// SPDX-License-Identifier: MIT
// VJP of VB-LoRA (ΔW = B·A, A and B mixed from the bank); three factors: logits_A
// [r·in/L, n], logits_B [out/L·r, n] and the bank [n, L]. The top-k selection is held fixed
// (as in PEFT, where torch.topk's indices carry no gradient): the logits outside a row's top k
// get zero gradient. With Z = X·Aᵀ and dZ = dY·B (tokens × r):
//   dA = dZᵀ·X [r, in],   dB = dYᵀ·Z [out, r],   dX += dZ·A
// and for every logit row (i, t) of A (likewise (t, i) of B, with g read down B's column) with
// selection (j_q, w_q) and g = dA[i, t·L : (t+1)·L]:
//   c_q = ⟨g, bank[j_q, :]⟩,   dℓ[j_q] += w_q·(c_q − Σ_p w_p·c_p),   dbank[j_q, :] += w_q·g.
// Scratch: A, B, dA, dB (r·(in + out) each pair) and tokens × r; never out × in.
#pragma once

#include <string>
#include <vector>

#include "../../expr/vblora.hpp"
#include "vblora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<vblora_update<T, device::cpu>> {
  using D = device::cpu;
  using U = vblora_update<T, D>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "logits_A" : i == 1 ? "logits_B" : "bank"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY,
                       std::span<const mview<C>> grads, const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<vblora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.logits_A(), op, "logits_A");
    detail::check_grad_shape(grads[1], u.logits_B(), op, "logits_B");
    detail::check_grad_shape(grads[2], u.bank(), op, "bank");
    using enum kernels::op;
    const bool gla = present(grads[0]), glb = present(grads[1]), gbank = present(grads[2]), gx = present(dX);
    if (!gla && !glb && !gbank && !gx) return;
    const index_t r = u.rank(), T_ = X.rows(), L = u.vector_length(), ti = u.in_tiles(), to = u.out_tiles();
    const auto sel = vblora_detail::select(u);
    const vblora_detail::factors<C, Ctx, U> f(ctx, u, sel);
    auto dZ = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), dY, none, f.B.cview(), none, C(0), dZ.view());
    if (gx) gemm<C>(ctx, C(1), dZ.cview(), none, f.A.cview(), none, C(1), dX);
    const bool need_a = gla || gbank, need_b = glb || gbank;
    if (!need_a && !need_b) return;
    auto dA = kernels::make_scratch<C>(ctx, need_a ? r : 0, u.cols());
    auto dB = kernels::make_scratch<C>(ctx, need_b ? u.rows() : 0, r);
    if (need_a) gemm<C>(ctx, C(1), dZ.cview(), trans, X, none, C(0), dA.view());
    if (need_b) {
      auto Z = kernels::make_scratch<C>(ctx, T_, r);
      gemm<C>(ctx, C(1), X, none, f.A.cview(), trans, C(0), Z.view());
      gemm<C>(ctx, C(1), dY, trans, Z.cview(), none, C(0), dB.view());
    }
    const auto& V = u.bank();
    std::vector<double> c;
    // One logit row with gradient g(l) of its mixed sub-vector: the softmax and bank terms.
    auto row = [&](const vblora_selection& s, index_t q, const mview<C>& gl, auto&& g) {
      const std::size_t k = s.index.size();
      c.assign(k, 0.0);
      double mean = 0;
      for (std::size_t p = 0; p < k; ++p) {
        for (index_t l = 0; l < L; ++l) c[p] += double(g(l)) * convert<double>(V(s.index[p], l));
        mean += s.weight[p] * c[p];
      }
      for (std::size_t p = 0; p < k; ++p) {
        if (present(gl)) gl(q, s.index[p]) += C(s.weight[p] * (c[p] - mean));
        if (gbank)
          for (index_t l = 0; l < L; ++l) grads[2](s.index[p], l) += C(s.weight[p] * double(g(l)));
      }
    };
    if (need_a) {
      const auto dAv = dA.cview();
      for (index_t i = 0; i < r; ++i)
        for (index_t t = 0; t < ti; ++t)
          row(sel.a[std::size_t(i * ti + t)], i * ti + t, grads[0], [&](index_t l) { return dAv(i, t * L + l); });
    }
    if (need_b) {
      const auto dBv = dB.cview();
      for (index_t t = 0; t < to; ++t)
        for (index_t i = 0; i < r; ++i)
          row(sel.b[std::size_t(t * r + i)], t * r + i, grads[1], [&](index_t l) { return dBv(t * L + l, i); });
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
