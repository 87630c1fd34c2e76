// SPDX-License-Identifier: MIT
// Weight-rewriting LoRA initialisations of a device-resident weight (deltaw/init/ is the
// CPU side): PiSSA and OLoRA. W is a writable float or double device view [out, in] with a
// unit stride; it is rewritten in place into W − s·B·A, computed in double (or, for PiSSA
// with weight_type_arithmetic, in W's type) from the factors as stored, row panel by row
// panel as on the CPU. The factors come back on the device (row-major B [out, r], A [r, in]).
//
//   pissa(ctx, W, r, s, opt)  exact (opt.power_iterations < 0): the thin SVD of W by
//       cusolverDn<t>gesvd, a dense factorisation as on the CPU (scratch: W in double, out·in,
//       and its vectors); randomized (N ≥ 0): cuda::randomized_svd of the view, the same
//       sketch as the CPU's (scratch O((out + in)·(r + p)); a float W with double arithmetic
//       is converted by gemm.cuh's panels of 2²⁴ entries per product).
//       Sign convention: each pair (B[:, j], A[j, :]) equals the CPU's up to one common sign
//       (the SVD's), so s·B·A and W_res are the CPU's to rounding.
//   olora(ctx, W, r, s)  Q·R of W's first r columns (cusolverDn<t>geqrf + <t>orgqr) gives
//       B = Q and A[:, :r] = R; A[:, r:] = Qᵀ·W[:, r:], equal to the CPU's full-QR rows of R
//       in exact arithmetic (the first r Householder reflectors depend on the first r columns
//       only). Same Householder convention as Eigen's, so B and A equal the CPU's to rounding,
//       with no sign freedom. Scratch: (out + in)·r doubles plus one row panel of W in
//       double of at most 64 K entries (so W is copied whole only when it is that small).
//
// Not included by deltaw/cuda/cuda.hpp.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>

#include <deltaw/init/factors.hpp>
#include <deltaw/init/pissa.hpp>

#include "linalg.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

/// LoRA factors held on the device: B [out, r] and A [r, in] row-major, ΔW = s·B·A.
template <class T>
struct device_lora_factors {
  index_t out = 0, in = 0, r = 0;
  double s = 1.0;
  buffer<T> B, A;

  device_view<const T> b() const { return {B.data(), out, r}; }
  device_view<const T> a() const { return {A.data(), r, in}; }
  device_view<T> b() { return {B.data(), out, r}; }
  device_view<T> a() { return {A.data(), r, in}; }
  /// The update over these factors (it views B and A: keep this object alive).
  auto adapter() const { return ::deltaw::lora(b(), a(), ::deltaw::scale(s)); }
  /// A host copy (synchronises through cudaMemcpy).
  lora_factors<T> to_host() const {
    lora_factors<T> f;
    f.s = s;
    f.B.resize(out, r);
    f.A.resize(r, in);
    if (out * r > 0) B.download(f.B.data(), std::size_t(out * r));
    if (r * in > 0) A.download(f.A.data(), std::size_t(r * in));
    return f;
  }
};

namespace detail {

template <class C>
DELTAW_HOST_DEVICE C sqrt_rn(C x) {
  if constexpr (std::is_same_v<C, float>) return ::sqrtf(x);
  else return ::sqrt(x);
}

/// B(i, j) = U(i, j)·√(S[j]/s), rounded to T (the CPU's order: √ in C, product in C).
template <class C, class T>
struct pissa_left {
  device_view<const C> U;
  const C* S;
  C s;
  DELTAW_HOST_DEVICE T operator()(index_t i, index_t j, T) const { return convert<T>(U(i, j) * sqrt_rn<C>(S[j] / s)); }
};
/// A(i, j) = √(S[i]/s)·V(j, i), rounded to T.
template <class C, class T>
struct pissa_right {
  device_view<const C> V;
  const C* S;
  C s;
  DELTAW_HOST_DEVICE T operator()(index_t i, index_t j, T) const { return convert<T>(sqrt_rn<C>(S[i] / s) * V(j, i)); }
};

/// W ← W − s·B·A in arithmetic C, from the factors as stored: one GEMM into W when C is
/// W's type, else by row panels of about 64 K entries converted to C and back (one rounding
/// of each entry of W, as on the CPU).
template <class C, class T>
void subtract_scaled_product(context& ctx, const device_view<T>& W, const device_view<const T>& B,
                             const device_view<const T>& A, double s, const char* op) {
  if (W.rows() == 0 || W.cols() == 0) return;
  if constexpr (std::is_same_v<C, T>) {
    gemm(ctx, W, B, A, -s, 1.0, op);
  } else {
    const index_t step = std::max<index_t>(1, (index_t(1) << 16) / std::max<index_t>(1, W.cols()));
    for (index_t r0 = 0; r0 < W.rows(); r0 += step) {
      const index_t nr = std::min(step, W.rows() - r0);
      const auto mark = ctx.position();
      const auto P = take_colmat<C>(ctx, nr, W.cols());
      copy(ctx, device_view<const T>(W.middle_rows(r0, nr)), P.view());
      gemm(ctx, P.view(), B.middle_rows(r0, nr), A, -s, 1.0, op);
      copy(ctx, P.cview(), W.middle_rows(r0, nr));
      ctx.release(mark);
    }
  }
}

template <class T>
void check_weight_view(const device_view<T>& W, const char* op) {
  static_assert(!std::is_const_v<T>, "deltaw::cuda initialisations rewrite W in place: pass a writable device view");
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "deltaw::cuda initialisations: W must be float or double");
  check_unit_stride(W, "W", op);
}

/// The factors of PiSSA from a device SVD of W (k ≥ r columns), then W's rewrite.
template <class C, class T>
device_lora_factors<T> pissa_finish(context& ctx, const device_view<T>& W, const device_view<const C>& U,
                                    const device_view<const C>& V, const C* S, index_t r, double s, const char* op) {
  device_lora_factors<T> f;
  f.out = W.rows();
  f.in = W.cols();
  f.r = r;
  f.s = s;
  f.B = buffer<T>(std::size_t(f.out * r));
  f.A = buffer<T>(std::size_t(r * f.in));
  transform(ctx, f.b(), pissa_left<C, T>{U, S, C(s)});
  transform(ctx, f.a(), pissa_right<C, T>{V, S, C(s)});
  subtract_scaled_product<C>(ctx, W, std::as_const(f).b(), std::as_const(f).a(), s, op);
  return f;
}

}  // namespace detail

/// PiSSA of rank r and scale s > 0 from the device weight W [out, in], rewriting W into
/// W_res in place; same options and arithmetic as deltaw::pissa.
template <class T>
device_lora_factors<T> pissa(context& ctx, const matrix_view<T, device::cuda>& W, index_t r, double s,
                             const pissa_options& opt = {}) {
  constexpr const char* op = "deltaw::cuda::pissa";
  detail::check_weight_view(W, op);
  ::deltaw::detail::check_init_rank(r, W.rows(), W.cols(), op);
  if (!(std::isfinite(s) && s > 0.0))
    throw argument_error(std::string(op) + ": the scale s must be finite and positive (A and B take √(S/s)); got " +
                         std::to_string(s));
  const device_view<const T> Wc(W);
  const rsvd_options ro{.oversampling = opt.oversampling, .power_iterations = opt.power_iterations, .seed = opt.seed};
  const auto from = [&]<class C>(const device_svd<C>& svd) {
    device_guard g(ctx.device());
    ctx.begin_operation();
    return detail::pissa_finish<C>(ctx, W, svd.u(), svd.v(), svd.S.data(), r, s, op);
  };
  if (opt.power_iterations >= 0) {
    if (opt.weight_type_arithmetic) return from(randomized_svd<T>(ctx, Wc, r, ro));
    return from(randomized_svd<double>(ctx, Wc, r, ro));
  }
  // Exact: the thin SVD of W in double, in scratch; the first r vectors are used in place.
  device_guard g(ctx.device());
  ctx.begin_operation();
  const auto sv = detail::thin_svd<double>(ctx, Wc, op);
  return detail::pissa_finish<double>(ctx, W, sv.U.cview().middle_cols(0, r), sv.V.cview().middle_cols(0, r), sv.S, r,
                                      s, op);
}

/// OLoRA of rank r and scale s from the device weight W [out, in], rewriting W into
/// W − s·B·A in place; computed in double as deltaw::olora.
template <class T>
device_lora_factors<T> olora(context& ctx, const matrix_view<T, device::cuda>& W, index_t r, double s) {
  constexpr const char* op = "deltaw::cuda::olora";
  detail::check_weight_view(W, op);
  ::deltaw::detail::check_init_rank(r, W.rows(), W.cols(), op);
  if (!std::isfinite(s)) throw non_finite_error(std::string(op) + ": the scale s must be finite");
  const index_t out = W.rows(), in = W.cols();
  device_guard g(ctx.device());
  ctx.begin_operation();
  const device_view<const T> Wc(W);
  // Q·R = W[:, :r] (out ≥ r): Q in X, R [r, r] upper triangular.
  const auto X = detail::take_colmat<double>(ctx, out, r), R = detail::take_colmat<double>(ctx, r, r);
  copy(ctx, Wc.middle_cols(0, r), X.view());
  const auto Q = detail::thin_qr(ctx, X, &R, op);
  // A = [R, Qᵀ·W[:, r:]], the second block accumulated over row panels of W in double.
  const auto Ad = detail::take_colmat<double>(ctx, r, in);
  copy(ctx, R.cview(), Ad.view().middle_cols(0, r));
  if (in > r) {
    const auto Aright = Ad.view().middle_cols(r, in - r);
    const index_t step = std::max<index_t>(1, (index_t(1) << 16) / (in - r));
    for (index_t r0 = 0; r0 < out; r0 += step) {
      const index_t nr = std::min(step, out - r0);
      const auto mark = ctx.position();
      const auto P = detail::take_colmat<double>(ctx, nr, in - r);
      copy(ctx, Wc.block(r0, r, nr, in - r), P.view());
      gemm(ctx, Aright, Q.cview().middle_rows(r0, nr).transpose(), P.cview(), 1.0, r0 == 0 ? 0.0 : 1.0, op);
      ctx.release(mark);
    }
  }
  device_lora_factors<T> f;
  f.out = out;
  f.in = in;
  f.r = r;
  f.s = s;
  f.B = buffer<T>(std::size_t(out * r));
  f.A = buffer<T>(std::size_t(r * in));
  copy(ctx, Q.cview(), f.b());
  copy(ctx, Ad.cview(), f.a());
  detail::subtract_scaled_product<double>(ctx, W, std::as_const(f).b(), std::as_const(f).a(), s, op);
  return f;
}

}  // namespace cuda
DELTAW_NAMESPACE_END
