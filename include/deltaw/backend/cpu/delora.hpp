// SPDX-License-Identifier: MIT
// Evaluator of DeLoRA (expr/delora.hpp): ΔW = B·diag(c)·A·diag(w), c from λ and the norms of
// A's rows and B's columns (recomputed per call: r·(in + out) flops).
//   apply:       Y += (((X·diag(w))·Aᵀ)·diag(c))·Bᵀ
//   transposed:  O += (((G·B)·diag(c))·A)·diag(w)
//   rows:        P += factor·(B[rows]·diag(c))·(A·diag(w))
// Scratch: tokens × in (the scaled input), tokens × r, r × in; never out × in.
// Templated on the device: the norms are summed where the factors live (reduce_cols) and the
// r coefficients computed on the host and copied back (copy_from_host), so the same code runs
// with a cuda::context (cuda/updates_structured.cuh).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../expr/delora.hpp"
#include "ops.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace delora_detail {

/// x² in double: the squared norms of A's rows and B's columns (a host-device functor, so
/// that they are summed on the factors' device and only r values are read back).
struct square_in_double {
  template <class T>
  DELTAW_HOST_DEVICE double operator()(T x) const {
    const double v = convert<double>(x);
    return v * v;
  }
};

/// The norms of A's rows and B's columns (unclamped) and c, in double, on the host. The sums
/// of squares are formed on the factors' device (reduce_cols: column by column in row order,
/// the order of a plain loop) and read back with λ (on a device: a download of 2·r + 1 values).
struct coefficients {
  std::vector<double> an, bn, c;
  double lambda = 0;
};
template <class Ctx, class U>
coefficients coeffs(const Ctx& ctx, const U& u) {
  coefficients k;
  const index_t r = u.rank();
  k.an.assign(std::size_t(r), 0.0);
  k.bn.assign(std::size_t(r), 0.0);
  k.c.assign(std::size_t(r), 0.0);
  k.lambda = to_host_vector<double>(ctx, u.lambda())[0];
  reduce_cols(ctx, u.A().transpose(), vector_view<double>(k.an.data(), r), square_in_double{});
  reduce_cols(ctx, u.B(), vector_view<double>(k.bn.data(), r), square_in_double{});
  for (index_t i = 0; i < r; ++i) {
    k.an[std::size_t(i)] = std::sqrt(k.an[std::size_t(i)]);
    k.bn[std::size_t(i)] = std::sqrt(k.bn[std::size_t(i)]);
    k.c[std::size_t(i)] = k.lambda / double(r) / (std::max(k.an[std::size_t(i)], delora_norm_floor) *
                                                  std::max(k.bn[std::size_t(i)], delora_norm_floor));
  }
  return k;
}

/// v (host values) as a [1, n] scratch in type C on ctx's device (kernels::as_vector views it).
template <class C, class Ctx>
auto row_scratch(const Ctx& ctx, const std::vector<double>& v) {
  auto s = kernels::make_scratch<C>(ctx, 1, index_t(v.size()));
  copy_from_host(ctx, matrix_view<const double>(v.data(), 1, index_t(v.size()), std::max<index_t>(index_t(v.size()), 1), 1),
                 s.view());
  return s;
}

}  // namespace delora_detail

template <class T, class D>
struct evaluator<delora_update<T, D>> : additive_rows<evaluator<delora_update<T, D>>, delora_update<T, D>> {
  using U = delora_update<T, D>;

  template <class C, class Ctx>
  static void apply_add(const Ctx& ctx, const U& u, const cview<C, D>& X, const mview<C, D>& Y) {
    using enum kernels::op;
    const auto k = delora_detail::coeffs(ctx, u);
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
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
  static void apply_transposed_add(const Ctx& ctx, const U& u, const cview<C, D>& G, const mview<C, D>& O) {
    using enum kernels::op;
    const auto k = delora_detail::coeffs(ctx, u);
    const kernels::operand<C, D> A(ctx, u.A()), B(ctx, u.B());
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
  static void add_scaled_rows(const Ctx& ctx, const U& u, index_t r0, const mview<C, D>& P, C factor) {
    using enum kernels::op;
    const auto k = delora_detail::coeffs(ctx, u);
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
