// SPDX-License-Identifier: MIT
// Spectra of device-resident updates (deltaw/spectral/ is the CPU side):
//
//   factored_svd(ctx, B, A, s), factored_spectrum(…)  the SVD of ΔW = s·B·A without the
//       dense matrix (docs/methods.md, "Spectrum of a factored update"): thin QR of B and of
//       Aᵀ on cuSOLVER, the SVD of the small core R_B·R_Aᵀ, and the vectors Q_B·U, Q_A·V.
//       Scratch O((m + n)·r + r²), never m × n.
//   intruder_dimensions(ctx, W0, finetuned, opt)      Shuttleworth et al. 2024 as on the
//       CPU: every left singular vector of W0 against the top k of the fine-tuned weight.
//       A dense analysis, as on the CPU: the weight is formed in double in scratch
//       (out·in) and factored by cusolverDn<t>gesvd; the scratch is about
//       out·in + 2·out·min(out, in) + min(out, in)² doubles plus cuSOLVER's workspace.
//
// Singular vectors' signs are cuSOLVER's: each pair (u_j, v_j) equals the CPU's up to one
// common sign; the similarities of intruder_dimensions are absolute values and do not
// depend on them.
//
// Not included by deltaw/cuda/cuda.hpp.
#pragma once

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <deltaw/spectral/factored_spectrum.hpp>
#include <deltaw/spectral/intruder.hpp>

#include "linalg.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

/// The full SVD of s·B·A (B [m, r], A [r, n] device views of any storage type and layout
/// with a unit stride; computed in C): U [m, t], S [t], V [n, t] on the device with
/// t = min(m, n, r), the sign of s folded into U as on the CPU.
template <class C = double, class TB, class TA>
device_svd<C> factored_svd(context& ctx, const matrix_view<TB, device::cuda>& B, const matrix_view<TA, device::cuda>& A,
                           double s) {
  detail::check_solver_type<C>();
  constexpr const char* op = "deltaw::cuda::factored_svd";
  if (B.cols() != A.rows())
    throw shape_error(std::string(op) + ": B [m, r] and A [r, n] must share r; got B " +
                      detail::shape_str(B.rows(), B.cols()) + " and A " + detail::shape_str(A.rows(), A.cols()));
  if (!std::isfinite(s)) throw non_finite_error(std::string(op) + ": the scale must be finite");
  const index_t m = B.rows(), r = B.cols(), n = A.cols();
  const index_t tb = std::min(m, r), ta = std::min(n, r), t = std::min(tb, ta);
  device_svd<C> out;
  out.m = m;
  out.n = n;
  out.k = t;
  if (t == 0) return out;
  device_guard g(ctx.device());
  ctx.begin_operation();
  using B_ = std::remove_const_t<TB>;
  using A_ = std::remove_const_t<TA>;
  // Q_B·R_B = B and Q_A·R_A = Aᵀ, thin, column-major in scratch.
  const auto QB = detail::take_colmat<C>(ctx, m, r), QA = detail::take_colmat<C>(ctx, n, r);
  const auto RB = detail::take_colmat<C>(ctx, tb, r), RA = detail::take_colmat<C>(ctx, ta, r);
  copy(ctx, matrix_view<const B_, device::cuda>(B), QB.view());
  copy(ctx, matrix_view<const A_, device::cuda>(A).transpose(), QA.view());
  const auto Qb = detail::thin_qr(ctx, QB, &RB, op);
  const auto Qa = detail::thin_qr(ctx, QA, &RA, op);
  const auto core = detail::take_colmat<C>(ctx, tb, ta);  // R_B·R_Aᵀ
  gemm(ctx, core.view(), RB.cview(), RA.cview().transpose(), 1.0, 0.0, op);
  const auto sv = detail::thin_svd<C>(ctx, core.cview(), op);
  out.U = buffer<C>(std::size_t(m * t));
  out.S = buffer<C>(std::size_t(t));
  out.V = buffer<C>(std::size_t(n * t));
  gemm(ctx, device_view<C>(out.U.data(), m, t, 1, m), Qb.cview(), sv.U.cview(), s < 0 ? -1.0 : 1.0, 0.0, op);
  gemm(ctx, device_view<C>(out.V.data(), n, t, 1, n), Qa.cview(), sv.V.cview(), 1.0, 0.0, op);
  const device_view<C> So(out.S.data(), t, 1, 1, t);
  copy(ctx, device_view<const C>(sv.S, t, 1, 1, t), So);
  scale(ctx, So, C(std::abs(s)));
  return out;
}

/// The SVD of a device LoRA's ΔW = s·B·A, from its factors.
template <class C = double, class T>
device_svd<C> factored_svd(context& ctx, const low_rank<T, device::cuda>& u) {
  return factored_svd<C>(ctx, u.B(), u.A(), u.scale());
}

/// The singular values of s·B·A (non-increasing) on the host, without the dense matrix.
template <class C = double, class TB, class TA>
Eigen::Matrix<C, Eigen::Dynamic, 1> factored_spectrum(context& ctx, const matrix_view<TB, device::cuda>& B,
                                                      const matrix_view<TA, device::cuda>& A, double s) {
  const device_svd<C> f = factored_svd<C>(ctx, B, A, s);
  Eigen::Matrix<C, Eigen::Dynamic, 1> v(f.k);
  if (f.k > 0) f.S.download(v.data(), std::size_t(f.k));
  return v;
}
template <class C = double, class T>
Eigen::Matrix<C, Eigen::Dynamic, 1> factored_spectrum(context& ctx, const low_rank<T, device::cuda>& u) {
  return factored_spectrum<C>(ctx, u.B(), u.A(), u.scale());
}

namespace detail {

/// X ← the weight `e` (a device view, or a sum W + ΔW… over device views) in double,
/// X = e when !transposed, else eᵀ (X column-major).
template <class E>
void dense_weight_into(context& ctx, const E& e, const device_view<double>& X, bool transposed) {
  constexpr const char* op = "deltaw::cuda::intruder_dimensions";
  const auto oriented = [&](const auto& v) { return transposed ? v.transpose() : v; };
  if constexpr (is_matrix_view_v<E>) {
    using T = std::remove_const_t<typename E::element_type>;
    copy(ctx, oriented(matrix_view<const T, device::cuda>(e)), X);
  } else if constexpr (is_cuda_low_rank<E>::value) {
    // X += s·B·A (or its transpose s·Aᵀ·Bᵀ).
    if (transposed) gemm(ctx, X, e.A().transpose(), e.B().transpose(), e.scale(), 1.0, op);
    else gemm(ctx, X, e.B(), e.A(), e.scale(), 1.0, op);
  } else if constexpr (update<E>) {
    // Another update type: materialised into a second dense block, then added.
    const auto mark = ctx.position();
    const auto D = take_colmat<double>(ctx, X.rows(), X.cols());
    evaluator<E>::template materialize<double>(ctx, e, oriented(D.view()));
    axpy(ctx, 1.0, D.cview(), X);
    ctx.release(mark);
  } else {
    dense_weight_into(ctx, e.base(), X, transposed);
    std::apply([&](const auto&... u) { (dense_weight_into(ctx, u, X, transposed), ...); }, e.deltas());
  }
}

/// The left singular vectors of the weight e [out, in] (all t = min(out, in) of them) as a
/// device view [out, t], and its singular values in S [t]. Work: X, a colmat of out·in doubles.
template <class E>
device_view<const double> left_vectors(context& ctx, const E& e, const colmat<double>& X, double* U, double* VT,
                                       double* S, const char* op) {
  const index_t out = e.rows(), in = e.cols(), t = std::min(out, in);
  const bool tall = out >= in;  // X = W (tall) or Wᵀ, so that gesvd sees rows ≥ columns
  dense_weight_into(ctx, e, X.view(), !tall);
  // W = U·S·Vᵀ. Tall: gesvd's U [out, t]. Wide: X = Wᵀ = V·S·Uᵀ, so W's U = VTᵀ [out, out].
  gesvd_tall(ctx, X, tall, !tall, U, S, VT, op);
  if (tall) return {U, out, t, 1, out};
  return device_view<const double>(VT, t, t, 1, t).transpose();
}

}  // namespace detail

/// Intruder dimensions of a device-resident fine-tuned weight relative to W0 (a device
/// view [out, in]). `finetuned`: a device view or a CUDA expression such as
/// `W0 + lora(B, A, …)` over device views. Same definition and report as
/// deltaw::intruder_dimensions; dense (see the file's comment).
template <class TW, class X1>
  requires cuda_expression<X1>
intruder_report intruder_dimensions(context& ctx, const matrix_view<TW, device::cuda>& W0, const X1& finetuned,
                                    const intruder_options& opt = {}) {
  constexpr const char* op = "deltaw::cuda::intruder_dimensions";
  const index_t out = W0.rows(), in = W0.cols(), t = std::min(out, in);
  if (finetuned.rows() != out || finetuned.cols() != in)
    throw shape_error(std::string(op) + ": W0 is " + detail::shape_str(out, in) + " but the fine-tuned weight is " +
                      detail::shape_str(finetuned.rows(), finetuned.cols()));
  if (opt.k < 1 || opt.k > t)
    throw rank_error(std::string(op) + ": k must be in [1, min(out, in)] = [1, " + std::to_string(t) + "] for W " +
                     detail::shape_str(out, in) + "; got k = " + std::to_string(opt.k));
  device_guard g(ctx.device());
  ctx.begin_operation();
  const bool tall = out >= in;
  const auto X = detail::take_colmat<double>(ctx, tall ? out : in, t);
  double* U0 = ctx.allocate<double>(std::size_t(out * t));
  double* U1 = ctx.allocate<double>(std::size_t(out * t));
  double* VT = ctx.allocate<double>(std::size_t(t * t));
  double* S0 = ctx.allocate<double>(std::size_t(t));
  double* S1 = ctx.allocate<double>(std::size_t(t));
  // W0's vectors first (into U0, or VT then copied out of the way), then the fine-tuned
  // weight's into U1 (or VT), reusing X.
  device_view<const double> u0 = detail::left_vectors(ctx, matrix_view<const std::remove_const_t<TW>, device::cuda>(W0),
                                                      X, U0, VT, S0, op);
  if (!tall) {
    copy(ctx, u0, device_view<double>(U0, out, t, 1, out));
    u0 = device_view<const double>(U0, out, t, 1, out);
  }
  const device_view<const double> u1 = detail::left_vectors(ctx, finetuned, X, U1, VT, S1, op);
  const auto overlap = detail::take_colmat<double>(ctx, t, opt.k);  // U0ᵀ·U1[:, :k]
  gemm(ctx, overlap.view(), u0.transpose(), u1.middle_cols(0, opt.k), 1.0, 0.0, op);
  std::vector<double> h(std::size_t(t * opt.k)), s1(std::size_t(opt.k));
  DELTAW_CUDA_CHECK(cudaMemcpyAsync(h.data(), overlap.p, h.size() * sizeof(double), cudaMemcpyDeviceToHost, ctx.stream()));
  DELTAW_CUDA_CHECK(cudaMemcpyAsync(s1.data(), S1, s1.size() * sizeof(double), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  intruder_report rep;
  rep.similarity.resize(opt.k);
  rep.singular_values.resize(opt.k);
  for (index_t j = 0; j < opt.k; ++j) {
    double best = 0.0;
    for (index_t i = 0; i < t; ++i) best = std::max(best, std::abs(h[std::size_t(j * t + i)]));
    rep.similarity(j) = best;
    rep.singular_values(j) = s1[std::size_t(j)];
    if (best < opt.epsilon) rep.intruders.push_back(j);
  }
  return rep;
}

}  // namespace cuda
DELTAW_NAMESPACE_END
