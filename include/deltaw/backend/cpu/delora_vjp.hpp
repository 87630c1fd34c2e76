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
// Templated on the device: ∂c [r] is formed where the factors live (dot_rows) and read on
// the host; the norm terms are a column (row) scaling of a copy of B (A) and one axpy.
#pragma once

#include <string>

#include "../../expr/delora.hpp"
#include "delora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<delora_update<T, D>> {
  using U = delora_update<T, D>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) { return i == 0 ? "B" : i == 1 ? "A" : "lambda"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
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
    const auto k = delora_detail::coeffs(ctx, u);
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
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
    // dc_i = Σ_t dHc[t, i]·H[t, i] in double, on the device (r values read back).
    auto dcs = kernels::make_scratch<double>(ctx, 1, r);
    dot_rows(ctx, dHc.cview().transpose(), H.cview().transpose(), vector_view<double, D>(dcs.data(), r));
    const std::vector<double> dc = to_host_vector<double>(ctx, vector_view<const double, D>(dcs.data(), r));
    // Through the norms (where not clamped): ∂B[:, i] −= ∂c_i·c_i·B[:, i]/‖B^i‖² (likewise A's
    // rows), as one column (row) scaling of a copy of the factor and one axpy.
    const auto through_norm = [&](const std::vector<double>& norms) {
      std::vector<double> f(static_cast<std::size_t>(r), 0.0);
      for (index_t i = 0; i < r; ++i) {
        const double n = norms[std::size_t(i)];
        if (n > delora_norm_floor) f[std::size_t(i)] = double(C(-dc[std::size_t(i)] * k.c[std::size_t(i)] / (n * n)));
      }
      return delora_detail::row_scratch<C>(ctx, f);
    };
    if (present(grads[0])) {
      auto Hc = kernels::make_scratch<C>(ctx, T_, r);
      copy(ctx, H.cview(), Hc.view());
      scale_cols(ctx, Hc.view(), kernels::as_vector(c));
      gemm<C>(ctx, C(1), dY, trans, Hc.cview(), none, C(1), grads[0]);
      const auto f = through_norm(k.bn);
      auto Bf = kernels::make_scratch<C>(ctx, u.rows(), r);
      copy(ctx, B.view(), Bf.view());
      scale_cols(ctx, Bf.view(), kernels::as_vector(f));
      axpy<C>(ctx, C(1), Bf.cview(), grads[0]);
    }
    if (present(grads[1])) {
      gemm<C>(ctx, C(1), dH.cview(), trans, Xw.cview(), none, C(1), grads[1]);
      const auto f = through_norm(k.an);
      auto Af = kernels::make_scratch<C>(ctx, r, u.cols());
      copy(ctx, A.view(), Af.view());
      scale_rows(ctx, Af.view(), kernels::as_vector(f));
      axpy<C>(ctx, C(1), Af.cview(), grads[1]);
    }
    if (present(grads[2])) {
      double dl = 0;
      for (index_t i = 0; i < r; ++i)
        dl += dc[std::size_t(i)] / (double(r) * std::max(k.an[std::size_t(i)], delora_norm_floor) *
                                    std::max(k.bn[std::size_t(i)], delora_norm_floor));
      detail::add_from_host(ctx, std::vector<C>{C(dl)}, grads[2]);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
