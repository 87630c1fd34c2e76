// SPDX-License-Identifier: MIT
// VJPs of the random-basis family (expr/random_basis.hpp): NOLA, VeRA, RandLoRA, written
// against the primitive layer. The frozen bases are regenerated from the seed with the
// evaluators' own tile generators (backend/cpu/random_basis.hpp), never stored and never
// formed at out × in; neither is ΔW nor any out × in gradient.
//
// - NOLA, ΔW = s·B·A, A = A₀ + Σᵢ αᵢ·Aᵢ, B = Σⱼ βⱼ·Bⱼ. As LoRA, with Z = X·Aᵀ:
//     dB = s·dYᵀ·Z [out, r],  dZ = s·dY·B,  dA = dZᵀ·X [r, in],  dX += dZ·A,
//   and then dαᵢ = ⟨dA, Aᵢ⟩_F, dβⱼ = ⟨dB, Bⱼ⟩_F: each basis is drawn chunk by chunk
//   (16 K entries) and contracted against the same chunk of dA or dB, so memory stays at
//   one chunk whatever k and l are (the paper's k = l = 512 would otherwise mean k copies
//   of an r × in matrix).
// - VeRA, ΔW = diag(λ_b)·B·diag(λ_d)·A. With Z = X·Aᵀ, H = Z·diag(λ_d),
//   G = dY·diag(λ_b)·B [tokens, r]:
//     dλ_b[o] = ⟨B[o, :], (dYᵀ·H)[o, :]⟩,  dλ_d[k] = ⟨G[:, k], Z[:, k]⟩,
//     dX += G·diag(λ_d)·A,
//   A drawn in column tiles and B in row tiles as in the evaluator.
// - RandLoRA, ΔW = s·U·V (out ≥ in) or s·Vᵀ·Uᵀ (out < in), V row c = λ[k, b]·A[k, :]∘γ[b, :]
//   (k = c / N, b = c % N). Call P the activation on the min_dim side and Q the one on the
//   max_dim side (P = X, Q = dY when out ≥ in; swapped otherwise). Then
//     dV = s·(Q·U)ᵀ·P [N·r, min_dim],
//     dλ[k, b] = Σ_j dV[c, j]·A[k, j]·γ[b, j],  dγ[b, :] += λ[k, b]·dV[c, :]∘A[k, :].
//   dV (about the size of W) is formed in row tiles of at most 256 rows, each reduced into
//   dλ and dγ at once. dX reuses Q·U (out ≥ in) or the evaluator's product (out < in).
//
// With autograd::adapted_linear the factor variables are the trainable tensors as
// matrices — NOLA {α [1, k], β [1, l]}, VeRA {λ_d [1, r], λ_b [1, out]}, RandLoRA
// {λ [r, N], γ [N, min_dim]} — and `cpu::vjp<U>::rebind(u, views)` builds the update
// from them with everything frozen (seed, shape, scale, shared bases) taken from u:
//
//   const auto proto = deltaw::vera(basis, out, in, ld0, lb0);
//   auto y = ag::adapted_linear<double, 2>(x, deltaw::view(W), {ld, lb}, [&](const auto& v) {
//     return deltaw::cpu::vjp<decltype(proto)>::rebind(proto, v);
//   });
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "random_basis.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace detail {
/// A [1, n] or [n, 1] factor variable's view as a vector_view (no copy).
template <class T, class D>
vector_view<const T, D> coefficient_vector(const matrix_view<const T, D>& v, index_t n, const char* op, const char* name) {
  if ((v.rows() != 1 && v.cols() != 1) || v.size() != n)
    throw shape_error(std::string(op) + ": " + name + " is " + deltaw::detail::shape_str(v.rows(), v.cols()) +
                      "; expected [1, " + std::to_string(n) + "]");
  return vector_view<const T, D>(v.data(), n, v.rows() == 1 ? v.col_stride() : v.row_stride());
}

/// A vector factor's gradient slot: absent, or [1, n] or [n, 1].
template <class C, class D>
void check_vector_grad(const mview<C, D>& g, index_t n, const char* op, const char* name) {
  if (present(g) && ((g.rows() != 1 && g.cols() != 1) || g.size() != n))
    throw shape_error(std::string(op) + ": the gradient of " + name + " is " +
                      deltaw::detail::shape_str(g.rows(), g.cols()) + " but " + name + " has " + std::to_string(n) +
                      " entries");
}
/// A present [1, n] or [n, 1] gradient slot as a vector_view.
template <class C, class D>
vector_view<C, D> grad_vector(const mview<C, D>& g) {
  return vector_view<C, D>(g.data(), g.size(), g.rows() == 1 ? g.col_stride() : g.row_stride());
}

/// out[i] += ⟨G, basis i⟩ over G's row-major flat order (entry f of G pairs with entry
/// f of each basis). Bases are drawn `chunk` entries at a time into one buffer, all of them
/// against the same chunk of G while it is in cache.
template <class C, class D, class Ctx>
void contract_with_bases(const Ctx& ctx, const kernels::scratch<C, D>& G, std::span<const basis_entries> bases,
                         const vector_view<C, D>& out, std::uint64_t chunk = std::uint64_t(1) << 14) {
  const std::uint64_t n = std::uint64_t(G.rows()) * std::uint64_t(G.cols());
  auto buf = kernels::make_scratch<C>(ctx, 1, index_t(std::min(chunk, n)));
  for (std::uint64_t f = 0; f < n; f += chunk) {
    const index_t m = index_t(std::min(chunk, n - f));
    const cview<C, D> g(G.data() + f, 1, m);
    const auto b = buf.view().middle_cols(0, m);
    for (std::size_t i = 0; i < bases.size(); ++i) {
      fill_random(ctx, bases[i], f, std::uint64_t(m), b);
      dot_rows(ctx, g, cview<C, D>(b), vector_view<C, D>(out.data() + index_t(i) * out.stride(), 1), true);
    }
  }
}
/// Y(i, j) += λ(k, b)·R(i, j), λ read where it lives (an axpy whose scalar stays on the device).
template <class C, class D>
struct add_lambda_times {
  cview<C, D> L, R;
  index_t k, b;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C y) const { return y + L(k, b) * R(i, j); }
};
}  // namespace detail

// ─────────────────────────────────────────────────────────────────────────────────────────
// NOLA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T, class D>
struct vjp<nola_update<T, D>> {
  using U = nola_update<T, D>;
  using E = evaluator<U>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "a_coef" : "b_coef"; }

  /// u with α = views[0] ([1, k]) and β = views[1] ([1, l]), viewed; k and l must stay
  /// those of u (they set the default basis bounds).
  static U rebind(const U& u, const std::array<matrix_view<const T, D>, 2>& views) {
    constexpr const char* op = "deltaw::cpu::vjp<nola>::rebind";
    const auto a = detail::coefficient_vector<T>(views[0], u.num_a_bases(), op, "a_coef");
    const auto b = detail::coefficient_vector<T>(views[1], u.num_b_bases(), op, "b_coef");
    return U(u.rows(), u.cols(), u.rank(), u.seed(), held_vector<T, D>{a, nullptr}, held_vector<T, D>{b, nullptr}, u.scale(),
             u.options());
  }

  /// grads = {dα [1, k], dβ [1, l]}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<nola>::backward";
    using enum kernels::op;
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_vector_grad(grads[0], u.num_a_bases(), op, "a_coef");
    detail::check_vector_grad(grads[1], u.num_b_bases(), op, "b_coef");
    const bool ga = present(grads[0]), gb = present(grads[1]), gx = present(dX);
    if (!ga && !gb && !gx) return;
    auto A = kernels::make_scratch<C>(ctx, u.rank(), u.cols());
    auto B = kernels::make_scratch<C>(ctx, u.rows(), u.rank());
    E::template form_A<C>(ctx, u, A.view());
    E::template form_B_rows<C>(ctx, u, 0, C(1), B.view());
    const C s = C(u.scale());
    auto dZ = kernels::make_scratch<C>(ctx, dY.rows(), u.rank());
    gemm<C>(ctx, s, dY, none, B.cview(), none, C(0), dZ.view());  // dZ = s·dY·B
    if (gb) {
      auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
      gemm<C>(ctx, C(1), X, none, A.cview(), trans, C(0), Z.view());
      auto dB = kernels::make_scratch<C>(ctx, u.rows(), u.rank());
      gemm<C>(ctx, s, dY, trans, Z.cview(), none, C(0), dB.view());  // dB = s·dYᵀ·Z
      const auto bases = E::b_bases(u);
      detail::contract_with_bases<C>(ctx, dB, std::span<const basis_entries>(bases), detail::grad_vector(grads[1]));
    }
    if (ga) {
      auto dA = kernels::make_scratch<C>(ctx, u.rank(), u.cols());
      gemm<C>(ctx, C(1), dZ.cview(), trans, X, none, C(0), dA.view());  // dA = dZᵀ·X
      const auto bases = E::a_bases(u);
      detail::contract_with_bases<C>(ctx, dA, std::span<const basis_entries>(bases), detail::grad_vector(grads[0]));
    }
    if (gx) gemm<C>(ctx, C(1), dZ.cview(), none, A.cview(), none, C(1), dX);
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// VeRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T, class D>
struct vjp<vera_update<T, D>> {
  using U = vera_update<T, D>;
  using E = evaluator<U>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "lambda_d" : "lambda_b"; }

  /// u with λ_d = views[0] ([1, r]) and λ_b = views[1] ([1, out]), viewed.
  static U rebind(const U& u, const std::array<matrix_view<const T, D>, 2>& views) {
    constexpr const char* op = "deltaw::cpu::vjp<vera>::rebind";
    const auto d = detail::coefficient_vector<T>(views[0], u.rank(), op, "lambda_d");
    const auto b = detail::coefficient_vector<T>(views[1], u.rows(), op, "lambda_b");
    return U(u.basis(), u.rows(), u.cols(), held_vector<T, D>{d, nullptr}, held_vector<T, D>{b, nullptr});
  }

  /// grads = {dλ_d [1, r], dλ_b [1, out]}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<vera>::backward";
    using enum kernels::op;
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_vector_grad(grads[0], u.rank(), op, "lambda_d");
    detail::check_vector_grad(grads[1], u.rows(), op, "lambda_b");
    const bool gd = present(grads[0]), gb = present(grads[1]), gx = present(dX);
    if (!gd && !gb && !gx) return;
    const index_t r = u.rank(), out = u.rows(), in = u.cols(), tokens = X.rows();
    const index_t ta = E::a_tile(u), tb = E::b_tile(u);
    const auto ld = to_host_vector<C>(ctx, u.lambda_d());
    const auto lb = to_host_vector<C>(ctx, u.lambda_b());
    const vector_view<const C> unscaled{};  // empty: the tiles are drawn without λ
    auto At = kernels::make_scratch<C>(ctx, r, ta);

    // Z = X·Aᵀ with the unscaled A (λ_d may be 0), H = Z·diag(λ_d).
    auto Z = kernels::make_scratch<C>(ctx, (gd || gb) ? tokens : 0, r);
    auto H = kernels::make_scratch<C>(ctx, (gd || gb) ? tokens : 0, r);
    if (gd || gb) {
      fill(ctx, Z.view(), C(0));
      for (index_t j0 = 0; j0 < in; j0 += ta) {
        const index_t tj = std::min(ta, in - j0);
        const auto a = At.view().middle_cols(0, tj);
        E::template A_tile<C>(ctx, u, unscaled, j0, a);
        gemm<C>(ctx, C(1), X.middle_cols(j0, tj), none, cview<C, D>(a), trans, C(1), Z.view());
      }
      copy(ctx, Z.cview(), H.view());
      scale_cols(ctx, H.view(), detail::host_view(ld));
    }
    // One pass over B's row tiles: dλ_b and G = dY·diag(λ_b)·B.
    const bool need_G = gd || gx;
    auto G = kernels::make_scratch<C>(ctx, need_G ? tokens : 0, r);
    if (need_G) fill(ctx, G.view(), C(0));
    if (gb || need_G) {
      auto Bt = kernels::make_scratch<C>(ctx, tb, r);
      auto M = kernels::make_scratch<C>(ctx, gb ? tb : 0, r);
      const auto gbv = gb ? detail::grad_vector(grads[1]) : vector_view<C, D>();
      for (index_t i0 = 0; i0 < out; i0 += tb) {
        const index_t ti = std::min(tb, out - i0);
        const auto bt = Bt.view().middle_rows(0, ti);
        E::template B_tile<C>(ctx, u, unscaled, i0, bt);  // unscaled B rows
        if (gb) {
          const auto m = M.view().middle_rows(0, ti);
          gemm<C>(ctx, C(1), dY.middle_cols(i0, ti), trans, H.cview(), none, C(0), m);  // [ti, r]
          dot_rows(ctx, cview<C, D>(bt), cview<C, D>(m), vector_view<C, D>(gbv.data() + i0 * gbv.stride(), ti, gbv.stride()),
                   true);
        }
        if (need_G) {
          scale_rows(ctx, bt, detail::host_view(lb), i0);
          gemm<C>(ctx, C(1), dY.middle_cols(i0, ti), none, cview<C, D>(bt), none, C(1), G.view());
        }
      }
    }
    if (gd)  // dλ_d[k] += ⟨G[:, k], Z[:, k]⟩
      dot_rows(ctx, G.cview().transpose(), Z.cview().transpose(), detail::grad_vector(grads[0]), true);
    if (gx) {
      scale_cols(ctx, G.view(), detail::host_view(ld));  // dZ = G·diag(λ_d)
      for (index_t j0 = 0; j0 < in; j0 += ta) {
        const index_t tj = std::min(ta, in - j0);
        const auto a = At.view().middle_cols(0, tj);
        E::template A_tile<C>(ctx, u, unscaled, j0, a);
        gemm<C>(ctx, C(1), G.cview(), none, cview<C, D>(a), none, C(1), dX.middle_cols(j0, tj));
      }
    }
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// RandLoRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T, class D>
struct vjp<randlora_update<T, D>> {
  using U = randlora_update<T, D>;
  using E = evaluator<U>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "lambda" : "gamma"; }

  /// u with λ = views[0] ([r, N]) and γ = views[1] ([N, min_dim]), viewed.
  static U rebind(const U& u, const std::array<matrix_view<const T, D>, 2>& views) {
    return U(u.basis(), u.rows(), u.cols(), held_matrix<T, D>{views[0], nullptr}, held_matrix<T, D>{views[1], nullptr},
             u.scale());
  }

  /// grads = {dλ [r, N], dγ [N, min_dim]}; see vjp.hpp.
  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<randlora>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.lambda(), op, "lambda");
    detail::check_grad_shape(grads[1], u.gamma(), op, "gamma");
    if (!present(grads[0]) && !present(grads[1]) && !present(dX)) return;
    const typename E::template state<C> x(ctx, u, C(1));  // A, λ, γ in C; V tiles carry s
    if (u.transposed())
      run<C>(ctx, u, x, dY, X, grads[0], grads[1], dX, dY);
    else
      run<C>(ctx, u, x, X, dY, grads[0], grads[1], dX, dY);
  }

 private:
  /// P [tokens, min_dim], Q [tokens, max_dim] as in the header comment.
  template <class C, class Ctx>
  static void run(const Ctx& ctx, const U& u, const typename E::template state<C>& x, const cview<C, D>& P,
                  const cview<C, D>& Q, const mview<C, D>& gl, const mview<C, D>& gg, const mview<C, D>& dX, const cview<C, D>& dY) {
    using enum kernels::op;
    const bool has_gl = present(gl), has_gg = present(gg), has_dx = present(dX);
    const bool need_dV = has_gl || has_gg;
    const bool dx_from_zq = has_dx && !u.transposed();  // dX = s·dY·U·V = (Q·U)·(s·V)
    if (need_dV || dx_from_zq) {
      const index_t tu = E::u_tile(x), tv = E::v_tile(x);
      auto Zq = kernels::make_scratch<C>(ctx, Q.rows(), x.nr);
      fill(ctx, Zq.view(), C(0));
      {
        auto Ut = kernels::make_scratch<C>(ctx, tu, x.nr);
        for (index_t i0 = 0; i0 < x.m; i0 += tu) {
          const index_t ti = std::min(tu, x.m - i0);
          const auto ut = Ut.view().middle_rows(0, ti);
          E::template U_tile<C>(ctx, u, i0, ut);
          gemm<C>(ctx, C(1), Q.middle_cols(i0, ti), none, cview<C, D>(ut), none, C(1), Zq.view());
        }
      }
      const C s = C(u.scale());
      const auto A = x.A.cview();
      const auto L = x.lambda.view();
      const auto Gm = x.gamma.view();
      auto dVt = kernels::make_scratch<C>(ctx, need_dV ? tv : 0, x.n);
      auto Vt = kernels::make_scratch<C>(ctx, dx_from_zq ? tv : 0, x.n);
      for (index_t c0 = 0; c0 < x.nr; c0 += tv) {
        const index_t tc = std::min(tv, x.nr - c0);
        if (need_dV) {
          const auto dv = dVt.view().middle_rows(0, tc);
          gemm<C>(ctx, s, Zq.cview().middle_cols(c0, tc), trans, P, none, C(0), dv);  // [tc, min_dim]
          for (index_t q = 0; q < tc; ++q) {
            const index_t c = c0 + q, k = c / x.N, b = c % x.N;
            const auto row = dv.middle_rows(q, 1);
            transform(ctx, A.middle_rows(k, 1), row, detail::product_map{});  // dV[c, :]∘A[k, :]
            if (has_gl)
              dot_rows(ctx, cview<C, D>(row), Gm.middle_rows(b, 1),
                       vector_view<C, D>(gl.data() + k * gl.row_stride() + b * gl.col_stride(), 1), true);
            if (has_gg)  // γ[b, :] += λ[k, b]·(dV[c, :]∘A[k, :])
              transform(ctx, gg.middle_rows(b, 1), detail::add_lambda_times<C, D>{L, cview<C, D>(row), k, b});
          }
        }
        if (dx_from_zq) {
          const auto v = Vt.view().middle_rows(0, tc);
          E::template V_tile<C>(ctx, x, c0, 0, v);
          gemm<C>(ctx, C(1), Zq.cview().middle_cols(c0, tc), none, cview<C, D>(v), none, C(1), dX);
        }
      }
    }
    if (has_dx && u.transposed()) E::template left<C>(ctx, u, x, dY, dX);  // dX += s·dY·Vᵀ·Uᵀ
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
