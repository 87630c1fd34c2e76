// VJPs of the random-basis family (expr/random_basis.hpp): NOLA, VeRA, RandLoRA. The
// frozen bases are regenerated from the seed with the evaluators' own tile generators
// (backend/cpu/random_basis.hpp), never stored and never formed at out × in; neither is
// ΔW nor any out × in gradient.
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
#include <string>
#include <vector>

#include "random_basis.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace detail {
/// A [1, n] or [n, 1] factor variable's view as a vector_view (no copy).
template <class T>
vector_view<const T> coefficient_vector(const matrix_view<const T>& v, index_t n, const char* op, const char* name) {
  if ((v.rows() != 1 && v.cols() != 1) || v.size() != n)
    throw shape_error(std::string(op) + ": " + name + " is " + deltaw::detail::shape_str(v.rows(), v.cols()) +
                      "; expected [1, " + std::to_string(n) + "]");
  return vector_view<const T>(v.data(), n, v.rows() == 1 ? v.col_stride() : v.row_stride());
}

/// A vector factor's gradient slot: [1, n] or [n, 1] (dense, so contiguous).
template <class C>
void check_vector_grad(const dense<C>* g, index_t n, const char* op, const char* name) {
  if (g && ((g->rows() != 1 && g->cols() != 1) || g->size() != n))
    throw shape_error(std::string(op) + ": the gradient of " + name + " is " +
                      deltaw::detail::shape_str(g->rows(), g->cols()) + " but " + name + " has " + std::to_string(n) +
                      " entries");
}

/// out[i] += ⟨G, basis i⟩ over G's row-major flat order (entry f of G pairs with entry
/// f of each basis). Bases are drawn `chunk` entries at a time into one buffer, all of them
/// against the same chunk of G while it is in cache.
template <class C>
void contract_with_bases(const dense<C>& G, const std::vector<basis_entries>& bases, C* out,
                         std::uint64_t chunk = std::uint64_t(1) << 14) {
  const std::uint64_t n = std::uint64_t(G.size());
  std::vector<C> buf(std::size_t(std::min(chunk, n)));
  using vec = Eigen::Matrix<C, Eigen::Dynamic, 1>;
  for (std::uint64_t f = 0; f < n; f += chunk) {
    const std::uint64_t m = std::min(chunk, n - f);
    const Eigen::Map<const vec> g(G.data() + f, Eigen::Index(m));
    for (std::size_t i = 0; i < bases.size(); ++i) {
      fill_entries<C>(bases[i], f, m, buf.data());
      out[i] += g.dot(Eigen::Map<const vec>(buf.data(), Eigen::Index(m)));
    }
  }
}
}  // namespace detail

// ─────────────────────────────────────────────────────────────────────────────────────────
// NOLA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T>
struct vjp<nola_update<T, device::cpu>> {
  using U = nola_update<T, device::cpu>;
  using E = evaluator<U>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "a_coef" : "b_coef"; }

  /// u with α = views[0] ([1, k]) and β = views[1] ([1, l]), viewed; k and l must stay
  /// those of u (they set the default basis bounds).
  static U rebind(const U& u, const std::array<matrix_view<const T>, 2>& views) {
    constexpr const char* op = "deltaw::cpu::vjp<nola>::rebind";
    const auto a = detail::coefficient_vector<T>(views[0], u.num_a_bases(), op, "a_coef");
    const auto b = detail::coefficient_vector<T>(views[1], u.num_b_bases(), op, "b_coef");
    return U(u.rows(), u.cols(), u.rank(), u.seed(), held_vector<T>{a, nullptr}, held_vector<T>{b, nullptr}, u.scale(),
             u.options());
  }

  /// grads = {&dα [1, k], &dβ [1, l]}; see vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<nola>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_vector_grad<C>(grads[0], u.num_a_bases(), op, "a_coef");
    detail::check_vector_grad<C>(grads[1], u.num_b_bases(), op, "b_coef");
    dense<C>* ga = grads[0];
    dense<C>* gb = grads[1];
    if (!ga && !gb && !dX) return;
    dense<C> A, B;
    E::template form_A<C>(u, A);
    E::template form_B_rows<C>(u, 0, u.rows(), C(1), B);
    const C s = C(u.scale());
    dense<C> dZ(dY.rows(), u.rank());
    dZ.noalias() = dY * B;
    dZ *= s;  // dZ = s·dY·B
    if (gb) {
      dense<C> Z(X.rows(), u.rank());
      Z.noalias() = X * A.transpose();
      dense<C> dB(u.rows(), u.rank());
      dB.noalias() = dY.transpose() * Z;
      dB *= s;
      std::vector<basis_entries> bases;
      for (index_t j = 0; j < u.num_b_bases(); ++j) bases.push_back(u.b_basis(j));
      detail::contract_with_bases<C>(dB, bases, gb->data());
    }
    if (ga) {
      dense<C> dA(u.rank(), u.cols());
      dA.noalias() = dZ.transpose() * X;
      std::vector<basis_entries> bases;
      for (index_t i = 0; i < u.num_a_bases(); ++i) bases.push_back(u.a_basis(i));
      detail::contract_with_bases<C>(dA, bases, ga->data());
    }
    if (dX) dX->noalias() += dZ * A;
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// VeRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T>
struct vjp<vera_update<T, device::cpu>> {
  using U = vera_update<T, device::cpu>;
  using E = evaluator<U>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "lambda_d" : "lambda_b"; }

  /// u with λ_d = views[0] ([1, r]) and λ_b = views[1] ([1, out]), viewed.
  static U rebind(const U& u, const std::array<matrix_view<const T>, 2>& views) {
    constexpr const char* op = "deltaw::cpu::vjp<vera>::rebind";
    const auto d = detail::coefficient_vector<T>(views[0], u.rank(), op, "lambda_d");
    const auto b = detail::coefficient_vector<T>(views[1], u.rows(), op, "lambda_b");
    return U(u.basis(), u.rows(), u.cols(), held_vector<T>{d, nullptr}, held_vector<T>{b, nullptr});
  }

  /// grads = {&dλ_d [1, r], &dλ_b [1, out]}; see vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<vera>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_vector_grad<C>(grads[0], u.rank(), op, "lambda_d");
    detail::check_vector_grad<C>(grads[1], u.rows(), op, "lambda_b");
    dense<C>* gd = grads[0];
    dense<C>* gb = grads[1];
    if (!gd && !gb && !dX) return;
    const index_t r = u.rank(), out = u.rows(), in = u.cols(), tokens = X.rows();
    const auto ld = detail::to_vector<C>(u.lambda_d());
    const auto lb = detail::to_vector<C>(u.lambda_b());
    const std::vector<C> ones_r(std::size_t(r), C(1)), ones_out(std::size_t(out), C(1));
    const Eigen::Map<const Eigen::Matrix<C, 1, Eigen::Dynamic>> ldr(ld.data(), r);
    dense<C> At, Bt;

    // Z = X·Aᵀ with the unscaled A (λ_d may be 0), H = Z·diag(λ_d).
    dense<C> Z, H;
    if (gd || gb) {
      Z.setZero(tokens, r);
      for (index_t j0 = 0, t = E::a_tile(u); j0 < in; j0 += t) {
        const index_t tj = std::min(t, in - j0);
        E::template A_tile<C>(u, ones_r, j0, tj, At);
        Z.noalias() += X.middleCols(j0, tj) * At.transpose();
      }
      H = Z;
      H.array().rowwise() *= ldr.array();
    }
    // One pass over B's row tiles: dλ_b and G = dY·diag(λ_b)·B.
    const bool need_G = gd || dX;
    dense<C> G, M;
    if (need_G) G.setZero(tokens, r);
    for (index_t i0 = 0, t = E::b_tile(u); i0 < out && (gb || need_G); i0 += t) {
      const index_t ti = std::min(t, out - i0);
      E::template B_tile<C>(u, ones_out, i0, ti, C(1), Bt);  // unscaled B rows
      if (gb) {
        M.noalias() = dY.middleCols(i0, ti).transpose() * H;  // [ti, r]
        for (index_t i = 0; i < ti; ++i) gb->data()[i0 + i] += Bt.row(i).dot(M.row(i));
      }
      if (need_G) {
        for (index_t i = 0; i < ti; ++i) Bt.row(i) *= lb[std::size_t(i0 + i)];
        G.noalias() += dY.middleCols(i0, ti) * Bt;
      }
    }
    if (gd)
      for (index_t k = 0; k < r; ++k) gd->data()[k] += G.col(k).dot(Z.col(k));
    if (dX) {
      G.array().rowwise() *= ldr.array();  // dZ = G·diag(λ_d)
      for (index_t j0 = 0, t = E::a_tile(u); j0 < in; j0 += t) {
        const index_t tj = std::min(t, in - j0);
        E::template A_tile<C>(u, ones_r, j0, tj, At);
        dX->middleCols(j0, tj).noalias() += G * At;
      }
    }
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// RandLoRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T>
struct vjp<randlora_update<T, device::cpu>> {
  using U = randlora_update<T, device::cpu>;
  using E = evaluator<U>;
  static constexpr int factor_count = 2;
  static const char* factor_name(int i) { return i == 0 ? "lambda" : "gamma"; }

  /// u with λ = views[0] ([r, N]) and γ = views[1] ([N, min_dim]), viewed.
  static U rebind(const U& u, const std::array<matrix_view<const T>, 2>& views) {
    return U(u.basis(), u.rows(), u.cols(), held_matrix<T>{views[0], nullptr}, held_matrix<T>{views[1], nullptr},
             u.scale());
  }

  /// grads = {&dλ [r, N], &dγ [N, min_dim]}; see vjp.hpp.
  template <class C, class XM, class GM>
  static void backward(const U& u, const XM& X, const GM& dY, std::span<dense<C>* const> grads, dense<C>* dX) {
    constexpr const char* op = "deltaw::cpu::vjp<randlora>::backward";
    detail::check_grad_slots<C>(grads, factor_count, op);
    detail::check_grad_shape<C>(grads[0], u.lambda(), op, "lambda");
    detail::check_grad_shape<C>(grads[1], u.gamma(), op, "gamma");
    if (!grads[0] && !grads[1] && !dX) return;
    const typename E::template context<C> x(u, C(1));  // A, λ, γ in C; V tiles carry s
    if (u.transposed())
      run<C>(u, x, dY, X, grads[0], grads[1], dX, dY);
    else
      run<C>(u, x, X, dY, grads[0], grads[1], dX, dY);
  }

 private:
  /// P [tokens, min_dim], Q [tokens, max_dim] as in the header comment.
  template <class C, class PM, class QM, class GM>
  static void run(const U& u, const typename E::template context<C>& x, const PM& P, const QM& Q, dense<C>* gl,
                  dense<C>* gg, dense<C>* dX, const GM& dY) {
    const bool need_dV = gl || gg;
    const bool dx_from_zq = dX && !u.transposed();  // dX = s·dY·U·V = (Q·U)·(s·V)
    dense<C> Zq, Ut, Vt, dVt;
    if (need_dV || dx_from_zq) {
      Zq.setZero(Q.rows(), x.nr);
      for (index_t i0 = 0, t = cpu::detail::tile_lines(x.nr, x.m); i0 < x.m; i0 += t) {
        const index_t ti = std::min(t, x.m - i0);
        E::template U_tile<C>(u, x, i0, ti, Ut);
        Zq.noalias() += Q.middleCols(i0, ti) * Ut;
      }
    }
    if (need_dV || dx_from_zq) {
      const C s = C(u.scale());
      for (index_t c0 = 0, t = cpu::detail::tile_lines(x.n, x.nr); c0 < x.nr; c0 += t) {
        const index_t tc = std::min(t, x.nr - c0);
        if (need_dV) {
          dVt.noalias() = Zq.middleCols(c0, tc).transpose() * P;  // [tc, min_dim]
          dVt *= s;
          for (index_t q = 0; q < tc; ++q) {
            const index_t c = c0 + q, k = c / x.N, b = c % x.N;
            dVt.row(q).array() *= x.A.row(k).array();  // dV[c, :]∘A[k, :]
            if (gl) (*gl)(k, b) += dVt.row(q).dot(x.gamma.row(b));
            if (gg) gg->row(b) += x.lambda(k, b) * dVt.row(q);
          }
        }
        if (dx_from_zq) {
          E::template V_tile<C>(x, c0, tc, 0, x.n, Vt);
          dX->noalias() += Zq.middleCols(c0, tc) * Vt;
        }
      }
    }
    if (dX && u.transposed()) E::template left<C>(u, x, dY, *dX);  // dX += s·dY·Vᵀ·Uᵀ
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
