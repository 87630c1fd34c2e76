// SPDX-License-Identifier: MIT
// Evaluator of Kronecker updates ΔW = s·(w1 ⊗ w2) (LoKr, DiffuseKronA), written against
// the primitive layer.
//
// Per token, (w1 ⊗ w2)·x = vec(w1·X·w2ᵀ), X the token as [c, d] row-major. Over all
// tokens that is two products on reshaped data, never w1 ⊗ w2:
//   w2 first:  Z [tokens·c, b] = X [tokens·c, d]·w2ᵀ (one GEMM), then Y_t += w1·Z_t
//              (a strided batch, one GEMM per token, written straight into Y's rows);
//   w1 first:  U_t = w1·X_t [a, d] (a strided batch), then Y [tokens·a, b] += U·w2ᵀ (one
//              GEMM, written straight into Y when its rows are packed, as [a, b] row-major).
// The cheaper order (kron_update::w1_first) is taken. apply_transposed is the same with
// w1ᵀ and w2ᵀ, since ΔWᵀ = s·(w1ᵀ ⊗ w2ᵀ). A low-rank factor is applied as its two
// factors in turn. The row operations add one rank-1 tile s·w1[i1, :]ᵀ·w2[i2, :] per row.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../../expr/kron.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace kron_detail {

inline constexpr kernels::op nt = kernels::op::none, tr = kernels::op::trans;

/// True when v's rows lie back to back (row-major, no padding), so [T, p·q] is also
/// [T·p, q] row-major.
template <class T, class D>
bool is_packed(const matrix_view<T, D>& v) {
  return (v.cols() <= 1 || v.col_stride() == 1) && (v.rows() <= 1 || v.row_stride() == v.cols());
}
/// True when each row of v is contiguous, so a row seen as [p, q] is row-major.
template <class T, class D>
bool is_rowwise(const matrix_view<T, D>& v) {
  return v.cols() <= 1 || v.col_stride() == 1;
}

/// Rows of a [T, p·q] view seen as [T·p, q] (v packed).
template <class T, class D>
matrix_view<T, D> reshape_rows(const matrix_view<T, D>& v, index_t p, index_t q) {
  return matrix_view<T, D>(v.data(), v.rows() * p, q, std::max<index_t>(q, 1), 1);
}
/// The first token of a [T, p·q] view seen as [p, q] (v row-wise); token t is this view
/// moved by t·v.row_stride() elements.
template <class T, class D>
matrix_view<T, D> token_block(const matrix_view<T, D>& v, index_t p, index_t q) {
  return matrix_view<T, D>(v.data(), p, q, std::max<index_t>(q, 1), 1);
}

/// v itself when it is packed (or, with rowwise_only, row-wise), else a packed copy it owns
/// (of the activations' size, never out × in).
template <class C, class D>
class packed_operand {
 public:
  template <class Ctx>
  packed_operand(const Ctx& ctx, const cview<C, D>& v, bool rowwise_only = false) {
    if (rowwise_only ? is_rowwise(v) : is_packed(v)) {
      view_ = v;
      return;
    }
    copy_ = kernels::make_scratch<C>(ctx, v.rows(), v.cols());
    copy(ctx, v, copy_.view());
    view_ = copy_.cview();
  }
  const cview<C, D>& view() const { return view_; }

 private:
  kernels::scratch<C, D> copy_;
  cview<C, D> view_;
};

/// A Kronecker factor's products in arithmetic type C (factors converted when their
/// storage is not C; they are small).
template <class C, class F>
class factor;

template <class C, class T, class D>
class factor<C, kron_dense_factor<T, D>> {
 public:
  template <class Ctx>
  factor(const Ctx& ctx, const kron_dense_factor<T, D>& f) : m_(ctx, f.matrix()) {}

  /// Out_i = α·op(F)·In_i + β·Out_i over a strided batch of count (op(F) = Fᵀ when trans).
  template <class Ctx>
  void left(const Ctx& ctx, bool trans, C alpha, const cview<C, D>& In, index_t in_stride, C beta,
            const mview<C, D>& Out, index_t out_stride, index_t count) const {
    gemm_strided_batched<C>(ctx, alpha, m_.view(), 0, trans ? tr : nt, In, in_stride, nt, beta, Out, out_stride, count);
  }
  /// Out = α·In·op(F)ᵀ + β·Out.
  template <class Ctx>
  void right(const Ctx& ctx, bool trans, C alpha, const cview<C, D>& In, C beta, const mview<C, D>& Out) const {
    gemm<C>(ctx, alpha, In, nt, m_.view(), trans ? nt : tr, beta, Out);
  }
  /// F as a packed row-major scratch (the row operations only; factor-sized).
  template <class Ctx>
  auto dense_copy(const Ctx& ctx) const {
    auto S = kernels::make_scratch<C>(ctx, m_.rows(), m_.cols());
    copy(ctx, m_.view(), S.view());
    return S;
  }
  /// ‖F‖²_F in double.
  double squared_norm() const {
    const kernels::cpu_context ctx;
    const kernels::operand<double, D> m(ctx, m_.view());
    return trace_of_product<double>(m.view(), m.view());
  }

 private:
  kernels::operand<C, D> m_;
};

template <class C, class T, class D>
class factor<C, kron_low_rank_factor<T, D>> {
 public:
  template <class Ctx>
  factor(const Ctx& ctx, const kron_low_rank_factor<T, D>& f) : l_(ctx, f.left()), r_(ctx, f.right()) {}

  /// op(F)·In_i = l·(r·In_i), or Fᵀ·In_i = rᵀ·(lᵀ·In_i); the rank-sized intermediates
  /// of the batch in one scratch.
  template <class Ctx>
  void left(const Ctx& ctx, bool trans, C alpha, const cview<C, D>& In, index_t in_stride, C beta,
            const mview<C, D>& Out, index_t out_stride, index_t count) const {
    if (count == 0) return;
    const index_t k = l_.cols(), n = In.cols();
    auto tmp = kernels::make_scratch<C>(ctx, count * k, n);
    const auto t0 = tmp.view().middle_rows(0, k);
    const index_t ts = k * n;
    if (trans) {
      gemm_strided_batched<C>(ctx, C(1), l_.view(), 0, tr, In, in_stride, nt, C(0), t0, ts, count);
      gemm_strided_batched<C>(ctx, alpha, r_.view(), 0, tr, cview<C, D>(t0), ts, nt, beta, Out, out_stride, count);
    } else {
      gemm_strided_batched<C>(ctx, C(1), r_.view(), 0, nt, In, in_stride, nt, C(0), t0, ts, count);
      gemm_strided_batched<C>(ctx, alpha, l_.view(), 0, nt, cview<C, D>(t0), ts, nt, beta, Out, out_stride, count);
    }
  }
  /// In·Fᵀ = (In·rᵀ)·lᵀ, or In·F = (In·l)·r.
  template <class Ctx>
  void right(const Ctx& ctx, bool trans, C alpha, const cview<C, D>& In, C beta, const mview<C, D>& Out) const {
    auto tmp = kernels::make_scratch<C>(ctx, In.rows(), l_.cols());
    if (trans) {
      gemm<C>(ctx, C(1), In, nt, l_.view(), nt, C(0), tmp.view());
      gemm<C>(ctx, alpha, tmp.cview(), nt, r_.view(), nt, beta, Out);
    } else {
      gemm<C>(ctx, C(1), In, nt, r_.view(), tr, C(0), tmp.view());
      gemm<C>(ctx, alpha, tmp.cview(), nt, l_.view(), tr, beta, Out);
    }
  }
  /// l·r as a packed row-major scratch (the row operations only; factor-sized).
  template <class Ctx>
  auto dense_copy(const Ctx& ctx) const {
    auto S = kernels::make_scratch<C>(ctx, l_.rows(), r_.cols());
    gemm<C>(ctx, C(1), l_.view(), nt, r_.view(), nt, C(0), S.view());
    return S;
  }
  /// ‖l·r‖²_F = tr((lᵀl)(r·rᵀ)), from two k × k Gram matrices, in double.
  double squared_norm() const {
    const kernels::cpu_context ctx;
    const kernels::operand<double, D> l(ctx, l_.view()), r(ctx, r_.view());
    const index_t k = l_.cols();
    auto gl = kernels::make_scratch<double>(ctx, k, k);
    auto gr = kernels::make_scratch<double>(ctx, k, k);
    gemm<double>(ctx, 1.0, l, tr, l, nt, 0.0, gl.view());
    gemm<double>(ctx, 1.0, r, nt, r, tr, 0.0, gr.view());
    return std::max(trace_of_product<double>(gl.cview(), gr.cview()), 0.0);
  }
  const cview<C, D>& left_matrix() const { return l_.view(); }
  const cview<C, D>& right_matrix() const { return r_.view(); }

 private:
  kernels::operand<C, D> l_, r_;
};

/// Out [T, p·uu] += s·(op(w1) ⊗ op(w2)) applied to each row of In [T, q·v], with
/// op(w1) [p, q], op(w2) [uu, v] (trans: the transposed factors).
template <class C, class Ctx, class U, class D>
void apply_kron_add(const Ctx& ctx, const U& u, bool trans, const cview<C, D>& In, const mview<C, D>& Out) {
  const index_t a = u.w1().rows(), c = u.w1().cols(), b = u.w2().rows(), d = u.w2().cols();
  const index_t p = trans ? c : a, q = trans ? a : c, uu = trans ? d : b, v = trans ? b : d;
  const index_t T = In.rows();
  if (T == 0 || p * uu == 0 || q * v == 0) return;
  const factor<C, typename U::first_factor> f1(ctx, u.w1());
  const factor<C, typename U::second_factor> f2(ctx, u.w2());
  const C s = C(u.scale());

  // For the transposed factors, op(w1) first costs what w2 first costs forwards (a
  // factor's product cost does not change under transposition).
  const bool op1_first = trans ? u.flops_w2_first(T) <= u.flops_w1_first(T) : u.w1_first(T);
  if (op1_first) {
    // U_t = s·op(w1)·X_t [p, v] (a batch over the tokens), then Out [T·p, uu] += U·op(w2)ᵀ
    // in one product: into Out when its rows are packed, else into a scratch added after.
    const packed_operand<C, D> X(ctx, In, /*rowwise_only=*/true);
    auto Ub = kernels::make_scratch<C>(ctx, T * p, v);
    f1.left(ctx, trans, s, token_block(X.view(), q, v), X.view().row_stride(), C(0),
            token_block(Ub.view(), p, v), p * v, T);
    if (is_packed(Out)) {
      f2.right(ctx, trans, C(1), Ub.cview(), C(1), reshape_rows(Out, p, uu));
    } else {
      auto S = kernels::make_scratch<C>(ctx, T, p * uu);
      f2.right(ctx, trans, C(1), Ub.cview(), C(0), reshape_rows(S.view(), p, uu));
      axpy<C>(ctx, C(1), S.cview(), Out);
    }
  } else {
    // Z [T·q, uu] = s·X [T·q, v]·op(w2)ᵀ in one product, then Out_t += op(w1)·Z_t (a batch
    // over the tokens, straight into Out's rows when they are contiguous).
    const packed_operand<C, D> X(ctx, In);
    auto Z = kernels::make_scratch<C>(ctx, T * q, uu);
    f2.right(ctx, trans, s, reshape_rows(X.view(), q, v), C(0), Z.view());
    if (is_rowwise(Out)) {
      f1.left(ctx, trans, C(1), token_block(Z.cview(), q, uu), q * uu, C(1), token_block(Out, p, uu),
              Out.row_stride(), T);
    } else {
      auto S = kernels::make_scratch<C>(ctx, T, p * uu);
      f1.left(ctx, trans, C(1), token_block(Z.cview(), q, uu), q * uu, C(0), token_block(S.view(), p, uu), p * uu, T);
      axpy<C>(ctx, C(1), S.cview(), Out);
    }
  }
}

/// P(i, j) += s·w1[i1, j1]·w2[i2, j2] for row r0 + i = i1·b + i2 and column j = j1·d + j2
/// of a panel, with w1 [a, c] and w2 [b, d] packed row-major: the whole panel in one
/// element-wise map (a functor, so that it also runs on a device).
template <class C>
struct kron_tile_map {
  const C* w1;
  const C* w2;
  index_t r0, b, c, d;
  C s;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C y) const {
    const index_t o = r0 + i;
    return y + (s * w1[(o / b) * c + j / d]) * w2[(o % b) * d + j % d];
  }
};

/// P += factor·(rows r0 … r0 + P.rows() of s·(w1 ⊗ w2)): row o = i1·b + i2 seen as [c, d]
/// gets the rank-1 tile factor·s·w1[i1, :]ᵀ·w2[i2, :], from the two factors made dense at
/// their own (small) sizes. On the CPU one map per row (no index division per element);
/// on another device one map over the panel (one launch), with the same arithmetic.
template <class C, class Ctx, class U, class D>
void add_kron_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel, C factor_) {
  if (panel.rows() == 0 || panel.cols() == 0) return;
  const auto w1 = factor<C, typename U::first_factor>(ctx, u.w1()).dense_copy(ctx);
  const auto w2 = factor<C, typename U::second_factor>(ctx, u.w2()).dense_copy(ctx);
  const index_t b = w2.rows(), c = w1.cols(), d = w2.cols();
  const C s = factor_ * C(u.scale());
  if constexpr (!std::is_same_v<D, device::cpu>) {
    transform(ctx, panel, kron_tile_map<C>{w1.data(), w2.data(), r0, b, c, d, s});
  } else {
    for (index_t i = 0; i < panel.rows(); ++i) {
      const index_t o = r0 + i, i1 = o / b, i2 = o % b;
      const C* w1r = w1.data() + i1 * c;  // packed row-major scratches
      const C* w2r = w2.data() + i2 * d;
      const mview<C, D> row(panel.data() + i * panel.row_stride(), c, d, d * panel.col_stride(), panel.col_stride());
      transform(ctx, row, [s, w1r, w2r](index_t j1, index_t j2, C y) { return y + (s * w1r[j1]) * w2r[j2]; });
    }
  }
}

}  // namespace kron_detail

template <class F1, class F2>
struct evaluator<kron_update<F1, F2>> : additive_rows<evaluator<kron_update<F1, F2>>, kron_update<F1, F2>> {
  using U = kron_update<F1, F2>;
  using D = typename U::device_type;

  /// Y += s·X·(w1 ⊗ w2)ᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    kron_detail::apply_kron_add<C>(ctx, u, false, X, Y);
  }
  /// O += s·G·(w1 ⊗ w2).
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    kron_detail::apply_kron_add<C>(ctx, u, true, G, O);
  }
  /// P += factor·ΔW[r0 : r0 + P.rows()].
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    kron_detail::add_kron_rows<C>(ctx, u, r0, P, factor);
  }
  /// ‖s·(w1 ⊗ w2)‖_F = |s|·‖w1‖_F·‖w2‖_F.
  template <class C>
  static double frobenius_norm(const U& u) {
    const kernels::cpu_context ctx;
    const kron_detail::factor<double, F1> f1(ctx, u.w1());
    const kron_detail::factor<double, F2> f2(ctx, u.w2());
    return std::abs(u.scale()) * std::sqrt(f1.squared_norm() * f2.squared_norm());
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
