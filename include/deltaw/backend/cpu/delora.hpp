// SPDX-License-Identifier: MIT
// Evaluator of DeLoRA (expr/delora.hpp): ΔW = B·diag(c)·A·diag(w), c from λ and the norms of
// A's rows and B's columns (recomputed per call: r·(in + out) flops).
//   apply:       Y += (((X·diag(w))·Aᵀ)·diag(c))·Bᵀ
//   transposed:  O += (((G·B)·diag(c))·A)·diag(w)
//   rows:        P += factor·(B[rows]·diag(c))·(A·diag(w))
// Scratch: tokens × in (the scaled input), tokens × r, r × in; never out × in.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../expr/delora.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace delora_detail {

/// The norms of A's rows and B's columns (unclamped) and c, in double.
struct coefficients {
  std::vector<double> an, bn, c;
  double lambda = 0;
};
template <class U>
coefficients coeffs(const U& u) {
  coefficients k;
  const index_t r = u.rank();
  k.an.assign(std::size_t(r), 0.0);
  k.bn.assign(std::size_t(r), 0.0);
  k.c.assign(std::size_t(r), 0.0);
  k.lambda = convert<double>(u.lambda()[0]);
  for (index_t i = 0; i < r; ++i) {
    double a = 0, b = 0;
    for (index_t j = 0; j < u.cols(); ++j) a += convert<double>(u.A()(i, j)) * convert<double>(u.A()(i, j));
    for (index_t o = 0; o < u.rows(); ++o) b += convert<double>(u.B()(o, i)) * convert<double>(u.B()(o, i));
    k.an[std::size_t(i)] = std::sqrt(a);
    k.bn[std::size_t(i)] = std::sqrt(b);
    k.c[std::size_t(i)] = k.lambda / double(r) / (std::max(k.an[std::size_t(i)], delora_norm_floor) *
                                                  std::max(k.bn[std::size_t(i)], delora_norm_floor));
  }
  return k;
}

/// c as a [1, n] scratch in type C (kernels::as_vector views it).
template <class C, class Ctx>
auto row_scratch(const Ctx& ctx, const std::vector<double>& v) {
  auto s = kernels::make_scratch<C>(ctx, 1, index_t(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i) s.view()(0, index_t(i)) = C(v[i]);
  return s;
}

}  // namespace delora_detail

template <class T>
struct evaluator<delora_update<T, device::cpu>> : additive_rows<evaluator<delora_update<T, device::cpu>>,
                                                                delora_update<T, device::cpu>> {
  using D = device::cpu;
  using U = delora_update<T, D>;

  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C>& X, const mview<C>& Y) {
    using enum kernels::op;
    const auto k = delora_detail::coeffs(u);
    const kernels::operand<C> A(ctx, u.A()), B(ctx, u.B());
    const auto c = delora_detail::row_scratch<C>(ctx, k.c);
    const auto w = kernels::vector_scratch<C>(ctx, u.w_norm());
    auto Xw = kernels::make_scratch<C>(ctx, X.rows(), X.cols());
    copy(ctx, X, Xw.view());
    scale_cols(ctx, Xw.view(), kernels::as_vector(w));
    auto H = kernels::make_scratch<C>(ctx, X.rows(), u.rank());
    gemm<C>(ctx, C(1), Xw.cview(), none, A.view(), trans, C(0), H.view());
    scale_cols(ctx, H.view(), kernels::as_vector(c));
    gemm<C>(ctx, C(1), H.cview(), none, B.view(), trans, C(1), Y);
  }
  template <class C, class Ctx>
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C>& G, const mview<C>& O) {
    using enum kernels::op;
    const auto k = delora_detail::coeffs(u);
    const kernels::operand<C> A(ctx, u.A()), B(ctx, u.B());
    const auto c = delora_detail::row_scratch<C>(ctx, k.c);
    const auto w = kernels::vector_scratch<C>(ctx, u.w_norm());
    auto H = kernels::make_scratch<C>(ctx, G.rows(), u.rank());
    gemm<C>(ctx, C(1), G, none, B.view(), none, C(0), H.view());
    scale_cols(ctx, H.view(), kernels::as_vector(c));
    auto Q = kernels::make_scratch<C>(ctx, G.rows(), u.cols());
    gemm<C>(ctx, C(1), H.cview(), none, A.view(), none, C(0), Q.view());
    scale_cols(ctx, Q.view(), kernels::as_vector(w));
    axpy<C>(ctx, C(1), Q.cview(), O);
  }
  template <class C, class Ctx>
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C>& P, C factor) {
    using enum kernels::op;
    const auto k = delora_detail::coeffs(u);
    const auto c = delora_detail::row_scratch<C>(ctx, k.c);
    const auto w = kernels::vector_scratch<C>(ctx, u.w_norm());
    auto Bc = kernels::make_scratch<C>(ctx, P.rows(), u.rank());
    copy(ctx, u.B().middle_rows(r0, P.rows()), Bc.view());
    scale_cols(ctx, Bc.view(), kernels::as_vector(c));
    auto Aw = kernels::make_scratch<C>(ctx, u.rank(), u.cols());
    copy(ctx, u.A(), Aw.view());
    scale_cols(ctx, Aw.view(), kernels::as_vector(w));
    gemm<C>(ctx, factor, Bc.cview(), none, Aw.cview(), none, C(1), P);
  }
  template <class C>
  static double frobenius_norm(const U& u) {
    return frobenius_norm_by_panels<C>(u);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
