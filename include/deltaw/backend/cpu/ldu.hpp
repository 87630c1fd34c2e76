// SPDX-License-Identifier: MIT
// CPU side of LoLDU: the partial-pivot LDU of a rectangular weight, the `loldu` factory,
// and the evaluator of ΔW = P·L_r·diag(c)·U_r, c = σ·z − σ₀·z₀.
//
// Apply gathers the rows of P·L_r once, scaled by c, into an out × r scratch (LoRA's B),
// so it costs the base GEMM plus 2·tokens·r·(in + out) flops; the permutation is never
// a matrix. While c = 0 (at initialisation) nothing is added at all.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "../../expr/ldu.hpp"
#include "evaluator.hpp"

DELTAW_NAMESPACE_BEGIN

/// The first k steps of the LU with partial pivoting of W [m, n], normalised to LDU:
///     W[o, :] = (L·diag(D)·U)[perm[o], :]  +  (the Schur complement, zero when k = min(m, n)).
/// L [m, k] is unit lower-trapezoidal with |L| ≤ 1, U [k, n] unit upper-trapezoidal, D [k]
/// the pivots; perm as in deltaw::ldu. Pivots are the first entry of largest magnitude
/// (LAPACK's choice). Computed in double.
struct ldu_factors {
  std::vector<index_t> perm;
  dense<double> L;
  Eigen::VectorXd D;
  dense<double> U;
};

namespace cpu {

/// Left-looking (Crout) LU, k steps: column j of the Schur complement and pivot row j are
/// formed from W and the j finished columns/rows only, so a truncated LoLDU costs
/// O(k²·(m + n)) and no copy of W, instead of a full O(m·n·min(m, n)) factorisation.
/// Truncation does not change P·L_r or U_r: later pivots only reorder rows of L that
/// P reorders back.
template <class TW>
ldu_factors partial_pivot_ldu(const matrix_view<const TW>& W, index_t k, const char* op = "deltaw::partial_pivot_ldu") {
  const index_t m = W.rows(), n = W.cols();
  if (k < 1 || k > std::min(m, n))
    throw rank_error(std::string(op) + ": the number of LU steps (rank r) must be in [1, min(out, in)] = [1, " +
                     std::to_string(std::min(m, n)) + "] for W " + deltaw::detail::shape_str(m, n) + "; got " +
                     std::to_string(k));
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j)
      if (!std::isfinite(convert<double>(W(i, j))))
        throw non_finite_error(std::string(op) + ": W " + deltaw::detail::shape_str(m, n) + " has a non-finite entry at (" +
                               std::to_string(i) + ", " + std::to_string(j) + ")");

  std::vector<index_t> rowof(static_cast<std::size_t>(m));  // working position i holds row rowof[i] of W
  for (index_t i = 0; i < m; ++i) rowof[std::size_t(i)] = i;
  dense<double> L = dense<double>::Zero(m, k);
  dense<double> Uu = dense<double>::Zero(k, n);  // U before dividing by the pivots
  Eigen::VectorXd c(m);
  Eigen::RowVectorXd w(n);

  for (index_t j = 0; j < k; ++j) {
    // Column j of the Schur complement, rows j..m-1.
    for (index_t i = j; i < m; ++i) c(i) = convert<double>(W(rowof[std::size_t(i)], j));
    if (j > 0) c.segment(j, m - j).noalias() -= L.block(j, 0, m - j, j) * Uu.block(0, j, j, 1);
    index_t piv = j;
    double best = std::abs(c(j));
    for (index_t i = j + 1; i < m; ++i)
      if (std::abs(c(i)) > best) best = std::abs(c(i)), piv = i;
    if (best == 0.0)
      throw rank_error(std::string(op) + ": zero pivot at step " + std::to_string(j) + " of the LU of W " +
                       deltaw::detail::shape_str(m, n) + ": its leading " + std::to_string(j + 1) +
                       " columns are linearly dependent, so D[" + std::to_string(j) +
                       "] = 0 and U = D⁻¹U is undefined; use a smaller rank r (≤ " + std::to_string(j) + ")");
    if (!std::isfinite(best))
      throw non_finite_error(std::string(op) + ": the LU of W " + deltaw::detail::shape_str(m, n) + " overflowed at step " +
                             std::to_string(j));
    if (piv != j) {
      std::swap(rowof[std::size_t(j)], rowof[std::size_t(piv)]);
      L.row(j).head(j).swap(L.row(piv).head(j));
      std::swap(c(j), c(piv));
    }
    // Pivot row j of U (columns j..n-1).
    for (index_t t = j; t < n; ++t) w(t) = convert<double>(W(rowof[std::size_t(j)], t));
    if (j > 0) w.segment(j, n - j).noalias() -= L.block(j, 0, 1, j) * Uu.block(0, j, j, n - j);
    w(j) = c(j);  // the same value, kept bit-identical to the pivot that was chosen
    Uu.block(j, j, 1, n - j) = w.segment(j, n - j);
    L(j, j) = 1.0;
    if (j + 1 < m) L.block(j + 1, j, m - j - 1, 1) = c.segment(j + 1, m - j - 1) / c(j);
  }

  ldu_factors f;
  f.perm.assign(std::size_t(m), 0);
  for (index_t i = 0; i < m; ++i) f.perm[std::size_t(rowof[std::size_t(i)])] = i;
  f.D = Uu.diagonal();
  f.U = f.D.cwiseInverse().asDiagonal() * Uu;
  for (index_t j = 0; j < k; ++j) f.U(j, j) = 1.0;  // exactly, not p/p
  f.L = std::move(L);
  return f;
}

}  // namespace cpu

/// The full partial-pivot LDU of W: k = min(out, in) steps, so W = P·L·diag(D)·U exactly
/// (up to rounding). Throws rank_error on a zero pivot.
template <class WL>
ldu_factors partial_pivot_ldu(const WL& W) {
  const auto v = view(W);
  using TW = std::remove_const_t<typename decltype(v)::element_type>;
  const matrix_view<const TW> Wv(v);
  return cpu::partial_pivot_ldu(Wv, std::min(Wv.rows(), Wv.cols()));
}

/// LoLDU of W [out, in] at rank r: runs the r leading steps of the partial-pivot LU, keeps
/// P, L_r, U_r frozen and z = z₀ = D[:r], σ = σ₀ = α/r (reference α = 1). The update owns
/// its factors (stored in the accumulation type of W: float for float/bf16/fp16, double
/// for double) and ΔW = 0 exactly until z or σ changes; train z in your own vector with
/// `u.with_z(deltaw::vview(z))`. Throws rank_error for r outside [1, min(out, in)] and for
/// a zero pivot among the first r, non_finite_error for a non-finite W or α.
template <class WL>
auto loldu(const WL& W, index_t r, alpha a = alpha(1.0), ldu_options opt = {}) {
  const auto v = view(W);
  static_assert(std::is_same_v<typename decltype(v)::device_type, device::cpu>,
                "deltaw::loldu: this factory factorises a CPU weight");
  using TW = std::remove_const_t<typename decltype(v)::element_type>;
  using T = accum_t<TW>;
  const matrix_view<const TW> Wv(v);
  if (!std::isfinite(a.value)) throw non_finite_error("deltaw::loldu: alpha must be finite, got " + std::to_string(a.value));
  if (r < 1 || r > std::min(Wv.rows(), Wv.cols()))
    throw rank_error("deltaw::loldu: the rank r must be in [1, min(out, in)] = [1, " +
                     std::to_string(std::min(Wv.rows(), Wv.cols())) + "] for W " +
                     deltaw::detail::shape_str(Wv.rows(), Wv.cols()) + "; got " + std::to_string(r));
  ldu_factors f = cpu::partial_pivot_ldu(Wv, r, "deltaw::loldu");
  using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  dense<T> L = f.L.cast<T>();
  dense<T> U = f.U.cast<T>();
  Vec z0 = f.D.cast<T>();
  Vec z = z0;  // the same bits: z − z₀ is exactly 0
  const double sigma = a.value / double(r);
  return ldu<T>(detail::hold_perm(std::move(f.perm)), hold(std::move(L)), hold_vector(std::move(z)),
                hold_vector(std::move(z0)), hold(std::move(U)), sigma, sigma, opt);
}

namespace cpu {

/// The host-side pieces of LoLDU's evaluator and VJP: the coefficients c = σ·z − σ₀·z₀ in
/// type C, and the permutation as a contiguous index span (perm[o] = the row of L_r that
/// row o of P·L_r is), for kernels::gather_rows.
namespace detail {
template <class C, class T>
std::vector<C> ldu_coefficients(const ldu<T, device::cpu>& u) {
  std::vector<C> c(std::size_t(u.rank()));
  for (index_t j = 0; j < u.rank(); ++j) c[std::size_t(j)] = C(u.coefficient(j));
  return c;
}
/// The same through ctx: z and z₀ read on the host (downloaded when they live on a device).
template <class C, class Ctx, class T, class D>
std::vector<C> ldu_coefficients(const Ctx& ctx, const ldu<T, D>& u) {
  const std::vector<double> z = to_host_vector<double>(ctx, u.z()), z0 = to_host_vector<double>(ctx, u.z0());
  std::vector<C> c(std::size_t(u.rank()));
  for (std::size_t j = 0; j < c.size(); ++j) c[j] = C(u.sigma() * z[j] - u.sigma0() * z0[j]);
  return c;
}
template <class C>
bool all_zero(const std::vector<C>& c) {
  return std::all_of(c.begin(), c.end(), [](C x) { return x == C(0); });
}
/// perm as a span: the view's own memory when it is contiguous, else a copy in `storage`.
template <class T>
std::span<const index_t> ldu_perm(const ldu<T, device::cpu>& u, std::vector<index_t>& storage) {
  const auto& p = u.perm();
  if (p.stride() == 1 || p.size() <= 1) return {p.data(), std::size_t(p.size())};
  storage.resize(std::size_t(p.size()));
  for (index_t o = 0; o < p.size(); ++o) storage[std::size_t(o)] = p[o];
  return {storage.data(), storage.size()};
}
/// Rows [r0, r0 + P.rows()) of P·L_r in type C, gathered into P [n, r] (the permutation
/// read where it lives).
template <class C, class Ctx, class T, class D>
void ldu_gather(const Ctx& ctx, const ldu<T, D>& u, index_t r0, const matrix_view<C, D>& P) {
  if (P.rows() == 0) return;
  const auto& p = u.perm();
  gather_rows(ctx, u.L(), vector_view<const index_t, D>(p.data() + r0 * p.stride(), P.rows(), p.stride()), P);
}
}  // namespace detail

/// ΔW = P·L_r·diag(c)·U_r. The rows of P·L_r·diag(c) are gathered once into an out × r
/// scratch (LoRA's B); the permutation is never a matrix. c is computed on the host (z and
/// z₀ read through to_host_vector); perm is read where it lives (gather_rows). Any device.
template <class T, class D>
struct evaluator<ldu<T, D>> : additive_rows<evaluator<ldu<T, D>>, ldu<T, D>> {
  using U = ldu<T, D>;

  /// Rows [r0, r0 + P.rows()) of P·L_r·diag(c) into P [n, r], in type C.
  template <class C, class Ctx>
  static void scaled_rows(const Ctx& ctx, const U& u, index_t r0, const std::vector<C>& c, const mview<C, D>& P) {
    detail::ldu_gather(ctx, u, r0, P);
    scale_cols(ctx, P, vector_view<const C>(c.data(), index_t(c.size())));
  }

  /// Y += (X·U_rᵀ)·(P·L_r·diag(c))ᵀ; nothing while c = 0 (ΔW = 0 exactly, the initial state).
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const auto c = detail::ldu_coefficients<C>(ctx, u);
    if (detail::all_zero(c)) return;
    const kernels::operand<C, D> Ur(ctx, u.U());
    auto Lp = kernels::make_scratch<C>(ctx, u.rows(), u.rank());
    scaled_rows<C>(ctx, u, 0, c, Lp.view());
    auto Z = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), X, none, Ur, trans, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, Lp.cview(), trans, C(1), Y);
  }

  /// O += (G·P·L_r·diag(c))·U_r.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const auto c = detail::ldu_coefficients<C>(ctx, u);
    if (detail::all_zero(c)) return;
    const kernels::operand<C, D> Ur(ctx, u.U());
    auto Lp = kernels::make_scratch<C>(ctx, u.rows(), u.rank());
    scaled_rows<C>(ctx, u, 0, c, Lp.view());
    auto Z = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, Lp.cview(), none, C(0), Z.view());
    gemm<C>(ctx, C(1), Z.cview(), none, Ur, none, C(1), O);
  }

  /// P += factor·(P·L_r·diag(c))[r0 : r0 + P.rows()]·U_r.
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const auto c = detail::ldu_coefficients<C>(ctx, u);
    if (detail::all_zero(c)) return;
    const kernels::operand<C, D> Ur(ctx, u.U());
    auto Lp = kernels::make_scratch<C>(ctx, P.rows(), u.rank());
    scaled_rows<C>(ctx, u, r0, c, Lp.view());
    gemm<C>(ctx, factor, Lp.cview(), none, Ur, none, C(1), P);
  }

  /// ‖P·L·diag(c)·U‖_F = ‖L·diag(c)·U‖_F = √(Σᵢⱼ cᵢcⱼ (LᵀL)ᵢⱼ (UUᵀ)ᵢⱼ), in double.
  template <class C>
  static double frobenius_norm(const U& u) {
    using enum kernels::op;
    const kernels::cpu_context ctx;
    const index_t r = u.rank();
    const kernels::operand<double> L(ctx, u.L()), Ur(ctx, u.U());
    const auto c = detail::ldu_coefficients<double>(u);
    const vector_view<const double> cv(c.data(), r);
    auto GL = kernels::make_scratch<double>(ctx, r, r);
    auto GU = kernels::make_scratch<double>(ctx, r, r);
    gemm<double>(ctx, 1.0, L, trans, L, none, 0.0, GL.view());
    gemm<double>(ctx, 1.0, Ur, none, Ur, trans, 0.0, GU.view());
    scale_rows(ctx, GL.view(), cv);  // diag(c)·LᵀL·diag(c)
    scale_cols(ctx, GL.view(), cv);
    return std::sqrt(std::max(trace_of_product<double>(GL.cview(), GU.cview()), 0.0));
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
