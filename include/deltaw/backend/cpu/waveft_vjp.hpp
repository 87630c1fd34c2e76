// SPDX-License-Identifier: MIT
// VJP of WaveFT (backend/cpu/waveft.hpp); one factor, the coefficients c [n], gradient slot
// [1, n] or [n, 1]: ∂c_k = s·Σ_entries w·Σ_t dY[t, r]·X[t, q] over the ≤ 4 entries (r, q, w)
// of coefficient k; dX += dY·ΔW. O(tokens·n).
#pragma once

#include <string>
#include <vector>

#include "../../expr/waveft.hpp"
#include "vjp.hpp"
#include "waveft.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<waveft_update<T, device::cpu>> {
  using D = device::cpu;
  using U = waveft_update<T, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "spectrum"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY, std::span<const mview<C>> grads,
                       const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<waveft>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const auto& g = grads[0];
    const index_t n = u.size();
    if (present(g) && (g.size() != n || (g.rows() != 1 && g.cols() != 1)))
      throw shape_error(std::string(op) + ": the gradient of the spectrum is " + deltaw::detail::shape_str(g.rows(), g.cols()) +
                        "; expected [1, " + std::to_string(n) + "] or [" + std::to_string(n) + ", 1]");
    if (present(dX)) evaluator<U>::template apply_transposed_add<C>(ctx, u, dY, dX);
    if (!present(g) || n == 0) return;
    const index_t stride = g.rows() == 1 ? g.col_stride() : g.row_stride();
    for (index_t k = 0; k < n; ++k) {
      double acc = 0;
      waveft_detail::for_each_entry(u, std::size_t(k), [&](index_t r, index_t q, double w) {
        double s = 0;
        for (index_t t = 0; t < X.rows(); ++t) s += double(dY(t, r)) * double(X(t, q));
        acc += w * s;
      });
      g.data()[k * stride] += C(u.scale() * acc);
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
