// SPDX-License-Identifier: MIT
// VJP of HRA (ΔW = W·(H − I), H = I − N·Tm·Nᵀ); one factor, U [in, r] (PEFT's hra_u).
// With V = dY·W, A = X·N, B = V·N (tokens × r):
//   dX += V·H − V = −(B·Tm)·Nᵀ
//   ∂Tm = −Bᵀ·A,   ∂N = −(Xᵀ·(B·Tm) + Vᵀ·(A·Tmᵀ))            (the in × in ∂H = Vᵀ·X never formed)
// then, on the host in double, back through the factors: plain, the WY recursion
// Tm[:k, k] = −2·Tm[:k, :k]·s_k, s_k = N[:, :k]ᵀ·n_k (k from r − 1 down) and the
// normalisation ∂u = (∂n − n·(nᵀ·∂n))/‖u‖; Gram–Schmidt (Tm = 2I fixed), back through
// v_k = u_k − Q_{<k}·(Q_{<k}ᵀ·u_k), q_k = v_k/‖v_k‖ (k from r − 1 down), the same function
// as PEFT's modified Gram–Schmidt. Scratch: tokens × in, in × r, r × r.
// Templated on the device: ∂N, ∂Tm and U are read on the host through to_host_vector (a
// download on a device) and ∂U is added back with add_from_host.
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include "../../expr/hra.hpp"
#include "hra.hpp"
#include "vjp.hpp"

DELTAW_NAMESPACE_BEGIN
namespace cpu {

namespace hra_detail {
/// ∂U (double, [in, r] row-major) from ∂N and ∂Tm (double, row-major), modifying both.
inline std::vector<double> pullback(const hra_factors& f, const std::vector<double>& U, std::vector<double>& dN,
                                    std::vector<double>& dT, bool gram_schmidt) {
  const index_t in = f.in, r = f.r;
  auto N = [&](index_t i, index_t k) { return f.N[std::size_t(i * r + k)]; };
  auto Tm = [&](index_t i, index_t k) { return f.Tm[std::size_t(i * r + k)]; };
  auto gN = [&](index_t i, index_t k) -> double& { return dN[std::size_t(i * r + k)]; };
  auto gT = [&](index_t i, index_t k) -> double& { return dT[std::size_t(i * r + k)]; };
  std::vector<double> dU(std::size_t(in * r), 0.0);
  auto gU = [&](index_t i, index_t k) -> double& { return dU[std::size_t(i * r + k)]; };
  std::vector<double> dv(static_cast<std::size_t>(in)), ds(static_cast<std::size_t>(r)), s(static_cast<std::size_t>(r));
  if (!gram_schmidt)
    for (index_t k = r - 1; k >= 1; --k) {  // Tm[:k, k] = −2·Tm[:k, :k]·s
      for (index_t j = 0; j < k; ++j) {
        double t = 0;
        for (index_t i = 0; i < in; ++i) t += N(i, j) * N(i, k);
        s[std::size_t(j)] = t;
      }
      for (index_t j = 0; j < k; ++j) {
        double t = 0;  // ∂s = −2·Tm[:k, :k]ᵀ·g
        for (index_t a = 0; a <= j; ++a) t += Tm(a, j) * gT(a, k);
        ds[std::size_t(j)] = -2.0 * t;
      }
      for (index_t a = 0; a < k; ++a)
        for (index_t j = a; j < k; ++j) gT(a, j) += -2.0 * gT(a, k) * s[std::size_t(j)];
      for (index_t j = 0; j < k; ++j)  // s_j = n_jᵀ·n_k
        for (index_t i = 0; i < in; ++i) {
          gN(i, j) += ds[std::size_t(j)] * N(i, k);
          gN(i, k) += ds[std::size_t(j)] * N(i, j);
        }
    }
  for (index_t k = r - 1; k >= 0; --k) {
    double d = 0;  // ∂v = (∂q − q·(qᵀ·∂q))/‖v‖
    for (index_t i = 0; i < in; ++i) d += N(i, k) * gN(i, k);
    const double inv = 1.0 / f.norms[std::size_t(k)];
    for (index_t i = 0; i < in; ++i) dv[std::size_t(i)] = (gN(i, k) - N(i, k) * d) * inv;
    if (!gram_schmidt) {
      for (index_t i = 0; i < in; ++i) gU(i, k) = dv[std::size_t(i)];
      continue;
    }
    for (index_t i = 0; i < in; ++i) gU(i, k) = dv[std::size_t(i)];
    for (index_t j = 0; j < k; ++j) {  // v = u − Σ_j (q_jᵀ·u)·q_j
      double qdv = 0, qu = 0;
      for (index_t i = 0; i < in; ++i) {
        qdv += N(i, j) * dv[std::size_t(i)];
        qu += N(i, j) * U[std::size_t(i * r + k)];
      }
      for (index_t i = 0; i < in; ++i) {
        gU(i, k) -= qdv * N(i, j);
        gN(i, j) -= qdv * U[std::size_t(i * r + k)] + qu * dv[std::size_t(i)];
      }
    }
  }
  return dU;
}
}  // namespace hra_detail

template <class T, class TW, class D>
struct vjp<hra_update<T, TW, D>> {
  using U = hra_update<T, TW, D>;
  static constexpr int factor_count = 1;
  static const char* factor_name(int) { return "U"; }

  template <class C, class Ctx>
  static void backward(const Ctx& ctx, const U& u, const cview<C, D>& X, const cview<C, D>& dY,
                       std::span<const mview<C, D>> grads, const mview<C, D>& dX) {
    constexpr const char* op = "deltaw::cpu::vjp<hra>::backward";
    detail::check_grad_slots(grads, factor_count, op);
    detail::check_backward_no_overlap(u, X, dY, grads, dX, factor_name, op);
    detail::check_grad_shape(grads[0], u.U(), op, "U");
    using enum kernels::op;
    const index_t in = u.cols(), r = u.rank(), tok = X.rows();
    const hra_detail::factors_in<C, Ctx, U> f(ctx, u);
    auto V = kernels::make_scratch<C>(ctx, tok, in);
    base_apply_transposed<C>(ctx, u.W(), dY, V.view());
    auto A = kernels::make_scratch<C>(ctx, tok, r), B = kernels::make_scratch<C>(ctx, tok, r);
    gemm<C>(ctx, C(1), V.cview(), none, f.N.cview(), none, C(0), B.view());
    auto BT = kernels::make_scratch<C>(ctx, tok, r);
    gemm<C>(ctx, C(1), B.cview(), none, f.Tm.cview(), none, C(0), BT.view());
    if (present(dX)) gemm<C>(ctx, C(-1), BT.cview(), none, f.N.cview(), trans, C(1), dX);
    if (!present(grads[0])) return;
    gemm<C>(ctx, C(1), X, none, f.N.cview(), none, C(0), A.view());
    auto AT = kernels::make_scratch<C>(ctx, tok, r);
    gemm<C>(ctx, C(1), A.cview(), none, f.Tm.cview(), trans, C(0), AT.view());
    auto gN = kernels::make_scratch<C>(ctx, in, r), gT = kernels::make_scratch<C>(ctx, r, r);
    gemm<C>(ctx, C(-1), X, trans, BT.cview(), none, C(0), gN.view());
    gemm<C>(ctx, C(-1), V.cview(), trans, AT.cview(), none, C(1), gN.view());
    gemm<C>(ctx, C(-1), B.cview(), trans, A.cview(), none, C(0), gT.view());
    // ∂N, ∂Tm and U read on the host (on a device: a download of 2·in·r + r² values), the
    // pullback through the factors there, ∂U added back on ctx's device.
    auto Us = kernels::make_scratch<double>(ctx, in, r);
    copy(ctx, u.U(), Us.view());
    const auto packed = [](const auto& S) {  // a dense row-major scratch as one vector
      const auto v = S.cview();
      return vector_view<const typename std::remove_cvref_t<decltype(v)>::value_type, D>(v.data(), v.rows() * v.cols());
    };
    std::vector<double> dN = to_host_vector<double>(ctx, packed(gN)), dT = to_host_vector<double>(ctx, packed(gT));
    const std::vector<double> Ud = to_host_vector<double>(ctx, packed(Us));
    const auto dU = hra_detail::pullback(*u.factors(), Ud, dN, dT, u.options().gram_schmidt);
    std::vector<C> add(dU.size());
    for (std::size_t i = 0; i < dU.size(); ++i) add[i] = C(dU[i]);
    detail::add_from_host(ctx, add, grads[0]);
  }
};

}  // namespace cpu
DELTAW_NAMESPACE_END
