// SPDX-License-Identifier: MIT
// Masked composition: Y = X·Wᵀ + Σ_k diag(M(:, k))·X·ΔW_kᵀ with per-token weights M
// [tokens, K] (soft masks, gates). One-hot rows of M give the heterogeneous batch of
// batch.hpp; soft rows give CLoRA's fusion of concept adapters or a mixture of adapters.
//
// Forward: for each update k, only the tokens with M(t, k) ≠ 0 are read (gathered when
// they are not consecutive rows); LoRA scales the rank-r intermediate (s·M(t, k)·X_t·Aᵀ)
// before the second product, any other type scales its rows of deltaw::apply(u, X_k).
// Backward (masked_backward), with dY given:
//   dM(t, k)  = ⟨dY_t, (X·ΔW_kᵀ)_t⟩       (LoRA: s·⟨(dY·B)_t, (X·Aᵀ)_t⟩, rank-r products)
//   factors_k = vjp<U_k>(X, diag(M(:, k))·dY)   (ΔW_k is linear in dY's rows)
//   dX        = dY·W + Σ_k diag(M(:, k))·dY·ΔW_k
// No out × in matrix is formed; scratch is tokens × out at most.
#pragma once

#include <string>
#include <vector>

#include "batch.hpp"

DELTAW_NAMESPACE_BEGIN
namespace serve {

namespace detail {

/// The tokens with a nonzero weight in column k of M, and those weights.
template <class C, class TM>
void nonzero_rows(const matrix_view<const TM>& M, index_t k, std::vector<index_t>& rows, std::vector<C>& w) {
  rows.clear();
  w.clear();
  for (index_t t = 0; t < M.rows(); ++t)
    if (const C m = convert<C>(M(t, k)); m != C(0)) {
      rows.push_back(t);
      w.push_back(m);
    }
}

inline index_t consecutive_start(const std::vector<index_t>& rows) {
  if (rows.empty()) return -1;
  return rows.back() - rows.front() + 1 == index_t(rows.size()) ? rows.front() : -1;
}

template <class U>
inline constexpr bool is_lora_v = false;
template <class T>
inline constexpr bool is_lora_v<low_rank<T, device::cpu>> = true;

/// The shape checks of apply_masked and masked_backward; device-neutral (also the CUDA
/// ones: cuda/include/deltaw/cuda/serve_masked.cuh). Reads shapes only, never M's values.
template <class U, class TW, class TM, class D>
void check_masked(const char* op, const matrix_view<const TW, D>& W, std::span<const U> updates,
                  const matrix_view<const TM, D>& M, index_t x_rows, index_t x_cols) {
  if (x_cols != W.cols())
    throw shape_error(std::string(op) + ": X is " + deltaw::detail::shape_str(x_rows, x_cols) + " but W is " +
                      deltaw::detail::shape_str(W.rows(), W.cols()) + "; X·Wᵀ needs X to have " +
                      std::to_string(W.cols()) + " columns");
  if (M.rows() != x_rows || M.cols() != index_t(updates.size()))
    throw shape_error(std::string(op) + ": the masks are " + deltaw::detail::shape_str(M.rows(), M.cols()) +
                      " but X has " + std::to_string(x_rows) + " tokens and there are " +
                      std::to_string(updates.size()) + " updates; M must be [tokens, updates]");
  for (std::size_t k = 0; k < updates.size(); ++k)
    visit_update(updates[k], [&](const auto& u) {
      if (u.rows() != W.rows() || u.cols() != W.cols())
        throw shape_error(std::string(op) + ": update " + std::to_string(k) + " is " +
                          deltaw::detail::shape_str(u.rows(), u.cols()) + " but W is " +
                          deltaw::detail::shape_str(W.rows(), W.cols()));
      if constexpr (requires { u.W(); }) {
        if (!same_view(u.W(), W))
          throw argument_error(std::string(op) + ": update " + std::to_string(k) +
                               " reads its own base weight and was built over another view than W");
      }
    });
}

/// Y(rows) += diag(w)·X_k·ΔWᵀ for one update, X_k the gathered rows (Y's rows start..start+n
/// when start ≥ 0). A function of its own, not a generic lambda: GCC 12 confuses the
/// lambda's auto parameter with the enclosing function's auto variables.
template <class C, class V>
void masked_add(const kernels::cpu_context& ctx, const V& u, const matrix_view<const C>& Xk,
                const vector_view<const C>& wk, const std::vector<index_t>& rows, index_t start,
                const matrix_view<C>& Ym) {
  using enum kernels::op;
  const index_t n = index_t(rows.size());
  if constexpr (is_lora_v<V>) {
    const lora_operands<C> f(ctx, u);
    auto Z = kernels::make_scratch<C>(ctx, n, u.rank());
    gemm<C>(ctx, f.s, Xk, none, f.A, trans, C(0), Z.view());
    kernels::scale_rows<C>(ctx, Z.view(), wk);
    if (start >= 0) {
      gemm<C>(ctx, C(1), Z.cview(), none, f.B, trans, C(1), Ym.middle_rows(start, n));
      return;
    }
    auto D = kernels::make_scratch<C>(ctx, n, Ym.cols());
    gemm<C>(ctx, C(1), Z.cview(), none, f.B, trans, C(0), D.view());
    kernels::scatter_add_rows<C>(ctx, C(1), D.cview(), rows, Ym);
  } else {
    auto D = kernels::make_scratch<C>(ctx, n, Ym.cols());
    deltaw::apply(u, Xk, D.view());
    kernels::scale_rows<C>(ctx, D.view(), wk);
    if (start >= 0) kernels::axpy<C>(ctx, C(1), D.cview(), Ym.middle_rows(start, n));
    else kernels::scatter_add_rows<C>(ctx, C(1), D.cview(), rows, Ym);
  }
}

}  // namespace detail

/// Y = X·Wᵀ + Σ_k diag(M(:, k))·X·ΔW_kᵀ. W [out, in], X [tokens, in], M [tokens, K] (any
/// storage type), Y [tokens, out] caller-provided (float or double: the arithmetic type).
/// `updates` holds update objects of one type or std::variants of update types.
template <class WL, class U, class ML, class XL, class YL>
void apply_masked(const WL& W, std::span<const U> updates, const ML& M, const XL& X, YL&& Y) {
  constexpr const char* op = "deltaw::serve::apply_masked";
  const auto Wv = detail::batch_input_view(W);
  const auto Mv = detail::batch_input_view(M);
  const auto Xv = detail::batch_input_view(X);
  auto Yv = deltaw::detail::cpu_output_view(std::forward<YL>(Y), op);
  using C = std::remove_const_t<typename decltype(Yv)::element_type>;
  detail::check_masked(op, Wv, updates, Mv, Xv.rows(), Xv.cols());
  if (Yv.rows() != Xv.rows() || Yv.cols() != Wv.rows())
    throw shape_error(std::string(op) + ": the output is " + deltaw::detail::shape_str(Yv.rows(), Yv.cols()) +
                      " but X·Wᵀ is " + deltaw::detail::shape_str(Xv.rows(), Wv.rows()));
  deltaw::detail::check_no_overlap(op, "the output Y", Yv, "the input X", Xv);
  deltaw::detail::check_no_overlap(op, "the output Y", Yv, "the weight W", Wv);
  deltaw::detail::check_no_overlap(op, "the output Y", Yv, "the masks M", Mv);
  for (const auto& e : updates)
    detail::visit_update(e, [&](const auto& u) { deltaw::detail::check_update_no_overlap(op, "the output Y", Yv, u, true); });
  cpu::with_views<C>(Xv, Yv, [&](const kernels::cpu_context& ctx, const cpu::cview<C>& Xm, const cpu::mview<C>& Ym) {
    cpu::base_apply<C>(ctx, Wv, Xm, Ym);
    std::vector<index_t> rows;
    std::vector<C> w;
    for (index_t k = 0; k < index_t(updates.size()); ++k) {
      detail::nonzero_rows<C>(Mv, k, rows, w);
      if (rows.empty()) continue;
      const index_t n = index_t(rows.size()), start = detail::consecutive_start(rows);
      const detail::group_rows<C> Xk(ctx, Xm, rows, start);
      const vector_view<const C> wk(w.data(), n);
      detail::visit_update(updates[std::size_t(k)], [&](const auto& u) {
        detail::masked_add<C>(ctx, u, Xk.view, wk, rows, start, Ym);
      });
    }
  });
}

template <class WL, class U, class ML, class XL, class YL>
void apply_masked(const WL& W, const std::vector<U>& updates, const ML& M, const XL& X, YL&& Y) {
  apply_masked(W, std::span<const U>(updates), M, X, std::forward<YL>(Y));
}

/// Where masked_backward writes; every present slot is accumulated into (+=), as in the
/// VJP protocol (backend/cpu/vjp.hpp); a default-constructed view is an absent slot.
template <class C>
struct masked_grads {
  /// [tokens, K]: dL/dM.
  matrix_view<C> dM;
  /// Per update, its factor slots in cpu::vjp<U>'s order (LoRA: {dB, dA}); an empty
  /// vector skips that update's factors.
  std::vector<std::vector<matrix_view<C>>> factors;
  /// [tokens, in]: dL/dX.
  matrix_view<C> dX;
};

/// The VJP of apply_masked for the upstream gradient dY [tokens, out]; see the header.
/// C is the arithmetic type (the slots' element type; float or double).
template <class C, class WL, class U, class ML, class XL, class GL>
void masked_backward(const WL& W, std::span<const U> updates, const ML& M, const XL& X, const GL& dY,
                     const masked_grads<C>& g) {
  constexpr const char* op = "deltaw::serve::masked_backward";
  using enum kernels::op;
  const auto Wv = detail::batch_input_view(W);
  const auto Mv = detail::batch_input_view(M);
  const auto Xv0 = detail::batch_input_view(X);
  const auto dYv0 = detail::batch_input_view(dY);
  detail::check_masked(op, Wv, updates, Mv, Xv0.rows(), Xv0.cols());
  const index_t T = Xv0.rows();
  if (dYv0.rows() != T || dYv0.cols() != Wv.rows())
    throw shape_error(std::string(op) + ": dY is " + deltaw::detail::shape_str(dYv0.rows(), dYv0.cols()) +
                      "; expected " + deltaw::detail::shape_str(T, Wv.rows()));
  if (cpu::present(g.dM) && (g.dM.rows() != T || g.dM.cols() != index_t(updates.size())))
    throw shape_error(std::string(op) + ": dM is " + deltaw::detail::shape_str(g.dM.rows(), g.dM.cols()) +
                      "; expected " + deltaw::detail::shape_str(T, index_t(updates.size())));
  if (cpu::present(g.dX) && (g.dX.rows() != T || g.dX.cols() != Wv.cols()))
    throw shape_error(std::string(op) + ": dX is " + deltaw::detail::shape_str(g.dX.rows(), g.dX.cols()) +
                      "; expected " + deltaw::detail::shape_str(T, Wv.cols()));
  if (!g.factors.empty() && g.factors.size() != updates.size())
    throw shape_error(std::string(op) + ": " + std::to_string(g.factors.size()) + " factor slot lists for " +
                      std::to_string(updates.size()) + " updates (pass none, or one list per update)");
  for (const auto& e : updates)
    detail::visit_update(e, [&](const auto& u) {
      static_assert(!requires { u.W(); },
                    "deltaw::serve::masked_backward: updates whose ΔW reads the base weight (DoRA, Bone bat, IA³, "
                    "OFT, HRA) have VJPs that include the base product; mask them with apply_masked only");
    });
  const kernels::cpu_context ctx;
  const kernels::operand<C> Xo(ctx, Xv0), dYo(ctx, dYv0);
  const auto& Xm = Xo.view();
  const auto& dYm = dYo.view();
  if (cpu::present(g.dX)) cpu::base_apply_transposed<C>(ctx, Wv, dYm, g.dX, C(1));
  std::vector<index_t> rows;
  std::vector<C> w;
  for (index_t k = 0; k < index_t(updates.size()); ++k) {
    detail::visit_update(updates[std::size_t(k)], [&](const auto& u) {
      using V = std::remove_cvref_t<decltype(u)>;
      // dM(:, k) over every token (the gradient of a zero weight is not zero).
      if (cpu::present(g.dM)) {
        auto col = g.dM.middle_cols(k, 1);
        const vector_view<C> out(col.data(), T, col.row_stride());
        if constexpr (detail::is_lora_v<V>) {
          const detail::lora_operands<C> f(ctx, u);
          auto Z = kernels::make_scratch<C>(ctx, T, u.rank());
          auto P = kernels::make_scratch<C>(ctx, T, u.rank());
          gemm<C>(ctx, f.s, Xm, none, f.A, trans, C(0), Z.view());
          gemm<C>(ctx, C(1), dYm, none, f.B, none, C(0), P.view());
          kernels::dot_rows<C, C>(ctx, Z.cview(), P.cview(), out, true);
        } else {
          auto D = kernels::make_scratch<C>(ctx, T, Wv.rows());
          deltaw::apply(u, Xm, D.view());
          kernels::dot_rows<C, C>(ctx, D.cview(), dYm, out, true);
        }
      }
      const bool want_factors = !g.factors.empty() && !g.factors[std::size_t(k)].empty();
      if (!want_factors && !cpu::present(g.dX)) return;
      detail::nonzero_rows<C>(Mv, k, rows, w);
      if (rows.empty()) return;
      const index_t n = index_t(rows.size()), start = detail::consecutive_start(rows);
      const detail::group_rows<C> Xk(ctx, Xm, rows, start);
      auto Gk = kernels::make_scratch<C>(ctx, n, Wv.rows());  // diag(M(rows, k))·dY(rows)
      kernels::gather_rows(ctx, dYm, rows, Gk.view());
      kernels::scale_rows<C>(ctx, Gk.view(), vector_view<const C>(w.data(), n));
      std::vector<matrix_view<C>> slots;
      if (want_factors) slots = g.factors[std::size_t(k)];
      else slots.resize(std::size_t(cpu::vjp<V>::factor_count));
      kernels::scratch<C> dXk;
      matrix_view<C> dXslot;
      if (cpu::present(g.dX)) {
        if (start >= 0) {
          dXslot = g.dX.middle_rows(start, n);
        } else {
          dXk = kernels::make_scratch<C>(ctx, n, Wv.cols());
          kernels::fill(ctx, dXk.view(), C(0));
          dXslot = dXk.view();
        }
      }
      cpu::vjp<V>::template backward<C>(ctx, u, Xk.view, Gk.cview(), std::span<const matrix_view<C>>(slots), dXslot);
      if (cpu::present(g.dX) && start < 0) kernels::scatter_add_rows<C>(ctx, C(1), dXk.cview(), rows, g.dX);
    });
  }
}

template <class C, class WL, class U, class ML, class XL, class GL>
void masked_backward(const WL& W, const std::vector<U>& updates, const ML& M, const XL& X, const GL& dY,
                     const masked_grads<C>& g) {
  masked_backward<C>(W, std::span<const U>(updates), M, X, dY, g);
}

}  // namespace serve
DELTAW_NAMESPACE_END
