// SPDX-License-Identifier: MIT
// VJP of DeLoRA (ΔW = B·diag(c)·A·diag(w), c_i = λ/(r·â_i·b̂_i), â_i = max(‖A[i, :]‖, 1e-4),
// b̂_i = max(‖B[:, i]‖, 1e-4)); three factors, B [out, r], A [r, in] and λ [1, 1] (w is frozen).
// With Xw = X·diag(w), H = Xw·Aᵀ, Hc = H·diag(c), dHc = dY·B (tokens × r):
//   ∂B += dYᵀ·Hc,   ∂A += (dHc·diag(c))ᵀ·Xw,   ∂c_i = Σ_t dHc[t, i]·H[t, i]
//   ∂λ = Σ_i ∂c_i·c_i/λ  (= Σ_i ∂c_i/(r·â_i·b̂_i)),
//   through the norms (where not clamped): ∂A[i, :] −= ∂c_i·c_i·A[i, :]/‖A_i‖²,
//   ∂B[:, i] −= ∂c_i·c_i·B[:, i]/‖B^i‖²
//   dX += ((dHc·diag(c))·A)·diag(w)
// Scratch tokens × in and tokens × r; no out × in matrix.
#pragma once

#include <string>

#include "../../expr/delora.hpp"
#include "delora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<delora_update<T, device::cpu>> {
  using D = device::cpu;
  using U = delora_update<T, D>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "B" : i == 1 ? "A" : "lambda"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY,
                       std::span<const mview<C>> grads, const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<delora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[1], u.A(), op, "A");
    if (present(grads[2]) && grads[2].size() != 1)
      throw shape_error(std::string(op) + ": the gradient of lambda is " +
                        deltaw::detail::shape_str(grads[2].rows(), grads[2].cols()) + "; expected [1, 1]");
    using enum kernels::op;
    const index_t r = u.rank(), T_ = X.rows();
    const auto k = delora_detail::coeffs(u);
    const kernels::operand<C> A(ctx, u.A()), B(ctx, u.B());
    const auto c = delora_detail::row_scratch<C>(ctx, k.c);
    const auto w = kernels::vector_scratch<C>(ctx, u.w_norm());
    auto dHc = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), dY, none, B.view(), none, C(0), dHc.view());
    auto dH = kernels::make_scratch<C>(ctx, T_, r);  // dHc·diag(c)
    copy(ctx, dHc.cview(), dH.view());
    scale_cols(ctx, dH.view(), kernels::as_vector(c));
    if (present(dX)) {
      auto Q = kernels::make_scratch<C>(ctx, T_, u.cols());
      gemm<C>(ctx, C(1), dH.cview(), none, A.view(), none, C(0), Q.view());
      scale_cols(ctx, Q.view(), kernels::as_vector(w));
      axpy<C>(ctx, C(1), Q.cview(), dX);
    }
    if (!present(grads[0]) && !present(grads[1]) && !present(grads[2])) return;
    auto Xw = kernels::make_scratch<C>(ctx, T_, u.cols());
    copy(ctx, X, Xw.view());
    scale_cols(ctx, Xw.view(), kernels::as_vector(w));
    auto H = kernels::make_scratch<C>(ctx, T_, r);
    gemm<C>(ctx, C(1), Xw.cview(), none, A.view(), trans, C(0), H.view());
    std::vector<double> dc(static_cast<std::size_t>(r), 0.0);
    for (index_t i = 0; i < r; ++i)
      for (index_t t = 0; t < T_; ++t) dc[std::size_t(i)] += double(dHc.cview()(t, i)) * double(H.cview()(t, i));
    if (present(grads[0])) {
      auto Hc = kernels::make_scratch<C>(ctx, T_, r);
      copy(ctx, H.cview(), Hc.view());
      scale_cols(ctx, Hc.view(), kernels::as_vector(c));
      gemm<C>(ctx, C(1), dY, trans, Hc.cview(), none, C(1), grads[0]);
      for (index_t i = 0; i < r; ++i) {
        const double n = k.bn[std::size_t(i)];
        if (!(n > delora_norm_floor)) continue;  // clamped: no gradient through the norm
        const C f = C(-dc[std::size_t(i)] * k.c[std::size_t(i)] / (n * n));
        for (index_t o = 0; o < u.rows(); ++o) grads[0](o, i) += f * B.view()(o, i);
      }
    }
    if (present(grads[1])) {
      gemm<C>(ctx, C(1), dH.cview(), trans, Xw.cview(), none, C(1), grads[1]);
      for (index_t i = 0; i < r; ++i) {
        const double n = k.an[std::size_t(i)];
        if (!(n > delora_norm_floor)) continue;
        const C f = C(-dc[std::size_t(i)] * k.c[std::size_t(i)] / (n * n));
        for (index_t j = 0; j < u.cols(); ++j) grads[1](i, j) += f * A.view()(i, j);
      }
    }
    if (present(grads[2])) {
      double dl = 0;
      for (index_t i = 0; i < r; ++i)
        dl += dc[std::size_t(i)] / (double(r) * std::max(k.an[std::size_t(i)], delora_norm_floor) *
                                    std::max(k.bn[std::size_t(i)], delora_norm_floor));
      grads[2](0, 0) += C(dl);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
