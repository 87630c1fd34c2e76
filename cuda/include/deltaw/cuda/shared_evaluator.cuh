// SPDX-License-Identifier: MIT
// The CUDA evaluator of an update type whose evaluator is written once against the
// primitive layer (cpu::evaluator<U> in deltaw/backend/cpu/, templated on the context):
// the same code runs with a cuda::context, its primitives (primitives.cuh,
// elementwise.cuh) found by argument-dependent lookup and its scratch from the context's
// arena (scratch.cuh). This adapts that evaluator to the CUDA protocol of evaluator.cuh:
//
//   apply(ctx, u, X, Y, β)             Y = β·Y + X·ΔWᵀ (β ∈ {0, 1})
//   apply_transposed(ctx, u, G, O, β)  O = β·O + G·ΔW
//   merge(ctx, u, W, sign)             W ← W + ΔW (sign > 0) or its exact inverse
//   materialize(ctx, u, M)             M = ΔW (dense: M is the caller's out × in view)
//
// X and G of another storage type than the output's are converted first (activation-sized
// scratch); a W that is not of the arithmetic type is converted in panels of
// cpu::panel_rows rows. Nothing out × in is allocated.
#pragma once

#include <algorithm>
#include <type_traits>

#include <deltaw/backend/cpu/evaluator.hpp>

#include "context.cuh"
#include "elementwise.cuh"
#include "evaluator.cuh"
#include "primitives.cuh"
#include "scratch.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class U>
struct shared_evaluator {
  using written_once = cpu::evaluator<U>;
  using D = device::cuda;

  template <class C, class TX>
  static void apply(context& ctx, const U& u, const device_view<const TX>& X, const device_view<C>& Y, double beta) {
    const context& c = ctx;
    if (beta == 0.0) fill(c, Y, C(0));
    const kernels::operand<C, D> Xc(c, X);
    written_once::template apply_add<C>(c, u, Xc.view(), Y);
  }

  template <class C, class TG>
  static void apply_transposed(context& ctx, const U& u, const device_view<const TG>& G, const device_view<C>& O,
                               double beta) {
    const context& c = ctx;
    if (beta == 0.0) fill(c, O, C(0));
    const kernels::operand<C, D> Gc(c, G);
    written_once::template apply_transposed_add<C>(c, u, Gc.view(), O);
  }

  template <class TW>
  static void merge(context& ctx, const U& u, const device_view<TW>& W, double sign) {
    using C = compute_t<std::remove_const_t<TW>, typename U::value_type>;
    const context& c = ctx;
    cpu::for_mutable_row_panels<C>(c, W, [&](index_t r0, const cpu::mview<C, D>& P) {
      if (sign > 0) written_once::template merge_rows<C>(c, u, r0, P);
      else written_once::template unmerge_rows<C>(c, u, r0, P);
    });
  }

  /// By panels of about 64 K entries: an evaluator's add_delta_rows may take scratch of
  /// its panel's size (DoRA, Bone bat), which must stay far below out × in.
  template <class C>
  static void materialize(context& ctx, const U& u, const device_view<C>& M) {
    const context& c = ctx;
    fill(c, M, C(0));
    const index_t step = std::max<index_t>(1, (index_t(1) << 16) / std::max<index_t>(M.cols(), 1));
    for (index_t r0 = 0; r0 < M.rows(); r0 += step) {
      const auto mark = c.position();
      written_once::template add_delta_rows<C>(c, u, r0, M.middle_rows(r0, std::min(step, M.rows() - r0)));
      c.release(mark);
    }
  }
};

}  // namespace cuda
DELTAW_NAMESPACE_END
