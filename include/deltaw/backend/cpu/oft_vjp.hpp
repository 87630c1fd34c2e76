// SPDX-License-Identifier: MIT
// VJP of OFT, ΔW = W·(Rᵀ − I), one factor Q [nq, b(b − 1)/2]. With V = dY·W [tokens, in]:
//   dX (update part) = V·Rᵀ − V (blockwise),   ∂L/∂R_k = X_kᵀ·V_k (b × b, summed over the
//   blocks for block_share), then through the parametrisation on the host, in double:
//     Cayley:   ∂L/∂Q = −(I + R)ᵀ·Ḡ·(I + Q)⁻ᵀ
//     Neumann:  ∂L/∂Q = Σ_k c_k Σ_{j<k} (Qᵀ)^j·Ḡ·(Qᵀ)^{k−1−j}
//   and ∂L/∂q_(i,j) = ∂L/∂Q(i, j) − ∂L/∂Q(j, i) for the stored upper triangle.
// PEFT's COFT projection is applied outside the graph (no gradient), as in PEFT.
// Any device: the nb blocks X_kᵀ·V_k are one strided batch read on the host at once (nb·b²
// values) and Q is downloaded once; ∂L/∂Q is formed on the host and added to the gradient
// slot through one upload and an axpy (detail::add_from_host).
#pragma once

#include <string>
#include <vector>

#include "../../expr/oft.hpp"
#include "oft.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T, class TW, class D>
struct vjp<oft_update<T, TW, D>> {
  using U = oft_update<T, TW, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "Q"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<oft>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.Q(), op, "Q");
    using enum kernels::op;
    const index_t b = u.block(), nq = u.Q().rows();
    auto V = kernels::make_scratch<C>(ctx, dY.rows(), u.cols());
    base_apply_transposed<C>(ctx, u.W(), dY, V.view());
    if (present(dX)) {
      const auto R = oft_detail::rotations_in<C>(ctx, u);
      oft_detail::rotate<C>(ctx, u, R, V.cview(), dX, trans, C(1));
      axpy<C>(ctx, C(-1), V.cview(), dX);
    }
    if (!present(grads[0]) || b < 2) return;
    // Ḡ_k = X_kᵀ·V_k for every block k (one strided batch), read on the host.
    const index_t nb = u.blocks(), ne = u.Q().cols();
    auto Gk = kernels::make_scratch<C>(ctx, nb * b, b);
    gemm_strided_batched<C>(ctx, C(1), X.middle_cols(0, b), b * X.col_stride(), trans, V.cview().middle_cols(0, b),
                            b * V.cview().col_stride(), none, C(0), Gk.view().middle_rows(0, b), b * b, nb);
    const std::vector<double> gk = to_host_vector<double>(ctx, vector_view<const C, D>(Gk.cview().data(), nb * b * b));
    std::vector<dense<double>> Gbar(std::size_t(nq), dense<double>::Zero(b, b));
    for (index_t k = 0; k < nb; ++k) {
      auto& acc = Gbar[std::size_t(u.shared() ? 0 : k)];
      for (index_t i = 0; i < b; ++i)
        for (index_t j = 0; j < b; ++j) acc(i, j) += gk[std::size_t((k * b + i) * b + j)];
    }
    const std::vector<double> Qh = oft_detail::to_host_matrix(ctx, u.Q());
    const matrix_view<const double> Qv(Qh.data(), nq, ne, ne, 1);
    std::vector<C> dq(std::size_t(nq * ne));
    for (index_t q = 0; q < nq; ++q) {
      const dense<double> S = oft_detail::skew(Qv, q, b);
      const Eigen::Map<const dense<double>> R(u.rotation(q), b, b);
      const dense<double> dQ = oft_detail::pullback(S, dense<double>(R), Gbar[std::size_t(q)], u.options());
      index_t e = 0;
      for (index_t i = 0; i < b; ++i)
        for (index_t j = i + 1; j < b; ++j, ++e) dq[std::size_t(q * ne + e)] = C(dQ(i, j) - dQ(j, i));
    }
    detail::add_from_host(ctx, dq, grads[0]);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
