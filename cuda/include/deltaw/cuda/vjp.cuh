// SPDX-License-Identifier: MIT
// The VJPs (factor gradients) of the update types on CUDA views, through the backward
// passes written once against the primitive layer (deltaw/backend/cpu/*_vjp.hpp,
// templated on the context and the device), run with a cuda::context:
//
//   cuda::backward<C>(ctx, u, X, dY, grads, dX)
//       grads[i] += ∂L/∂factor_i (absent slots skipped), dX += dY·ΔW (skipped when absent),
//       for Y = X·ΔWᵀ and the upstream gradient dY; the frozen base's dY·W is the caller's.
//       X [tokens, in] and dY [tokens, out] are CUDA views of any storage type (converted
//       to C, activation-sized scratch); grads and dX are float or double CUDA views.
//
// Types: LoRA/rsLoRA, B·R·A (core_lora, lora_xs, lora_sb, lamda), Block-LoRA, MiSS (+ mini),
// Bone bat, LoLDU (z, σ), DoRA (B, A, m), NOLA, VeRA, RandLoRA, Kronecker (kron, lokr,
// diffusekrona; dense and low-rank factors), and the types of updates_lowrank.cuh,
// updates_structured.cuh and updates_spectral.cuh (their cpu::vjp, written once or
// specialised for device::cuda there); lazy sums W + Δ₁ + … (below). The factor order and the slot shapes are
// cpu::vjp<U>'s (factor_name(i)). Nothing out × in is allocated.
//
// Also the primitives those passes need beyond the evaluators' (the CPU side is
// deltaw/kernels/): gemm_strided_reduce (Σ over a strided batch of products), dot_rows
// (row inner products into a device vector) and reduce_cols (column sums read on the
// host: synchronises; for the r or out values that LoLDU's and DoRA's backward sum there).
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <deltaw/backend/cpu/block_affine_vjp.hpp>
#include <deltaw/backend/cpu/block_lora_vjp.hpp>
#include <deltaw/backend/cpu/core_low_rank_vjp.hpp>
#include <deltaw/backend/cpu/dora_vjp.hpp>
#include <deltaw/backend/cpu/kron_vjp.hpp>
#include <deltaw/backend/cpu/ldu_vjp.hpp>
#include <deltaw/backend/cpu/low_rank_vjp.hpp>
#include <deltaw/backend/cpu/random_basis_vjp.hpp>
#include <deltaw/backend/cpu/vjp.hpp>

#include "context.cuh"
#include "elementwise.cuh"
#include "for_each.cuh"
#include "kron.cuh"
#include "primitives.cuh"
#include "scratch.cuh"
#include "updates.cuh"
#include "vector_ops.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

namespace detail {

/// out[i·stride] (+)= Σ_j X(i, j)·Y(i, j), one thread per row, accumulated in A.
template <class T, class A>
struct dot_rows_fn {
  matrix_view<const T, device::cuda> X, Y;
  A* out;
  index_t stride;
  bool accumulate;
  DELTAW_HOST_DEVICE void operator()(index_t i) const {
    A s(0);
    for (index_t j = 0; j < X.cols(); ++j) s += convert<A>(X(i, j)) * convert<A>(Y(i, j));
    A& o = out[i * stride];
    o = accumulate ? o + s : s;
  }
};

/// out[j] = Σ_i f(X(i, j)) in A, one thread per column, in row order (the CPU's order).
template <class T, class A, class F>
struct reduce_cols_fn {
  matrix_view<const T, device::cuda> X;
  A* out;
  F f;
  DELTAW_HOST_DEVICE void operator()(index_t j) const {
    A s(0);
    for (index_t i = 0; i < X.rows(); ++i) s += A(f(X(i, j)));
    out[j] = s;
  }
};

template <class C>
device_view<const C> moved(const device_view<const C>& v, index_t offset) {
  return device_view<const C>(v.data() + offset, v.rows(), v.cols(), v.row_stride(), v.col_stride());
}

}  // namespace detail

/// out[i] (+)= ⟨X(i, :), Y(i, :)⟩ for two same-shaped views, out a device vector (any
/// stride), on ctx's stream: kernels::dot_rows with the output on the device.
template <class T, class A>
void dot_rows(const context& ctx, const matrix_view<const T, device::cuda>& X, const matrix_view<const T, device::cuda>& Y,
              const vector_view<A, device::cuda>& out, bool accumulate = false) {
  constexpr const char* op = "deltaw::cuda::dot_rows";
  if (X.rows() != Y.rows() || X.cols() != Y.cols())
    throw shape_error(std::string(op) + ": " + ::deltaw::detail::shape_str(X.rows(), X.cols()) + " and " +
                      ::deltaw::detail::shape_str(Y.rows(), Y.cols()));
  if (out.size() != X.rows())
    throw shape_error(std::string(op) + ": " + std::to_string(out.size()) + " outputs for " +
                      ::deltaw::detail::shape_str(X.rows(), X.cols()));
  detail::for_each_index(ctx, X.rows(), detail::dot_rows_fn<T, A>{X, Y, out.data(), out.stride(), accumulate}, op);
}

/// out[j] (+)= Σ_i f(X(i, j)) with out in host memory: the column sums formed on the device
/// (f a host-device functor) and read back, which synchronises ctx's stream. For the few
/// values (r or out of them) a backward pass combines on the host.
template <class T, class A, class F>
void reduce_cols(const context& ctx, const matrix_view<const T, device::cuda>& X, const vector_view<A>& out, const F& f,
                 bool accumulate = false) {
  constexpr const char* op = "deltaw::cuda::reduce_cols";
  if (out.size() != X.cols())
    throw shape_error(std::string(op) + ": " + std::to_string(out.size()) + " outputs for " +
                      ::deltaw::detail::shape_str(X.rows(), X.cols()));
  if (X.cols() == 0) return;
  const auto mark = ctx.position();
  A* d = ctx.allocate<A>(std::size_t(X.cols()));
  detail::for_each_index(ctx, X.cols(), detail::reduce_cols_fn<T, A, F>{X, d, f}, op);
  const std::vector<A> h = to_host_vector<A>(ctx, vector_view<const A, device::cuda>(d, X.cols()));
  ctx.release(mark);
  for (index_t j = 0; j < X.cols(); ++j) out[j] = accumulate ? out[j] + h[std::size_t(j)] : h[std::size_t(j)];
}

/// C = α·Σ_{i < count} op(A_i)·op(B_i) + β·C, A_i being A's view moved by i·stride_a
/// elements (likewise B): kernels::gemm_strided_reduce on the device. The items go in
/// chunks of about 64 K output entries through one strided batch into scratch, summed by
/// one product with a vector of ones; C is read once per chunk (unread when β = 0 and
/// count > 0). Scratch: one chunk, never count × |C| when that is larger.
template <class C>
void gemm_strided_reduce(const context& ctx, std::type_identity_t<C> alpha, device_view<const C> A, index_t stride_a,
                         kernels::op oa, device_view<const C> B, index_t stride_b, kernels::op ob,
                         std::type_identity_t<C> beta, device_view<C> Cv, index_t count) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "deltaw::cuda::gemm_strided_reduce: float or double");
  constexpr const char* op = "deltaw::cuda::gemm_strided_reduce";
  {
    const auto Ao = oa == kernels::op::trans ? A.transpose() : A;
    const auto Bo = ob == kernels::op::trans ? B.transpose() : B;
    detail::check_gemm_shapes(Ao.rows(), Ao.cols(), Bo.rows(), Bo.cols(), Cv.rows(), Cv.cols(), op);
  }
  if (Cv.rows() == 0 || Cv.cols() == 0) return;
  if (count <= 0) return scale(ctx, Cv, beta);  // C = β·C (zeros when β = 0)
  const index_t m = Cv.rows(), n = Cv.cols(), mn = m * n;
  const index_t chunk = std::clamp<index_t>((index_t(1) << 16) / mn, 1, count);
  if (chunk == 1) {  // items of 64 K entries or more: one product each, accumulated in C
    for (index_t i = 0; i < count; ++i)
      gemm<C>(ctx, alpha, detail::moved(A, i * stride_a), oa, detail::moved(B, i * stride_b), ob, i == 0 ? C(beta) : C(1),
              Cv);
    return;
  }
  const auto mark = ctx.position();
  C* items = ctx.allocate<C>(std::size_t(chunk * mn));
  C* ones = ctx.allocate<C>(std::size_t(chunk));
  C* sum = ctx.allocate<C>(std::size_t(mn));
  fill(ctx, device_view<C>(ones, 1, chunk, chunk, 1), C(1));
  const device_view<C> S(sum, m, n, n, 1);  // Σ of one chunk, row-major
  for (index_t t0 = 0; t0 < count; t0 += chunk) {
    const index_t k = std::min(chunk, count - t0);
    gemm_strided_batched<C>(ctx, C(1), detail::moved(A, t0 * stride_a), stride_a, oa, detail::moved(B, t0 * stride_b),
                            stride_b, ob, C(0), device_view<C>(items, m, n, n, 1), mn, k);
    // [1, k]·[k, m·n]: the k items (each m × n row-major) summed.
    gemm<C>(ctx, C(1), device_view<const C>(ones, 1, k, k, 1), kernels::op::none,
            device_view<const C>(items, k, mn, mn, 1), kernels::op::none, C(0), device_view<C>(sum, 1, mn, mn, 1));
    transform(ctx, device_view<const C>(S), Cv, detail::combine<C>{alpha, t0 == 0 ? C(beta) : C(1)});
  }
  ctx.release(mark);
}

/// The factor gradients of a CUDA update (see the top of this file). C: the arithmetic
/// and gradient type (float or double). `extra` goes to cpu::vjp<U>::backward as is (a
/// route for Bone bat and Kronecker updates).
template <class C, update U, class TX, class TG, class... Extra>
  requires std::same_as<device_of<U>, device::cuda>
void backward(context& ctx, const U& u, const matrix_view<TX, device::cuda>& X, const matrix_view<TG, device::cuda>& dY,
              std::span<const matrix_view<C, device::cuda>> grads, const matrix_view<C, device::cuda>& dX,
              Extra&&... extra) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::backward: the gradients are float or double CUDA views");
  using V = cpu::vjp<U>;
  constexpr const char* op = "deltaw::cuda::backward";
  cpu::detail::check_grad_slots(grads, V::factor_count, op);
  if (X.cols() != u.cols() || dY.cols() != u.rows() || dY.rows() != X.rows())
    throw shape_error(std::string(op) + ": X is " + ::deltaw::detail::shape_str(X.rows(), X.cols()) + " and dY " +
                      ::deltaw::detail::shape_str(dY.rows(), dY.cols()) + " for ΔW " +
                      ::deltaw::detail::shape_str(u.rows(), u.cols()));
  if (cpu::present(dX) && (dX.rows() != X.rows() || dX.cols() != X.cols()))
    throw shape_error(std::string(op) + ": dX is " + ::deltaw::detail::shape_str(dX.rows(), dX.cols()) + " but X is " +
                      ::deltaw::detail::shape_str(X.rows(), X.cols()));
  // X and dY as given (the type's backward sees converted copies when they are not C).
  for (std::size_t i = 0; i <= grads.size(); ++i) {
    const auto& g = i < grads.size() ? grads[i] : dX;
    if (!cpu::present(g)) continue;
    const char* a = i < grads.size() ? "the gradient of " : "the input gradient dX";
    const char* b = i < grads.size() ? V::factor_name(int(i)) : "";
    if (views_overlap(g, X)) ::deltaw::detail::throw_overlap(op, a, b, "the input X", "");
    if (views_overlap(g, dY)) ::deltaw::detail::throw_overlap(op, a, b, "the upstream gradient dY", "");
  }
  device_guard guard(ctx.device());
  ctx.begin_operation();
  const context& c = ctx;
  const kernels::operand<C, device::cuda> Xo(c, matrix_view<const std::remove_const_t<TX>, device::cuda>(X));
  const kernels::operand<C, device::cuda> Go(c, matrix_view<const std::remove_const_t<TG>, device::cuda>(dY));
  V::template backward<C>(c, u, Xo.view(), Go.view(), grads, dX, std::forward<Extra>(extra)...);
}
template <class C, update U, class TX, class TG, class... Extra>
  requires std::same_as<device_of<U>, device::cuda>
void backward(const U& u, const matrix_view<TX, device::cuda>& X, const matrix_view<TG, device::cuda>& dY,
              std::span<const matrix_view<C, device::cuda>> grads, const matrix_view<C, device::cuda>& dX,
              Extra&&... extra) {
  backward<C>(default_context(), u, X, dY, grads, dX, std::forward<Extra>(extra)...);
}

/// The VJP through a lazy sum W + ΔW₁ + … + ΔW_n on CUDA (W frozen): `grads` holds every
/// update's slots in order (update 1's cpu::vjp slots, then update 2's, …; absent slots
/// are skipped) and dX += dY·W + Σ_k dY·ΔW_k (skipped when absent). Updates over their
/// own weight (DoRA, Bone bat) count ΔW as W' − W, so the sum is still W'.
template <class C, class TW, class... Us, class TX, class TG>
void backward(context& ctx, const sum<TW, device::cuda, Us...>& e, const matrix_view<TX, device::cuda>& X,
              const matrix_view<TG, device::cuda>& dY, std::span<const matrix_view<C, device::cuda>> grads,
              const matrix_view<C, device::cuda>& dX) {
  constexpr const char* op = "deltaw::cuda::backward";
  constexpr int slots = (0 + ... + cpu::vjp<Us>::factor_count);
  if (int(grads.size()) != slots)
    throw argument_error(std::string(op) + ": a sum of " + std::to_string(sizeof...(Us)) + " updates has " +
                         std::to_string(slots) + " gradient slots (each update's factors in order); got " +
                         std::to_string(grads.size()));
  if (cpu::present(dX) && views_overlap(dX, e.base()))
    ::deltaw::detail::throw_overlap(op, "the input gradient dX", "", "the weight W", "");
  std::size_t first = 0;
  std::apply([&](const auto&... u) {
    ((backward<C>(ctx, u, X, dY, grads.subspan(first, std::size_t(cpu::vjp<std::remove_cvref_t<decltype(u)>>::factor_count)),
                  dX),
      first += std::size_t(cpu::vjp<std::remove_cvref_t<decltype(u)>>::factor_count)),
     ...);
  }, e.deltas());
  if (!cpu::present(dX) || dX.rows() == 0 || dX.cols() == 0) return;
  detail::check_unit_stride(e.base(), "W", op);
  device_guard guard(ctx.device());
  ctx.begin_operation();
  gemm(ctx, dX, matrix_view<const std::remove_const_t<TG>, device::cuda>(dY), e.base(), 1.0, 1.0,
       "deltaw::cuda::backward (dX += dY·W)");
}
template <class C, class TW, class... Us, class TX, class TG>
void backward(const sum<TW, device::cuda, Us...>& e, const matrix_view<TX, device::cuda>& X,
              const matrix_view<TG, device::cuda>& dY, std::span<const matrix_view<C, device::cuda>> grads,
              const matrix_view<C, device::cuda>& dX) {
  backward<C>(default_context(), e, X, dY, grads, dX);
}

}  // namespace cuda
DELTAW_NAMESPACE_END
