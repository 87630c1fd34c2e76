// SPDX-License-Identifier: MIT
// Evaluator of SHiRA (expr/shira.hpp): ΔW sparse in CSR, ΔW[o, c] = s·v[k].
//   apply:        Y[t, o] += s·Σ_{k ∈ row o} v[k]·X[t, c_k]          (SpMM, 2·tokens·nnz flops)
//   transposed:   O[t, c_k] += s·v[k]·G[t, o]
//   merge:        W[o, c_k] += s·v[k] (scatter-add in place); unmerge subtracts the same
//   ‖ΔW‖_F = |s|·‖v‖ (the entries are distinct)
// Tokens are taken in blocks of 32, transposed into a contiguous in × 32 scratch, so that each
// pass over the CSR arrays serves 32 rows of X with unit-stride reads. Scratch: the nnz
// values in the arithmetic type (s folded in), in CSR order, and in × 32.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../expr/shira.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace shira_detail {
inline constexpr index_t token_block = 32;

/// s·v in CSR order, in type C.
template <class C, class U>
std::vector<C> csr_values(const U& u) {
  const auto& p = *u.pattern();
  const auto& v = u.values();
  std::vector<C> out(std::size_t(p.nnz()));
  for (std::size_t j = 0; j < out.size(); ++j) out[j] = C(u.scale() * convert<double>(v[p.csr_value[j]]));
  return out;
}

/// Y[t, o] += Σ_k val[k]·X[t, c_k] over the rows o of the pattern. Each block of 32 tokens is
/// first transposed into Xt [in, 32] (contiguous), so that an entry reads 32 adjacent values.
template <class C>
void spmm_rows(const shira_pattern& p, const std::vector<C>& val, const cview<C>& X, const mview<C>& Y) {
  constexpr index_t tb = token_block;
  std::vector<C> xt(std::size_t(X.cols() * tb));
  C acc[tb];
  for (index_t t0 = 0; t0 < X.rows(); t0 += tb) {
    const index_t nt = std::min(tb, X.rows() - t0);
    std::fill(xt.begin(), xt.end(), C(0));
    for (index_t t = 0; t < nt; ++t)
      for (index_t c = 0; c < X.cols(); ++c) xt[std::size_t(c * tb + t)] = X(t0 + t, c);
    for (index_t o = 0; o < p.out; ++o) {
      const index_t b = p.row_ptr[std::size_t(o)], e = p.row_ptr[std::size_t(o + 1)];
      if (b == e) continue;
      for (index_t t = 0; t < tb; ++t) acc[t] = C(0);
      for (index_t k = b; k < e; ++k) {
        const C w = val[std::size_t(k)];
        const C* xk = xt.data() + index_t(p.csr_col[std::size_t(k)]) * tb;
        for (index_t t = 0; t < tb; ++t) acc[t] += w * xk[t];
      }
      for (index_t t = 0; t < nt; ++t) Y(t0 + t, o) += acc[t];
    }
  }
}

/// O[t, c_k] += val[k]·G[t, o], 32 tokens at a time through a contiguous Ot [in, 32].
template <class C>
void spmm_transposed(const shira_pattern& p, const std::vector<C>& val, const cview<C>& G, const mview<C>& O) {
  constexpr index_t tb = token_block;
  std::vector<C> ot(std::size_t(O.cols() * tb));
  C g[tb];
  for (index_t t0 = 0; t0 < G.rows(); t0 += tb) {
    const index_t nt = std::min(tb, G.rows() - t0);
    std::fill(ot.begin(), ot.end(), C(0));
    for (index_t o = 0; o < p.out; ++o) {
      const index_t b = p.row_ptr[std::size_t(o)], e = p.row_ptr[std::size_t(o + 1)];
      if (b == e) continue;
      for (index_t t = 0; t < tb; ++t) g[t] = t < nt ? G(t0 + t, o) : C(0);
      for (index_t k = b; k < e; ++k) {
        const C w = val[std::size_t(k)];
        C* ok = ot.data() + index_t(p.csr_col[std::size_t(k)]) * tb;
        for (index_t t = 0; t < tb; ++t) ok[t] += w * g[t];
      }
    }
    for (index_t t = 0; t < nt; ++t)
      for (index_t c = 0; c < O.cols(); ++c) O(t0 + t, c) += ot[std::size_t(c * tb + t)];
  }
}
}  // namespace shira_detail

template <class T>
struct evaluator<shira_update<T, device::cpu>> : additive_rows<evaluator<shira_update<T, device::cpu>>,
                                                               shira_update<T, device::cpu>> {
  using D = device::cpu;
  using U = shira_update<T, D>;

  /// Y += X·ΔWᵀ (sparse).
  template <class C, class Ctx>
  static void apply_add(const Ctx&, const U& u, const cview<C>& X, const mview<C>& Y) {
    shira_detail::spmm_rows<C>(*u.pattern(), shira_detail::csr_values<C>(u), X, Y);
  }
  /// O += G·ΔW (sparse).
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx&, const U& u, const cview<C>& G, const mview<C>& O) {
    shira_detail::spmm_transposed<C>(*u.pattern(), shira_detail::csr_values<C>(u), G, O);
  }
  /// P += factor·ΔW[r0 : r0 + P.rows()]: the scatter-add of merge (factor 1) and unmerge (−1).
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx&, const U& u, index_t r0, const mview<C>& P, C factor) {
    const auto& p = *u.pattern();
    const auto val = shira_detail::csr_values<C>(u);
    for (index_t i = 0; i < P.rows(); ++i) {
      const index_t o = r0 + i;
      for (index_t k = p.row_ptr[std::size_t(o)]; k < p.row_ptr[std::size_t(o + 1)]; ++k)
        P(i, index_t(p.csr_col[std::size_t(k)])) += factor * val[std::size_t(k)];
    }
  }
  /// |s|·‖v‖ (distinct entries), in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    double sq = 0;
    for (index_t k = 0; k < u.nnz(); ++k) {
      const double x = convert<double>(u.values()[k]);
      sq += x * x;
    }
    return std::abs(u.scale()) * std::sqrt(sq);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
