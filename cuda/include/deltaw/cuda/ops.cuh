// SPDX-License-Identifier: MIT
// The public operations on CUDA expressions, chosen by the views' device: apply (Y =
// X·(W + ΔW)ᵀ, or an update alone), merge and unmerge in place. Each takes an explicit
// context first, or uses the calling thread's default_context(). All are asynchronous on
// the context's stream.
#pragma once

#include <string>
#include <tuple>
#include <type_traits>

#include <deltaw/expr/update.hpp>

#include "context.cuh"
#include "evaluator.cuh"
#include "gemm.cuh"

DELTAW_NAMESPACE_BEGIN

/// An expression whose operands are CUDA views.
template <class E>
concept cuda_expression = weight_expression<E> && std::same_as<device_of<E>, device::cuda>;

namespace cuda::detail {

template <class V>
inline constexpr bool is_cuda_view_v =
    is_matrix_view_v<V> && std::is_same_v<typename std::remove_cvref_t<V>::device_type, device::cuda>;

/// Rejects, with the user's names for the operands, views that cuBLAS cannot address.
template <class V>
void check_unit_stride(const V& v, const char* what, const char* op) {
  if (!v.is_row_major() && !v.is_col_major())
    throw layout_error(std::string(op) + ": " + what + " " + shape_str(v.rows(), v.cols()) + " has strides " +
                       strides_str(v.row_stride(), v.col_stride()) +
                       "; the CUDA backend needs a unit stride in one dimension (row-major or column-major, "
                       "padding allowed)");
}

/// An update whose ΔW reads its own weight (DoRA, Bone bat) merges only into that weight.
template <class TW, class U>
void check_own_weight(const matrix_view<TW, device::cuda>& W, const U& u, const char* op) {
  if constexpr (requires { u.W(); }) {
    if (!same_view(u.W(), matrix_view<const TW, device::cuda>(W)))
      throw argument_error(std::string(op) + ": a " + U::method_name + " update merges only into the weight it was built on");
  }
}

template <class C, class E, class TX>
void apply_expr(context& ctx, const E& e, const device_view<const TX>& X, const device_view<C>& Y) {
  constexpr const char* op = "deltaw::apply";
  if constexpr (is_matrix_view_v<E>) {
    gemm(ctx, Y, X, e.transpose(), 1.0, 0.0, op);
  } else if constexpr (update<E>) {
    evaluator<E>::template apply<C, TX>(ctx, e, X, Y, 0.0);
  } else {
    gemm(ctx, Y, X, e.base().transpose(), 1.0, 0.0, op);
    std::apply([&](const auto&... u) {
      (evaluator<std::remove_cvref_t<decltype(u)>>::template apply<C, TX>(ctx, u, X, Y, 1.0), ...);
    }, e.deltas());
  }
}

template <class TW, class U>
void merge_impl(context& ctx, const matrix_view<TW, device::cuda>& W, const U& u, double sign, const char* op) {
  static_assert(!std::is_const_v<TW>, "deltaw::merge/unmerge: the weight must be a writable (non-const) CUDA view");
  ::deltaw::detail::check_same_shape(W.rows(), W.cols(), u, op);
  check_own_weight(W, u, op);
  check_unit_stride(W, "W", op);
  if (W.rows() == 0 || W.cols() == 0) return;
  device_guard g(ctx.device());
  ctx.begin_operation();
  evaluator<U>::merge(ctx, u, W, sign);
}

}  // namespace cuda::detail

/// Y = X·(W + ΔW)ᵀ on ctx's stream. X: [tokens, in] CUDA view of any storage type; Y:
/// [tokens, out] writable float or double CUDA view. Views need a unit stride in one
/// dimension. Nothing is synchronised: Y is ready when ctx.stream() reaches this point.
template <cuda_expression E, class XV, class YV>
void apply(cuda::context& ctx, const E& e, const XV& X, const YV& Y) {
  constexpr const char* op = "deltaw::apply";
  static_assert(cuda::detail::is_cuda_view_v<XV>,
                "deltaw::apply: the expression lives on CUDA, so X must be a CUDA view "
                "(deltaw::cuda::view(ptr, rows, cols)), not a CPU matrix");
  static_assert(cuda::detail::is_cuda_view_v<YV>,
                "deltaw::apply: the expression lives on CUDA, so Y must be a CUDA view "
                "(deltaw::cuda::view(ptr, rows, cols)), not a CPU matrix");
  using TX = std::remove_const_t<typename XV::element_type>;
  using C = typename YV::element_type;
  static_assert(!std::is_const_v<C>, "deltaw::apply: the output must be a writable (non-const) view");
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::apply: outputs are float or double (bf16/fp16 are storage types)");
  if (X.cols() != e.cols())
    throw shape_error(std::string(op) + ": X is " + detail::shape_str(X.rows(), X.cols()) + " but W is " +
                      detail::shape_str(e.rows(), e.cols()) + "; X·Wᵀ needs X to have " + std::to_string(e.cols()) +
                      " columns");
  if (Y.rows() != X.rows() || Y.cols() != e.rows())
    throw shape_error(std::string(op) + ": the output is " + detail::shape_str(Y.rows(), Y.cols()) +
                      " but X·Wᵀ is " + detail::shape_str(X.rows(), e.rows()));
  cuda::detail::check_unit_stride(X, "X", op);
  cuda::detail::check_unit_stride(Y, "the output", op);
  if constexpr (is_matrix_view_v<E>) cuda::detail::check_unit_stride(e, "W", op);
  else if constexpr (is_sum<E>::value) cuda::detail::check_unit_stride(e.base(), "W", op);
  if (Y.rows() == 0 || Y.cols() == 0) return;
  cuda::device_guard g(ctx.device());
  ctx.begin_operation();
  cuda::detail::apply_expr<C, E, TX>(ctx, e, matrix_view<const TX, device::cuda>(X), Y);
}

/// Y = X·(W + ΔW)ᵀ with the calling thread's default context.
template <cuda_expression E, class XV, class YV>
void apply(const E& e, const XV& X, const YV& Y) {
  apply(cuda::default_context(), e, X, Y);
}

/// W ← W + ΔW in place on ctx's stream. W: a writable CUDA view [out, in]; a 16-bit W is
/// updated in fp32 and rounded once.
template <class WV, update U>
  requires std::same_as<device_of<U>, device::cuda>
void merge(cuda::context& ctx, const WV& W, const U& u) {
  static_assert(cuda::detail::is_cuda_view_v<WV>,
                "deltaw::merge: the update lives on CUDA, so W must be a CUDA view (deltaw::cuda::view(ptr, rows, cols))");
  cuda::detail::merge_impl(ctx, W, u, +1.0, "deltaw::merge");
}
template <class WV, update U>
  requires std::same_as<device_of<U>, device::cuda>
void merge(const WV& W, const U& u) {
  merge(cuda::default_context(), W, u);
}

/// O = G·ΔW on ctx's stream: the input gradient of apply for an update alone. G: [tokens,
/// out] CUDA view of any storage type; O: [tokens, in] writable float or double CUDA view;
/// any layouts. Update types whose CUDA evaluator is the shared one (shared_evaluator.cuh).
template <update U, class GV, class OV>
  requires std::same_as<device_of<U>, device::cuda>
void apply_transposed(cuda::context& ctx, const U& u, const GV& G, const OV& O) {
  constexpr const char* op = "deltaw::apply_transposed";
  static_assert(cuda::detail::is_cuda_view_v<GV> && cuda::detail::is_cuda_view_v<OV>,
                "deltaw::apply_transposed: the update lives on CUDA, so G and O must be CUDA views "
                "(deltaw::cuda::view(ptr, rows, cols))");
  using TG = std::remove_const_t<typename GV::element_type>;
  using C = typename OV::element_type;
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::apply_transposed: the output is a writable float or double view");
  if (G.cols() != u.rows())
    throw shape_error(std::string(op) + ": G is " + detail::shape_str(G.rows(), G.cols()) + " but ΔW is " +
                      detail::shape_str(u.rows(), u.cols()) + "; G·ΔW needs G to have " + std::to_string(u.rows()) +
                      " columns");
  if (O.rows() != G.rows() || O.cols() != u.cols())
    throw shape_error(std::string(op) + ": the output is " + detail::shape_str(O.rows(), O.cols()) + " but G·ΔW is " +
                      detail::shape_str(G.rows(), u.cols()));
  if (O.rows() == 0 || O.cols() == 0) return;
  cuda::device_guard g(ctx.device());
  ctx.begin_operation();
  cuda::evaluator<U>::template apply_transposed<C, TG>(ctx, u, matrix_view<const TG, device::cuda>(G), O, 0.0);
}
template <update U, class GV, class OV>
  requires std::same_as<device_of<U>, device::cuda>
void apply_transposed(const U& u, const GV& G, const OV& O) {
  apply_transposed(cuda::default_context(), u, G, O);
}

/// O = G·(W + ΔW₁ + … + ΔW_n) for a lazy sum on CUDA, on ctx's stream: the base product G·W,
/// then each update's transposed apply added (the input gradient of apply through the sum).
/// G: [tokens, out] CUDA view of any storage type; O: [tokens, in] writable float or double.
template <class TW, class... Us, class GV, class OV>
void apply_transposed(cuda::context& ctx, const sum<TW, device::cuda, Us...>& e, const GV& G, const OV& O) {
  constexpr const char* op = "deltaw::apply_transposed";
  static_assert(cuda::detail::is_cuda_view_v<GV> && cuda::detail::is_cuda_view_v<OV>,
                "deltaw::apply_transposed: the sum lives on CUDA, so G and O must be CUDA views "
                "(deltaw::cuda::view(ptr, rows, cols))");
  using TG = std::remove_const_t<typename GV::element_type>;
  using C = typename OV::element_type;
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::apply_transposed: the output is a writable float or double view");
  if (G.cols() != e.rows())
    throw shape_error(std::string(op) + ": G is " + detail::shape_str(G.rows(), G.cols()) + " but W is " +
                      detail::shape_str(e.rows(), e.cols()) + "; G·W needs G to have " + std::to_string(e.rows()) +
                      " columns");
  if (O.rows() != G.rows() || O.cols() != e.cols())
    throw shape_error(std::string(op) + ": the output is " + detail::shape_str(O.rows(), O.cols()) + " but G·W is " +
                      detail::shape_str(G.rows(), e.cols()));
  cuda::detail::check_unit_stride(e.base(), "W", op);
  ::deltaw::detail::check_no_overlap(op, "the output O", O, "the upstream gradient G", G);
  ::deltaw::detail::check_no_overlap(op, "the output O", O, "the weight W", e.base());
  if (O.rows() == 0 || O.cols() == 0) return;
  cuda::device_guard g(ctx.device());
  ctx.begin_operation();
  const matrix_view<const TG, device::cuda> Gc(G);
  cuda::gemm(ctx, O, Gc, e.base(), 1.0, 0.0, op);
  std::apply([&](const auto&... u) {
    (cuda::evaluator<std::remove_cvref_t<decltype(u)>>::template apply_transposed<C, TG>(ctx, u, Gc, O, 1.0), ...);
  }, e.deltas());
}
template <class TW, class... Us, class GV, class OV>
void apply_transposed(const sum<TW, device::cuda, Us...>& e, const GV& G, const OV& O) {
  apply_transposed(cuda::default_context(), e, G, O);
}

/// M = ΔW, dense, into the caller's writable float or double CUDA view [out, in] (any
/// layout), on ctx's stream. Only M is out × in: no scratch of that size is taken.
template <update U, class MV>
  requires std::same_as<device_of<U>, device::cuda>
void materialize(cuda::context& ctx, const U& u, const MV& M) {
  static_assert(cuda::detail::is_cuda_view_v<MV>,
                "deltaw::materialize: the update lives on CUDA, so M must be a CUDA view "
                "(deltaw::cuda::view(ptr, rows, cols))");
  using C = typename MV::element_type;
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::materialize: the output is a writable float or double view");
  ::deltaw::detail::check_same_shape(M.rows(), M.cols(), u, "deltaw::materialize");
  if (M.rows() == 0 || M.cols() == 0) return;
  cuda::device_guard g(ctx.device());
  ctx.begin_operation();
  cuda::evaluator<U>::template materialize<C>(ctx, u, M);
}
template <update U, class MV>
  requires std::same_as<device_of<U>, device::cuda>
void materialize(const U& u, const MV& M) {
  materialize(cuda::default_context(), u, M);
}

/// The inverse of merge: W ← W − ΔW in place on ctx's stream.
template <class WV, update U>
  requires std::same_as<device_of<U>, device::cuda>
void unmerge(cuda::context& ctx, const WV& W, const U& u) {
  static_assert(cuda::detail::is_cuda_view_v<WV>,
                "deltaw::unmerge: the update lives on CUDA, so W must be a CUDA view (deltaw::cuda::view(ptr, rows, cols))");
  cuda::detail::merge_impl(ctx, W, u, -1.0, "deltaw::unmerge");
}
template <class WV, update U>
  requires std::same_as<device_of<U>, device::cuda>
void unmerge(const WV& W, const U& u) {
  unmerge(cuda::default_context(), W, u);
}

DELTAW_NAMESPACE_END
