// SPDX-License-Identifier: MIT
// Evaluator of HRA (expr/hra.hpp), W' = W·H with H = I − N·Tm·Nᵀ acting on the input, and
// its constructor deltaw::hra, which computes the compact WY factors N, Tm (in double, on
// the host) from PEFT's hra_u: the normalised columns (plain) or their Gram–Schmidt
// orthonormalisation (apply_GS).
//   apply over its own W (the apply_with_base hook of ops.hpp):  Y = (X·Hᵀ)·Wᵀ
//   transposed:                                                   O = (G·W)·H
//   alone:  Y += (X·Hᵀ − X)·Wᵀ,  O += (G·W)·H − G·W
//   merge:  rows of W ← rows·H;  unmerge: rows ← rows·Hᵀ (H orthogonal: exact)
// with P·H = P − ((P·N)·Tm)·Nᵀ and P·Hᵀ = P − ((P·N)·Tmᵀ)·Nᵀ (4·rows·in·r + 2·rows·r²
// flops); neither the in × in H nor W' is formed. Scratch: tokens × in (or panel_rows × in)
// and rows × r. The evaluator is templated on the device (the cached factors are copied to
// it per call: copy_from_host); deltaw::hra builds CPU updates, cuda::hra CUDA ones
// (cuda/updates_structured.cuh).
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../../expr/hra.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace hra_detail {

/// N [in, r] and Tm [r, r] in type C.
/// (host values, copied to ctx's device: on a GPU an upload of in·r + r² values per call).
template <class C, class Ctx, class U>
struct factors_in {
  decltype(kernels::make_scratch<C>(std::declval<const Ctx&>(), index_t(0), index_t(0))) N, Tm;
  factors_in(const Ctx& ctx, const U& u)
      : N(kernels::make_scratch<C>(ctx, u.cols(), u.rank())), Tm(kernels::make_scratch<C>(ctx, u.rank(), u.rank())) {
    const auto& f = *u.factors();
    copy_from_host(ctx, matrix_view<const double>(f.N.data(), f.in, f.r, f.r, 1), N.view());
    copy_from_host(ctx, matrix_view<const double>(f.Tm.data(), f.r, f.r, f.r, 1), Tm.view());
  }
};

/// Out = beta·Out − ((In·N)·op(Tm))·Nᵀ. In and Out may be the same rows (In·N is formed first).
template <class C, class Ctx, class F, class D>
void reflect_delta(const Ctx& ctx, const F& f, const cview<C, D>& In, const mview<C, D>& Out, kernels::op o, C beta) {
  using enum kernels::op;
  const index_t r = f.Tm.cview().rows();
  auto A = kernels::make_scratch<C>(ctx, In.rows(), r), B = kernels::make_scratch<C>(ctx, In.rows(), r);
  gemm<C>(ctx, C(1), In, none, f.N.cview(), none, C(0), A.view());
  gemm<C>(ctx, C(1), A.cview(), none, f.Tm.cview(), o, C(0), B.view());
  gemm<C>(ctx, C(-1), B.cview(), none, f.N.cview(), trans, beta, Out);
}

/// Rows of P ← P·op(H) in place (op = none: P·H, trans: P·Hᵀ).
template <class C, class Ctx, class F, class D>
void reflect_rows_in_place(const Ctx& ctx, const F& f, const mview<C, D>& P, kernels::op o) {
  reflect_delta<C>(ctx, f, cview<C, D>(P), P, o, C(1));
}

}  // namespace hra_detail

template <class T, class TW, class D>
struct evaluator<hra_update<T, TW, D>> {
  using U = hra_update<T, TW, D>;

  /// Y = (X·Hᵀ)·Wᵀ: replaces the base product in a lazy sum over u's own W.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const hra_detail::factors_in<C, Ctx, U> f(ctx, u);
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
    copy(ctx, X, Z.view());
    hra_detail::reflect_delta<C>(ctx, f, X, Z.view(), kernels::op::trans, C(1));
    base_apply<C>(ctx, u.W(), Z.cview(), Y);
  }
  /// O = (G·W)·H.
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const hra_detail::factors_in<C, Ctx, U> f(ctx, u);
    base_apply_transposed<C>(ctx, u.W(), G, O);
    hra_detail::reflect_rows_in_place<C>(ctx, f, O, kernels::op::none);
  }
  /// Y += (X·Hᵀ − X)·Wᵀ = −(((X·N)·Tmᵀ)·Nᵀ)·Wᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const hra_detail::factors_in<C, Ctx, U> f(ctx, u);
    auto Dx = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
    hra_detail::reflect_delta<C>(ctx, f, X, Dx.view(), kernels::op::trans, C(0));
    for_row_panels<C>(ctx, u.W(), [&](index_t r0, const cview<C, D>& P) {
      gemm<C>(ctx, C(1), Dx.cview(), kernels::op::none, P, kernels::op::trans, C(1), Y.middle_cols(r0, P.rows()));
    });
  }
  /// O += (G·W)·H − G·W.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const hra_detail::factors_in<C, Ctx, U> f(ctx, u);
    auto GW = kernels::make_scratch<C>(ctx, G.rows(), u.cols());
    base_apply_transposed<C>(ctx, u.W(), G, GW.view());
    hra_detail::reflect_delta<C>(ctx, f, GW.cview(), O, kernels::op::none, C(1));
  }

  /// P += ΔW[r0 : r0 + P.rows()] = −((W_rows·N)·Tm)·Nᵀ, panel_rows rows at a time.
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    const hra_detail::factors_in<C, Ctx, U> f(ctx, u);
    auto w = kernels::make_scratch<C>(ctx, std::min(panel_rows, panel.rows()), u.cols());
    for (index_t r = 0; r < panel.rows(); r += panel_rows) {
      const index_t n = std::min(panel_rows, panel.rows() - r);
      const auto wv = w.view().middle_rows(0, n);
      copy(ctx, u.W().middle_rows(r0 + r, n), wv);
      hra_detail::reflect_delta<C>(ctx, f, cview<C, D>(wv), panel.middle_rows(r, n), kernels::op::none, C(1));
    }
  }
  /// Rows of W ← rows·H (W must be u's own weight: checked by merge).
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t, const mview<C, D>& panel) {
    hra_detail::reflect_rows_in_place<C>(ctx, hra_detail::factors_in<C, Ctx, U>(ctx, u), panel, kernels::op::none);
  }
  /// Rows of W' ← rows·Hᵀ = rows·H⁻¹.
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t, const mview<C, D>& panel) {
    hra_detail::reflect_rows_in_place<C>(ctx, hra_detail::factors_in<C, Ctx, U>(ctx, u), panel, kernels::op::trans);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu

namespace detail {
/// The compact WY factors of H from U [in, r] (double). argument_error for a zero (or
/// non-finite) column, or, with Gram–Schmidt, a column in the span of the earlier ones
/// (residual ≤ 1e-12·‖u_k‖, where PEFT would normalise rounding noise).
template <class T, class D>
std::shared_ptr<const hra_factors> hra_make_factors(const matrix_view<const T, D>& Uv, hra_options o) {
  auto f = std::make_shared<hra_factors>();
  const index_t in = Uv.rows(), r = Uv.cols();
  f->in = in;
  f->r = r;
  f->N.assign(std::size_t(in * r), 0.0);
  f->Tm.assign(std::size_t(r * r), 0.0);
  f->norms.assign(std::size_t(r), 0.0);
  auto N = [&](index_t i, index_t k) -> double& { return f->N[std::size_t(i * r + k)]; };
  auto Tm = [&](index_t i, index_t k) -> double& { return f->Tm[std::size_t(i * r + k)]; };
  std::vector<double> v(static_cast<std::size_t>(in));
  for (index_t k = 0; k < r; ++k) {
    for (index_t i = 0; i < in; ++i) v[std::size_t(i)] = convert<double>(Uv(i, k));
    double sq0 = 0;
    for (double x : v) sq0 += x * x;
    if (o.gram_schmidt)  // modified Gram–Schmidt, as PEFT: v ← v − (q_jᵀ·v)·q_j for j < k
      for (index_t j = 0; j < k; ++j) {
        double d = 0;
        for (index_t i = 0; i < in; ++i) d += N(i, j) * v[std::size_t(i)];
        for (index_t i = 0; i < in; ++i) v[std::size_t(i)] -= d * N(i, j);
      }
    double sq = 0;
    for (double x : v) sq += x * x;
    const double nrm = std::sqrt(sq);
    // Gram–Schmidt: a residual at rounding level (relative to ‖u_k‖) is noise, not a direction.
    if (!(nrm > 0) || !std::isfinite(nrm) || (o.gram_schmidt && k > 0 && nrm <= 1e-12 * std::sqrt(sq0)))
      throw argument_error("deltaw::hra: column " + std::to_string(k) + " of U (hra_u) " +
                           (o.gram_schmidt && k > 0 ? "is zero or in the span of the earlier columns (Gram–Schmidt)"
                                                    : "is zero or not finite") +
                           ", so its reflection is undefined");
    f->norms[std::size_t(k)] = nrm;
    for (index_t i = 0; i < in; ++i) N(i, k) = v[std::size_t(i)] / nrm;
    Tm(k, k) = 2.0;
    if (o.gram_schmidt) continue;
    // Tm[:k, k] = −2·Tm[:k, :k]·(N[:, :k]ᵀ·n_k)
    std::vector<double> s(std::size_t(k), 0.0);
    for (index_t j = 0; j < k; ++j)
      for (index_t i = 0; i < in; ++i) s[std::size_t(j)] += N(i, j) * N(i, k);
    for (index_t a = 0; a < k; ++a) {
      double t = 0;
      for (index_t j = a; j < k; ++j) t += Tm(a, j) * s[std::size_t(j)];
      Tm(a, k) = -2.0 * t;
    }
  }
  return f;
}

/// hra() from held operands: computes and caches the compact WY factors.
template <class TW, class T, class D>
auto make_hra(held_matrix<TW, D> hw, held_matrix<T, D> hu, hra_options o) {
  static_assert(std::is_same_v<D, device::cpu>, "deltaw::hra: the reflections are computed on the host (CPU views)");
  std::shared_ptr<const hra_factors> f;
  // Only for a shape the update accepts (its constructor reports the others).
  if (hu.view.cols() >= 1 && hu.view.rows() == hw.view.cols()) f = hra_make_factors(hu.view, o);
  return hra_update<T, TW>(std::move(hw), std::move(hu), o, std::move(f));
}
}  // namespace detail

/// HRA over W [out, in] with U [in, r] (PEFT's hra_u: one column per Householder
/// reflection); W and U held by view, or owned if temporaries. Computes and caches the
/// compact WY form of H (plain product of reflections, or Gram–Schmidt with
/// hra_options{.gram_schmidt = true}).
template <class WL, class UL>
auto hra(WL&& W, UL&& U, hra_options o = {}) {
  return detail::make_hra(hold(std::forward<WL>(W)), hold(std::forward<UL>(U)), o);
}

DELTAW_NAMESPACE_END
