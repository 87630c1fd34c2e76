// The CPU evaluator protocol. Each update type U specialises cpu::evaluator<U> with:
//
//   template <class C> static void apply_add(const U&, const X&, Y&);            // Y += X·ΔWᵀ
//   template <class C> static void apply_transposed_add(const U&, const G&, O&); // O += G·ΔW
//   template <class C> static void add_delta_rows(const U&, index_t r0, P&);     // P += ΔW[r0 : r0+P.rows()]
//   template <class C> static void merge_rows(const U&, index_t r0, P&);         // P (rows of W) ← rows of W + ΔW
//   template <class C> static void unmerge_rows(const U&, index_t r0, P&);       // the exact inverse of merge_rows
//   template <class C> static double frobenius_norm(const U&);                   // ‖ΔW‖_F
//
// C is the arithmetic type (float or double); X, G, Y, O, P are Eigen expressions of C.
// An update simply added to W provides add_scaled_rows and inherits the three row
// operations from additive_rows below.
// Types whose ΔW depends on W (DoRA) may also provide the sum hooks in backend/cpu/sum.hpp.
#pragma once

#include <cmath>

#include "eigen_bridge.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

template <class U>
struct evaluator {
  static_assert(sizeof(U) == 0,
                "deltaw::cpu::evaluator: this update type has no CPU evaluator; include its header from "
                "deltaw/backend/cpu/ (deltaw/deltaw.hpp includes them all)");
};

/// The row operations of an update that is simply added to W (merge = +ΔW, unmerge = −ΔW),
/// derived from the type's one `add_scaled_rows<C>(u, r0, panel, factor)`, which does
/// panel += factor·ΔW[r0 : r0 + panel.rows()]. Evaluators inherit it (CRTP).
template <class Derived, class U>
struct additive_rows {
  template <class C, class P>
  static void add_delta_rows(const U& u, index_t r0, P& panel) {
    Derived::template add_scaled_rows<C>(u, r0, panel, C(1));
  }
  template <class C, class P>
  static void merge_rows(const U& u, index_t r0, P& panel) {
    Derived::template add_scaled_rows<C>(u, r0, panel, C(1));
  }
  template <class C, class P>
  static void unmerge_rows(const U& u, index_t r0, P& panel) {
    Derived::template add_scaled_rows<C>(u, r0, panel, C(-1));
  }
};

/// ‖ΔW‖_F computed panel by panel (bounded memory) for types without a closed form.
template <class C, class U>
double frobenius_norm_by_panels(const U& u) {
  double sq = 0.0;
  dense<C> panel;
  for (index_t r0 = 0; r0 < u.rows(); r0 += panel_rows) {
    const index_t n = std::min(panel_rows, u.rows() - r0);
    panel.setZero(n, u.cols());
    evaluator<U>::template add_delta_rows<C>(u, r0, panel);
    sq += panel.template cast<double>().squaredNorm();
  }
  return std::sqrt(sq);
}

}  // namespace cpu
DELTAW_NAMESPACE_END
