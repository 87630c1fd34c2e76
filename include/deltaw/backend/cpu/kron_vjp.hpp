// SPDX-License-Identifier: MIT
// VJP of the Kronecker updates ΔW = s·(w1 ⊗ w2) (LoKr, DiffuseKronA), w1 [a, c],
// w2 [b, d]. Per token, with X_t [c, d] and dY_t [a, b] the token's rows reshaped
// row-major, Y_t = s·w1·X_t·w2ᵀ, so
//   ∂w1 = s·Σ_t dY_t·w2·X_tᵀ  [a, c],   ∂w2 = s·Σ_t dY_tᵀ·w1·X_t  [b, d],
//   dX_t (update part) = s·w1ᵀ·dY_t·w2  [c, d].
// Each is two products, and four intermediates can carry them (dYr = dY as [T·a, b],
// Xr = X as [T·c, d]; T tokens):
//   Q = s·dYr·w2 [T·a, d]    gives ∂w1 = Σ_t Q_t·X_tᵀ and dX_t = w1ᵀ·Q_t;
//   V_t = s·w1ᵀ·dY_t [c, b]  gives ∂w2 = Vᵀ·Xr and dXr = V·w2;
//   P_t = w1·X_t [a, d]      gives ∂w2 = s·dYrᵀ·P;
//   Z = Xr·w2ᵀ [T·c, b]      gives ∂w1 = s·Σ_t dY_t·Z_tᵀ.
// The products with w2 and the sums over tokens and rows (Vᵀ·Xr, dYrᵀ·P) are one GEMM on
// the reshaped data; the products with w1 are strided batches over the tokens, and the
// sums Σ_t of per-token products batch-reduce GEMMs (kernels::gemm_strided_reduce).
// backward picks, per gradient, the route with the fewest flops (intermediates shared),
// so nothing larger than the forward's own intermediates ([T·a, d] or [T·c, b]) and the
// factors' own sizes is allocated: never w1 ⊗ w2 nor an out × in gradient.
// A low-rank factor F = left·right is applied as its two factors; its gradient is
// formed at the factor's own size G [rows, cols], then ∂left = G·rightᵀ, ∂right = leftᵀ·G.
//
// Factors, in order (PEFT's names): w1 or w1_a, w1_b; then w2 or w2_a, w2_b.
#pragma once

#include <optional>
#include <string>

#include "../../expr/kron.hpp"
#include "kron.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace kron_vjp_detail {

using kron_detail::nt;
using kron_detail::tr;

/// Gradient slots a factor takes: 1 (dense) or 2 (left, right of a low-rank factor).
template <class F>
inline constexpr int slots = F::is_low_rank ? 2 : 1;

/// Which intermediate carries each gradient (see the top of this file).
struct plan {
  bool w1_via_q = true;  ///< ∂w1 from Q (else from Z)
  bool w2_via_v = true;  ///< ∂w2 from V (else from P)
  bool x_via_q = true;   ///< dX from Q (else from V)
};

/// Flops of the plan for T tokens; the gradients not wanted cost nothing.
template <class U>
index_t plan_flops(const U& u, index_t T, plan p, bool want1, bool want2, bool wantx) {
  const index_t a = u.w1().rows(), c = u.w1().cols(), b = u.w2().rows(), d = u.w2().cols();
  const bool q = (want1 && p.w1_via_q) || (wantx && p.x_via_q);
  const bool v = (want2 && p.w2_via_v) || (wantx && !p.x_via_q);
  index_t f = 0;
  if (q) f += u.w2().product_flops(T * a);
  if (v) f += T * u.w1().product_flops(b);
  if (want1) f += p.w1_via_q ? 2 * T * a * d * c : u.w2().product_flops(T * c) + 2 * T * a * b * c;
  if (want2) f += p.w2_via_v ? 2 * T * c * b * d : T * u.w1().product_flops(d) + 2 * T * a * b * d;
  if (wantx) f += p.x_via_q ? T * u.w1().product_flops(d) : u.w2().product_flops(T * c);
  return f;
}

/// The cheapest of the eight plans.
template <class U>
plan cheapest_plan(const U& u, index_t T, bool want1, bool want2, bool wantx) {
  plan best;
  index_t best_flops = -1;
  for (int k = 0; k < 8; ++k) {
    const plan p{(k & 1) != 0, (k & 2) != 0, (k & 4) != 0};
    const index_t f = plan_flops(u, T, p, want1, want2, wantx);
    if (best_flops < 0 || f < best_flops) {
      best = p;
      best_flops = f;
    }
  }
  return best;
}

/// Adds ∂w1 into G1 [a, c] and ∂w2 into G2 [b, d] and dY·ΔW into dX [T, in], each skipped
/// when absent, by plan p. X [T, in], dY [T, out].
template <class C, class Ctx, class U, class D>
void kron_backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY, const mview<C, D>& G1,
                   const mview<C, D>& G2, const mview<C, D>& dX, plan p) {
  using kron_detail::reshape_rows;
  using kron_detail::token_block;
  const index_t a = u.w1().rows(), c = u.w1().cols(), b = u.w2().rows(), d = u.w2().cols();
  const index_t T = X.rows();
  const bool want1 = present(G1), want2 = present(G2), wantx = present(dX);
  if (T == 0 || a * b == 0 || c * d == 0 || (!want1 && !want2 && !wantx)) return;
  const kron_detail::factor<C, typename U::first_factor> f1(ctx, u.w1());
  const kron_detail::factor<C, typename U::second_factor> f2(ctx, u.w2());
  const C s = C(u.scale());
  // X and dY packed (copied when they are not), so that they are [T·c, d] and [T·a, b].
  const kron_detail::packed_operand<C, D> Xp(ctx, X), dYp(ctx, dY);
  const auto Xr = reshape_rows(Xp.view(), c, d);
  const auto dYr = reshape_rows(dYp.view(), a, b);
  const auto X0 = token_block(Xp.view(), c, d);    // token t: moved by c·d
  const auto dY0 = token_block(dYp.view(), a, b);  // token t: moved by a·b
  // dX: straight into its rows when they are packed, else into a scratch added at the end.
  const bool dx_direct = !wantx || kron_detail::is_packed(dX);
  kernels::scratch<C, D> dXs;
  if (!dx_direct) dXs = kernels::make_scratch<C>(ctx, T, c * d);
  const mview<C, D> dXt = dx_direct ? dX : dXs.view();
  const C bx = dx_direct ? C(1) : C(0);

  const bool need_q = (want1 && p.w1_via_q) || (wantx && p.x_via_q);
  const bool need_v = (want2 && p.w2_via_v) || (wantx && !p.x_via_q);
  if (need_q) {
    auto Q = kernels::make_scratch<C>(ctx, T * a, d);
    f2.right(ctx, true, s, dYr, C(0), Q.view());  // s·dYr·w2
    const auto Q0 = token_block(Q.cview(), a, d);
    if (want1 && p.w1_via_q) gemm_strided_reduce<C>(ctx, C(1), Q0, a * d, nt, X0, c * d, tr, C(1), G1, T);
    if (wantx && p.x_via_q) f1.left(ctx, true, C(1), Q0, a * d, bx, token_block(dXt, c, d), c * d, T);  // w1ᵀ·Q_t
  }
  if (need_v) {
    auto V = kernels::make_scratch<C>(ctx, T * c, b);
    f1.left(ctx, true, s, dY0, a * b, C(0), token_block(V.view(), c, b), c * b, T);  // s·w1ᵀ·dY_t
    if (want2 && p.w2_via_v) gemm<C>(ctx, C(1), V.cview(), tr, Xr, nt, C(1), G2);
    if (wantx && !p.x_via_q) f2.right(ctx, true, C(1), V.cview(), bx, reshape_rows(dXt, c, d));  // V·w2
  }
  if (want1 && !p.w1_via_q) {
    auto Z = kernels::make_scratch<C>(ctx, T * c, b);
    f2.right(ctx, false, s, Xr, C(0), Z.view());  // s·Xr·w2ᵀ
    gemm_strided_reduce<C>(ctx, C(1), dY0, a * b, nt, token_block(Z.cview(), c, b), c * b, tr, C(1), G1, T);
  }
  if (want2 && !p.w2_via_v) {
    auto P = kernels::make_scratch<C>(ctx, T * a, d);
    f1.left(ctx, false, s, X0, c * d, C(0), token_block(P.view(), a, d), a * d, T);  // s·w1·X_t
    gemm<C>(ctx, C(1), dYr, tr, P.cview(), nt, C(1), G2);
  }
  if (!dx_direct) axpy<C>(ctx, C(1), dXs.cview(), dX);
}

/// Checks a factor's slots against its shapes.
template <class F, class G>
void check_factor_slots(const F& f, const G* g, const char* op, const char* dense_name, const char* left_name,
                        const char* right_name) {
  if constexpr (F::is_low_rank) {
    cpu::detail::check_grad_shape(g[0], f.left(), op, left_name);
    cpu::detail::check_grad_shape(g[1], f.right(), op, right_name);
  } else {
    (void)left_name;
    (void)right_name;
    cpu::detail::check_grad_shape(g[0], f.matrix(), op, dense_name);
  }
}

/// Where a factor's gradient [rows, cols] accumulates: a dense factor's own slot, or, for
/// a low-rank factor, a zeroed factor-sized scratch that finish() chains into its slots.
/// Absent when no slot of the factor is.
template <class C, class D, class F>
class factor_grad {
 public:
  template <class Ctx>
  factor_grad(const Ctx& ctx, const F& f, const mview<C, D>* g, bool want) : g_(g) {
    if (!want) return;
    if constexpr (F::is_low_rank) {
      G_ = kernels::make_scratch<C>(ctx, f.rows(), f.cols());
      fill(ctx, G_.view(), C(0));
      view_ = G_.view();
    } else {
      (void)ctx;
      (void)f;
      view_ = g[0];
    }
  }
  const mview<C, D>& view() const { return view_; }
  /// ∂left += G·rightᵀ, ∂right += leftᵀ·G (a low-rank factor's present slots).
  template <class Ctx>
  void finish(const Ctx& ctx, const F& f) const {
    if constexpr (F::is_low_rank) {
      if (!present(view_)) return;
      const kernels::operand<C, D> L(ctx, f.left()), R(ctx, f.right());
      if (present(g_[0])) gemm<C>(ctx, C(1), G_.cview(), nt, R, tr, C(1), g_[0]);
      if (present(g_[1])) gemm<C>(ctx, C(1), L, tr, G_.cview(), nt, C(1), g_[1]);
    } else {
      (void)ctx;
      (void)f;
    }
  }

 private:
  const mview<C, D>* g_;
  kernels::scratch<C, D> G_;
  mview<C, D> view_;
};

}  // namespace kron_vjp_detail

template <class F1, class F2>
struct vjp<kron_update<F1, F2>> {
  using U = kron_update<F1, F2>;
  using D = typename U::device_type;
  static constexpr int n1 = kron_vjp_detail::slots<F1>;
  static constexpr int n2 = kron_vjp_detail::slots<F2>;
  static constexpr int factor_count = n1 + n2;
  /// w1 (or w1_a, w1_b), then w2 (or w2_a, w2_b): PEFT's lokr_* names.
  static const char* factor_name(int i) {
    if (i < n1) return n1 == 1 ? "w1" : i == 0 ? "w1_a" : "w1_b";
    i -= n1;
    return n2 == 1 ? "w2" : i == 0 ? "w2_a" : "w2_b";
  }

  /// grads: one slot per factor in factor_name's order; see vjp.hpp. `route` forces one
  /// of the eight plans (the tests check each); by default the cheapest is taken.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX,
                       std::optional<kron_vjp_detail::plan> route = std::nullopt) {
    constexpr const char* op = "deltaw::cpu::vjp<kron>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    if (X.cols() != u.cols() || dY.cols() != u.rows() || dY.rows() != X.rows())
      throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) + " and dY " +
                        deltaw::detail::shape_str(dY.rows(), dY.cols()) + " for ΔW " +
                        deltaw::detail::shape_str(u.rows(), u.cols()));
    if (present(dX) && (dX.rows() != X.rows() || dX.cols() != X.cols()))
      throw shape_error(std::string(op) + ": dX is " + deltaw::detail::shape_str(dX.rows(), dX.cols()) + " but X is " +
                        deltaw::detail::shape_str(X.rows(), X.cols()));
    const mview<C, D>* g1 = grads.data();
    const mview<C, D>* g2 = grads.data() + n1;
    kron_vjp_detail::check_factor_slots(u.w1(), g1, op, "w1", "w1_a", "w1_b");
    kron_vjp_detail::check_factor_slots(u.w2(), g2, op, "w2", "w2_a", "w2_b");
    bool want1 = false, want2 = false;
    for (int i = 0; i < n1; ++i) want1 = want1 || present(g1[i]);
    for (int i = 0; i < n2; ++i) want2 = want2 || present(g2[i]);
    if (X.rows() == 0) return;  // nothing flows from no tokens
    const auto p = route ? *route : kron_vjp_detail::cheapest_plan(u, X.rows(), want1, want2, present(dX));
    const kron_vjp_detail::factor_grad<C, D, F1> G1(ctx, u.w1(), g1, want1);
    const kron_vjp_detail::factor_grad<C, D, F2> G2(ctx, u.w2(), g2, want2);
    kron_vjp_detail::kron_backward<C>(ctx, u, X, dY, G1.view(), G2.view(), dX, p);
    G1.finish(ctx, u.w1());
    G2.finish(ctx, u.w2());
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
