// SPDX-License-Identifier: MIT
// CUDA evaluator of LoRA/rsLoRA (ΔW = s·B·A): two cuBLAS products through a tokens × r
// scratch, Z = X·Aᵀ then Y = β·Y + s·Z·Bᵀ, so the extra cost over the base GEMM is
// 2·tokens·r·(in + out) flops and the dense ΔW is never formed. Merge is one product
// W ← W ± s·B·A accumulated into W (β = 1); apply_transposed O = G·ΔW likewise through
// G·B; materialize one product into the caller's view.
#pragma once

#include <algorithm>

#include <deltaw/expr/low_rank.hpp>

#include "evaluator.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class T>
struct evaluator<low_rank<T, device::cuda>> {
  using U = low_rank<T, device::cuda>;

  template <class C, class TX>
  static void apply(context& ctx, const U& u, const device_view<const TX>& X, const device_view<C>& Y, double beta) {
    const index_t tokens = X.rows();
    const index_t r = u.rank();
    if (tokens == 0 || Y.cols() == 0) return;
    // Z is column-major [tokens, r] in the output's arithmetic type: fp32 (or fp64)
    // whatever the factors' storage, so nothing is rounded to 16 bits between the products.
    const auto mk = ctx.position();
    C* z = ctx.allocate<C>(std::size_t(tokens * r));
    const device_view<C> Z(z, tokens, r, 1, std::max<index_t>(1, tokens));
    gemm(ctx, Z, X, u.A().transpose(), 1.0, 0.0, "deltaw::apply (LoRA: Z = X·Aᵀ)");
    gemm(ctx, Y, device_view<const C>(Z), u.B().transpose(), u.scale(), beta, "deltaw::apply (LoRA: Y += s·Z·Bᵀ)");
    ctx.release(mk);  // stream order makes the scratch reusable by the next operation
  }

  /// O = β·O + s·(G·B)·A: the transposed product through a tokens × r scratch.
  template <class C, class TG>
  static void apply_transposed(context& ctx, const U& u, const device_view<const TG>& G, const device_view<C>& O,
                               double beta) {
    const index_t tokens = G.rows();
    const index_t r = u.rank();
    if (tokens == 0 || O.cols() == 0) return;
    const auto mk = ctx.position();
    C* z = ctx.allocate<C>(std::size_t(tokens * r));
    const device_view<C> Z(z, tokens, r, 1, std::max<index_t>(1, tokens));
    gemm(ctx, Z, G, u.B(), 1.0, 0.0, "deltaw::apply_transposed (LoRA: Z = G·B)");
    gemm(ctx, O, device_view<const C>(Z), u.A(), u.scale(), beta, "deltaw::apply_transposed (LoRA: O += s·Z·A)");
    ctx.release(mk);
  }

  /// M = s·B·A into the caller's out × in view (one product, β = 0).
  template <class C>
  static void materialize(context& ctx, const U& u, const device_view<C>& M) {
    gemm(ctx, M, u.B(), u.A(), u.scale(), 0.0, "deltaw::materialize (LoRA)");
  }

  template <class TW>
  static void merge(context& ctx, const U& u, const device_view<TW>& W, double sign) {
    gemm(ctx, W, u.B(), u.A(), sign * u.scale(), 1.0, sign > 0 ? "deltaw::merge (LoRA)" : "deltaw::unmerge (LoRA)");
  }
};

}  // namespace cuda
DELTAW_NAMESPACE_END
