// SPDX-License-Identifier: MIT
// Evaluator of HiRA (expr/hira.hpp), ΔW = W ⊙ (B·A), with the two exact schedules:
//   products (tokens·r ≤ tokens + r):  Y += Σ_j ((X·diag(a_j))·Wᵀ)·diag(b_j)   (one GEMM over the
//                                      r stacked scaled copies of X), O likewise with G
//   panels (otherwise):                M = W[rows] ⊙ (c + B[rows]·A) for panel_rows rows at a time
//                                      (c = 0 for ΔW, 1 for W + ΔW), Y[:, rows] (+)= X·Mᵀ,
//                                      O (+)= G[:, rows]·M
// merge: rows of W ← W ⊙ (1 + B·A); unmerge: ÷ (1 + B·A). Neither B·A nor ΔW is formed whole:
// scratch is r·tokens·(in + out) or one panel (panel_rows × in) and its B·A.
// Templated on the device (maps are host-device functors): the same code runs with a
// cuda::context (cuda/updates_structured.cuh); there unmerge's zero check counts on the device.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "../../expr/hira.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace hira_detail {

template <class C, class D>
vector_view<const C, D> row_of(const matrix_view<const C, D>& M, index_t i) {
  return vector_view<const C, D>(M.data() + i * M.row_stride(), M.cols(), M.col_stride());
}
template <class C, class D>
vector_view<const C, D> col_of(const matrix_view<const C, D>& M, index_t j) {
  return vector_view<const C, D>(M.data() + j * M.col_stride(), M.rows(), M.row_stride());
}

/// The element-wise maps, as host-device functors so that the evaluator runs on any
/// device (a cuda::context included).
template <class C>
struct modulate {  // w·(c + m)
  C c;
  DELTAW_HOST_DEVICE C operator()(C w, C m) const { return w * (c + m); }
};
struct times {  // x·y
  template <class C>
  DELTAW_HOST_DEVICE C operator()(C x, C y) const {
    return x * y;
  }
};
struct times_one_plus {  // w·(1 + m), called as (m, w)
  template <class C>
  DELTAW_HOST_DEVICE C operator()(C m, C w) const {
    return w * (C(1) + m);
  }
};
struct over_one_plus {  // w / (1 + m), called as (m, w)
  template <class C>
  DELTAW_HOST_DEVICE C operator()(C m, C w) const {
    return w / (C(1) + m);
  }
};
struct is_minus_one {  // 1 where 1 + m = 0, in double (counted by reduce_cols)
  template <class C>
  DELTAW_HOST_DEVICE double operator()(C m) const {
    return C(1) + m == C(0) ? 1.0 : 0.0;
  }
};

/// True when the r-products schedule is cheaper: r·tokens·out·in against (tokens + r)·out·in.
template <class I>
bool use_products(I tokens, I r) {
  return tokens * r <= tokens + r;
}

/// Calls f(r0, M) with M = W[r0 : r0 + n] ⊙ (c + B[r0 : r0 + n]·A), panel by panel.
template <class C, class Ctx, class U, class F>
void modulated_panels(const Ctx& ctx, const U& u, C c, F&& f) {
  using enum kernels::op;
  using D = device_of<U>;
  const kernels::operand<C, D> A(ctx, u.A());
  const index_t rows = std::min(panel_rows, u.rows());
  auto M = kernels::make_scratch<C>(ctx, rows, u.cols()), Wp = kernels::make_scratch<C>(ctx, rows, u.cols());
  for (index_t r0 = 0; r0 < u.rows(); r0 += panel_rows) {
    const index_t n = std::min(panel_rows, u.rows() - r0);
    const auto Mv = M.view().middle_rows(0, n), Wv = Wp.view().middle_rows(0, n);
    const kernels::operand<C, D> B(ctx, u.B().middle_rows(r0, n));
    gemm<C>(ctx, C(1), B.view(), none, A.view(), none, C(0), Mv);
    copy(ctx, u.W().middle_rows(r0, n), Wv);
    transform(ctx, cview<C, D>(Wv), Mv, modulate<C>{c});
    f(r0, cview<C, D>(Mv));
  }
}

/// Y (+)= Σ_j ((X·diag(a_j))·Wᵀ)·diag(b_j): one GEMM of the r stacked copies with W.
template <class C, class Ctx, class U, class D>
void products_apply(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
  const index_t r = u.rank(), T = X.rows();
  const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
  auto Xs = kernels::make_scratch<C>(ctx, r * T, u.cols());
  auto P = kernels::make_scratch<C>(ctx, r * T, u.rows());
  for (index_t j = 0; j < r; ++j) {
    const auto Xj = Xs.view().middle_rows(j * T, T);
    copy(ctx, X, Xj);
    scale_cols(ctx, Xj, row_of(A.view(), j));
  }
  base_apply<C>(ctx, u.W(), Xs.cview(), P.view());
  for (index_t j = 0; j < r; ++j) {
    const auto Pj = P.view().middle_rows(j * T, T);
    scale_cols(ctx, Pj, col_of(B.view(), j));
    axpy<C>(ctx, C(1), cview<C, D>(Pj), Y);
  }
}
/// O += Σ_j ((G·diag(b_j))·W)·diag(a_j).
template <class C, class Ctx, class U, class D>
void products_transposed(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
  const index_t r = u.rank(), T = G.rows();
  const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
  auto Gs = kernels::make_scratch<C>(ctx, r * T, u.rows());
  auto Q = kernels::make_scratch<C>(ctx, r * T, u.cols());
  for (index_t j = 0; j < r; ++j) {
    const auto Gj = Gs.view().middle_rows(j * T, T);
    copy(ctx, G, Gj);
    scale_cols(ctx, Gj, col_of(B.view(), j));
  }
  base_apply_transposed<C>(ctx, u.W(), Gs.cview(), Q.view());
  for (index_t j = 0; j < r; ++j) {
    const auto Qj = Q.view().middle_rows(j * T, T);
    scale_cols(ctx, Qj, row_of(A.view(), j));
    axpy<C>(ctx, C(1), cview<C, D>(Qj), O);
  }
}

}  // namespace hira_detail

template <class T, class TW, class D>
struct evaluator<hira_update<T, TW, D>> {
  using U = hira_update<T, TW, D>;

  /// Y = X·(W ⊙ (1 + B·A))ᵀ: replaces the base product in a lazy sum over u's own W.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    if (hira_detail::use_products(X.rows(), u.rank())) {
      base_apply<C>(ctx, u.W(), X, Y);
      hira_detail::products_apply<C>(ctx, u, X, Y);
      return;
    }
    hira_detail::modulated_panels<C>(ctx, u, C(1), [&](index_t r0, const cview<C, D>& M) {
      gemm<C>(ctx, C(1), X, kernels::op::none, M, kernels::op::trans, C(0), Y.middle_cols(r0, M.rows()));
    });
  }
  /// O = G·(W ⊙ (1 + B·A)).
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    if (hira_detail::use_products(G.rows(), u.rank())) {
      base_apply_transposed<C>(ctx, u.W(), G, O);
      hira_detail::products_transposed<C>(ctx, u, G, O);
      return;
    }
    fill(ctx, O, C(0));
    hira_detail::modulated_panels<C>(ctx, u, C(1), [&](index_t r0, const cview<C, D>& M) {
      gemm<C>(ctx, C(1), G.middle_cols(r0, M.rows()), kernels::op::none, M, kernels::op::none, C(1), O);
    });
  }
  /// Y += X·(W ⊙ B·A)ᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    if (hira_detail::use_products(X.rows(), u.rank())) return hira_detail::products_apply<C>(ctx, u, X, Y);
    hira_detail::modulated_panels<C>(ctx, u, C(0), [&](index_t r0, const cview<C, D>& M) {
      gemm<C>(ctx, C(1), X, kernels::op::none, M, kernels::op::trans, C(1), Y.middle_cols(r0, M.rows()));
    });
  }
  /// O += G·(W ⊙ B·A).
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    if (hira_detail::use_products(G.rows(), u.rank())) return hira_detail::products_transposed<C>(ctx, u, G, O);
    hira_detail::modulated_panels<C>(ctx, u, C(0), [&](index_t r0, const cview<C, D>& M) {
      gemm<C>(ctx, C(1), G.middle_cols(r0, M.rows()), kernels::op::none, M, kernels::op::none, C(1), O);
    });
  }

  /// P += ΔW[r0 : r0 + P.rows()] = W[rows] ⊙ (B[rows]·A).
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    using enum kernels::op;
    const kernels::operand<C, D> A(ctx, u.A());
    auto w = kernels::make_scratch<C>(ctx, std::min(panel_rows, panel.rows()), u.cols());
    auto m = kernels::make_scratch<C>(ctx, std::min(panel_rows, panel.rows()), u.cols());
    for (index_t r = 0; r < panel.rows(); r += panel_rows) {
      const index_t n = std::min(panel_rows, panel.rows() - r);
      const auto wv = w.view().middle_rows(0, n), mv = m.view().middle_rows(0, n);
      const kernels::operand<C, D> B(ctx, u.B().middle_rows(r0 + r, n));
      gemm<C>(ctx, C(1), B.view(), none, A.view(), none, C(0), mv);
      copy(ctx, u.W().middle_rows(r0 + r, n), wv);
      transform(ctx, cview<C, D>(wv), mv, hira_detail::times{});
      axpy<C>(ctx, C(1), cview<C, D>(mv), panel.middle_rows(r, n));
    }
  }
  /// Rows of W ← W ⊙ (1 + B·A) (W must be u's own weight: checked by merge), panel_rows rows
  /// of B·A at a time.
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    by_chunks<C>(ctx, u, r0, panel, [&](const cview<C, D>& BA, const mview<C, D>& P) {
      transform(ctx, BA, P, hira_detail::times_one_plus{});
    });
  }
  /// Rows of W' ← W' ÷ (1 + B·A); argument_error (before anything is written) where an
  /// entry 1 + (B·A)_oi is 0.
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    const auto lost = [&] {
      throw argument_error("deltaw::unmerge (HiRA): 1 + (B·A) is 0 at an entry of rows " + std::to_string(r0) +
                           " … of W, so the merged weight lost that entry and cannot be unmerged");
    };
    std::vector<double> zeros;  // on a device: the zeros of 1 + B·A counted per column there, read here
    by_chunks<C>(ctx, u, r0, panel, [&](const cview<C, D>& BA, const mview<C, D>& P) {
      if constexpr (std::is_same_v<D, device::cpu>) {
        for (index_t i = 0; i < P.rows(); ++i)
          for (index_t j = 0; j < P.cols(); ++j)
            if (C(1) + BA(i, j) == C(0)) lost();
      } else {
        zeros.resize(std::size_t(BA.cols()));
        reduce_cols(ctx, BA, vector_view<double>(zeros.data(), BA.cols()), hira_detail::is_minus_one{});
        for (const double z : zeros)
          if (z > 0) lost();
      }
    });
    by_chunks<C>(ctx, u, r0, panel, [&](const cview<C, D>& BA, const mview<C, D>& P) {
      transform(ctx, BA, P, hira_detail::over_one_plus{});
    });
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }

 private:
  /// Calls f(BA, P) over chunks of panel_rows rows of the panel, BA = B[rows]·A.
  template <class C, class Ctx, class F>
  static void by_chunks(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel, F&& f) {
    const kernels::operand<C, D> A(ctx, u.A());
    auto M = kernels::make_scratch<C>(ctx, std::min(panel_rows, panel.rows()), u.cols());
    for (index_t r = 0; r < panel.rows(); r += panel_rows) {
      const index_t n = std::min(panel_rows, panel.rows() - r);
      const kernels::operand<C, D> B(ctx, u.B().middle_rows(r0 + r, n));
      const auto Mv = M.view().middle_rows(0, n);
      gemm<C>(ctx, C(1), B.view(), kernels::op::none, A.view(), kernels::op::none, C(0), Mv);
      f(cview<C, D>(Mv), panel.middle_rows(r, n));
    }
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
