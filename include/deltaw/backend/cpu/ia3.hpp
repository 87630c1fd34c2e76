// SPDX-License-Identifier: MIT
// Evaluator of IA³ (expr/ia3.hpp): W' = diag(l)·W (output) or W·diag(l) (input). In a lazy
// sum over its own W it replaces the base product (the apply_with_base hook of ops.hpp):
// one product with W, and a scaling of the output (output IA³) or of a copy of the input
// (input IA³) — W' is never formed. Alone, ΔW = diag(l − 1)·W or W·diag(l − 1) is applied
// the same way into a tokens × out scratch. Merge scales rows or columns of W in place;
// unmerge divides by l (exact inverse up to rounding; an entry l = 0 makes it impossible and
// is refused). Written against the primitive layer for any device (CUDA runs it through
// cuda/include/deltaw/cuda/updates_lowrank.cuh): its maps are host-device functors, and the
// one value unmerge reads on the host (whether l has a zero) is downloaded explicitly.
#pragma once

#include <cmath>
#include <concepts>
#include <string>
#include <type_traits>
#include <vector>

#include "../../expr/ia3.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace ia3_detail {
/// y − shift (host and device).
template <class C>
struct minus {
  C shift;
  DELTAW_HOST_DEVICE C operator()(index_t, index_t, C y) const { return y - shift; }
};
/// y / l[j]: the input side's unmerge (l a contiguous vector on the map's device).
template <class C>
struct over_col {
  const C* l;
  DELTAW_HOST_DEVICE C operator()(index_t, index_t j, C y) const { return y / l[j]; }
};
/// l − shift in type C, as a [1, n] scratch (kernels::as_vector views it).
template <class C, class Ctx, class U>
auto vector_in(const Ctx& ctx, const U& u, double shift) {
  auto s = kernels::vector_scratch<C>(ctx, u.l());
  if (shift != 0.0 && u.l().size() > 0) transform(ctx, s.view(), minus<C>{C(shift)});
  return s;
}
/// The first i in [lo, lo + n) with l[i] = 0 once converted to C, or −1: read on the host
/// (a copy on the CPU; on a device, a synchronising download of those n values).
template <class C, class Ctx, class U>
index_t first_zero(const Ctx& ctx, const U& u, index_t lo, index_t n) {
  if (n <= 0) return -1;
  using V = std::remove_cvref_t<decltype(u.l())>;
  const auto& l = u.l();
  const std::vector<C> h = to_host_vector<C>(ctx, V(l.data() + lo * l.stride(), n, l.stride()));
  for (index_t i = 0; i < n; ++i)
    if (h[std::size_t(i)] == C(0)) return lo + i;
  return -1;
}
}  // namespace ia3_detail

template <class T, class TW, class D>
struct evaluator<ia3_update<T, TW, D>> {
  using U = ia3_update<T, TW, D>;

  /// Y = X·W'ᵀ: replaces the base product in a lazy sum over u's own W.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const auto l = ia3_detail::vector_in<C>(ctx, u, 0.0);
    if (u.side() == ia3_side::output) {
      base_apply<C>(ctx, u.W(), X, Y);
      scale_cols(ctx, Y, kernels::as_vector(l));
    } else {
      auto Xs = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
      copy(ctx, X, Xs.view());
      scale_cols(ctx, Xs.view(), kernels::as_vector(l));
      base_apply<C>(ctx, u.W(), Xs.cview(), Y);
    }
  }
  /// O = G·W'.
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const auto l = ia3_detail::vector_in<C>(ctx, u, 0.0);
    if (u.side() == ia3_side::output) {
      auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
      copy(ctx, G, Gs.view());
      scale_cols(ctx, Gs.view(), kernels::as_vector(l));
      base_apply_transposed<C>(ctx, u.W(), Gs.cview(), O);
    } else {
      base_apply_transposed<C>(ctx, u.W(), G, O);
      scale_cols(ctx, O, kernels::as_vector(l));
    }
  }

  /// Y += X·ΔWᵀ (IA³ alone, or over another weight than its own).
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const auto l1 = ia3_detail::vector_in<C>(ctx, u, 1.0);
    auto P = kernels::make_scratch<C>(ctx, X.rows(), u.rows());
    if (u.side() == ia3_side::output) {
      base_apply<C>(ctx, u.W(), X, P.view());
      scale_cols(ctx, P.view(), kernels::as_vector(l1));
    } else {
      auto Xs = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
      copy(ctx, X, Xs.view());
      scale_cols(ctx, Xs.view(), kernels::as_vector(l1));
      base_apply<C>(ctx, u.W(), Xs.cview(), P.view());
    }
    axpy<C>(ctx, C(1), P.cview(), Y);
  }
  /// O += G·ΔW.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const auto l1 = ia3_detail::vector_in<C>(ctx, u, 1.0);
    if (u.side() == ia3_side::output) {
      auto Gs = kernels::make_scratch<C>(ctx, G.rows(), G.cols());
      copy(ctx, G, Gs.view());
      scale_cols(ctx, Gs.view(), kernels::as_vector(l1));
      base_apply_transposed<C>(ctx, u.W(), Gs.cview(), O, C(1));
    } else {
      auto P = kernels::make_scratch<C>(ctx, G.rows(), u.cols());
      base_apply_transposed<C>(ctx, u.W(), G, P.view());
      scale_cols(ctx, P.view(), kernels::as_vector(l1));
      axpy<C>(ctx, C(1), P.cview(), O);
    }
  }

  /// P += ΔW[r0 : r0 + P.rows()].
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    auto rows = kernels::make_scratch<C>(ctx, panel.rows(), u.cols());
    copy(ctx, u.W().middle_rows(r0, panel.rows()), rows.view());
    const auto l1 = ia3_detail::vector_in<C>(ctx, u, 1.0);
    if (u.side() == ia3_side::output) scale_rows(ctx, rows.view(), kernels::as_vector(l1), r0);
    else scale_cols(ctx, rows.view(), kernels::as_vector(l1));
    axpy<C>(ctx, C(1), rows.cview(), panel);
  }
  /// Rows of W ← rows of W' (W must be u's own weight: checked by merge).
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    const auto l = ia3_detail::vector_in<C>(ctx, u, 0.0);
    if (u.side() == ia3_side::output) scale_rows(ctx, panel, kernels::as_vector(l), r0);
    else scale_cols(ctx, panel, kernels::as_vector(l));
  }
  /// Rows of W' ← rows of W' / l; argument_error (before anything is written) when an
  /// entry of l that the rows need is 0.
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    const bool out = u.side() == ia3_side::output;
    const index_t lo = out ? r0 : 0, n = out ? panel.rows() : panel.cols();
    if (const index_t i = ia3_detail::first_zero<C>(ctx, u, lo, n); i >= 0)
      throw argument_error("deltaw::unmerge (IA³): l[" + std::to_string(i) + "] = 0, so the merged weight lost that " +
                           (out ? "row" : "column") + " and cannot be unmerged");
    const auto ls = ia3_detail::vector_in<C>(ctx, u, 0.0);
    if (out) divide_rows(ctx, panel, kernels::as_vector(ls), r0);
    else transform(ctx, panel, ia3_detail::over_col<C>{ls.cview().data()});
  }

  /// ‖ΔW‖²_F = Σ_oj (l − 1)²·W², in double, one pass over W. CPU only (CUDA's
  /// frobenius_norm forms ΔW by panels through add_delta_rows).
  template <class C>
    requires std::same_as<D, device::cpu>
  static double frobenius_norm(const U& u) {
    const kernels::cpu_context ctx;
    const auto& l = u.l();
    double sq = 0.0;
    const bool out = u.side() == ia3_side::output;
    for_row_panels<double>(ctx, u.W(), [&](index_t r0, const cview<double, D>& P) {
      for (index_t i = 0; i < P.rows(); ++i)
        for (index_t j = 0; j < P.cols(); ++j) {
          const double g = convert<double>(l[out ? r0 + i : j]) - 1.0;
          sq += g * g * P(i, j) * P(i, j);
        }
    });
    return std::sqrt(sq);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
