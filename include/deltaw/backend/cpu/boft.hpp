// SPDX-License-Identifier: MIT
// Evaluator of BOFT (expr/boft.hpp), W' = diag(s)·W·Rᵀ with R = M_{m−1}⋯M_0 acting on the
// input (M_i = P_i·BD_i·P_iᵀ), and its constructor deltaw::boft, which computes the
// rotation blocks (b × b, in double, on the host; oft.hpp's Cayley / Cayley–Neumann).
//   X·M_i:   gather X's columns by perm_i⁻¹, rotate each block of b columns by R_{i,k},
//            gather the columns by perm_i (the gathers are skipped when P_i = I)
//   X·R = X·M_{m−1}⋯M_0 (factors m−1 … 0),   X·Rᵀ = X·M_0ᵀ⋯M_{m−1}ᵀ (factors 0 … m−1)
//   apply over its own W (apply_with_base):  Y = ((X·R)·Wᵀ)·diag(s)
//   transposed:                              O = ((G·diag(s))·W)·Rᵀ
//   alone:  Y += ((X·R)·Wᵀ)·diag(s) − X·Wᵀ,  O += ((G·diag(s))·W)·Rᵀ − G·W
//   merge:  rows of W ← s_o·rows·Rᵀ;  unmerge: rows ← (rows / s_o)·R⁻ᵀ (every block
//           inverted, b × b; exact Cayley blocks are orthogonal and R⁻ᵀ = R up to rounding)
// Scratch: two tokens × in buffers (and at most panel_rows × in for merge); the dense
// in × in R, the permutation matrices and W' are never formed.
// Written against the primitive layer, for any device: each factor's nb block products are
// one strided batch; the rotations (host values, computed once in double by deltaw::boft or
// deltaw::cuda::boft) are uploaded into scratch, the permutations reach the device as host
// indices of gather_rows (range-checked and copied into scratch), and unmerge inverts the
// b × b blocks on the host (Eigen) and reads s on the host to refuse a zero.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../../expr/boft.hpp"
#include "oft.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace boft_detail {

/// S = (P − Pᵀ)/2 of parameter block `blk` (rows blk·b … of P [m·nb·b, b]), in double.
template <class T, class D>
dense<double> skew(const matrix_view<const T, D>& P, index_t blk, index_t b) {
  dense<double> S(b, b);
  for (index_t i = 0; i < b; ++i)
    for (index_t j = 0; j < b; ++j)
      S(i, j) = 0.5 * (convert<double>(P(blk * b + i, j)) - convert<double>(P(blk * b + j, i)));
  return S;
}

/// A block table [m·nb·b, b] in type C on ctx's device: the cached rotations, or
/// (inverse) their inverses, computed on the host and uploaded.
template <class C, class Ctx, class U>
auto blocks_in(const Ctx& ctx, const U& u, bool inverse) {
  const index_t b = u.block(), n = u.factors() * u.blocks();
  auto R = kernels::make_scratch<C>(ctx, n * b, b);
  if (!inverse) {
    copy_from_host(ctx, matrix_view<const double>(u.rotations()->data(), n * b, b, b, 1), R.view());
    return R;
  }
  for (index_t q = 0; q < n; ++q) {
    const Eigen::Map<const dense<double>> Rq(u.rotations()->data() + q * b * b, b, b);
    Eigen::FullPivLU<dense<double>> lu(Rq);
    if (!lu.isInvertible())
      throw argument_error("deltaw::unmerge (BOFT): the rotation block " + std::to_string(q) +
                           " is singular (a truncated Cayley–Neumann series), so the merge cannot be undone");
    const dense<double> Ri = lu.inverse();
    copy_from_host(ctx, matrix_view<const double>(Ri.data(), b, b, b, 1), R.view().middle_rows(q * b, b));
  }
  return R;
}

/// Out(:, j) = In(:, idx[j]) (a column gather: row gathers of the transposed views; the
/// host indices are copied to the device by gather_rows).
template <class C, class Ctx, class D>
void gather_cols(const Ctx& ctx, const cview<C, D>& In, const std::vector<index_t>& idx, const mview<C, D>& Out) {
  gather_rows(ctx, In.transpose(), std::span<const index_t>(idx), Out.transpose());
}

/// Out[:, block k] = In[:, block k]·op(R_{i,k}) for the nb blocks of factor i: one strided batch.
template <class C, class Ctx, class U, class S, class D>
void block_products(const Ctx& ctx, const U& u, const S& Bk, index_t i, const cview<C, D>& In, kernels::op o,
                    const mview<C, D>& Out) {
  const index_t b = u.block();
  gemm_strided_batched<C>(ctx, C(1), In.middle_cols(0, b), b * In.col_stride(), kernels::op::none,
                          Bk.cview().middle_rows(i * u.blocks() * b, b), b * b, o, C(0), Out.middle_cols(0, b),
                          b * Out.col_stride(), u.blocks());
}

/// Out = In·op(M_{i₁})·op(M_{i₂})⋯ for the factors in `descending` (m−1 … 0) or ascending
/// order; op(M_i) = P_i·op(BD_i)·P_iᵀ with the blocks of Bk [m·nb·b, b]. Out must not
/// overlap In.
template <class C, class Ctx, class U, class S, class D>
void butterfly(const Ctx& ctx, const U& u, const S& Bk, const cview<C, D>& In, const mview<C, D>& Out, bool descending,
               kernels::op o) {
  const index_t m = u.factors();
  if (In.rows() == 0 || In.cols() == 0) return;
  auto s0 = kernels::make_scratch<C>(ctx, In.rows(), In.cols());
  auto s1 = kernels::make_scratch<C>(ctx, In.rows(), In.cols());
  cview<C, D> cur = In;
  auto free_buf = [&]() -> mview<C, D> { return cur.data() == s0.view().data() ? s1.view() : s0.view(); };
  for (index_t step = 0; step < m; ++step) {
    const index_t i = descending ? m - 1 - step : step;
    const bool last = step == m - 1;
    const auto& p = u.permutation(i);
    if (!p.empty()) {
      const auto g = free_buf();
      gather_cols<C>(ctx, cur, u.inverse_permutation(i), g);
      cur = cview<C, D>(g);
    }
    const mview<C, D> h = last && p.empty() ? Out : free_buf();
    block_products<C>(ctx, u, Bk, i, cur, o, h);
    cur = cview<C, D>(h);
    if (!p.empty()) {
      const mview<C, D> d = last ? Out : free_buf();
      gather_cols<C>(ctx, cur, p, d);
      cur = cview<C, D>(d);
    }
  }
}

/// Rows of P ← rows·Rᵀ·(row scale s from r0) (merge), or rows ← (rows / s)·R⁻ᵀ (unmerge).
template <class C, class Ctx, class U, class D>
void transform_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, bool inverse) {
  const auto Bk = blocks_in<C>(ctx, u, inverse);
  const auto sv = kernels::vector_scratch<C>(ctx, u.s());
  const auto s = kernels::as_vector(sv);
  if (inverse) {
    const std::vector<C> sh = to_host_vector<C>(ctx, u.s());  // read on the host (a download on a device)
    for (index_t i = 0; i < P.rows(); ++i)
      if (sh[std::size_t(r0 + i)] == C(0))
        throw argument_error("deltaw::unmerge (BOFT): s[" + std::to_string(r0 + i) +
                             "] = 0, so the merged weight lost that row and cannot be unmerged");
  }
  auto tmp = kernels::make_scratch<C>(ctx, std::min(panel_rows, P.rows()), P.cols());
  for (index_t r = 0; r < P.rows(); r += panel_rows) {
    const index_t n = std::min(panel_rows, P.rows() - r);
    const auto rows = P.middle_rows(r, n);
    const auto t = tmp.view().middle_rows(0, n);
    copy(ctx, cview<C, D>(rows), t);
    if (inverse) {
      divide_rows(ctx, t, s, r0 + r);
      butterfly<C>(ctx, u, Bk, cview<C, D>(t), rows, true, kernels::op::trans);
    } else {
      butterfly<C>(ctx, u, Bk, cview<C, D>(t), rows, false, kernels::op::trans);
      scale_rows(ctx, rows, s, r0 + r);
    }
  }
}

}  // namespace boft_detail

template <class T, class TW, class D>
struct evaluator<boft_update<T, TW, D>> {
  using U = boft_update<T, TW, D>;

  /// Y = ((X·R)·Wᵀ)·diag(s): replaces the base product in a lazy sum over u's own W.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const auto Bk = boft_detail::blocks_in<C>(ctx, u, false);
    auto Xr = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
    boft_detail::butterfly<C>(ctx, u, Bk, X, Xr.view(), true, kernels::op::none);
    base_apply<C>(ctx, u.W(), Xr.cview(), Y);
    const auto s = kernels::vector_scratch<C>(ctx, u.s());
    scale_cols(ctx, Y, kernels::as_vector(s));
  }
  /// O = ((G·diag(s))·W)·Rᵀ.
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const auto Bk = boft_detail::blocks_in<C>(ctx, u, false);
    const auto s = kernels::vector_scratch<C>(ctx, u.s());
    auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
    copy(ctx, G, Gs.view());
    scale_cols(ctx, Gs.view(), kernels::as_vector(s));
    auto GW = kernels::make_scratch<C>(ctx, G.rows(), u.cols());
    base_apply_transposed<C>(ctx, u.W(), Gs.cview(), GW.view());
    boft_detail::butterfly<C>(ctx, u, Bk, GW.cview(), O, false, kernels::op::trans);
  }
  /// Y += ((X·R)·Wᵀ)·diag(s) − X·Wᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    apply_with_base<C>(ctx, u, X, P.view());
    axpy<C>(ctx, C(1), P.cview(), Y);
    for_row_panels<C>(ctx, u.W(), [&](index_t r0, const cview<C, D>& Wp) {
      gemm<C>(ctx, C(-1), X, kernels::op::none, Wp, kernels::op::trans, C(1), Y.middle_cols(r0, Wp.rows()));
    });
  }
  /// O += ((G·diag(s))·W)·Rᵀ − G·W.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    auto P = kernels::make_scratch<C>(ctx, G.rows(), u.cols());
    apply_transposed_with_base<C>(ctx, u, G, P.view());
    axpy<C>(ctx, C(1), P.cview(), O);
    base_apply_transposed<C>(ctx, u.W(), G, P.view());
    axpy<C>(ctx, C(-1), P.cview(), O);
  }

  /// P += ΔW[r0 : r0 + P.rows()] = rows of diag(s)·W·Rᵀ − W, panel_rows rows at a time.
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    auto w = kernels::make_scratch<C>(ctx, std::min(panel_rows, panel.rows()), u.cols());
    auto t = kernels::make_scratch<C>(ctx, std::min(panel_rows, panel.rows()), u.cols());
    for (index_t r = 0; r < panel.rows(); r += panel_rows) {
      const index_t n = std::min(panel_rows, panel.rows() - r);
      const auto wv = w.view().middle_rows(0, n), tv = t.view().middle_rows(0, n);
      copy(ctx, u.W().middle_rows(r0 + r, n), wv);
      copy(ctx, cview<C, D>(wv), tv);
      boft_detail::transform_rows<C>(ctx, u, r0 + r, tv, false);
      const auto Pr = panel.middle_rows(r, n);
      axpy<C>(ctx, C(1), cview<C, D>(tv), Pr);
      axpy<C>(ctx, C(-1), cview<C, D>(wv), Pr);
    }
  }
  /// Rows of W ← s_o·rows·Rᵀ (W must be u's own weight: checked by merge).
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    boft_detail::transform_rows<C>(ctx, u, r0, panel, false);
  }
  /// Rows of W' ← (rows / s_o)·R⁻ᵀ; argument_error when an s_o is 0 or a block is singular.
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    boft_detail::transform_rows<C>(ctx, u, r0, panel, true);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu

namespace detail {
/// The rotation blocks of the parameters P [m·nb·b, b] (a host view), in double, row-major;
/// empty for a shape the update rejects (its constructor reports it).
template <class T>
std::shared_ptr<std::vector<double>> boft_rotations(const matrix_view<const T>& P, const oft_options& o) {
  auto R = std::make_shared<std::vector<double>>();
  const index_t b = P.cols(), rows = P.rows();
  if (b >= 1 && rows % b == 0) {
    R->resize(std::size_t(rows * b));
    for (index_t q = 0; q < rows / b; ++q) {
      const dense<double> Rq = cpu::oft_detail::rotation(cpu::boft_detail::skew(P, q, b), o);
      for (index_t i = 0; i < b; ++i)
        for (index_t j = 0; j < b; ++j) (*R)[std::size_t((q * b + i) * b + j)] = Rq(i, j);
    }
  }
  return R;
}

/// boft() from held operands: computes and caches the rotation blocks.
template <class TW, class T, class D>
auto make_boft(held_matrix<TW, D> hw, held_matrix<T, D> hp, held_vector<T, D> hs, oft_options o) {
  static_assert(std::is_same_v<D, device::cpu>,
                "deltaw::boft: the rotation blocks are computed on the host (CPU views; deltaw::cuda::boft(ctx, W, R, s) "
                "for CUDA views)");
  auto R = boft_rotations(hp.view, o);
  return boft_update<T, TW, D>(std::move(hw), std::move(hp), std::move(hs), o, std::move(R));
}
}  // namespace detail

/// BOFT over W [out, in] with R [m·nb·b, b] (PEFT's boft_R [m, nb, b, b] flattened; nb·b =
/// in) and s [out] (boft_s [out, 1]); W, R and s held by view, or owned if temporaries.
/// Rotations: exact Cayley by default (PEFT's BOFT). Computes and caches the blocks.
template <class WL, class RL, class SL>
auto boft(WL&& W, RL&& R, SL&& s, oft_options o = boft_default_options) {
  auto hs = hold_vector(std::forward<SL>(s));
  return detail::make_boft(hold(std::forward<WL>(W)), hold(std::forward<RL>(R)), std::move(hs), o);
}

DELTAW_NAMESPACE_END
