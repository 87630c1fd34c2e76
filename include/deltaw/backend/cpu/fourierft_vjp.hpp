// SPDX-License-Identifier: MIT
// VJP of FourierFT (ΔW = s·Re(ifft2(S)), backend/cpu/fourierft.hpp); one factor, the
// spectrum c [n], whose gradient slot is [1, n] or [n, 1]. With x̃ and g̃ the conjugate
// DFTs of a token's input row (over in) and upstream gradient row (over out):
//   ∂c_k = s/(out·in)·Σ_t Re(g̃_t[r_k]·x̃_t[q_k])        (Σ_{p,j} g_p·x_j·cos(2π(r_k p/out + q_k j/in)))
//   dX  += dY·ΔW                                        (the transposed apply)
// Per token one real FFT over in and one over out; never the out × in ΔW or its gradient.
#pragma once

#include <string>

#include "../../expr/fourierft.hpp"
#include "fourierft.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<fourierft_update<T, device::cpu>> {
  using D = device::cpu;
  using U = fourierft_update<T, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "spectrum"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY, std::span<const mview<C>> grads,
                       const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<fourierft>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const auto& g = grads[0];
    const index_t n = u.size(), out = u.rows(), in = u.cols(), T_ = X.rows();
    if (present(g) && (g.size() != n || (g.rows() != 1 && g.cols() != 1)))
      throw shape_error(std::string(op) + ": the gradient of the spectrum is " + deltaw::detail::shape_str(g.rows(), g.cols()) +
                        "; expected [1, " + std::to_string(n) + "] or [" + std::to_string(n) + ", 1]");
    if (present(dX)) evaluator<U>::template apply_transposed_add<C>(ctx, u, dY, dX);
    if (!present(g) || n == 0 || T_ == 0) return;
    const index_t stride = g.rows() == 1 ? g.col_stride() : g.row_stride();
    const index_t ch = std::min(T_, fourierft_detail::chunk_rows);
    fourierft_detail::forward_rows<C> FX(in, ch, op), FG(out, ch, op);
    const auto& ix = u.indices();
    std::vector<double> acc(static_cast<std::size_t>(n), 0.0);
    for (index_t t0 = 0; t0 < T_; t0 += ch) {
      const index_t k = std::min(ch, T_ - t0);
      FX.run(ctx, X, t0, k);
      FG.run(ctx, dY, t0, k);
      for (index_t t = 0; t < k; ++t) {
        const auto* fx = FX.row(t);
        const auto* fg = FG.row(t);
        for (index_t j = 0; j < n; ++j) {
          const auto v = fourierft_detail::plus_dft(fg, ix.rows[std::size_t(j)], out) *
                         fourierft_detail::plus_dft(fx, ix.cols[std::size_t(j)], in);
          acc[std::size_t(j)] += double(v.real());
        }
      }
    }
    const double f = evaluator<U>::norm_factor(u);
    for (index_t j = 0; j < n; ++j) g.data()[j * stride] += C(f * acc[std::size_t(j)]);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
