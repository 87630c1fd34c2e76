// SPDX-License-Identifier: MIT
// VJP of SHiRA (ΔW[o_k, c_k] = s·v[k]); one factor, v, whose gradient slot is [1, nnz] or
// [nnz, 1] (PEFT's shira_weight is a vector):
//   ∂v[k] = s·Σ_t dY[t, o_k]·X[t, c_k]      (the sampled product dYᵀ·X at the pattern only)
//   dX   += dY·ΔW                           (the transposed SpMM)
// 2·tokens·nnz flops each; no out × in matrix (the dense dYᵀ·X is never formed).
#pragma once

#include <string>

#include "../../expr/shira.hpp"
#include "shira.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class T>
struct vjp<shira_update<T, device::cpu>> {
  using D = device::cpu;
  using U = shira_update<T, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "v"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C>& X, const cview<C>& dY,
                       std::span<const mview<C>> grads, const mview<C>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<shira>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    const auto& g = grads[0];
    const index_t n = u.nnz();
    if (present(g) && (g.size() != n || (g.rows() != 1 && g.cols() != 1)))
      throw shape_error(std::string(op) + ": the gradient of v is " + deltaw::detail::shape_str(g.rows(), g.cols()) +
                        "; expected [1, " + std::to_string(n) + "] or [" + std::to_string(n) + ", 1]");
    if (present(dX)) evaluator<U>::template apply_transposed_add<C>(ctx, u, dY, dX);
    if (!present(g) || n == 0) return;
    const auto& p = *u.pattern();
    const index_t gs = g.rows() == 1 ? g.col_stride() : g.row_stride();
    C* gd = g.data();
    const C s = C(u.scale());
    for (index_t o = 0; o < p.out; ++o)
      for (index_t k = p.row_ptr[std::size_t(o)]; k < p.row_ptr[std::size_t(o + 1)]; ++k) {
        const index_t c = index_t(p.csr_col[std::size_t(k)]);
        C acc = C(0);
        for (index_t t = 0; t < X.rows(); ++t) acc += dY(t, o) * X(t, c);
        gd[p.csr_value[std::size_t(k)] * gs] += s * acc;
      }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
