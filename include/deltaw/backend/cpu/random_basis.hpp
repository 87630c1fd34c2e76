// SPDX-License-Identifier: MIT
// Evaluators of NOLA, VeRA and RandLoRA, written against the primitive layer. Bases are
// regenerated from their seed on every call (kernels::fill_random, kernels::axpy_random:
// Philox, bit-identical on every device), in tiles, straight into the scratch the next
// product reads (still in cache); none is kept between calls and RandLoRA's
// U [max_dim, N·r] and V [N·r, min_dim] (each about the size of W) are never formed whole.
//
// - NOLA forms A [r, in] and B [out, r] per call: they are LoRA-sized (r small), and A and
//   B are sums of k and l bases, so one scratch each, swept in 16 K-entry pieces with all
//   bases accumulated while the piece is in L1/L2 (axpy_random), is the cheapest order
//   (every basis entry is drawn exactly once per call). The dense ΔW is not formed.
// - VeRA draws A in column tiles [r, tile] and B in row tiles [tile, r], scaled by λ_d/λ_b
//   as they are drawn, so a large shared rank (PEFT's default r = 256) costs no r × in buffer.
// - RandLoRA draws U in row tiles [tile, N·r] and V in row tiles [tile, min_dim]; each tile
//   feeds one GEMM and is overwritten.
//
// NOLA's α, β and VeRA's λ_d, λ_b are read on the host (to_host_vector, a download on a
// device) and passed to axpy_random/scale_rows; RandLoRA's λ and γ are read where they
// live by the V tile's functor. The evaluators serve any device (CUDA: updates.cuh).
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "../../core/random.hpp"
#include "../../expr/random_basis.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace detail {
/// Lines (rows or columns) of a basis tile: about `budget` entries, at least `lo` and at most
/// `hi` lines. Large enough that each GEMM on the tile amortises the packing of its other
/// operand, small enough that the tile is still in cache when the GEMM reads it.
inline index_t tile_lines(index_t line_length, index_t total, index_t budget = index_t(1) << 20, index_t lo = 64,
                          index_t hi = 256) {
  const index_t t = line_length > 0 ? budget / line_length : hi;
  return std::max<index_t>(1, std::min(total, std::clamp(t, lo, hi)));
}

/// A coefficient vector converted to C on the host.
template <class C, class T>
std::vector<C> to_vector(const vector_view<const T>& v) {
  std::vector<C> out(std::size_t(v.size()));
  for (index_t i = 0; i < v.size(); ++i) out[std::size_t(i)] = convert<C>(v[i]);
  return out;
}

/// A host vector as a read-only vector_view.
template <class C>
vector_view<const C> host_view(const std::vector<C>& v) {
  return vector_view<const C>(v.data(), index_t(v.size()));
}
}  // namespace detail

// ─────────────────────────────────────────────────────────────────────────────────────────
// NOLA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T, class D>
struct evaluator<nola_update<T, D>> : additive_rows<evaluator<nola_update<T, D>>, nola_update<T, D>> {
  using U = nola_update<T, D>;

  /// The bases Aᵢ [r, in] (without A₀) and Bⱼ [out, r], in order.
  static std::vector<basis_entries> a_bases(const U& u) {
    std::vector<basis_entries> bases;
    bases.reserve(std::size_t(u.num_a_bases()));
    for (index_t i = 0; i < u.num_a_bases(); ++i) bases.push_back(u.a_basis(i));
    return bases;
  }
  static std::vector<basis_entries> b_bases(const U& u) {
    std::vector<basis_entries> bases;
    bases.reserve(std::size_t(u.num_b_bases()));
    for (index_t j = 0; j < u.num_b_bases(); ++j) bases.push_back(u.b_basis(j));
    return bases;
  }

  /// A = A₀ + Σᵢ αᵢ·Aᵢ into A [r, in]. A₀ enters as a basis of coefficient 1 added to zeros,
  /// which reproduces its entries exactly.
  template <class C, class Ctx>
  static void form_A(const Ctx& ctx, const U& u, const mview<C, D>& A) {
    const std::vector<C> a = to_host_vector<C>(ctx, u.a_coefficients());
    std::vector<C> coef;
    std::vector<basis_entries> bases;
    coef.reserve(a.size() + 1);
    bases.reserve(a.size() + 1);
    if (u.options().frozen_a0) {
      coef.push_back(C(1));
      bases.push_back(u.a0());
    }
    for (index_t i = 0; i < u.num_a_bases(); ++i) {
      coef.push_back(a[std::size_t(i)]);
      bases.push_back(u.a_basis(i));
    }
    fill(ctx, A, C(0));
    axpy_random(ctx, detail::host_view(coef), std::span<const basis_entries>(bases), 0, std::uint64_t(u.cols()), A);
  }

  /// Rows [r0, r0 + B.rows()) of B = Σⱼ βⱼ·Bⱼ, times `factor`, into B [rows, r].
  template <class C, class Ctx>
  static void form_B_rows(const Ctx& ctx, const U& u, index_t r0, C factor, const mview<C, D>& B) {
    std::vector<C> b = to_host_vector<C>(ctx, u.b_coefficients());
    for (C& x : b) x *= factor;
    const std::vector<basis_entries> bases = b_bases(u);
    fill(ctx, B, C(0));
    axpy_random(ctx, detail::host_view(b), std::span<const basis_entries>(bases),
                std::uint64_t(r0) * std::uint64_t(u.rank()), std::uint64_t(u.rank()), B);
  }

  /// Y += (X·Aᵀ)·(s·B)ᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    auto A = kernels::make_scratch<C>(ctx, u.rank(), u.cols());
    auto B = kernels::make_scratch<C>(ctx, u.rows(), u.rank());
    form_A<C>(ctx, u, A.view());
    form_B_rows<C>(ctx, u, 0, C(u.scale()), B.view());
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), X, none, A.cview(), trans, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, B.cview(), trans, C(1), Y);
  }

  /// O += (G·s·B)·A.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    auto A = kernels::make_scratch<C>(ctx, u.rank(), u.cols());
    auto B = kernels::make_scratch<C>(ctx, u.rows(), u.rank());
    form_A<C>(ctx, u, A.view());
    form_B_rows<C>(ctx, u, 0, C(u.scale()), B.view());
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, B.cview(), none, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, A.cview(), none, C(1), O);
  }

  /// P += factor·s·B[r0 : r0 + P.rows()]·A.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    auto A = kernels::make_scratch<C>(ctx, u.rank(), u.cols());
    auto B = kernels::make_scratch<C>(ctx, P.rows(), u.rank());
    form_A<C>(ctx, u, A.view());
    form_B_rows<C>(ctx, u, r0, factor * C(u.scale()), B.view());
    gemm<C>(ctx, C(1), B.cview(), none, A.cview(), none, C(1), P);
  }

  /// ‖s·B·A‖_F from the r × r Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    auto A = kernels::make_scratch<double>(ctx, u.rank(), u.cols());
    auto B = kernels::make_scratch<double>(ctx, u.rows(), u.rank());
    form_A<double>(ctx, u, A.view());
    form_B_rows<double>(ctx, u, 0, u.scale(), B.view());
    auto GB = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    auto GA = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    gemm<double>(ctx, 1.0, B.cview(), trans, B.cview(), none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, A.cview(), none, A.cview(), trans, 0.0, GA.view());
    return std::sqrt(std::max(trace_of_product<double>(GB.cview(), GA.cview()), 0.0));
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// VeRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T, class D>
struct evaluator<vera_update<T, D>> : additive_rows<evaluator<vera_update<T, D>>, vera_update<T, D>> {
  using U = vera_update<T, D>;

  /// diag(λ_d)·A[:, j0 : j0 + At.cols()] into At [r, tj]; an empty ld leaves A unscaled.
  template <class C, class Ctx>
  static void A_tile(const Ctx& ctx, const U& u, const vector_view<const C>& ld, index_t j0, const mview<C, D>& At) {
    const auto& b = u.basis();
    fill_random(ctx, b.A(), b.a_index(0, j0), std::uint64_t(b.in_max), At);
    if (ld.size() > 0) scale_rows(ctx, At, ld);
  }
  /// diag(lb)·B[i0 : i0 + Bt.rows(), :] into Bt [ti, r] (lb: λ_b times the caller's factor,
  /// indexed by the layer's row); an empty lb leaves B unscaled.
  template <class C, class Ctx>
  static void B_tile(const Ctx& ctx, const U& u, const vector_view<const C>& lb, index_t i0, const mview<C, D>& Bt) {
    const auto& b = u.basis();
    fill_random(ctx, b.B(), b.b_index(i0, 0), std::uint64_t(u.rank()), Bt);
    if (lb.size() > 0) scale_rows(ctx, Bt, lb, i0);
  }
  static index_t a_tile(const U& u) { return detail::tile_lines(u.rank(), u.cols(), index_t(1) << 16); }
  static index_t b_tile(const U& u) { return detail::tile_lines(u.rank(), u.rows(), index_t(1) << 16); }

  /// Z = X·(diag(λ_d)·A)ᵀ, then Y += Z·(diag(λ_b)·B)ᵀ, tile by tile.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const auto ld = to_host_vector<C>(ctx, u.lambda_d());
    const auto lb = to_host_vector<C>(ctx, u.lambda_b());
    const index_t r = u.rank(), ta = a_tile(u), tb = b_tile(u);
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), r);
    auto At = kernels::make_scratch<C>(ctx, r, ta);
    auto Bt = kernels::make_scratch<C>(ctx, tb, r);
    fill(ctx, Z.view(), C(0));
    for (index_t j0 = 0; j0 < u.cols(); j0 += ta) {
      const index_t tj = std::min(ta, u.cols() - j0);
      const auto a = At.view().middle_cols(0, tj);
      A_tile<C>(ctx, u, detail::host_view(ld), j0, a);
      gemm<C>(ctx, C(1), X.middle_cols(j0, tj), none, cview<C, D>(a), trans, C(1), Z.view());
    }
    for (index_t i0 = 0; i0 < u.rows(); i0 += tb) {
      const index_t ti = std::min(tb, u.rows() - i0);
      const auto bt = Bt.view().middle_rows(0, ti);
      B_tile<C>(ctx, u, detail::host_view(lb), i0, bt);
      gemm<C>(ctx, C(1), Z.cview(), none, cview<C, D>(bt), trans, C(1), Y.middle_cols(i0, ti));
    }
  }

  /// Z = G·diag(λ_b)·B, then O += Z·diag(λ_d)·A, tile by tile.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const auto ld = to_host_vector<C>(ctx, u.lambda_d());
    const auto lb = to_host_vector<C>(ctx, u.lambda_b());
    const index_t r = u.rank(), ta = a_tile(u), tb = b_tile(u);
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), r);
    auto At = kernels::make_scratch<C>(ctx, r, ta);
    auto Bt = kernels::make_scratch<C>(ctx, tb, r);
    fill(ctx, Z.view(), C(0));
    for (index_t i0 = 0; i0 < u.rows(); i0 += tb) {
      const index_t ti = std::min(tb, u.rows() - i0);
      const auto bt = Bt.view().middle_rows(0, ti);
      B_tile<C>(ctx, u, detail::host_view(lb), i0, bt);
      gemm<C>(ctx, C(1), G.middle_cols(i0, ti), none, cview<C, D>(bt), none, C(1), Z.view());
    }
    for (index_t j0 = 0; j0 < u.cols(); j0 += ta) {
      const index_t tj = std::min(ta, u.cols() - j0);
      const auto a = At.view().middle_cols(0, tj);
      A_tile<C>(ctx, u, detail::host_view(ld), j0, a);
      gemm<C>(ctx, C(1), Z.cview(), none, cview<C, D>(a), none, C(1), O.middle_cols(j0, tj));
    }
  }

  /// P += factor·diag(λ_b)[r0 : …]·B[r0 : …]·diag(λ_d)·A, A in column tiles.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const auto ld = to_host_vector<C>(ctx, u.lambda_d());
    auto lb = to_host_vector<C>(ctx, u.lambda_b());
    for (C& x : lb) x = factor * x;
    const index_t ta = a_tile(u);
    auto Bt = kernels::make_scratch<C>(ctx, P.rows(), u.rank());
    auto At = kernels::make_scratch<C>(ctx, u.rank(), ta);
    B_tile<C>(ctx, u, detail::host_view(lb), r0, Bt.view());
    for (index_t j0 = 0; j0 < u.cols(); j0 += ta) {
      const index_t tj = std::min(ta, u.cols() - j0);
      const auto a = At.view().middle_cols(0, tj);
      A_tile<C>(ctx, u, detail::host_view(ld), j0, a);
      gemm<C>(ctx, C(1), Bt.cview(), none, cview<C, D>(a), none, C(1), P.middle_cols(j0, tj));
    }
  }

  /// ‖diag(λ_b)·B·diag(λ_d)·A‖_F from two r × r Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    const auto ld = to_host_vector<double>(ctx, u.lambda_d());
    const auto lb = to_host_vector<double>(ctx, u.lambda_b());
    auto A = kernels::make_scratch<double>(ctx, u.rank(), u.cols());
    auto B = kernels::make_scratch<double>(ctx, u.rows(), u.rank());
    A_tile<double>(ctx, u, detail::host_view(ld), 0, A.view());
    B_tile<double>(ctx, u, detail::host_view(lb), 0, B.view());
    auto GB = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    auto GA = kernels::make_scratch<double>(ctx, u.rank(), u.rank());
    gemm<double>(ctx, 1.0, B.cview(), trans, B.cview(), none, 0.0, GB.view());
    gemm<double>(ctx, 1.0, A.cview(), none, A.cview(), trans, 0.0, GA.view());
    return std::sqrt(std::max(trace_of_product<double>(GB.cview(), GA.cview()), 0.0));
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// RandLoRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T, class D>
struct evaluator<randlora_update<T, D>> : additive_rows<evaluator<randlora_update<T, D>>, randlora_update<T, D>> {
  using U = randlora_update<T, D>;

  /// What every call needs once: A [r, min_dim] drawn, λ and γ in type C.
  template <class C>
  struct state {
    kernels::scratch<C, D> A;
    kernels::operand<C, D> lambda, gamma;
    index_t N, nr, n, m;
    C factor;  ///< s times the caller's sign, folded into V

    template <class Ctx>
    state(const Ctx& ctx, const U& u, C sign)
        : A(kernels::make_scratch<C>(ctx, u.rank(), u.min_dim())), lambda(ctx, u.lambda()), gamma(ctx, u.gamma()),
          N(u.num_bases()), nr(u.num_bases() * u.rank()), n(u.min_dim()), m(u.max_dim()),
          factor(sign * C(u.scale())) {
      const auto& b = u.basis();
      fill_random(ctx, b.A(), 0, std::uint64_t(b.min_dim), A.view());
    }
  };

  /// Rows [c0, c0 + Vt.rows()) and columns [j0, j0 + Vt.cols()) of factor·V:
  /// row c = λ[c/N, c%N]·A[c/N]∘γ[c%N].
  template <class C>
  struct V_entry {
    cview<C, D> L, A, G;
    C factor;
    index_t N, c0, j0;
    DELTAW_HOST_DEVICE C operator()(index_t q, index_t j, C) const {
      const index_t c = c0 + q, k = c / N, b = c % N;
      const C coef = factor * L(k, b);
      return coef * (A(k, j0 + j) * G(b, j0 + j));
    }
  };
  template <class C, class Ctx>
  static void V_tile(const Ctx& ctx, const state<C>& x, index_t c0, index_t j0, const mview<C, D>& Vt) {
    transform(ctx, Vt, V_entry<C>{x.lambda.view(), x.A.cview(), x.gamma.view(), x.factor, x.N, c0, j0});
  }
  /// Rows [i0, i0 + Ut.rows()) of U: row i is B[i, :N, :] flattened, i.e. entries i·N_shared·r + c.
  template <class C, class Ctx>
  static void U_tile(const Ctx& ctx, const U& u, index_t i0, const mview<C, D>& Ut) {
    const auto& b = u.basis();
    fill_random(ctx, b.B(), b.b_index(i0, 0, 0), b.b_index(1, 0, 0), Ut);
  }
  template <class C>
  static index_t v_tile(const state<C>& x) { return detail::tile_lines(x.n, x.nr); }
  template <class C>
  static index_t u_tile(const state<C>& x) { return detail::tile_lines(x.nr, x.m); }

  /// Y [T, max_dim] += X [T, min_dim]·(factor·V)ᵀ·Uᵀ.
  template <class C, class Ctx>
  static void left(const Ctx& ctx, const U& u, const state<C>& x, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const index_t tv = v_tile(x), tu = u_tile(x);
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), x.nr);
    auto Vt = kernels::make_scratch<C>(ctx, tv, x.n);
    for (index_t c0 = 0; c0 < x.nr; c0 += tv) {
      const index_t tc = std::min(tv, x.nr - c0);
      const auto v = Vt.view().middle_rows(0, tc);
      V_tile<C>(ctx, x, c0, 0, v);
      gemm<C>(ctx, C(1), X, none, cview<C, D>(v), trans, C(0), Z.view().middle_cols(c0, tc));
    }
    auto Ut = kernels::make_scratch<C>(ctx, tu, x.nr);
    for (index_t i0 = 0; i0 < x.m; i0 += tu) {
      const index_t ti = std::min(tu, x.m - i0);
      const auto ut = Ut.view().middle_rows(0, ti);
      U_tile<C>(ctx, u, i0, ut);
      gemm<C>(ctx, C(1), Z.cview(), none, cview<C, D>(ut), trans, C(1), Y.middle_cols(i0, ti));
    }
  }
  /// Y [T, min_dim] += X [T, max_dim]·U·(factor·V).
  template <class C, class Ctx>
  static void right(const Ctx& ctx, const U& u, const state<C>& x, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const index_t tv = v_tile(x), tu = u_tile(x);
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), x.nr);
    fill(ctx, Z.view(), C(0));
    auto Ut = kernels::make_scratch<C>(ctx, tu, x.nr);
    for (index_t i0 = 0; i0 < x.m; i0 += tu) {
      const index_t ti = std::min(tu, x.m - i0);
      const auto ut = Ut.view().middle_rows(0, ti);
      U_tile<C>(ctx, u, i0, ut);
      gemm<C>(ctx, C(1), X.middle_cols(i0, ti), none, cview<C, D>(ut), none, C(1), Z.view());
    }
    auto Vt = kernels::make_scratch<C>(ctx, tv, x.n);
    for (index_t c0 = 0; c0 < x.nr; c0 += tv) {
      const index_t tc = std::min(tv, x.nr - c0);
      const auto v = Vt.view().middle_rows(0, tc);
      V_tile<C>(ctx, x, c0, 0, v);
      gemm<C>(ctx, C(1), Z.cview().middle_cols(c0, tc), none, cview<C, D>(v), none, C(1), Y);
    }
  }

  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const state<C> x(ctx, u, C(1));
    if (u.transposed())
      right<C>(ctx, u, x, X, Y);  // ΔW = s·Vᵀ·Uᵀ: X·ΔWᵀ = s·X·U·V
    else
      left<C>(ctx, u, x, X, Y);   // ΔW = s·U·V:  X·ΔWᵀ = s·X·Vᵀ·Uᵀ
  }

  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const state<C> x(ctx, u, C(1));
    if (u.transposed())
      left<C>(ctx, u, x, G, O);   // G·ΔW = s·G·Vᵀ·Uᵀ
    else
      right<C>(ctx, u, x, G, O);  // G·ΔW = s·G·U·V
  }

  /// Rows [r0, r0 + P.rows()) of sign·ΔW added to P, 256 rows at a time.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C sign) {
    using enum kernels::op;
    const state<C> x(ctx, u, sign);
    const index_t rows = std::min(panel_rows, P.rows());
    if (!u.transposed()) {
      // Rows of U·V are rows of U.
      const index_t tv = v_tile(x);
      auto Ut = kernels::make_scratch<C>(ctx, rows, x.nr);
      auto Vt = kernels::make_scratch<C>(ctx, tv, x.n);
      for (index_t p0 = 0; p0 < P.rows(); p0 += panel_rows) {
        const index_t pr = std::min(panel_rows, P.rows() - p0);
        const auto sub = P.middle_rows(p0, pr);
        const auto ut = Ut.view().middle_rows(0, pr);
        U_tile<C>(ctx, u, r0 + p0, ut);
        for (index_t c0 = 0; c0 < x.nr; c0 += tv) {
          const index_t tc = std::min(tv, x.nr - c0);
          const auto v = Vt.view().middle_rows(0, tc);
          V_tile<C>(ctx, x, c0, 0, v);
          gemm<C>(ctx, C(1), cview<C, D>(ut).middle_cols(c0, tc), none, cview<C, D>(v), none, C(1), sub);
        }
      }
    } else {
      // Rows of Vᵀ·Uᵀ are columns of V.
      const index_t tu = u_tile(x);
      auto Vt = kernels::make_scratch<C>(ctx, x.nr, rows);
      auto Ut = kernels::make_scratch<C>(ctx, tu, x.nr);
      for (index_t p0 = 0; p0 < P.rows(); p0 += panel_rows) {
        const index_t pr = std::min(panel_rows, P.rows() - p0);
        const auto sub = P.middle_rows(p0, pr);
        const auto v = Vt.view().middle_cols(0, pr);
        V_tile<C>(ctx, x, 0, r0 + p0, v);
        for (index_t i0 = 0; i0 < x.m; i0 += tu) {
          const index_t ti = std::min(tu, x.m - i0);
          const auto ut = Ut.view().middle_rows(0, ti);
          U_tile<C>(ctx, u, i0, ut);
          gemm<C>(ctx, C(1), cview<C, D>(v), trans, cview<C, D>(ut), trans, C(1), sub.middle_cols(i0, ti));
        }
      }
    }
  }

  /// ΔW is full rank: no small Gram form; summed panel by panel in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<double>(u);
  }
};

}  // namespace cpu

/// NOLA's combined factors {B [out, r], A [r, in]} (ΔW = u.scale()·B·A), formed once: for
/// inference with frozen coefficients, lora(B, A, scale(u.scale())) then skips drawing the
/// k + l bases on every call.
template <class C = float, class T>
std::pair<dense<C>, dense<C>> nola_factors(const nola_update<T, device::cpu>& u) {
  using E = cpu::evaluator<nola_update<T, device::cpu>>;
  const kernels::cpu_context ctx;
  auto A = kernels::make_scratch<C>(ctx, u.rank(), u.cols());
  auto B = kernels::make_scratch<C>(ctx, u.rows(), u.rank());
  E::template form_A<C>(ctx, u, A.view());
  E::template form_B_rows<C>(ctx, u, 0, C(1), B.view());
  return {std::move(B.eigen()), std::move(A.eigen())};
}

DELTAW_NAMESPACE_END
