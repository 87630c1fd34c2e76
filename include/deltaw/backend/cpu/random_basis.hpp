// CPU evaluators of NOLA, VeRA and RandLoRA. Bases are regenerated from their seed on
// every call, in tiles, straight into the buffer the next product reads (still in cache);
// none is kept between calls and RandLoRA's U [max_dim, N·r] and V [N·r, min_dim] (each
// about the size of W) are never formed whole.
//
// - NOLA forms A [r, in] and B [out, r] per call: they are LoRA-sized (r small), and A and
//   B are sums of k and l bases, so one buffer each, filled chunk by chunk with all bases
//   accumulated while the chunk is in L1/L2, is the cheapest order (every basis entry is
//   drawn exactly once per call). The dense ΔW is not formed.
// - VeRA draws A in column tiles [r, tile] and B in row tiles [tile, r], scaled by λ_d/λ_b
//   as they are drawn, so a large shared rank (PEFT's default r = 256) costs no r × in buffer.
// - RandLoRA draws U in row tiles [tile, N·r] and V in row tiles [tile, min_dim]; each tile
//   feeds one GEMM and is overwritten.
#pragma once

#include <algorithm>
#include <cstdint>
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

/// rows × cols entries of a random tensor with leading dimension ld, from (i0, j0), into a
/// row-major buffer with leading dimension ldo.
template <class C>
void fill_block(const basis_entries& e, index_t ld, index_t i0, index_t j0, index_t rows, index_t cols, C* out,
                index_t ldo) {
  for (index_t i = 0; i < rows; ++i)
    fill_entries<C>(e, std::uint64_t(i0 + i) * std::uint64_t(ld) + std::uint64_t(j0), std::uint64_t(cols),
                    out + i * ldo);
}

template <class C, class T>
std::vector<C> to_vector(const vector_view<const T>& v) {
  std::vector<C> out(std::size_t(v.size()));
  for (index_t i = 0; i < v.size(); ++i) out[std::size_t(i)] = convert<C>(v[i]);
  return out;
}
}  // namespace detail

// ─────────────────────────────────────────────────────────────────────────────────────────
// NOLA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T>
struct evaluator<nola_update<T, device::cpu>> : additive_rows<evaluator<nola_update<T, device::cpu>>, nola_update<T, device::cpu>> {
  using U = nola_update<T, device::cpu>;
  /// Entries accumulated over all bases before moving on: 16 K floats = 64 KiB.
  static constexpr std::uint64_t chunk = std::uint64_t(1) << 14;

  /// A = A₀ + Σᵢ αᵢ·Aᵢ, [r, in].
  template <class C>
  static void form_A(const U& u, dense<C>& A) {
    A.resize(u.rank(), u.cols());
    const std::vector<C> a = detail::to_vector<C>(u.a_coefficients());
    std::vector<basis_entries> bases;
    bases.reserve(a.size());
    for (index_t i = 0; i < u.num_a_bases(); ++i) bases.push_back(u.a_basis(i));
    const basis_entries a0 = u.a0();
    const std::uint64_t n = std::uint64_t(A.size());
    C* p = A.data();
    for (std::uint64_t f = 0; f < n; f += chunk) {
      const std::uint64_t m = std::min(chunk, n - f);
      if (u.options().frozen_a0)
        fill_entries<C>(a0, f, m, p + f);
      else
        std::fill(p + f, p + f + m, C(0));
      for (std::size_t i = 0; i < bases.size(); ++i) axpy_entries<C>(a[i], bases[i], f, m, p + f);
    }
  }

  /// Rows [r0, r0 + nrows) of B = Σⱼ βⱼ·Bⱼ, times `factor`.
  template <class C>
  static void form_B_rows(const U& u, index_t r0, index_t nrows, C factor, dense<C>& B) {
    B.setZero(nrows, u.rank());
    std::vector<C> b = detail::to_vector<C>(u.b_coefficients());
    for (C& x : b) x *= factor;
    std::vector<basis_entries> bases;
    bases.reserve(b.size());
    for (index_t j = 0; j < u.num_b_bases(); ++j) bases.push_back(u.b_basis(j));
    const std::uint64_t first = std::uint64_t(r0) * std::uint64_t(u.rank());
    const std::uint64_t n = std::uint64_t(B.size());
    C* p = B.data();
    for (std::uint64_t f = 0; f < n; f += chunk) {
      const std::uint64_t m = std::min(chunk, n - f);
      for (std::size_t j = 0; j < bases.size(); ++j) axpy_entries<C>(b[j], bases[j], first + f, m, p + f);
    }
  }

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    dense<C> A, B;
    form_A<C>(u, A);
    form_B_rows<C>(u, 0, u.rows(), C(u.scale()), B);
    dense<C> Z(X.rows(), u.rank());
    Z.noalias() = X * A.transpose();
    Y.noalias() += Z * B.transpose();
  }

  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    dense<C> A, B;
    form_A<C>(u, A);
    form_B_rows<C>(u, 0, u.rows(), C(u.scale()), B);
    dense<C> Z(G.rows(), u.rank());
    Z.noalias() = G * B;
    O.noalias() += Z * A;
  }

  template <class C, class P>
  static void add_scaled_rows(const U& u, index_t r0, P& panel, C factor) {
    dense<C> A, B;
    form_A<C>(u, A);
    form_B_rows<C>(u, r0, panel.rows(), factor * C(u.scale()), B);
    panel.noalias() += B * A;
  }

  /// ‖s·B·A‖_F from the r × r Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    dense<double> A, B;
    form_A<double>(u, A);
    form_B_rows<double>(u, 0, u.rows(), u.scale(), B);
    const dense<double> GB = B.transpose() * B;
    const dense<double> GA = A * A.transpose();
    return std::sqrt(std::max(GB.cwiseProduct(GA).sum(), 0.0));
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// VeRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T>
struct evaluator<vera_update<T, device::cpu>> : additive_rows<evaluator<vera_update<T, device::cpu>>, vera_update<T, device::cpu>> {
  using U = vera_update<T, device::cpu>;

  /// diag(λ_d)·A[:, j0 : j0+tj], [r, tj].
  template <class C>
  static void A_tile(const U& u, const std::vector<C>& ld, index_t j0, index_t tj, dense<C>& At) {
    const auto& b = u.basis();
    At.resize(u.rank(), tj);
    detail::fill_block<C>(b.A(), b.in_max, 0, j0, u.rank(), tj, At.data(), tj);
    for (index_t k = 0; k < u.rank(); ++k) At.row(k) *= ld[std::size_t(k)];
  }
  /// factor·diag(λ_b)·B[i0 : i0+ti, :], [ti, r] (contiguous in B's flat order).
  template <class C>
  static void B_tile(const U& u, const std::vector<C>& lb, index_t i0, index_t ti, C factor, dense<C>& Bt) {
    const auto& b = u.basis();
    Bt.resize(ti, u.rank());
    fill_entries<C>(b.B(), b.b_index(i0, 0), std::uint64_t(ti) * std::uint64_t(u.rank()), Bt.data());
    for (index_t i = 0; i < ti; ++i) Bt.row(i) *= factor * lb[std::size_t(i0 + i)];
  }
  static index_t a_tile(const U& u) { return detail::tile_lines(u.rank(), u.cols(), index_t(1) << 16); }
  static index_t b_tile(const U& u) { return detail::tile_lines(u.rank(), u.rows(), index_t(1) << 16); }

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    const auto ld = detail::to_vector<C>(u.lambda_d());
    const auto lb = detail::to_vector<C>(u.lambda_b());
    dense<C> Z = dense<C>::Zero(X.rows(), u.rank()), At, Bt;
    for (index_t j0 = 0, t = a_tile(u); j0 < u.cols(); j0 += t) {
      const index_t tj = std::min(t, u.cols() - j0);
      A_tile<C>(u, ld, j0, tj, At);
      Z.noalias() += X.middleCols(j0, tj) * At.transpose();
    }
    for (index_t i0 = 0, t = b_tile(u); i0 < u.rows(); i0 += t) {
      const index_t ti = std::min(t, u.rows() - i0);
      B_tile<C>(u, lb, i0, ti, C(1), Bt);
      Y.middleCols(i0, ti).noalias() += Z * Bt.transpose();
    }
  }

  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    const auto ld = detail::to_vector<C>(u.lambda_d());
    const auto lb = detail::to_vector<C>(u.lambda_b());
    dense<C> Z = dense<C>::Zero(G.rows(), u.rank()), At, Bt;
    for (index_t i0 = 0, t = b_tile(u); i0 < u.rows(); i0 += t) {
      const index_t ti = std::min(t, u.rows() - i0);
      B_tile<C>(u, lb, i0, ti, C(1), Bt);
      Z.noalias() += G.middleCols(i0, ti) * Bt;
    }
    for (index_t j0 = 0, t = a_tile(u); j0 < u.cols(); j0 += t) {
      const index_t tj = std::min(t, u.cols() - j0);
      A_tile<C>(u, ld, j0, tj, At);
      O.middleCols(j0, tj).noalias() += Z * At;
    }
  }

  template <class C, class P>
  static void add_scaled_rows(const U& u, index_t r0, P& panel, C factor) {
    const auto ld = detail::to_vector<C>(u.lambda_d());
    const auto lb = detail::to_vector<C>(u.lambda_b());
    dense<C> At, Bt;
    B_tile<C>(u, lb, r0, panel.rows(), factor, Bt);
    for (index_t j0 = 0, t = a_tile(u); j0 < u.cols(); j0 += t) {
      const index_t tj = std::min(t, u.cols() - j0);
      A_tile<C>(u, ld, j0, tj, At);
      panel.middleCols(j0, tj).noalias() += Bt * At;
    }
  }

  /// ‖diag(λ_b)·B·diag(λ_d)·A‖_F from two r × r Gram matrices, in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    const auto ld = detail::to_vector<double>(u.lambda_d());
    const auto lb = detail::to_vector<double>(u.lambda_b());
    dense<double> A, B;
    A_tile<double>(u, ld, 0, u.cols(), A);
    B_tile<double>(u, lb, 0, u.rows(), 1.0, B);
    const dense<double> GB = B.transpose() * B;
    const dense<double> GA = A * A.transpose();
    return std::sqrt(std::max(GB.cwiseProduct(GA).sum(), 0.0));
  }
};

// ─────────────────────────────────────────────────────────────────────────────────────────
// RandLoRA
// ─────────────────────────────────────────────────────────────────────────────────────────

template <class T>
struct evaluator<randlora_update<T, device::cpu>> : additive_rows<evaluator<randlora_update<T, device::cpu>>, randlora_update<T, device::cpu>> {
  using U = randlora_update<T, device::cpu>;

  /// What every call needs once: A [r, min_dim] drawn, λ and γ in type C.
  template <class C>
  struct context {
    dense<C> A, lambda_scratch, gamma_scratch;
    cmap<C> lambda, gamma;
    index_t N, nr, n, m;
    C factor;  ///< s times the caller's sign, folded into V

    context(const U& u, C sign)
        : lambda(row_major_operand<C>(u.lambda(), lambda_scratch)),
          gamma(row_major_operand<C>(u.gamma(), gamma_scratch)),
          N(u.num_bases()), nr(u.num_bases() * u.rank()), n(u.min_dim()), m(u.max_dim()),
          factor(sign * C(u.scale())) {
      const auto& b = u.basis();
      A.resize(u.rank(), n);
      detail::fill_block<C>(b.A(), b.min_dim, 0, 0, u.rank(), n, A.data(), n);
    }
  };

  /// Rows [c0, c0+tc) and columns [j0, j0+tj) of factor·V: row c = λ[c/N, c%N]·A[c/N]∘γ[c%N].
  template <class C>
  static void V_tile(const context<C>& x, index_t c0, index_t tc, index_t j0, index_t tj, dense<C>& Vt) {
    Vt.resize(tc, tj);
    for (index_t q = 0; q < tc; ++q) {
      const index_t c = c0 + q, k = c / x.N, b = c % x.N;
      const C coef = x.factor * x.lambda(k, b);
      Vt.row(q).noalias() = coef * x.A.row(k).segment(j0, tj).cwiseProduct(x.gamma.row(b).segment(j0, tj));
    }
  }
  /// Rows [i0, i0+ti) of U: row i is B[i, :N, :] flattened, i.e. entries i·N_shared·r + c.
  template <class C>
  static void U_tile(const U& u, const context<C>& x, index_t i0, index_t ti, dense<C>& Ut) {
    const auto& b = u.basis();
    Ut.resize(ti, x.nr);
    for (index_t q = 0; q < ti; ++q)
      fill_entries<C>(b.B(), b.b_index(i0 + q, 0, 0), std::uint64_t(x.nr), Ut.data() + q * x.nr);
  }

  /// Y [T, max_dim] += X [T, min_dim]·(factor·V)ᵀ·Uᵀ.
  template <class C, class XM, class YM>
  static void left(const U& u, const context<C>& x, const XM& X, YM& Y) {
    dense<C> Z(X.rows(), x.nr), Vt, Ut;
    for (index_t c0 = 0, t = detail::tile_lines(x.n, x.nr); c0 < x.nr; c0 += t) {
      const index_t tc = std::min(t, x.nr - c0);
      V_tile<C>(x, c0, tc, 0, x.n, Vt);
      Z.middleCols(c0, tc).noalias() = X * Vt.transpose();
    }
    for (index_t i0 = 0, t = detail::tile_lines(x.nr, x.m); i0 < x.m; i0 += t) {
      const index_t ti = std::min(t, x.m - i0);
      U_tile<C>(u, x, i0, ti, Ut);
      Y.middleCols(i0, ti).noalias() += Z * Ut.transpose();
    }
  }
  /// Y [T, min_dim] += X [T, max_dim]·U·(factor·V).
  template <class C, class XM, class YM>
  static void right(const U& u, const context<C>& x, const XM& X, YM& Y) {
    dense<C> Z = dense<C>::Zero(X.rows(), x.nr), Vt, Ut;
    for (index_t i0 = 0, t = detail::tile_lines(x.nr, x.m); i0 < x.m; i0 += t) {
      const index_t ti = std::min(t, x.m - i0);
      U_tile<C>(u, x, i0, ti, Ut);
      Z.noalias() += X.middleCols(i0, ti) * Ut;
    }
    for (index_t c0 = 0, t = detail::tile_lines(x.n, x.nr); c0 < x.nr; c0 += t) {
      const index_t tc = std::min(t, x.nr - c0);
      V_tile<C>(x, c0, tc, 0, x.n, Vt);
      Y.noalias() += Z.middleCols(c0, tc) * Vt;
    }
  }

  template <class C, class XM, class YM>
  static void apply_add(const U& u, const XM& X, YM& Y) {
    const context<C> x(u, C(1));
    if (u.transposed())
      right<C>(u, x, X, Y);  // ΔW = s·Vᵀ·Uᵀ: X·ΔWᵀ = s·X·U·V
    else
      left<C>(u, x, X, Y);   // ΔW = s·U·V:  X·ΔWᵀ = s·X·Vᵀ·Uᵀ
  }

  template <class C, class GM, class OM>
  static void apply_transposed_add(const U& u, const GM& G, OM& O) {
    const context<C> x(u, C(1));
    if (u.transposed())
      left<C>(u, x, G, O);   // G·ΔW = s·G·Vᵀ·Uᵀ
    else
      right<C>(u, x, G, O);  // G·ΔW = s·G·U·V
  }

  /// Rows [r0, r0 + panel.rows()) of sign·ΔW added to the panel, 256 rows at a time.
  template <class C, class P>
  static void add_scaled_rows(const U& u, index_t r0, P& panel, C sign) {
    const context<C> x(u, sign);
    dense<C> Vt, Ut;
    for (index_t p0 = 0; p0 < panel.rows(); p0 += panel_rows) {
      const index_t pr = std::min(panel_rows, panel.rows() - p0);
      auto sub = panel.middleRows(p0, pr);
      if (!u.transposed()) {
        // Rows of U·V are rows of U.
        U_tile<C>(u, x, r0 + p0, pr, Ut);
        for (index_t c0 = 0, t = detail::tile_lines(x.n, x.nr); c0 < x.nr; c0 += t) {
          const index_t tc = std::min(t, x.nr - c0);
          V_tile<C>(x, c0, tc, 0, x.n, Vt);
          sub.noalias() += Ut.middleCols(c0, tc) * Vt;
        }
      } else {
        // Rows of Vᵀ·Uᵀ are columns of V.
        V_tile<C>(x, 0, x.nr, r0 + p0, pr, Vt);
        for (index_t i0 = 0, t = detail::tile_lines(x.nr, x.m); i0 < x.m; i0 += t) {
          const index_t ti = std::min(t, x.m - i0);
          U_tile<C>(u, x, i0, ti, Ut);
          sub.middleCols(i0, ti).noalias() += Vt.transpose() * Ut.transpose();
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
  dense<C> A, B;
  cpu::evaluator<nola_update<T, device::cpu>>::template form_A<C>(u, A);
  cpu::evaluator<nola_update<T, device::cpu>>::template form_B_rows<C>(u, 0, u.rows(), C(1), B);
  return {std::move(B), std::move(A)};
}

DELTAW_NAMESPACE_END
