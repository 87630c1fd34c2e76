// SPDX-License-Identifier: MIT
// Evaluators of the block-affine updates: Bone "bat" and MiSS, written against the
// primitive layer.
//
// Bone bat, W'_ij = W_ij·(I + b_i) + b_i. Rows i·r … i·r + r − 1 of W, with packed rows
// (row-major, row stride = in), are the matrix M_i [in, r] whose row k·(in/r) + j is row k
// of W_ij, so W_i·blockdiag(b_i) is one product M_i·b_i, and the bias adds b_i's row k to
// the in/r rows of M_i for W row k. Apply chooses by flops (bone_bat_update::forms_merged_weight):
//   - tokens > r: form W' panel by panel and multiply (2·out·in·r flops to form);
//   - else blockwise, y_i = Σ_j (x_j·(I + b_i)ᵀ)·W_ijᵀ + (Σ_j x_j)·b_iᵀ (about one extra
//     base GEMM), which never forms W'. The bias terms of all blocks are one product
//     S·bᵀ (S = Σ_j x_j), b [out, r] being the b_i stacked.
// In a lazy sum over its own W, bat computes X·W'ᵀ itself instead of X·Wᵀ + X·ΔWᵀ (the
// apply_with_base hook in ops.hpp), so W is multiplied once.
//
// MiSS: y += (Σ_j x_j)·D with x_j the r-column blocks of x (the last one zero-padded), and
// the transposed apply tiles G·Dᵀ along the input.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../../expr/block_affine.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace block_affine_detail {

enum class bat_form { merged, delta, unmerge };

/// True when v's rows lie back to back with unit stride (row-major, row stride = cols):
/// then v [n, in] is also the matrix [n·(in/r), r] of its r-column blocks (as_blocks).
template <class T, class D>
bool rows_packed(const matrix_view<T, D>& v) {
  return v.empty() || ((v.col_stride() == 1 || v.cols() == 1) && (v.row_stride() == v.cols() || v.rows() == 1));
}

/// v [n, in] with packed rows seen as [n·(in/r), r]: row t·(in/r) + j is block j of row t.
template <class T, class D>
matrix_view<T, D> as_blocks(const matrix_view<T, D>& v, index_t r) {
  return matrix_view<T, D>(v.data(), v.rows() * (v.cols() / r), r, r, 1);
}

/// v in type C with packed rows: v itself when it already is, else a copy held by `buf`
/// (reused when it has v's shape).
template <class C, class Ctx, class T, class D, class S>
cview<C, D> packed_rows(const Ctx& ctx, const matrix_view<const T, D>& v, S& buf) {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, C>) {
    if (rows_packed(v)) return v;
  }
  if (buf.rows() != v.rows() || buf.cols() != v.cols()) buf = kernels::make_scratch<C>(ctx, v.rows(), v.cols());
  copy(ctx, v, buf.view());
  return buf.cview();
}

/// S = Σ_j X[:, j·r : j·r + r], the last, partial block (in mod r columns) zero-padded.
template <class C, class Ctx, class D>
void sum_column_blocks(const Ctx& ctx, const cview<C, D>& X, index_t r, const mview<C, D>& S) {
  fill(ctx, S, C(0));
  const index_t full = X.cols() / r, tail = X.cols() % r;
  for (index_t j = 0; j < full; ++j) axpy<C>(ctx, C(1), X.middle_cols(j * r, r), S);
  if (tail > 0) axpy<C>(ctx, C(1), X.middle_cols(full * r, tail), S.middle_cols(0, tail));
}

/// y + sign·V(a / nb, j) at row a of M (a host-device functor).
template <class C, class D>
struct add_block_row {
  matrix_view<const C, D> V;
  index_t nb;
  C sign;
  DELTAW_HOST_DEVICE C operator()(index_t a, index_t j, C y) const { return y + sign * V(a / nb, j); }
};
/// (keep ? y + P(a, j) : P(a, j)) + bias(a / nb, j) at row a of M (a host-device functor).
template <class C, class D>
struct add_product_and_bias {
  matrix_view<const C, D> P, bias;
  index_t nb;
  bool keep;
  DELTAW_HOST_DEVICE C operator()(index_t a, index_t j, C y) const {
    return (keep ? y + P(a, j) : P(a, j)) + bias(a / nb, j);
  }
};

/// M [n·nb, r] (n rows of a packed [n, nb·r] matrix as blocks): row k·nb + j gets
/// sign·V(k, :) added, for every j < nb.
template <class C, class Ctx, class D>
void add_row_to_blocks(const Ctx& ctx, const mview<C, D>& M, index_t nb, const cview<C, D>& V, C sign) {
  if (nb == 0) return;
  transform(ctx, M.middle_rows(0, V.rows() * nb), add_block_row<C, D>{V, nb, sign});
}

/// Rows of W (or W') packed in `rows` [n, in], all inside output block i with
/// row0 − i·r = k0, rewritten in place as
///   merged:  M + M·b_i + bias    (W → W')
///   delta:   M·b_i + bias        (W → ΔW)
///   unmerge: (M − bias)·inv_i    (W' → W, inv_i = (I + b_i)⁻¹)
/// `work` holds at least n·(in/r) × r.
template <class C, class Ctx, class D, class S>
void transform_block_rows(const Ctx& ctx, const mview<C, D>& rows, index_t r, index_t k0, const cview<C, D>& bi,
                          const cview<C, D>& inv, bat_form form, S& work) {
  using enum kernels::op;
  const index_t n = rows.rows(), in = rows.cols(), nb = in / r;
  if (n == 0 || in == 0) return;
  const auto M = as_blocks(rows, r);
  const auto P = work.view().middle_rows(0, n * nb);
  const auto bias = bi.middle_rows(k0, n);
  if (form == bat_form::unmerge) {
    add_row_to_blocks<C>(ctx, M, nb, bias, C(-1));
    gemm<C>(ctx, C(1), M, none, inv, none, C(0), P);
    copy(ctx, cview<C, D>(P), M);
    return;
  }
  gemm<C>(ctx, C(1), M, none, bi, none, C(0), P);  // M·b_i
  transform(ctx, M, add_product_and_bias<C, D>{cview<C, D>(P), bias, nb, form == bat_form::merged});
}

/// (I + b_i)⁻¹ in type C, computed in double on the host (r × r); throws if I + b_i is
/// singular.
template <class C, class Ctx, class D>
auto inverse_of_identity_plus(const Ctx& ctx, const cview<C, D>& bi, index_t i, index_t r) {
  // b_i read on the host (a device copies it into a packed scratch and downloads it).
  auto packed = kernels::make_scratch<C>(ctx, r, r);
  copy(ctx, bi, packed.view());
  const std::vector<double> h = to_host_vector<double>(ctx, vector_view<const C, D>(packed.data(), r * r));
  dense<double> A(r, r);
  for (index_t a = 0; a < r; ++a)
    for (index_t c = 0; c < r; ++c) A(a, c) = (a == c ? 1.0 : 0.0) + h[std::size_t(a * r + c)];
  Eigen::FullPivLU<dense<double>> lu(A);
  if (!lu.isInvertible())
    throw argument_error("deltaw::unmerge (Bone bat): I + b_i is singular for output block i = " + std::to_string(i) +
                         " (rows " + std::to_string(i * r) + " to " + std::to_string(i * r + r - 1) + " of b [out, " +
                         std::to_string(r) + "]), so W cannot be recovered from W'");
  const dense<double> inv = lu.inverse();
  auto out = kernels::make_scratch<C>(ctx, r, r);
  copy_from_host(ctx, matrix_view<const double>(inv.data(), r, r, r, 1), out.view());
  return out;
}

/// Applies `form` to rows [r0, r0 + P.rows()) held in P: in place when P's rows are
/// packed, else through a packed copy written back.
template <class C, class Ctx, class U, class D>
void transform_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel, bat_form form) {
  const index_t n = panel.rows(), in = u.cols(), r = u.block();
  if (n == 0 || in == 0) return;
  const kernels::operand<C, D> b(ctx, u.b());
  // Unmerge inverts every block of the panel before touching any row, so a singular
  // I + b_i leaves the panel (the whole W when it maps directly) as it was.
  const index_t i_first = r0 / r, i_last = (r0 + n - 1) / r;
  using inv_t = decltype(kernels::make_scratch<C>(ctx, 0, 0));
  std::vector<inv_t> inv;
  if (form == bat_form::unmerge)
    for (index_t i = i_first; i <= i_last; ++i)
      inv.push_back(inverse_of_identity_plus<C>(ctx, b.view().middle_rows(i * r, r), i, r));
  auto copy_buf = kernels::make_scratch<C>(ctx, 0, 0);
  const bool packed = rows_packed(panel);
  mview<C, D> rows = panel;
  if (!packed) {
    copy_buf = kernels::make_scratch<C>(ctx, n, in);
    copy(ctx, cview<C, D>(panel), copy_buf.view());
    rows = copy_buf.view();
  }
  auto work = kernels::make_scratch<C>(ctx, std::min(n, r) * (in / r), r);
  for (index_t g0 = 0; g0 < n;) {
    const index_t o = r0 + g0, i = o / r, k0 = o % r, gn = std::min(r - k0, n - g0);
    const cview<C, D> inv_i = form == bat_form::unmerge ? inv[std::size_t(i - i_first)].cview() : cview<C, D>();
    transform_block_rows<C>(ctx, rows.middle_rows(g0, gn), r, k0, b.view().middle_rows(i * r, r), inv_i, form, work);
    g0 += gn;
  }
  if (!packed) copy(ctx, copy_buf.cview(), panel);
}

/// Rows per W' panel: a multiple of r near 1024 (bounds the scratch to panel × in).
inline index_t merged_panel_rows(index_t r) { return r * std::max<index_t>(1, 1024 / r); }

/// Calls f(r0, P) with P (a cview) rows [r0, r0 + n) of W' (form merged) or of ΔW (form
/// delta). The one place a dense W' exists outside merge: panel by panel, in one scratch.
template <class C, class Ctx, class U, class F>
void for_merged_weight_panels(const Ctx& ctx, const U& u, bat_form form, F&& f) {
  using D = typename U::device_type;
  const index_t step = merged_panel_rows(u.block());
  auto panel = kernels::make_scratch<C>(ctx, std::min(step, u.rows()), u.cols());
  for (index_t r0 = 0; r0 < u.rows(); r0 += step) {
    const index_t n = std::min(step, u.rows() - r0);
    const mview<C, D> P = panel.view().middle_rows(0, n);
    copy(ctx, u.W().middle_rows(r0, n), P);
    transform_rows<C>(ctx, u, r0, P, form);
    f(r0, cview<C, D>(P));
  }
}

/// Y = X·(W + ΔW)ᵀ (with_base) or Y += X·ΔWᵀ, blockwise (tokens ≤ r): never forms W'.
template <class C, class Ctx, class U, class D>
void bat_apply_blockwise(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y, bool with_base) {
  using enum kernels::op;
  const index_t T = X.rows(), in = u.cols(), out = u.rows(), r = u.block(), nb = in / r;
  auto xs = kernels::make_scratch<C>(ctx, 0, 0);
  const auto Xb = as_blocks(packed_rows<C>(ctx, X, xs), r);  // rows t·nb + j: x_j of token t
  const kernels::operand<C, D> b(ctx, u.b());
  auto S = kernels::make_scratch<C>(ctx, T, r);  // Σ_j x_j
  sum_column_blocks<C>(ctx, X, r, S.view());
  auto Xi = kernels::make_scratch<C>(ctx, T * nb, r);
  const cview<C, D> Xiv(Xi.data(), T, in, std::max<index_t>(in, 1), 1);  // Xi as [T, in]
  for (index_t i = 0; i < out / r; ++i) {
    const auto bi = b.view().middle_rows(i * r, r);
    if (with_base) copy(ctx, Xb, Xi.view());
    gemm<C>(ctx, C(1), Xb, none, bi, trans, with_base ? C(1) : C(0), Xi.view());  // x_j·(I + b_i)ᵀ or x_j·b_iᵀ
    const kernels::operand<C, D> Wi(ctx, u.W().middle_rows(i * r, r));
    gemm<C>(ctx, C(1), Xiv, none, Wi, trans, with_base ? C(0) : C(1), Y.middle_cols(i * r, r));
  }
  gemm<C>(ctx, C(1), S.cview(), none, b, trans, C(1), Y);  // y_i += S·b_iᵀ for every i at once
}

/// O = G·(W + ΔW) (with_base) or O += G·ΔW, blockwise:
/// O_j += (G_i·W_ij)·(I + b_i) + G_i·b_i summed over i.
template <class C, class Ctx, class U, class D>
void bat_apply_transposed_blockwise(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O,
                                    bool with_base) {
  using enum kernels::op;
  const index_t T = G.rows(), in = u.cols(), out = u.rows(), r = u.block(), nb = in / r;
  const kernels::operand<C, D> b(ctx, u.b());
  // The accumulator: O itself when its rows are packed, else a scratch added at the end.
  auto accs = kernels::make_scratch<C>(ctx, 0, 0);
  const bool direct = rows_packed(O);
  mview<C, D> acc = O;
  if (!direct) {
    accs = kernels::make_scratch<C>(ctx, T, in);
    acc = accs.view();
  }
  if (with_base || !direct) fill(ctx, acc, C(0));
  const auto accb = as_blocks(acc, r);
  auto Q = kernels::make_scratch<C>(ctx, T, r);
  gemm<C>(ctx, C(1), G, none, b, none, C(0), Q.view());  // Σ_i G_i·b_i = G·b
  auto Ti = kernels::make_scratch<C>(ctx, T, in);
  for (index_t i = 0; i < out / r; ++i) {
    const kernels::operand<C, D> Wi(ctx, u.W().middle_rows(i * r, r));
    gemm<C>(ctx, C(1), G.middle_cols(i * r, r), none, Wi, none, C(0), Ti.view());
    gemm<C>(ctx, C(1), as_blocks(Ti.cview(), r), none, b.view().middle_rows(i * r, r), none, C(1), accb);
    if (with_base) axpy<C>(ctx, C(1), Ti.cview(), acc);
  }
  add_row_to_blocks<C>(ctx, accb, nb, Q.cview(), C(1));  // rows t·nb + j += Q(t, :)
  if (!direct) {
    if (with_base)
      copy(ctx, accs.cview(), O);
    else
      axpy<C>(ctx, C(1), accs.cview(), O);
  }
}

}  // namespace block_affine_detail

template <class T, class TW, class D>
struct evaluator<bone_bat_update<T, TW, D>> {
  using U = bone_bat_update<T, TW, D>;
  using form = block_affine_detail::bat_form;

  /// Y = X·W'ᵀ with W' = W + ΔW, W = u.W(): replaces the base product in a lazy sum over
  /// u's own weight (ops.hpp), so that W is multiplied once.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    if (u.forms_merged_weight(X.rows())) {
      block_affine_detail::for_merged_weight_panels<C>(ctx, u, form::merged, [&](index_t r0, const cview<C, D>& P) {
        gemm<C>(ctx, C(1), X, kernels::op::none, P, kernels::op::trans, C(0), Y.middle_cols(r0, P.rows()));
      });
    } else {
      block_affine_detail::bat_apply_blockwise<C>(ctx, u, X, Y, true);
    }
  }
  /// O = G·W'.
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    if (u.forms_merged_weight(G.rows())) {
      if (u.rows() == 0) fill(ctx, O, C(0));
      block_affine_detail::for_merged_weight_panels<C>(ctx, u, form::merged, [&](index_t r0, const cview<C, D>& P) {
        gemm<C>(ctx, C(1), G.middle_cols(r0, P.rows()), kernels::op::none, P, kernels::op::none, r0 == 0 ? C(0) : C(1), O);
      });
    } else {
      block_affine_detail::bat_apply_transposed_blockwise<C>(ctx, u, G, O, true);
    }
  }

  /// Y += X·ΔWᵀ (bat alone, or over another weight than its own).
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    if (u.forms_merged_weight(X.rows())) {
      block_affine_detail::for_merged_weight_panels<C>(ctx, u, form::delta, [&](index_t r0, const cview<C, D>& P) {
        gemm<C>(ctx, C(1), X, kernels::op::none, P, kernels::op::trans, C(1), Y.middle_cols(r0, P.rows()));
      });
    } else {
      block_affine_detail::bat_apply_blockwise<C>(ctx, u, X, Y, false);
    }
  }
  /// O += G·ΔW.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    if (u.forms_merged_weight(G.rows())) {
      block_affine_detail::for_merged_weight_panels<C>(ctx, u, form::delta, [&](index_t r0, const cview<C, D>& P) {
        gemm<C>(ctx, C(1), G.middle_cols(r0, P.rows()), kernels::op::none, P, kernels::op::none, C(1), O);
      });
    } else {
      block_affine_detail::bat_apply_transposed_blockwise<C>(ctx, u, G, O, false);
    }
  }

  /// P += ΔW[r0 : r0 + P.rows()] (through a packed copy of those rows of W).
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    auto rows = kernels::make_scratch<C>(ctx, panel.rows(), u.cols());
    copy(ctx, u.W().middle_rows(r0, panel.rows()), rows.view());
    block_affine_detail::transform_rows<C>(ctx, u, r0, rows.view(), form::delta);
    axpy<C>(ctx, C(1), rows.cview(), panel);
  }
  /// Rows of W ← rows of W' (W must be u's own weight: checked by merge).
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    block_affine_detail::transform_rows<C>(ctx, u, r0, panel, form::merged);
  }
  /// Rows of W' ← (W'_ij − b_i)·(I + b_i)⁻¹; throws argument_error if some I + b_i is singular.
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    block_affine_detail::transform_rows<C>(ctx, u, r0, panel, form::unmerge);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

template <class T, class D>
struct evaluator<miss_update<T, D>> : additive_rows<evaluator<miss_update<T, D>>, miss_update<T, D>> {
  using U = miss_update<T, D>;

  /// Y += (Σ_j x_j)·D, tiled along the output for mini.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const index_t T_ = X.rows(), r = u.block(), m = u.block_cols();
    if (T_ == 0 || u.rows() == 0) return;
    const kernels::operand<C, D> Dm(ctx, u.D());
    auto S = kernels::make_scratch<C>(ctx, T_, r);
    block_affine_detail::sum_column_blocks<C>(ctx, X, r, S.view());
    if (u.repeats() == 1) {
      gemm<C>(ctx, C(1), S.cview(), none, Dm, none, C(1), Y);
      return;
    }
    auto SD = kernels::make_scratch<C>(ctx, T_, m);
    gemm<C>(ctx, C(1), S.cview(), none, Dm, none, C(0), SD.view());
    for (index_t k = 0; k < u.repeats(); ++k) axpy<C>(ctx, C(1), SD.cview(), Y.middle_cols(k * m, m));
  }

  /// O += G·ΔW: O[:, j·r + k] += (G_fold·Dᵀ)[:, k], G_fold the sum of G's m-column blocks.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const index_t T_ = G.rows(), in = u.cols(), r = u.block(), m = u.block_cols();
    if (T_ == 0 || in == 0) return;
    const kernels::operand<C, D> Dm(ctx, u.D());
    auto Q = kernels::make_scratch<C>(ctx, T_, r);
    if (u.repeats() == 1) {
      gemm<C>(ctx, C(1), G, none, Dm, trans, C(0), Q.view());
    } else {
      auto Gf = kernels::make_scratch<C>(ctx, T_, m);
      fill(ctx, Gf.view(), C(0));
      for (index_t k = 0; k < u.repeats(); ++k) axpy<C>(ctx, C(1), G.middle_cols(k * m, m), Gf.view());
      gemm<C>(ctx, C(1), Gf.cview(), none, Dm, trans, C(0), Q.view());
    }
    const index_t full = in / r, tail = in % r;
    for (index_t j = 0; j < full; ++j) axpy<C>(ctx, C(1), Q.cview(), O.middle_cols(j * r, r));
    if (tail > 0) axpy<C>(ctx, C(1), Q.cview().middle_cols(0, tail), O.middle_cols(full * r, tail));
  }

  /// P += factor·(rows r0 … of ΔW): row o is D[:, o mod m]ᵀ tiled along the input.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel, C factor) {
    const index_t n = panel.rows(), in = u.cols(), r = u.block(), m = u.block_cols();
    if (n == 0 || in == 0) return;
    std::vector<index_t> cols(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) cols[std::size_t(i)] = (r0 + i) % m;
    auto rowsT = kernels::make_scratch<C>(ctx, n, r);  // row i: factor·D[:, (r0 + i) mod m]ᵀ
    gather_rows(ctx, u.D().transpose(), std::span<const index_t>(cols), rowsT.view());
    if (factor != C(1)) transform(ctx, rowsT.view(), kernels::scale_by<C>{factor});
    const index_t full = in / r, tail = in % r;
    for (index_t j = 0; j < full; ++j) axpy<C>(ctx, C(1), rowsT.cview(), panel.middle_cols(j * r, r));
    if (tail > 0) axpy<C>(ctx, C(1), rowsT.cview().middle_cols(0, tail), panel.middle_cols(full * r, tail));
  }

  /// ‖ΔW‖²_F = repeats·(full blocks·‖D‖²_F + ‖first (in mod r) rows of D‖²_F).
  template <class C>
  static double frobenius_norm(const U& u) {
    const kernels::cpu_context ctx;
    const index_t r = u.block(), full = u.cols() / r, tail = u.cols() % r;
    std::vector<double> sq(static_cast<std::size_t>(r));  // ‖row k of D‖²
    reduce_rows(ctx, u.D(), vector_view<double>(sq.data(), r), [](auto x) {
      const double v = deltaw::convert<double>(x);
      return v * v;
    });
    double all = 0.0, top = 0.0;
    for (index_t k = 0; k < r; ++k) {
      all += sq[std::size_t(k)];
      if (k < tail) top += sq[std::size_t(k)];
    }
    return std::sqrt(double(u.repeats()) * (double(full) * all + top));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
