// CPU evaluators of the block-affine updates: Bone "bat" and MiSS.
//
// Bone bat, W'_ij = W_ij·(I + b_i) + b_i. Rows i·r … i·r + r − 1 of W, stored row-major,
// are the matrix M_i [in, r] whose row k·(in/r) + j is row k of W_ij, so W_i·blockdiag(b_i)
// is one product M_i·b_i, and the bias adds b_i's row k to the in/r rows of M_i for W row k.
// Apply chooses by flops (bone_bat_update::forms_merged_weight):
//   - tokens > r: form W' panel by panel and multiply (2·out·in·r flops to form);
//   - else blockwise, y_i = Σ_j (x_j·(I + b_i)ᵀ)·W_ijᵀ + (Σ_j x_j)·b_iᵀ (about one extra
//     base GEMM), which never forms W'.
// In a lazy sum over its own W, bat computes X·W'ᵀ itself instead of X·Wᵀ + X·ΔWᵀ (the
// apply_with_base hook in ops.hpp), so W is multiplied once.
//
// MiSS: y += (Σ_j x_j)·D with x_j the r-column blocks of x (the last one zero-padded), and
// the transposed apply tiles G·Dᵀ along the input.
#pragma once

#include <Eigen/LU>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../../expr/block_affine.hpp"
#include "evaluator.hpp"
#include "kron.hpp"  // kron_detail::packed_rows

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace block_affine_detail {

enum class bat_form { merged, delta, unmerge };

/// Rows [row0, row0 + n) of W (or W'), packed row-major in `rows`, all inside output block
/// i with row0 − i·r = k0, rewritten in place as
///   merged:  M + M·b_i + bias    (W → W')
///   delta:   M·b_i + bias        (W → ΔW)
///   unmerge: (M − bias)·inv_i    (W' → W, inv_i = (I + b_i)⁻¹)
template <class C, class BM>
void transform_block_rows(C* rows, index_t n, index_t in, index_t r, index_t k0, const BM& bi, const dense<C>* inv,
                          bat_form form) {
  if (n == 0 || in == 0) return;
  const index_t nb = in / r;
  Eigen::Map<dense<C>> M(rows, n * nb, r);
  if (form == bat_form::unmerge) {
    for (index_t k = 0; k < n; ++k) M.middleRows(k * nb, nb).rowwise() -= bi.row(k0 + k);
    const dense<C> solved = M * (*inv);
    M = solved;
    return;
  }
  dense<C> Mb = M * bi;
  if (form == bat_form::merged)
    M += Mb;
  else
    M = Mb;
  for (index_t k = 0; k < n; ++k) M.middleRows(k * nb, nb).rowwise() += bi.row(k0 + k);
}

/// (I + b_i)⁻¹ in type C, computed in double; throws if I + b_i is singular.
template <class C, class BM>
dense<C> inverse_of_identity_plus(const BM& bi, index_t i, index_t r) {
  const dense<double> A = dense<double>::Identity(r, r) + bi.template cast<double>();
  Eigen::FullPivLU<dense<double>> lu(A);
  if (!lu.isInvertible())
    throw argument_error("deltaw::unmerge (Bone bat): I + b_i is singular for output block i = " + std::to_string(i) +
                         " (rows " + std::to_string(i * r) + " to " + std::to_string(i * r + r - 1) + " of b [out, " +
                         std::to_string(r) + "]), so W cannot be recovered from W'");
  return lu.inverse().template cast<C>();
}

/// Applies `form` to rows [r0, r0 + P.rows()) held in P (any writable Eigen expression):
/// in place when P's rows are packed, else through a packed copy.
template <class C, class U, class P>
void transform_rows(const U& u, index_t r0, P& panel, bat_form form) {
  const index_t n = panel.rows(), in = u.cols(), r = u.block();
  if (n == 0 || in == 0) return;
  dense<C> sb;
  const auto b = row_major_operand<C>(u.b(), sb);
  dense<C> copy;
  C* data = nullptr;
  bool packed = false;
  if constexpr (std::is_same_v<typename P::Scalar, C> && (int(P::Flags) & Eigen::DirectAccessBit)) {
    packed = kron_detail::is_packed_row_major(panel);
    if (packed) data = const_cast<C*>(panel.data());
  }
  if (!packed) {
    copy = panel;
    data = copy.data();
  }
  // Unmerge inverts every block of the panel before touching any row, so a singular
  // I + b_i leaves the panel (the whole W when it maps directly) as it was.
  const index_t i_first = r0 / r, i_last = (r0 + n - 1) / r;
  std::vector<dense<C>> inv;
  if (form == bat_form::unmerge)
    for (index_t i = i_first; i <= i_last; ++i) inv.push_back(inverse_of_identity_plus<C>(b.middleRows(i * r, r), i, r));
  for (index_t g0 = 0; g0 < n;) {
    const index_t o = r0 + g0, i = o / r, k0 = o % r, gn = std::min(r - k0, n - g0);
    const dense<C>* inv_i = form == bat_form::unmerge ? &inv[std::size_t(i - i_first)] : nullptr;
    transform_block_rows<C>(data + g0 * in, gn, in, r, k0, b.middleRows(i * r, r), inv_i, form);
    g0 += gn;
  }
  if (!packed) panel = copy;
}

/// Rows [r0, r0 + n) of W in type C, packed.
template <class C, class TW>
dense<C> weight_rows(const matrix_view<const TW>& W, index_t r0, index_t n) {
  dense<C> out;
  with_operand<C>(W.middle_rows(r0, n), [&](const auto& M) { out = M; });
  return out;
}

/// Rows per W' panel: a multiple of r near 1024 (bounds the scratch to panel × in).
inline index_t merged_panel_rows(index_t r) { return r * std::max<index_t>(1, 1024 / r); }

/// Calls f(r0, P) with P rows [r0, r0 + n) of W' (form merged) or of ΔW (form delta).
/// The one place a dense W' exists outside merge: panel by panel, dropped after each call.
template <class C, class U, class F>
void for_merged_weight_panels(const U& u, bat_form form, F&& f) {
  const index_t step = merged_panel_rows(u.block());
  for (index_t r0 = 0; r0 < u.rows(); r0 += step) {
    const index_t n = std::min(step, u.rows() - r0);
    dense<C> P = weight_rows<C>(u.W(), r0, n);
    transform_rows<C>(u, r0, P, form);
    f(r0, P);
  }
}

/// Y (+)= X·(W + ΔW)ᵀ (with_base) or Y += X·ΔWᵀ, blockwise (tokens ≤ r): never forms W'.
template <class C, class U, class XM, class YM>
void bat_apply_blockwise(const U& u, const XM& X, YM& Y, bool with_base) {
  const index_t T = X.rows(), in = u.cols(), out = u.rows(), r = u.block(), nb = in / r;
  dense<C> xs, sb;
  const C* x = kron_detail::packed_rows<C>(X, xs);
  const auto b = row_major_operand<C>(u.b(), sb);
  const Eigen::Map<const dense<C>> Xb(x, T * nb, r);  // rows t·nb + j: x_j of token t
  dense<C> S(T, r);                                   // Σ_j x_j
  for (index_t t = 0; t < T; ++t) S.row(t) = Xb.middleRows(t * nb, nb).colwise().sum();
  dense<C> Xi(T * nb, r);
  for (index_t i = 0; i < out / r; ++i) {
    const auto bi = b.middleRows(i * r, r);
    Xi.noalias() = Xb * bi.transpose();
    if (with_base) Xi += Xb;
    const Eigen::Map<const dense<C>> Xiv(Xi.data(), T, in);
    auto Yi = Y.middleCols(i * r, r);
    with_operand<C>(u.W().middle_rows(i * r, r), [&](const auto& Wi) {
      if (with_base)
        Yi.noalias() = Xiv * Wi.transpose();
      else
        Yi.noalias() += Xiv * Wi.transpose();
    });
    Yi.noalias() += S * bi.transpose();
  }
}

/// O (+)= G·(W + ΔW) (with_base) or O += G·ΔW, blockwise:
/// O_j += (G_i·W_ij)·(I + b_i) + G_i·b_i summed over i.
template <class C, class U, class GM, class OM>
void bat_apply_transposed_blockwise(const U& u, const GM& G, OM& O, bool with_base) {
  const index_t T = G.rows(), in = u.cols(), out = u.rows(), r = u.block(), nb = in / r;
  dense<C> sb;
  const auto b = row_major_operand<C>(u.b(), sb);
  dense<C> acc = dense<C>::Zero(T, in);
  Eigen::Map<dense<C>> accb(acc.data(), T * nb, r);
  dense<C> Q = dense<C>::Zero(T, r);  // Σ_i G_i·b_i
  dense<C> Ti(T, in);
  for (index_t i = 0; i < out / r; ++i) {
    const auto bi = b.middleRows(i * r, r);
    const auto Gi = G.middleCols(i * r, r);
    with_operand<C>(u.W().middle_rows(i * r, r), [&](const auto& Wi) { Ti.noalias() = Gi * Wi; });
    const Eigen::Map<const dense<C>> Tib(Ti.data(), T * nb, r);
    accb.noalias() += Tib * bi;
    if (with_base) acc += Ti;
    Q.noalias() += Gi * bi;
  }
  for (index_t t = 0; t < T; ++t) accb.middleRows(t * nb, nb).rowwise() += Q.row(t);
  if (with_base)
    O = acc;
  else
    O += acc;
}

}  // namespace block_affine_detail

template <class T, class TW>
struct evaluator<bone_bat_update<T, TW, device::cpu>> {
  using U = bone_bat_update<T, TW, device::cpu>;
  using form = block_affine_detail::bat_form;

  /// Y = X·W'ᵀ with W' = W + ΔW, W = u.W(): replaces the base product in a lazy sum over
  /// u's own weight (ops.hpp), so that W is multiplied once.
  template <class C, class XM, class YM>
  static void apply_with_base(const U& u, const XM& X, YM& Y) {
    if (u.forms_merged_weight(X.rows())) {
      block_affine_detail::for_merged_weight_panels<C>(u, form::merged, [&](index_t r0, const dense<C>& P) {
        Y.middleCols(r0, P.rows()).noalias() = X * P.transpose();
      });
    } else {
      block_affine_detail::bat_apply_blockwise<C>(u, X, Y, true);
    }
  }
  /// O = G·W'.
  template <class C, class GM, class OM>
  static void apply_transposed_with_base(const U& u, const GM& G, OM& O) {
    if (u.forms_merged_weight(G.rows())) {
      O.setZero();
      block_affine_detail::for_merged_weight_panels<C>(u, form::merged, [&](index_t r0, const dense<C>& P) {
        O.noalias() += G.middleCols(r0, P.rows()) * P;
      });
    } else {
      block_affine_detail::bat_apply_transposed_blockwise<C>(u, G, O, true);
    }
  }

  /// Y += X·ΔWᵀ (bat alone, or over another weight than its own).
  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    if (u.forms_merged_weight(X.rows())) {
      block_affine_detail::for_merged_weight_panels<C>(u, form::delta, [&](index_t r0, const dense<C>& P) {
        Y.middleCols(r0, P.rows()).noalias() += X * P.transpose();
      });
    } else {
      block_affine_detail::bat_apply_blockwise<C>(u, X, Y, false);
    }
  }
  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    if (u.forms_merged_weight(G.rows())) {
      block_affine_detail::for_merged_weight_panels<C>(u, form::delta, [&](index_t r0, const dense<C>& P) {
        O.noalias() += G.middleCols(r0, P.rows()) * P;
      });
    } else {
      block_affine_detail::bat_apply_transposed_blockwise<C>(u, G, O, false);
    }
  }

  template <class C, class P>
  static void add_delta_rows(const U& u, index_t r0, P& panel) {
    dense<C> D = block_affine_detail::weight_rows<C>(u.W(), r0, panel.rows());
    block_affine_detail::transform_rows<C>(u, r0, D, form::delta);
    panel += D;
  }
  /// Rows of W ← rows of W' (W must be u's own weight: checked by merge).
  template <class C, class P>
  static void merge_rows(const U& u, index_t r0, P& panel) {
    block_affine_detail::transform_rows<C>(u, r0, panel, form::merged);
  }
  /// Rows of W' ← (W'_ij − b_i)·(I + b_i)⁻¹; throws argument_error if some I + b_i is singular.
  template <class C, class P>
  static void unmerge_rows(const U& u, index_t r0, P& panel) {
    block_affine_detail::transform_rows<C>(u, r0, panel, form::unmerge);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

template <class T>
struct evaluator<miss_update<T, device::cpu>> : additive_rows<evaluator<miss_update<T, device::cpu>>, miss_update<T, device::cpu>> {
  using U = miss_update<T, device::cpu>;

  /// Y += (Σ_j x_j)·D, tiled along the output for mini.
  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    const index_t T_ = X.rows(), in = u.cols(), r = u.block(), m = u.block_cols();
    if (T_ == 0 || u.rows() == 0) return;
    dense<C> sd;
    const auto D = row_major_operand<C>(u.D(), sd);
    dense<C> S = dense<C>::Zero(T_, r);
    const index_t full = in / r, tail = in % r;
    for (index_t j = 0; j < full; ++j) S += X.middleCols(j * r, r);
    if (tail > 0) S.leftCols(tail) += X.middleCols(full * r, tail);
    if (u.repeats() == 1) {
      Y.noalias() += S * D;
      return;
    }
    const dense<C> SD = S * D;
    for (index_t k = 0; k < u.repeats(); ++k) Y.middleCols(k * m, m) += SD;
  }

  /// O += G·ΔW: O[:, j·r + k] += (G_fold·Dᵀ)[:, k], G_fold the sum of G's m-column blocks.
  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    const index_t T_ = G.rows(), in = u.cols(), r = u.block(), m = u.block_cols();
    if (T_ == 0 || in == 0) return;
    dense<C> sd;
    const auto D = row_major_operand<C>(u.D(), sd);
    dense<C> Q(T_, r);
    if (u.repeats() == 1) {
      Q.noalias() = G * D.transpose();
    } else {
      dense<C> Gf = dense<C>::Zero(T_, m);
      for (index_t k = 0; k < u.repeats(); ++k) Gf += G.middleCols(k * m, m);
      Q.noalias() = Gf * D.transpose();
    }
    const index_t full = in / r, tail = in % r;
    for (index_t j = 0; j < full; ++j) O.middleCols(j * r, r) += Q;
    if (tail > 0) O.middleCols(full * r, tail) += Q.leftCols(tail);
  }

  /// P += factor·(rows r0 … of ΔW): row o is D[:, o mod m]ᵀ tiled along the input.
  template <class C, class P>
  static void add_scaled_rows(const U& u, index_t r0, P& panel, C factor) {
    const index_t n = panel.rows(), in = u.cols(), r = u.block(), m = u.block_cols();
    if (n == 0 || in == 0) return;
    dense<C> sd;
    const auto D = row_major_operand<C>(u.D(), sd);
    dense<C> rowsT(n, r);  // row i: D[:, (r0 + i) mod m]ᵀ
    for (index_t i = 0; i < n; ++i) rowsT.row(i) = factor * D.col((r0 + i) % m).transpose();
    const index_t full = in / r, tail = in % r;
    for (index_t j = 0; j < full; ++j) panel.middleCols(j * r, r) += rowsT;
    if (tail > 0) panel.middleCols(full * r, tail) += rowsT.leftCols(tail);
  }

  /// ‖ΔW‖²_F = repeats·(full blocks·‖D‖²_F + ‖first (in mod r) rows of D‖²_F).
  template <class C>
  static double frobenius_norm(const U& u) {
    dense<double> sd;
    const auto D = row_major_operand<double>(u.D(), sd);
    const index_t r = u.block(), full = u.cols() / r, tail = u.cols() % r;
    const double per = double(full) * D.squaredNorm() + D.topRows(tail).squaredNorm();
    return std::sqrt(double(u.repeats()) * per);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
