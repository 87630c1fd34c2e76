// CPU evaluator of Kronecker updates ΔW = s·(w1 ⊗ w2) (LoKr, DiffuseKronA).
//
// Per token, (w1 ⊗ w2)·x = vec(w1·X·w2ᵀ), X the token as [c, d] row-major. Over all
// tokens that is two products on reshaped data, never w1 ⊗ w2:
//   w2 first:  Z [tokens·c, b] = X [tokens·c, d]·w2ᵀ (one GEMM), then Y_t += w1·Z_t;
//   w1 first:  U_t = w1·X_t [a, d] per token, then Y [tokens·a, b] += U·w2ᵀ (one GEMM,
//              written straight into Y, whose rows are [a, b] row-major).
// The cheaper order (kron_update::w1_first) is taken. apply_transposed is the same with
// w1ᵀ and w2ᵀ, since ΔWᵀ = s·(w1ᵀ ⊗ w2ᵀ). A low-rank factor is applied as its two
// factors in turn.
#pragma once

#include <algorithm>
#include <cmath>

#include "../../expr/kron.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace kron_detail {

/// A factor's matrices as row-major Eigen maps in type C (copies only when the factor's
/// storage is not C row-major; factors are small).
template <class C, class F>
struct factor_operand;

template <class C, class T>
struct factor_operand<C, kron_dense_factor<T, device::cpu>> {
  dense<C> scratch;
  cmap<C> m;
  explicit factor_operand(const kron_dense_factor<T, device::cpu>& f) : m(row_major_operand<C>(f.matrix(), scratch)) {}

  /// Out (+)= op(F)·In, op(F) = F or Fᵀ.
  template <bool accumulate, class In, class Out>
  void left(bool trans, const In& in, Out& out, dense<C>&) const {
    if (trans) {
      if constexpr (accumulate) out.noalias() += m.transpose() * in; else out.noalias() = m.transpose() * in;
    } else {
      if constexpr (accumulate) out.noalias() += m * in; else out.noalias() = m * in;
    }
  }
  /// Out (+)= In·op(F)ᵀ.
  template <bool accumulate, class In, class Out>
  void right(bool trans, const In& in, Out& out) const {
    if (trans) {
      if constexpr (accumulate) out.noalias() += in * m; else out.noalias() = in * m;
    } else {
      if constexpr (accumulate) out.noalias() += in * m.transpose(); else out.noalias() = in * m.transpose();
    }
  }
  /// The factor as a dense matrix (materialize and merge only).
  dense<C> dense_matrix() const { return m; }
  double squared_norm() const { return m.template cast<double>().squaredNorm(); }
};

template <class C, class T>
struct factor_operand<C, kron_low_rank_factor<T, device::cpu>> {
  dense<C> sl, sr;
  cmap<C> l, r;  // F = l·r, l [rows, k], r [k, cols]
  explicit factor_operand(const kron_low_rank_factor<T, device::cpu>& f)
      : l(row_major_operand<C>(f.left(), sl)), r(row_major_operand<C>(f.right(), sr)) {}

  // op(F)·In = l·(r·In), or Fᵀ·In = rᵀ·(lᵀ·In); tmp holds the rank-sized intermediate.
  template <bool accumulate, class In, class Out>
  void left(bool trans, const In& in, Out& out, dense<C>& tmp) const {
    if (trans) {
      tmp.noalias() = l.transpose() * in;
      if constexpr (accumulate) out.noalias() += r.transpose() * tmp; else out.noalias() = r.transpose() * tmp;
    } else {
      tmp.noalias() = r * in;
      if constexpr (accumulate) out.noalias() += l * tmp; else out.noalias() = l * tmp;
    }
  }
  // In·Fᵀ = (In·rᵀ)·lᵀ, or In·F = (In·l)·r.
  template <bool accumulate, class In, class Out>
  void right(bool trans, const In& in, Out& out) const {
    dense<C> tmp;
    if (trans) {
      tmp.noalias() = in * l;
      if constexpr (accumulate) out.noalias() += tmp * r; else out.noalias() = tmp * r;
    } else {
      tmp.noalias() = in * r.transpose();
      if constexpr (accumulate) out.noalias() += tmp * l.transpose(); else out.noalias() = tmp * l.transpose();
    }
  }
  dense<C> dense_matrix() const { return l * r; }
  /// ‖l·r‖²_F = tr((lᵀl)(r·rᵀ)), from two k × k Gram matrices.
  double squared_norm() const {
    const dense<double> gl = l.template cast<double>().transpose() * l.template cast<double>();
    const dense<double> gr = r.template cast<double>() * r.template cast<double>().transpose();
    return std::max(gl.cwiseProduct(gr).sum(), 0.0);
  }
};

/// True when m's rows lie back to back in memory (row-major, no padding between rows).
template <class M>
bool is_packed_row_major(const M& m) {
  if constexpr ((int(M::Flags) & Eigen::DirectAccessBit) && (int(M::Flags) & Eigen::RowMajorBit)) {
    return m.innerStride() == 1 && (m.rows() <= 1 || m.outerStride() == m.cols());
  } else {
    return false;
  }
}

/// Row-major packed data of m in type C: m's own memory when it already is, else a copy
/// (of the activations' size, never out × in).
template <class C, class M>
const C* packed_rows(const M& m, dense<C>& scratch) {
  if constexpr (std::is_same_v<typename M::Scalar, C> && (int(M::Flags) & Eigen::DirectAccessBit)) {
    if (is_packed_row_major(m)) return m.data();
  }
  scratch = m;
  return scratch.data();
}

/// Out [T, p·u] += s·(op(w1) ⊗ op(w2)) applied to each row of In [T, q·v], with
/// op(w1) [p, q], op(w2) [u, v] (trans: the transposed factors).
template <class C, class U, class InM, class OutM>
void apply_kron_add(const U& u, bool trans, const InM& In, OutM& Out) {
  const factor_operand<C, typename U::first_factor> f1(u.w1());
  const factor_operand<C, typename U::second_factor> f2(u.w2());
  const index_t a = u.w1().rows(), c = u.w1().cols(), b = u.w2().rows(), d = u.w2().cols();
  const index_t p = trans ? c : a, q = trans ? a : c, uu = trans ? d : b, v = trans ? b : d;
  const index_t T = In.rows();
  if (T == 0 || p * uu == 0) return;
  const C s = C(u.scale());

  dense<C> in_scratch;
  const C* x = packed_rows<C>(In, in_scratch);
  // Write straight into Out when its rows are packed; else into a temporary added at the end.
  const bool direct = [&] {
    if constexpr (std::is_same_v<typename OutM::Scalar, C> && (int(OutM::Flags) & Eigen::DirectAccessBit))
      return is_packed_row_major(Out);
    else
      return false;
  }();
  dense<C> out_scratch;
  C* y = nullptr;
  if (direct) {
    if constexpr (std::is_same_v<typename OutM::Scalar, C> && (int(OutM::Flags) & Eigen::DirectAccessBit))
      y = const_cast<C*>(Out.data());
  } else {
    out_scratch.setZero(T, p * uu);
    y = out_scratch.data();
  }
  using Map = Eigen::Map<dense<C>>;
  using CMap = Eigen::Map<const dense<C>>;
  dense<C> tmp;

  // For the transposed factors, op(w1) first costs what w2 first costs forwards (a
  // factor's product cost does not change under transposition).
  const bool op1_first = trans ? u.flops_w2_first(T) <= u.flops_w1_first(T) : u.w1_first(T);
  if (op1_first) {
    // U_t = s·op(w1)·X_t [p, v], then Out [T·p, uu] += U·op(w2)ᵀ in one product.
    dense<C> Ub(T * p, v);
    for (index_t t = 0; t < T; ++t) {
      const CMap Xt(x + t * q * v, q, v);
      auto Ut = Ub.middleRows(t * p, p);
      f1.template left<false>(trans, Xt, Ut, tmp);
    }
    if (s != C(1)) Ub *= s;
    Map Y(y, T * p, uu);
    f2.template right<true>(trans, Ub, Y);
  } else {
    // Z [T·q, uu] = s·X [T·q, v]·op(w2)ᵀ in one product, then Out_t += op(w1)·Z_t.
    const CMap Xr(x, T * q, v);
    dense<C> Z(T * q, uu);
    f2.template right<false>(trans, Xr, Z);
    if (s != C(1)) Z *= s;
    for (index_t t = 0; t < T; ++t) {
      Map Yt(y + t * p * uu, p, uu);
      f1.template left<true>(trans, Z.middleRows(t * q, q), Yt, tmp);
    }
  }
  if (!direct) Out += out_scratch;
}

/// P += factor·(rows r0 … r0 + P.rows() of s·(w1 ⊗ w2)), from the two small dense factors.
template <class C, class U, class P>
void add_kron_rows(const U& u, index_t r0, P& panel, C factor) {
  if (panel.rows() == 0 || panel.cols() == 0) return;
  const dense<C> w1 = factor_operand<C, typename U::first_factor>(u.w1()).dense_matrix();
  const dense<C> w2 = factor_operand<C, typename U::second_factor>(u.w2()).dense_matrix();
  const index_t b = w2.rows(), c = w1.cols(), d = w2.cols();
  const C s = factor * C(u.scale());
  for (index_t i = 0; i < panel.rows(); ++i) {
    const index_t o = r0 + i, i1 = o / b, i2 = o % b;
    for (index_t j1 = 0; j1 < c; ++j1) panel.row(i).segment(j1 * d, d) += (s * w1(i1, j1)) * w2.row(i2);
  }
}

}  // namespace kron_detail

template <class F1, class F2>
struct evaluator<kron_update<F1, F2>> {
  using U = kron_update<F1, F2>;

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    kron_detail::apply_kron_add<C>(u, false, X, Y);
  }
  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    kron_detail::apply_kron_add<C>(u, true, G, O);
  }
  template <class C, class P>
  static void add_delta_rows(const U& u, index_t r0, P& panel) {
    kron_detail::add_kron_rows<C>(u, r0, panel, C(1));
  }
  template <class C, class P>
  static void merge_rows(const U& u, index_t r0, P& panel) {
    kron_detail::add_kron_rows<C>(u, r0, panel, C(1));
  }
  template <class C, class P>
  static void unmerge_rows(const U& u, index_t r0, P& panel) {
    kron_detail::add_kron_rows<C>(u, r0, panel, C(-1));
  }
  /// ‖s·(w1 ⊗ w2)‖_F = |s|·‖w1‖_F·‖w2‖_F.
  template <class C>
  static double frobenius_norm(const U& u) {
    const kron_detail::factor_operand<double, F1> f1(u.w1());
    const kron_detail::factor_operand<double, F2> f2(u.w2());
    return std::abs(u.scale()) * std::sqrt(f1.squared_norm() * f2.squared_norm());
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
