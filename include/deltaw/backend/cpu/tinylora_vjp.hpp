// SPDX-License-Identifier: MIT
// VJP of TinyLoRA, ΔW = s·B·R·A with R = Σᵢ vᵢPᵢ (backend/cpu/tinylora.hpp). With Z = X·Aᵀ
// and V = dY·B (tokens × r):
//   dR = s·Vᵀ·Z (r × r),  dvᵢ = ⟨Pᵢ, dR⟩ (dv = vec(dR)ᵀ·Pᵀ, one [1, r²]·[r², u] product),
//   dB = s·dYᵀ·(Z·Rᵀ),  dA = s·(V·R)ᵀ·X,  dX (update part) = s·(V·R)·A.
// Slots {B, v, A}; PEFT trains only v (pass absent views for B and A). dv is [u, 1] or [1, u].
#pragma once

#include <string>

#include "../../expr/tinylora.hpp"
#include "tinylora.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class D>
struct vjp<tinylora_update<T, D>> {
  using U = tinylora_update<T, D>;
  static constexpr int factor_count = 3;
  static const char* factor_name(int i) {
    constexpr const char* n[] = {"B", "v", "A"};
    return n[i];
  }
  /// grads = {dB, dv, dA}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<tinylora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.B(), op, "B");
    detail::check_grad_shape(grads[2], u.A(), op, "A");
    const index_t r = u.rank(), nu = u.vector_size(), n = X.rows();
    const auto& gv = grads[1];
    if (present(gv) && !(gv.rows() == nu && gv.cols() == 1) && !(gv.rows() == 1 && gv.cols() == nu))
      throw shape_error(std::string(op) + ": the gradient of v must be [u, 1] or [1, u] with u = " +
                        std::to_string(nu) + "; got " + deltaw::detail::shape_str(gv.rows(), gv.cols()));
    using enum kernels::op;
    const C s = C(u.scale());
    const kernels::operand<C, D> B(ctx, u.B()), A(ctx, u.A());
    const auto Rs = detail::tinylora_core<C>(ctx, u);
    const auto R = detail::tinylora_core_view(Rs, r);
    auto Z = kernels::make_scratch<C>(ctx, n, r);
    auto V = kernels::make_scratch<C>(ctx, n, r);
    gemm<C>(ctx, C(1), X, none, A.view(), trans, C(0), Z.view());
    gemm<C>(ctx, C(1), dY, none, B.view(), none, C(0), V.view());
    if (present(gv)) {
      auto dR = kernels::make_scratch<C>(ctx, r, r);
      gemm<C>(ctx, s, V.cview(), trans, Z.cview(), none, C(0), dR.view());
      const kernels::operand<C, D> P(ctx, u.P());
      const auto dRv = dR.cview();
      const matrix_view<const C, D> dr(dRv.data(), 1, r * r, r * r, 1);
      // dv (as [1, u]) += vec(dR)ᵀ·Pᵀ; a [u, 1] slot is the same numbers transposed.
      const mview<C, D> gvr = gv.rows() == 1 ? gv : mview<C, D>(gv.data(), 1, nu, nu * gv.row_stride(), gv.row_stride());
      gemm<C>(ctx, C(1), dr, none, P.view(), trans, C(1), gvr);
    }
    if (present(grads[0])) {
      auto ZR = kernels::make_scratch<C>(ctx, n, r);
      gemm<C>(ctx, C(1), Z.cview(), none, R, trans, C(0), ZR.view());
      gemm<C>(ctx, s, dY, trans, ZR.cview(), none, C(1), grads[0]);
    }
    if (!present(grads[2]) && !present(dX)) return;
    auto VR = kernels::make_scratch<C>(ctx, n, r);
    gemm<C>(ctx, C(1), V.cview(), none, R, none, C(0), VR.view());
    if (present(grads[2])) gemm<C>(ctx, s, VR.cview(), trans, X, none, C(1), grads[2]);
    if (present(dX)) gemm<C>(ctx, s, VR.cview(), none, A.view(), none, C(1), dX);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
