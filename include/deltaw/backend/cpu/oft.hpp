// SPDX-License-Identifier: MIT
// Evaluator of OFT (expr/oft.hpp), W' = W·Rᵀ with R = blockdiag(R_k) acting on the input,
// and its constructor deltaw::oft, which computes the rotation blocks R_k (b × b, in double,
// on the host: Cayley by an LU solve, Cayley–Neumann by PEFT's truncated series).
//   apply over its own W (the apply_with_base hook of ops.hpp):  Y = (X·R)·Wᵀ
//   transposed:                                                   O = (G·W)·Rᵀ
//   alone:  Y += (X·R − X)·Wᵀ,  O += (G·W)·Rᵀ − G·W
//   merge:  rows of W ← rows·Rᵀ;  unmerge: rows ← rows·R⁻ᵀ (each R_k inverted, b × b)
// X·R is one strided batch of b-column products (2·tokens·in·b flops); the dense in × in R
// and W' are never formed. Scratch: tokens × in, and at most panel_rows × in for merge.
// Written against the primitive layer, for any device: the rotations are host values
// (computed once, in double, by deltaw::oft or deltaw::cuda::oft) uploaded into scratch
// (copy_from_host); unmerge inverts the b × b blocks on the host (Eigen) and uploads them.
#pragma once

#include <deltaw/core/eigen_dense.hpp>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../../expr/oft.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace oft_detail {

/// Q_k = S − Sᵀ from row `row` of Q (its strict upper triangle, row-major), in double.
template <class T, class D>
dense<double> skew(const matrix_view<const T, D>& Q, index_t row, index_t b) {
  dense<double> S = dense<double>::Zero(b, b);
  index_t k = 0;
  for (index_t i = 0; i < b; ++i)
    for (index_t j = i + 1; j < b; ++j, ++k) {
      const double v = convert<double>(Q(row, k));
      S(i, j) = v;
      S(j, i) = -v;
    }
  return S;
}

/// The coefficients c_1 … c_m of PEFT's Cayley–Neumann series R = I + Σ c_k·Q^k.
inline std::vector<double> neumann_coefficients(int terms) {
  if (terms <= 1) return {};
  if (terms == 2) return {2.0};
  const int m = std::max(terms - 1, 3);
  std::vector<double> c(std::size_t(m), 2.0);
  c.back() = 1.0;
  return c;
}

// rotation and pullback are templates (always instantiated with double) so that the LU
// code in them is compiled only by files that build an OFT update, not by every file that
// includes deltaw.hpp (3.4 s of g++ -O2 per file as plain inline functions).
template <class Real>
dense<Real> rotation(const dense<Real>& S, const oft_options& o) {
  static_assert(std::is_same_v<Real, double>, "OFT's rotations are computed in double");
  const index_t b = S.rows();
  const dense<double> I = dense<double>::Identity(b, b);
  if (o.cayley_neumann) {
    dense<double> R = I, P = I;
    for (double c : neumann_coefficients(o.neumann_terms)) {
      P = (P * S).eval();
      R += c * P;
    }
    return R;
  }
  // R·(I + S) = I − S (PEFT: torch.linalg.solve(I + Q, I − Q, left=False)); I + S is
  // invertible for every skew-symmetric S.
  const dense<double> Rt = (I + S).transpose().partialPivLu().solve((I - S).transpose());
  return Rt.transpose();
}

/// ∂L/∂Q (b × b, Q skew as a free matrix) from Ḡ = ∂L/∂R.
template <class Real>
dense<Real> pullback(const dense<Real>& S, const dense<Real>& R, const dense<Real>& G, const oft_options& o) {
  static_assert(std::is_same_v<Real, double>, "OFT's rotations are computed in double");
  const index_t b = S.rows();
  const dense<double> I = dense<double>::Identity(b, b);
  if (!o.cayley_neumann) {
    const dense<double> M = (I + S).partialPivLu().inverse();
    return -((I + R).transpose() * G * M.transpose());
  }
  const auto c = neumann_coefficients(o.neumann_terms);
  std::vector<dense<double>> P(c.size() + 1);  // P_j = (Sᵀ)^j
  P[0] = I;
  for (std::size_t j = 1; j < P.size(); ++j) P[j] = P[j - 1] * S.transpose();
  dense<double> out = dense<double>::Zero(b, b);
  for (std::size_t k = 1; k <= c.size(); ++k)
    for (std::size_t j = 0; j < k; ++j) out += c[k - 1] * (P[j] * G * P[k - 1 - j]);
  return out;
}

/// The cached rotations (host values) in type C, [nq·b, b], on ctx's device.
template <class C, class Ctx, class U>
auto rotations_in(const Ctx& ctx, const U& u) {
  const index_t b = u.block(), nq = u.Q().rows();
  auto R = kernels::make_scratch<C>(ctx, nq * b, b);
  copy_from_host(ctx, matrix_view<const double>(u.rotations()->data(), nq * b, b, b, 1), R.view());
  return R;
}

/// M (on ctx's device, any layout) in host memory, row-major, in double: one download
/// (a synchronisation on a device). For the small parameter matrices whose b × b blocks
/// are transformed on the host (OFT's Q, BOFT's R).
template <class Ctx, class T, class D>
std::vector<double> to_host_matrix(const Ctx& ctx, const matrix_view<const T, D>& M) {
  const index_t n = M.rows() * M.cols();
  if (n == 0) return {};
  auto s = kernels::make_scratch<double>(ctx, M.rows(), M.cols());
  copy(ctx, M, s.view());
  return to_host_vector<double>(ctx, vector_view<const double, D>(s.cview().data(), n));
}

/// Out[:, block k] = In[:, block k]·op(R_k) + beta·Out[:, block k] for every block: one
/// strided batch of nb products (R's stride 0 when one block is shared).
template <class C, class Ctx, class U, class S, class D>
void rotate(const Ctx& ctx, const U& u, const S& R, const cview<C, D>& In, const mview<C, D>& Out, kernels::op o, C beta) {
  const index_t b = u.block();
  gemm_strided_batched<C>(ctx, C(1), In.middle_cols(0, b), b * In.col_stride(), kernels::op::none,
                          R.cview().middle_rows(0, b), u.shared() ? 0 : b * b, o, beta, Out.middle_cols(0, b),
                          b * Out.col_stride(), u.blocks());
}

/// Rows of P ← rows·op(M)ᵀ blockwise (M: R for merge, R⁻¹ for unmerge), panel_rows rows at a time.
template <class C, class Ctx, class U, class S, class D>
void rotate_rows_in_place(const Ctx& ctx, const U& u, const S& M, const mview<C, D>& P) {
  auto tmp = kernels::make_scratch<C>(ctx, std::min(panel_rows, P.rows()), P.cols());
  for (index_t r = 0; r < P.rows(); r += panel_rows) {
    const index_t n = std::min(panel_rows, P.rows() - r);
    const auto rows = P.middle_rows(r, n);
    const auto t = tmp.view().middle_rows(0, n);
    copy(ctx, cview<C, D>(rows), t);
    rotate<C>(ctx, u, M, cview<C, D>(t), rows, kernels::op::trans, C(0));
  }
}

}  // namespace oft_detail

template <class T, class TW, class D>
struct evaluator<oft_update<T, TW, D>> {
  using U = oft_update<T, TW, D>;

  /// Y = (X·R)·Wᵀ: replaces the base product in a lazy sum over u's own W.
  template <class C, class Ctx>
  static void apply_with_base(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const auto R = oft_detail::rotations_in<C>(ctx, u);
    auto Xr = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
    oft_detail::rotate<C>(ctx, u, R, X, Xr.view(), kernels::op::none, C(0));
    base_apply<C>(ctx, u.W(), Xr.cview(), Y);
  }
  /// O = (G·W)·Rᵀ.
  template <class C, class Ctx>
  static void apply_transposed_with_base(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const auto R = oft_detail::rotations_in<C>(ctx, u);
    auto GW = kernels::make_scratch<C>(ctx, G.rows(), u.cols());
    base_apply_transposed<C>(ctx, u.W(), G, GW.view());
    oft_detail::rotate<C>(ctx, u, R, GW.cview(), O, kernels::op::trans, C(0));
  }
  /// Y += (X·R − X)·Wᵀ.
  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    const auto R = oft_detail::rotations_in<C>(ctx, u);
    auto Xr = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
    oft_detail::rotate<C>(ctx, u, R, X, Xr.view(), kernels::op::none, C(0));
    axpy<C>(ctx, C(-1), X, Xr.view());
    for_row_panels<C>(ctx, u.W(), [&](index_t r0, const cview<C, D>& P) {
      gemm<C>(ctx, C(1), Xr.cview(), kernels::op::none, P, kernels::op::trans, C(1), Y.middle_cols(r0, P.rows()));
    });
  }
  /// O += (G·W)·Rᵀ − G·W.
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    const auto R = oft_detail::rotations_in<C>(ctx, u);
    auto GW = kernels::make_scratch<C>(ctx, G.rows(), u.cols());
    base_apply_transposed<C>(ctx, u.W(), G, GW.view());
    oft_detail::rotate<C>(ctx, u, R, GW.cview(), O, kernels::op::trans, C(1));
    axpy<C>(ctx, C(-1), GW.cview(), O);
  }

  /// P += ΔW[r0 : r0 + P.rows()] = rows of W·(Rᵀ − I), panel_rows rows at a time.
  template <class C, class Ctx>
  static void add_delta_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& panel) {
    const auto R = oft_detail::rotations_in<C>(ctx, u);
    auto w = kernels::make_scratch<C>(ctx, std::min(panel_rows, panel.rows()), u.cols());
    for (index_t r = 0; r < panel.rows(); r += panel_rows) {
      const index_t n = std::min(panel_rows, panel.rows() - r);
      const auto wv = w.view().middle_rows(0, n);
      copy(ctx, u.W().middle_rows(r0 + r, n), wv);
      const auto Pr = panel.middle_rows(r, n);
      oft_detail::rotate<C>(ctx, u, R, cview<C, D>(wv), Pr, kernels::op::trans, C(1));
      axpy<C>(ctx, C(-1), cview<C, D>(wv), Pr);
    }
  }
  /// Rows of W ← rows·Rᵀ (W must be u's own weight: checked by merge).
  template <class C, class Ctx>
  static void merge_rows(const Ctx& ctx, const U& u, index_t, const mview<C, D>& panel) {
    oft_detail::rotate_rows_in_place<C>(ctx, u, oft_detail::rotations_in<C>(ctx, u), panel);
  }
  /// Rows of W' ← rows·R⁻ᵀ; argument_error when some R_k is singular (possible only for
  /// a truncated Cayley–Neumann series far from the identity).
  template <class C, class Ctx>
  static void unmerge_rows(const Ctx& ctx, const U& u, index_t, const mview<C, D>& panel) {
    const index_t b = u.block(), nq = u.Q().rows();
    auto inv = kernels::make_scratch<C>(ctx, nq * b, b);
    for (index_t q = 0; q < nq; ++q) {
      const Eigen::Map<const dense<double>> Rq(u.rotations()->data() + q * b * b, b, b);
      Eigen::FullPivLU<dense<double>> lu(Rq);
      if (!lu.isInvertible())
        throw argument_error("deltaw::unmerge (OFT): the rotation block " + std::to_string(q) +
                             " is singular (a truncated Cayley–Neumann series), so the merge cannot be undone");
      const dense<double> Ri = lu.inverse();
      copy_from_host(ctx, matrix_view<const double>(Ri.data(), b, b, b, 1), inv.view().middle_rows(q * b, b));
    }
    oft_detail::rotate_rows_in_place<C>(ctx, u, inv, panel);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu

/// PEFT's COFT projection (coft = true, eps): each row q of Q whose skew matrix has
/// Frobenius norm above eps/√nq is scaled onto that radius (PEFT applies it to the stored
/// parameter before every forward). Returns the projected copy [nq, b(b − 1)/2].
template <class QL>
auto oft_coft_project(const QL& Q, double eps) {
  const auto Qv = view(Q);
  using T = std::remove_const_t<typename decltype(Qv)::element_type>;
  dense<T> out(Qv.rows(), Qv.cols());
  const double lim = eps / std::sqrt(double(Qv.rows()));
  for (index_t q = 0; q < Qv.rows(); ++q) {
    double sq = 0;
    for (index_t j = 0; j < Qv.cols(); ++j) sq += 2.0 * convert<double>(Qv(q, j)) * convert<double>(Qv(q, j));
    const double n = std::sqrt(sq);
    const double f = n <= lim ? 1.0 : lim / n;
    for (index_t j = 0; j < Qv.cols(); ++j) out(q, j) = convert<T>(f * convert<double>(Qv(q, j)));
  }
  return out;
}

namespace detail {
/// The rotation blocks of Q (a host view) for a weight of `in` columns, in double,
/// row-major [nq·b, b]; empty for a shape the update rejects (its constructor reports it).
template <class T>
std::shared_ptr<std::vector<double>> oft_rotations(const matrix_view<const T>& Q, index_t in, const oft_options& o) {
  const index_t b = detail::oft_block_from_elements(Q.cols());
  auto R = std::make_shared<std::vector<double>>();
  const index_t nq = Q.rows();
  if (b >= 1 && nq >= 1 && (nq * b == in || (nq == 1 && in % b == 0))) {
    R->resize(std::size_t(nq * b * b));
    for (index_t q = 0; q < nq; ++q) {
      const dense<double> Rq = cpu::oft_detail::rotation(cpu::oft_detail::skew(Q, q, b), o);
      for (index_t i = 0; i < b; ++i)
        for (index_t j = 0; j < b; ++j) (*R)[std::size_t((q * b + i) * b + j)] = Rq(i, j);
    }
  }
  return R;
}

/// oft() from held operands: computes and caches the rotation blocks.
template <class TW, class T, class D>
auto make_oft(held_matrix<TW, D> hw, held_matrix<T, D> hq, oft_options o) {
  static_assert(std::is_same_v<D, device::cpu>,
                "deltaw::oft: the rotation blocks are computed on the host (CPU views; deltaw::cuda::oft(ctx, W, Q) "
                "for CUDA views)");
  auto R = oft_rotations(hq.view, hw.view.cols(), o);
  return oft_update<T, TW>(std::move(hw), std::move(hq), o, std::move(R));
}
}  // namespace detail

/// OFT over W [out, in] with Q [nq, b(b − 1)/2] (PEFT's oft_R.weight: one row per block,
/// or one shared row for block_share); W and Q held by view, or owned if temporaries.
/// Computes and caches the rotation blocks.
template <class WL, class QL>
auto oft(WL&& W, QL&& Q, oft_options o = {}) {
  return detail::make_oft(hold(std::forward<WL>(W)), hold(std::forward<QL>(Q)), o);
}

DELTAW_NAMESPACE_END
