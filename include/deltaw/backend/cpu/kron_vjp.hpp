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

/// G1 = ∂w1 [a, c], G2 = ∂w2 [b, d] (written, when not null) and dX += dY·ΔW (when not
/// null), by plan p. X [T, in], dY [T, out]; dX is [T, in].
template <class C, class U, class XM, class GM>
void kron_backward(const U& u, const XM& X, const GM& dY, dense<C>* G1, dense<C>* G2, dense<C>* dX, plan p) {
  using F1 = typename U::first_factor;
  using F2 = typename U::second_factor;
  const index_t a = u.w1().rows(), c = u.w1().cols(), b = u.w2().rows(), d = u.w2().cols();
  const index_t T = X.rows();
  if (G1) G1->setZero(a, c);
  if (G2) G2->setZero(b, d);
  if (T == 0 || (!G1 && !G2 && !dX)) return;
  const kron_detail::factor_operand<C, F1> f1(u.w1());
  const kron_detail::factor_operand<C, F2> f2(u.w2());
  const C s = C(u.scale());
  using CMap = Eigen::Map<const dense<C>>;
  using Map = Eigen::Map<dense<C>>;
  dense<C> xs, gs, tmp;
  const CMap Xr(kron_detail::packed_rows<C>(X, xs), T * c, d);
  const CMap dYr(kron_detail::packed_rows<C>(dY, gs), T * a, b);
  // dX is a dense row-major [T, in] matrix, so its rows are packed: [T·c, d] in place.
  std::optional<Map> dXr;
  if (dX) dXr.emplace(dX->data(), T * c, d);

  const bool need_q = (G1 && p.w1_via_q) || (dX && p.x_via_q);
  const bool need_v = (G2 && p.w2_via_v) || (dX && !p.x_via_q);
  if (need_q) {
    dense<C> Q(T * a, d);
    f2.template right<false>(true, dYr, Q);  // dYr·w2
    if (s != C(1)) Q *= s;
    for (index_t t = 0; t < T; ++t) {
      const auto Qt = Q.middleRows(t * a, a);
      if (G1 && p.w1_via_q) G1->noalias() += Qt * Xr.middleRows(t * c, c).transpose();
      if (dX && p.x_via_q) {
        auto dXt = dXr->middleRows(t * c, c);
        f1.template left<true>(true, Qt, dXt, tmp);  // += w1ᵀ·Q_t
      }
    }
  }
  if (need_v) {
    dense<C> V(T * c, b);
    for (index_t t = 0; t < T; ++t) {
      auto Vt = V.middleRows(t * c, c);
      f1.template left<false>(true, dYr.middleRows(t * a, a), Vt, tmp);  // w1ᵀ·dY_t
    }
    if (s != C(1)) V *= s;
    if (G2 && p.w2_via_v) G2->noalias() += V.transpose() * Xr;
    if (dX && !p.x_via_q) f2.template right<true>(true, V, *dXr);  // += V·w2
  }
  if (G1 && !p.w1_via_q) {
    dense<C> Z(T * c, b);
    f2.template right<false>(false, Xr, Z);  // Xr·w2ᵀ
    if (s != C(1)) Z *= s;
    for (index_t t = 0; t < T; ++t) G1->noalias() += dYr.middleRows(t * a, a) * Z.middleRows(t * c, c).transpose();
  }
  if (G2 && !p.w2_via_v) {
    dense<C> P(T * a, d);
    for (index_t t = 0; t < T; ++t) {
      auto Pt = P.middleRows(t * a, a);
      f1.template left<false>(false, Xr.middleRows(t * c, c), Pt, tmp);  // w1·X_t
    }
    if (s != C(1)) P *= s;
    G2->noalias() += dYr.transpose() * P;
  }
}

/// Checks a factor's slots against its shapes.
template <class C, class F>
void check_factor_slots(const F& f, dense<C>* const* g, const char* op, const char* dense_name, const char* left_name,
                        const char* right_name) {
  if constexpr (F::is_low_rank) {
    cpu::detail::check_grad_shape<C>(g[0], f.left(), op, left_name);
    cpu::detail::check_grad_shape<C>(g[1], f.right(), op, right_name);
  } else {
    (void)left_name;
    (void)right_name;
    cpu::detail::check_grad_shape<C>(g[0], f.matrix(), op, dense_name);
  }
}

/// Adds the factor-sized gradient G of a factor into its slots.
template <class C, class F>
void chain_factor(const F& f, const dense<C>& G, dense<C>* const* g) {
  if constexpr (F::is_low_rank) {
    dense<C> sl, sr;
    const auto L = row_major_operand<C>(f.left(), sl);
    const auto R = row_major_operand<C>(f.right(), sr);
    if (g[0]) g[0]->noalias() += G * R.transpose();
    if (g[1]) g[1]->noalias() += L.transpose() * G;
  } else {
    (void)f;
    *g[0] += G;
  }
}

}  // namespace kron_vjp_detail

template <class F1, class F2>
struct vjp<kron_update<F1, F2>> {
  using U = kron_update<F1, F2>;
  static constexpr int n1 = kron_vjp_detail::slots<F1>;
  static constexpr int n2 = kron_vjp_detail::slots<F2>;
  static constexpr int factor_count = n1 + n2;
  /// w1 (or w1_a, w1_b), then w2 (or w2_a, w2_b): PEFT's lokr_* names.
  static const char* factor_name(int i) {
    if (i < n1) return n1 == 1 ? "w1" : i == 0 ? "w1_a" : "w1_b";
    i -= n1;
    return n2 == 1 ? "w2" : i == 0 ? "w2_a" : "w2_b";
  }

  /// grads: one slot per factor in factor_name's order; see vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<kron>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    if (X.cols() != u.cols() || dY.cols() != u.rows() || dY.rows() != X.rows())
      throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(X.rows(), X.cols()) + " and dY " +
                        deltaw::detail::shape_str(dY.rows(), dY.cols()) + " for ΔW " +
                        deltaw::detail::shape_str(u.rows(), u.cols()));
    if (dX && (dX->rows() != X.rows() || dX->cols() != X.cols()))
      throw shape_error(std::string(op) + ": dX is " + deltaw::detail::shape_str(dX->rows(), dX->cols()) + " but X is " +
                        deltaw::detail::shape_str(X.rows(), X.cols()));
    dense<C>* const* g1 = grads.data();
    dense<C>* const* g2 = grads.data() + n1;
    kron_vjp_detail::check_factor_slots<C>(u.w1(), g1, op, "w1", "w1_a", "w1_b");
    kron_vjp_detail::check_factor_slots<C>(u.w2(), g2, op, "w2", "w2_a", "w2_b");
    bool want1 = false, want2 = false;
    for (int i = 0; i < n1; ++i) want1 = want1 || g1[i];
    for (int i = 0; i < n2; ++i) want2 = want2 || g2[i];
    const auto p = kron_vjp_detail::cheapest_plan(u, X.rows(), want1, want2, dX != nullptr);
    dense<C> G1, G2;
    kron_vjp_detail::kron_backward<C>(u, X, dY, want1 ? &G1 : nullptr, want2 ? &G2 : nullptr, dX, p);
    if (want1) kron_vjp_detail::chain_factor<C>(u.w1(), G1, g1);
    if (want2) kron_vjp_detail::chain_factor<C>(u.w2(), G2, g2);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
