// SPDX-License-Identifier: MIT
// VJP of C3A (backend/cpu/c3a.hpp); one factor, the kernel [out/b · in/b, b]. With ĝ_m and
// x̂_j a token's real-FFT half spectra of output block m of dY and input block j of X:
//   ∂w_{m,j} = s/b·irfft(Σ_t conj(ĝ_{t,m})·x̂_{t,j})     (the circular correlation of g and x)
//   dX      += dY·ΔW                                    (the transposed apply)
// Per frequency the sum over tokens is one real GEMM, [Re ĝ | Im ĝ]ᵀ·[Re x̂ | Im x̂]
// (2·out/b × 2·in/b, accumulated over chunks of 64 tokens), whose four quadrants give the
// real and imaginary parts.
#pragma once

#include <algorithm>
#include <complex>
#include <string>
#include <vector>

#include "../../expr/c3a.hpp"
#include "c3a.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<c3a_update<T, device::cpu>> {
  using D = device::cpu;
  using U = c3a_update<T, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "kernel"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY, std::span<const mview<C>> grads,
                       const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<c3a>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.kernel(), op, "kernel");
    if (present(dX)) evaluator<U>::template apply_transposed_add<C>(ctx, u, dY, dX);
    const auto& g = grads[0];
    const index_t b = u.block_size(), m = u.row_blocks(), n = u.col_blocks(), fb = b / 2 + 1, T_ = X.rows();
    if (!present(g) || T_ == 0 || m == 0 || n == 0) return;
    const index_t ch = std::min(T_, c3a_detail::chunk_rows);
    c3a_detail::chunk_fft<C> fx(ch, n, b, op), fg(ch, m, b, op);
    auto SX = kernels::make_scratch<C>(ctx, fb * ch, 2 * n), SG = kernels::make_scratch<C>(ctx, fb * ch, 2 * m);
    auto M = kernels::make_scratch<C>(ctx, fb * 2 * m, 2 * n);  // Σ over tokens, per frequency
    for (index_t t0 = 0; t0 < T_; t0 += ch) {
      const index_t k = std::min(ch, T_ - t0);
      fx.forward(ctx, X, t0, k, SX.view());
      fg.forward(ctx, dY, t0, k, SG.view());
      for (index_t f = 0; f < fb; ++f)
        gemm<C>(ctx, C(1), SG.cview().middle_rows(f * k, k), kernels::op::trans, SX.cview().middle_rows(f * k, k),
                kernels::op::none, t0 == 0 ? C(0) : C(1), M.view().middle_rows(f * 2 * m, 2 * m));
    }
    std::vector<std::complex<C>> Dsp(static_cast<std::size_t>(m * n * fb));
    for (index_t f = 0; f < fb; ++f) {
      const auto Mv = M.cview().middle_rows(f * 2 * m, 2 * m);
      for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j)
          Dsp[std::size_t((i * n + j) * fb + f)] =
              std::complex<C>(Mv(i, j) + Mv(m + i, n + j), Mv(i, n + j) - Mv(m + i, j));
    }
    std::vector<C> dw(static_cast<std::size_t>(m * n * b));
    fft::plan<C>::c2r(b, m * n, Dsp.data(), dw.data(), op)();
    axpy<C>(ctx, C(u.scale() / double(b)), cview<C>(dw.data(), m * n, b, b, 1), g);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
