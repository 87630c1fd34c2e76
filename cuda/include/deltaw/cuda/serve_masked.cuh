// SPDX-License-Identifier: MIT
// Masked composition on CUDA (docs/serving.md, "Masked composition on CUDA"): the device
// counterpart of deltaw/serve/masked.hpp,
//
//   Y = X·Wᵀ + Σ_k diag(M(:, k))·X·ΔW_kᵀ      M [tokens, K]: per-token weights (soft masks, gates)
//
//   apply_masked(ctx, W, updates, M, X, Y)
//   masked_backward(ctx, W, updates, M, X, dY, grads)     grads: cuda::serve::masked_grads<C>
//
// W [out, in], X [tokens, in], M, dY [tokens, out]: CUDA views of any storage type; Y and
// the gradients: float or double CUDA views (the arithmetic type C). `updates` holds CUDA
// updates of one type or std::variants of several.
//
// Update types. LoRA/rsLoRA (low_rank<T, device::cuda>) and the CUDA pool's
// serve::sliced_lora<T, device::cuda> take a rank-r path, as the CPU does: Z = s·X·Aᵀ
// [tokens, r], its rows scaled by M(:, k) (one map), then Y += Z·Bᵀ (per slice for a
// sliced_lora). Any other CUDA update type goes through its CUDA evaluator into a
// tokens × out scratch D = X·ΔW_kᵀ, added as Y += diag(M(:, k))·D by one map.
//
// M is read on the device only. Every update is applied to every token and a zero weight
// multiplies its token's row by 0; tokens are not skipped as on the CPU (which reads M on
// the host to gather the nonzero rows). So nothing synchronises, at the price of each
// update's products running over all tokens: for one-hot masks, apply_lora_batch and
// apply_grouped (serve.cuh) do about a K-th of the work. For finite values the results
// are the CPU's; where X·ΔW_kᵀ is not finite at a token of weight 0, that row is NaN here.
//
// Backward, with dY given (every present slot is accumulated into, +=, as in the VJP
// protocol; a default-constructed view is an absent slot):
//   dM(:, k) += rowdot(X·ΔW_kᵀ, dY)            every token (a zero weight has a gradient)
//                                              LoRA: rowdot(s·X·Aᵀ, dY·B), rank-r products
//   factors_k += vjp<U_k>(X, diag(M(:, k))·dY)
//                                              LoRA: with Z = diag(m)·s·X·Aᵀ, P = diag(m)·dY·B,
//                                              dB += dYᵀ·Z, dA += s·Pᵀ·X, dX += s·P·A
//   dX += dY·W + Σ_k diag(M(:, k))·dY·ΔW_k
// Update k's factor slots are cpu::vjp<U_k>'s (LoRA {dB, dA}); a sliced_lora's are one
// {dB_i, dA_i} pair per slice, in order. An empty list skips that update's factors. Types
// whose ΔW reads the base weight (DoRA, Bone bat, IA³, OFT, HRA) are refused at compile
// time by masked_backward, as on the CPU (apply_masked takes them when built over W).
// The slot count, LoRA's slot shapes, dM, dX, dY and the aliasing of every output are
// checked before anything is written; another type's slot shapes are checked by its VJP
// when its turn comes (after the gradients of the updates before it were added).
//
// Host steps: the checks (shapes, layouts, aliasing; serve::detail::check_masked is the
// CPU's). No value is read back and nothing is uploaded.
//
// Scratch: no out × in matrix is formed. LoRA: two tokens × r matrices (one in the
// forward); other types: one tokens × out matrix at a time, plus what their evaluator or
// VJP takes itself; and converted copies of X (and dY) when their storage type is not C.
// Everything is issued on ctx's stream.
#pragma once

#include <span>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include <deltaw/serve/masked.hpp>

#include "context.cuh"
#include "elementwise.cuh"
#include "evaluator.cuh"
#include "gemm.cuh"
#include "ops.cuh"
#include "primitives.cuh"
#include "scratch.cuh"
#include "serve.cuh"
#include "vjp.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda::serve {

/// Where masked_backward writes: the CUDA twin of deltaw::serve::masked_grads. Every
/// present slot is accumulated into (+=); a default-constructed view is an absent slot.
template <class C>
struct masked_grads {
  /// [tokens, K]: dL/dM (any strides).
  matrix_view<C, device::cuda> dM;
  /// Per update, its factor slots (cpu::vjp<U>'s order; LoRA {dB, dA}; a sliced_lora one
  /// {dB_i, dA_i} pair per slice); an empty list skips that update's factors.
  std::vector<std::vector<matrix_view<C, device::cuda>>> factors;
  /// [tokens, in]: dL/dX (a unit stride in one dimension).
  matrix_view<C, device::cuda> dX;
};

namespace detail {

/// y·M(i, k): the rows of a tokens × r (or tokens × out) matrix scaled by column k of M.
template <class C, class TM>
struct mask_rows_fn {
  matrix_view<const TM, device::cuda> M;
  index_t k;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t, C y) const { return y * convert<C>(M(i, k)); }
};

/// y + D(i, j)·M(i, k): Y += diag(M(:, k))·D in one map (the CPU scales D, then adds it).
template <class C, class TM>
struct add_masked_rows_fn {
  matrix_view<const C, device::cuda> D;
  matrix_view<const TM, device::cuda> M;
  index_t k;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C y) const { return y + D(i, j) * convert<C>(M(i, k)); }
};

/// G(i, j)·M(i, k): diag(M(:, k))·dY into scratch.
template <class C, class TM>
struct masked_copy_fn {
  matrix_view<const C, device::cuda> G;
  matrix_view<const TM, device::cuda> M;
  index_t k;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C) const { return G(i, j) * convert<C>(M(i, k)); }
};

/// The factor slots an update takes in masked_backward.
template <class V>
index_t factor_slots(const V& u) {
  if constexpr (is_lora_adapter<V>) return 2 * index_t(slices_of(u).size());
  else return index_t(cpu::vjp<V>::factor_count);
}

template <class V>
void require_cuda_update() {
  static_assert(std::is_same_v<device_of<V>, device::cuda>,
                "deltaw::cuda::serve: masked composition takes CUDA updates (built over cuda::view)");
}

/// Y += Σ over this update: diag(M(:, k))·X·ΔWᵀ. A function of its own, not a generic
/// lambda (see masked.hpp).
template <class C, class V, class TM>
void masked_add(context& ctx, const V& u, const device_view<const C>& X, const matrix_view<const TM, device::cuda>& M,
                index_t k, const device_view<C>& Y) {
  constexpr const char* op = "deltaw::cuda::serve::apply_masked";
  const context& c = ctx;
  const index_t T = X.rows();
  const auto mark = c.position();
  if constexpr (is_lora_adapter<V>) {
    for (const auto& sl : slices_of(u)) {
      const auto mk = c.position();
      const index_t r = sl.rank();
      const device_view<C> Z(c.allocate<C>(std::size_t(T * r)), T, r, r, 1);
      gemm(c, Z, X, sl.A().transpose(), sl.scale(), 0.0, op);  // Z = s·X·Aᵀ
      transform(c, Z, mask_rows_fn<C, TM>{M, k});                 // diag(M(:, k))·Z
      gemm(c, Y, device_view<const C>(Z), sl.B().transpose(), 1.0, 1.0, op);
      c.release(mk);
    }
  } else {
    require_cuda_update<V>();
    const device_view<C> D(c.allocate<C>(std::size_t(T * Y.cols())), T, Y.cols(), Y.cols(), 1);
    evaluator<V>::template apply<C, C>(ctx, u, X, D, 0.0);
    transform(c, Y, add_masked_rows_fn<C, TM>{device_view<const C>(D), M, k});
  }
  c.release(mark);
}

/// One update's part of masked_backward: dM(:, k), its factor slots, its part of dX.
template <class C, class V, class TM>
void masked_vjp(context& ctx, const V& u, const device_view<const C>& X, const device_view<const C>& G,
                const matrix_view<const TM, device::cuda>& M, index_t k, const vector_view<C, device::cuda>& dm,
                std::span<const matrix_view<C, device::cuda>> slots, const device_view<C>& dX) {
  using enum kernels::op;
  const context& c = ctx;
  const index_t T = X.rows();
  const bool want_m = dm.data() != nullptr;
  const bool want_x = cpu::present(dX);
  const auto mark = c.position();
  if constexpr (is_lora_adapter<V>) {
    std::size_t i = 0;
    for (const auto& sl : slices_of(u)) {
      const matrix_view<C, device::cuda> dB = slots.empty() ? matrix_view<C, device::cuda>() : slots[i];
      const matrix_view<C, device::cuda> dA = slots.empty() ? matrix_view<C, device::cuda>() : slots[i + 1];
      i += 2;
      const bool want_b = cpu::present(dB), want_a = cpu::present(dA);
      if (!want_m && !want_b && !want_a && !want_x) continue;
      const auto mk = c.position();
      {
        const index_t r = sl.rank();
        const C s = C(sl.scale());
        const kernels::operand<C, device::cuda> B(c, sl.B()), A(c, sl.A());
        kernels::scratch<C, device::cuda> Z, P;
        if (want_m || want_b) {
          Z = kernels::make_scratch<C>(c, T, r);
          gemm<C>(c, s, X, none, A.view(), trans, C(0), Z.view());  // Z = s·X·Aᵀ
        }
        if (want_m || want_a || want_x) {
          P = kernels::make_scratch<C>(c, T, r);
          gemm<C>(c, C(1), G, none, B.view(), none, C(0), P.view());  // P = dY·B
        }
        if (want_m) dot_rows<C, C>(c, Z.cview(), P.cview(), dm, true);
        if (want_b) {
          transform(c, Z.view(), mask_rows_fn<C, TM>{M, k});
          gemm<C>(c, C(1), G, trans, Z.cview(), none, C(1), dB);  // dB += dYᵀ·diag(m)·s·X·Aᵀ
        }
        if (want_a || want_x) {
          transform(c, P.view(), mask_rows_fn<C, TM>{M, k});
          if (want_a) gemm<C>(c, s, P.cview(), trans, X, none, C(1), dA);  // dA += s·(diag(m)·dY·B)ᵀ·X
          if (want_x) gemm<C>(c, s, P.cview(), none, A.view(), none, C(1), dX);
        }
      }  // the scratch above is given back here, latest first
      c.release(mk);
    }
  } else {
    require_cuda_update<V>();
    kernels::scratch<C, device::cuda> D;
    if (want_m) {
      D = kernels::make_scratch<C>(c, T, G.cols());
      evaluator<V>::template apply<C, C>(ctx, u, X, D.view(), 0.0);  // D = X·ΔWᵀ
      dot_rows<C, C>(c, D.cview(), G, dm, true);
    }
    bool any = want_x;
    for (const auto& s : slots) any = any || cpu::present(s);
    if (any) {
      if (!want_m) D = kernels::make_scratch<C>(c, T, G.cols());
      transform(c, D.view(), masked_copy_fn<C, TM>{G, M, k});  // diag(M(:, k))·dY (D is read first on the stream)
      std::vector<matrix_view<C, device::cuda>> none_given;
      if (slots.empty()) none_given.resize(std::size_t(cpu::vjp<V>::factor_count));
      cpu::vjp<V>::template backward<C>(c, u, X, D.cview(),
                                        slots.empty() ? std::span<const matrix_view<C, device::cuda>>(none_given) : slots,
                                        dX);
    }
    D = {};
  }
  c.release(mark);
}

template <class TW, class TM, class TX, class C, class U>
void check_apply(const char* op, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                 const matrix_view<TM, device::cuda>& M, const matrix_view<TX, device::cuda>& X,
                 const matrix_view<C, device::cuda>& Y) {
  const matrix_view<const std::remove_const_t<TW>, device::cuda> Wc(W);
  const matrix_view<const std::remove_const_t<TM>, device::cuda> Mc(M);
  ::deltaw::serve::detail::check_masked(op, Wc, updates, Mc, X.rows(), X.cols());
  if (Y.rows() != X.rows() || Y.cols() != W.rows())
    throw shape_error(std::string(op) + ": the output is " + ::deltaw::detail::shape_str(Y.rows(), Y.cols()) +
                      " but X·Wᵀ is " + ::deltaw::detail::shape_str(X.rows(), W.rows()));
  ::deltaw::cuda::detail::check_unit_stride(W, "W", op);
  ::deltaw::cuda::detail::check_unit_stride(X, "X", op);
  ::deltaw::cuda::detail::check_unit_stride(Y, "the output", op);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "the input X", X);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "the weight W", W);
  ::deltaw::detail::check_no_overlap(op, "the output Y", Y, "the masks M", M);
  for (const auto& e : updates)
    ::deltaw::serve::detail::visit_update(e, [&](const auto& u) {
      require_cuda_update<std::remove_cvref_t<decltype(u)>>();
      ::deltaw::detail::check_update_no_overlap(op, "the output Y", Y, u, true);
    });
}

}  // namespace detail

/// Y = X·Wᵀ + Σ_k diag(M(:, k))·X·ΔW_kᵀ on ctx's stream (see the top of this file). W
/// [out, in], X [tokens, in] and M [tokens, K = updates.size()]: CUDA views of any storage
/// type (W, X with a unit stride in one dimension; M any strides); Y [tokens, out]: a
/// writable float or double CUDA view. Never forms out × in.
template <class TW, class U, class TM, class TX, class C>
void apply_masked(context& ctx, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                  const matrix_view<TM, device::cuda>& M, const matrix_view<TX, device::cuda>& X,
                  const matrix_view<C, device::cuda>& Y) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::serve::apply_masked: the output is float or double (16-bit types are storage)");
  constexpr const char* op = "deltaw::cuda::serve::apply_masked";
  detail::check_apply(op, W, updates, M, X, Y);
  if (Y.rows() == 0 || Y.cols() == 0) return;
  device_guard guard(ctx.device());
  ctx.begin_operation();
  const context& c = ctx;
  const matrix_view<const std::remove_const_t<TM>, device::cuda> Mc(M);
  const kernels::operand<C, device::cuda> Xo(c, matrix_view<const std::remove_const_t<TX>, device::cuda>(X));
  const device_view<const C> Xm = Xo.view();
  gemm(c, Y, Xm, matrix_view<const std::remove_const_t<TW>, device::cuda>(W).transpose(), 1.0, 0.0, op);
  if (X.cols() == 0) return;
  for (index_t k = 0; k < index_t(updates.size()); ++k)
    ::deltaw::serve::detail::visit_update(updates[std::size_t(k)],
                                          [&](const auto& u) { detail::masked_add<C>(ctx, u, Xm, Mc, k, Y); });
}

/// The same with the updates in a std::vector.
template <class TW, class U, class TM, class TX, class C>
void apply_masked(context& ctx, const matrix_view<TW, device::cuda>& W, const std::vector<U>& updates,
                  const matrix_view<TM, device::cuda>& M, const matrix_view<TX, device::cuda>& X,
                  const matrix_view<C, device::cuda>& Y) {
  apply_masked(ctx, W, std::span<const U>(updates), M, X, Y);
}

/// The VJP of apply_masked for the upstream gradient dY [tokens, out] (see the top of this
/// file): dM, every update's factor gradients and dX, accumulated into g's present slots.
template <class TW, class U, class TM, class TX, class TG, class C>
void masked_backward(context& ctx, const matrix_view<TW, device::cuda>& W, std::span<const U> updates,
                     const matrix_view<TM, device::cuda>& M, const matrix_view<TX, device::cuda>& X,
                     const matrix_view<TG, device::cuda>& dY, const masked_grads<C>& g) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::serve::masked_backward: the gradients are float or double CUDA views");
  constexpr const char* op = "deltaw::cuda::serve::masked_backward";
  using DV = matrix_view<C, device::cuda>;
  const matrix_view<const std::remove_const_t<TW>, device::cuda> Wc(W);
  const matrix_view<const std::remove_const_t<TM>, device::cuda> Mc(M);
  const matrix_view<const std::remove_const_t<TX>, device::cuda> Xc(X);
  const matrix_view<const std::remove_const_t<TG>, device::cuda> Gc(dY);
  ::deltaw::serve::detail::check_masked(op, Wc, updates, Mc, X.rows(), X.cols());
  const index_t T = X.rows(), K = index_t(updates.size());
  if (dY.rows() != T || dY.cols() != W.rows())
    throw shape_error(std::string(op) + ": dY is " + ::deltaw::detail::shape_str(dY.rows(), dY.cols()) + "; expected " +
                      ::deltaw::detail::shape_str(T, W.rows()));
  if (cpu::present(g.dM) && (g.dM.rows() != T || g.dM.cols() != K))
    throw shape_error(std::string(op) + ": dM is " + ::deltaw::detail::shape_str(g.dM.rows(), g.dM.cols()) +
                      "; expected " + ::deltaw::detail::shape_str(T, K));
  if (cpu::present(g.dX) && (g.dX.rows() != T || g.dX.cols() != W.cols()))
    throw shape_error(std::string(op) + ": dX is " + ::deltaw::detail::shape_str(g.dX.rows(), g.dX.cols()) +
                      "; expected " + ::deltaw::detail::shape_str(T, W.cols()));
  if (!g.factors.empty() && g.factors.size() != updates.size())
    throw shape_error(std::string(op) + ": " + std::to_string(g.factors.size()) + " factor slot lists for " +
                      std::to_string(updates.size()) + " updates (pass none, or one list per update)");
  // Slot counts (and LoRA's slot shapes); the outputs, for the aliasing checks.
  std::vector<std::pair<std::string, DV>> outputs;
  if (cpu::present(g.dM)) outputs.emplace_back("the mask gradient dM", g.dM);
  if (cpu::present(g.dX)) outputs.emplace_back("the input gradient dX", g.dX);
  for (std::size_t k = 0; k < updates.size(); ++k)
    ::deltaw::serve::detail::visit_update(updates[k], [&](const auto& u) {
      using V = std::remove_cvref_t<decltype(u)>;
      detail::require_cuda_update<V>();
      static_assert(!requires { u.W(); },
                    "deltaw::cuda::serve::masked_backward: updates whose ΔW reads the base weight (DoRA, Bone bat, IA³, "
                    "OFT, HRA) have VJPs that include the base product; mask them with apply_masked only");
      if (g.factors.empty() || g.factors[k].empty()) return;
      const auto& s = g.factors[k];
      const index_t want = detail::factor_slots(u);
      if (index_t(s.size()) != want)
        throw argument_error(std::string(op) + ": update " + std::to_string(k) + " takes " + std::to_string(want) +
                             " factor gradient slots" +
                             (detail::is_lora_adapter<V> ? " ({dB, dA} per rank slice)" : " (one per factor)") + "; got " +
                             std::to_string(s.size()));
      if constexpr (detail::is_lora_adapter<V>) {
        std::size_t i = 0;
        for (const auto& sl : detail::slices_of(u)) {
          cpu::detail::check_grad_shape(s[i], sl.B(), op, "B");
          cpu::detail::check_grad_shape(s[i + 1], sl.A(), op, "A");
          i += 2;
        }
      }
      for (std::size_t i = 0; i < s.size(); ++i)
        if (cpu::present(s[i]))
          outputs.emplace_back("the gradient of update " + std::to_string(k) + "'s factor " + std::to_string(i), s[i]);
    });
  if (cpu::present(g.dX)) {
    ::deltaw::cuda::detail::check_unit_stride(g.dX, "dX", op);
    ::deltaw::detail::check_no_overlap(op, "the input gradient dX", g.dX, "the weight W", W);
  }
  ::deltaw::cuda::detail::check_unit_stride(W, "W", op);
  ::deltaw::cuda::detail::check_unit_stride(X, "X", op);
  ::deltaw::cuda::detail::check_unit_stride(dY, "dY", op);
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const std::string& name = outputs[i].first;
    const DV& o = outputs[i].second;
    ::deltaw::detail::check_no_overlap(op, name.c_str(), o, "the input X", X);
    ::deltaw::detail::check_no_overlap(op, name.c_str(), o, "the upstream gradient dY", dY);
    ::deltaw::detail::check_no_overlap(op, name.c_str(), o, "the masks M", M);
    for (const auto& e : updates)
      ::deltaw::serve::detail::visit_update(
          e, [&](const auto& u) { ::deltaw::detail::check_update_no_overlap(op, name.c_str(), o, u, true); });
    for (std::size_t j = i + 1; j < outputs.size(); ++j)
      ::deltaw::detail::check_no_overlap(op, name.c_str(), o, outputs[j].first.c_str(), outputs[j].second);
  }
  if (T == 0) return;  // every sum over tokens is empty
  device_guard guard(ctx.device());
  ctx.begin_operation();
  const context& c = ctx;
  const kernels::operand<C, device::cuda> Xo(c, Xc), Go(c, Gc);
  const device_view<const C> Xm = Xo.view(), Gm = Go.view();
  if (cpu::present(g.dX) && W.rows() > 0 && W.cols() > 0)
    gemm(c, g.dX, Gm, Wc, 1.0, 1.0, "deltaw::cuda::serve::masked_backward (dX += dY·W)");
  for (index_t k = 0; k < K; ++k) {
    vector_view<C, device::cuda> dm;
    if (cpu::present(g.dM)) {
      const auto col = g.dM.middle_cols(k, 1);
      dm = vector_view<C, device::cuda>(col.data(), T, col.row_stride());
    }
    const std::span<const matrix_view<C, device::cuda>> slots =
        g.factors.empty() ? std::span<const matrix_view<C, device::cuda>>() : std::span(g.factors[std::size_t(k)]);
    ::deltaw::serve::detail::visit_update(updates[std::size_t(k)], [&](const auto& u) {
      detail::masked_vjp<C>(ctx, u, Xm, Gm, Mc, k, dm, slots, g.dX);
    });
  }
}

/// The same with the updates in a std::vector.
template <class TW, class U, class TM, class TX, class TG, class C>
void masked_backward(context& ctx, const matrix_view<TW, device::cuda>& W, const std::vector<U>& updates,
                     const matrix_view<TM, device::cuda>& M, const matrix_view<TX, device::cuda>& X,
                     const matrix_view<TG, device::cuda>& dY, const masked_grads<C>& g) {
  masked_backward(ctx, W, std::span<const U>(updates), M, X, dY, g);
}

}  // namespace cuda::serve
DELTAW_NAMESPACE_END
