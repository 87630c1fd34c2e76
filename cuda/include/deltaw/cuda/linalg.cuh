// SPDX-License-Identifier: MIT
// Dense linear algebra on the device over cuSOLVER (Householder QR: <t>geqrf + <t>orgqr;
// SVD: <t>gesvd), and the randomized SVD of a device-resident expression.
//
// deltaw::cuda::randomized_svd(ctx, e, k, opt) is deltaw::randomized_svd
// (deltaw/linalg/randomized_svd.hpp: Halko, Martinsson, Tropp 2011, Alg. 4.4 with
// re-orthonormalised power iterations) step for step: the same Gaussian test matrix Ω (the
// same Philox stream, key and element order), the same sketch layout (Yᵀ [l, m] row-major,
// which is the column-major Y that geqrf factors in place), the same Householder convention
// (LAPACK's and Eigen's: R's diagonal has the sign opposite to the column's leading entry),
// so Q and the spectrum agree with the CPU's to rounding. e is a device matrix view, a
// device update (LoRA: two products through an l × r scratch; other types through their
// shared evaluator) or a lazy sum W + ΔW…: it is applied, never materialised, and the
// scratch is O((m + n)·(k + p)) plus cuSOLVER's workspace.
//
// Ω is drawn on the host and copied (n·l values): random_stream::normal goes through
// log/cos/sin, whose last-ulp rounding differs between libm and CUDA's math library, and a
// different Ω would change the result beyond rounding. The singular vectors' signs are
// cuSOLVER's: each pair (u_j, v_j) equals the CPU's up to one common sign.
//
// Not included by deltaw/cuda/cuda.hpp (it pulls in Eigen's SVD): include it where needed.
#pragma once

#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <deltaw/linalg/randomized_svd.hpp>

#include "buffer.cuh"
#include "context.cuh"
#include "elementwise.cuh"
#include "error.cuh"
#include "gemm.cuh"
#include "low_rank.cuh"
#include "ops.cuh"
#include "updates.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

/// A truncated SVD held on the device: U [m, k] and V [n, k] column-major with orthonormal
/// columns, S [k] non-increasing and non-negative.
template <class C>
struct device_svd {
  index_t m = 0, n = 0, k = 0;
  buffer<C> U, S, V;

  device_view<const C> u() const { return {U.data(), m, k, 1, std::max<index_t>(1, m)}; }
  device_view<const C> v() const { return {V.data(), n, k, 1, std::max<index_t>(1, n)}; }
  vector_view<const C, device::cuda> s() const { return {S.data(), k}; }

  /// A host copy (synchronises through cudaMemcpy).
  svd_result<C> to_host() const {
    svd_result<C> r;
    r.U.resize(m, k);
    r.V.resize(n, k);
    r.S.resize(k);
    if (m * k > 0) U.download(r.U.data(), std::size_t(m * k));
    if (n * k > 0) V.download(r.V.data(), std::size_t(n * k));
    if (k > 0) S.download(r.S.data(), std::size_t(k));
    return r;
  }
};

namespace detail {

/// A column-major rows × cols matrix in the context's scratch (leading dimension max(1, rows)).
template <class C>
struct colmat {
  C* p = nullptr;
  index_t rows = 0, cols = 0;
  index_t ld() const { return std::max<index_t>(1, rows); }
  device_view<C> view() const { return {p, rows, cols, 1, ld()}; }
  device_view<const C> cview() const { return {p, rows, cols, 1, ld()}; }
};

template <class C>
colmat<C> take_colmat(const context& ctx, index_t rows, index_t cols) {
  return {rows * cols > 0 ? ctx.allocate<C>(std::size_t(rows * cols)) : nullptr, rows, cols};
}

template <class C>
constexpr void check_solver_type() {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda linear algebra: the arithmetic type is float or double");
}

/// Householder QR in place: A = Q·R with the reflectors below A's diagonal and their
/// scalars in tau [min(m, n)] (cusolverDn<t>geqrf).
template <class C>
void geqrf(context& ctx, const colmat<C>& A, C* tau, const char* op) {
  check_solver_type<C>();
  if (A.rows == 0 || A.cols == 0) return;
  const int m = to_int(A.rows, "a dimension", op), n = to_int(A.cols, "a dimension", op),
            lda = to_int(A.ld(), "a leading dimension", op);
  cusolverDnHandle_t h = ctx.cusolver();
  int lwork = 0;
  if constexpr (std::is_same_v<C, float>) DELTAW_CUDA_CHECK(cusolverDnSgeqrf_bufferSize(h, m, n, A.p, lda, &lwork));
  else DELTAW_CUDA_CHECK(cusolverDnDgeqrf_bufferSize(h, m, n, A.p, lda, &lwork));
  C* work = ctx.allocate<C>(std::size_t(std::max(1, lwork)));
  int* info = ctx.allocate<int>(1);  // only negative for a wrong argument, which the checks above exclude
  if constexpr (std::is_same_v<C, float>) DELTAW_CUDA_CHECK(cusolverDnSgeqrf(h, m, n, A.p, lda, tau, work, lwork, info));
  else DELTAW_CUDA_CHECK(cusolverDnDgeqrf(h, m, n, A.p, lda, tau, work, lwork, info));
}

/// The first n columns of Q from geqrf's first k reflectors, in place (cusolverDn<t>orgqr).
template <class C>
void orgqr(context& ctx, C* A, index_t rows, index_t lda_, index_t n_, index_t k_, const C* tau, const char* op) {
  if (rows == 0 || n_ == 0) return;
  const int m = to_int(rows, "a dimension", op), n = to_int(n_, "a dimension", op), k = to_int(k_, "a dimension", op),
            lda = to_int(lda_, "a leading dimension", op);
  cusolverDnHandle_t h = ctx.cusolver();
  int lwork = 0;
  if constexpr (std::is_same_v<C, float>) DELTAW_CUDA_CHECK(cusolverDnSorgqr_bufferSize(h, m, n, k, A, lda, tau, &lwork));
  else DELTAW_CUDA_CHECK(cusolverDnDorgqr_bufferSize(h, m, n, k, A, lda, tau, &lwork));
  C* work = ctx.allocate<C>(std::size_t(std::max(1, lwork)));
  int* info = ctx.allocate<int>(1);
  if constexpr (std::is_same_v<C, float>) DELTAW_CUDA_CHECK(cusolverDnSorgqr(h, m, n, k, A, lda, tau, work, lwork, info));
  else DELTAW_CUDA_CHECK(cusolverDnDorgqr(h, m, n, k, A, lda, tau, work, lwork, info));
}

/// R(i, j) = A(i, j) on and above the diagonal, 0 below.
template <class C>
struct upper_part {
  device_view<const C> A;
  DELTAW_HOST_DEVICE C operator()(index_t i, index_t j, C) const { return j >= i ? A(i, j) : C(0); }
};

/// Thin QR of A [m, n] in place: on return A's first t = min(m, n) columns hold Q (the
/// returned colmat views them), and R [t, n] (upper trapezoidal) is written when given.
template <class C>
colmat<C> thin_qr(context& ctx, const colmat<C>& A, const colmat<C>* R, const char* op) {
  const index_t t = std::min(A.rows, A.cols);
  if (t == 0) {
    if (R && R->rows * R->cols > 0) fill(ctx, R->view(), C(0));
    return {A.p, A.rows, 0};
  }
  const auto mark = ctx.position();
  C* tau = ctx.allocate<C>(std::size_t(t));
  geqrf(ctx, A, tau, op);
  if (R) transform(ctx, R->view(), upper_part<C>{A.cview().middle_rows(0, t)});
  orgqr(ctx, A.p, A.rows, A.ld(), t, t, tau, op);
  ctx.release(mark);  // stream order: the workspace is reused only by later work
  return {A.p, A.rows, t};
}

/// The SVD of a tall column-major A [p, q] (p ≥ q; A is destroyed) by cusolverDn<t>gesvd:
/// U [p, q] (when want_u), S [q], VT [q, q] (when want_vt). Synchronises to read devInfo:
/// a failure to converge throws cuda_error.
template <class C>
void gesvd_tall(context& ctx, const colmat<C>& A, bool want_u, bool want_vt, C* U, C* S, C* VT, const char* op) {
  check_solver_type<C>();
  const int p = to_int(A.rows, "a dimension", op), q = to_int(A.cols, "a dimension", op),
            lda = to_int(A.ld(), "a leading dimension", op);
  if (q == 0) return;
  cusolverDnHandle_t h = ctx.cusolver();
  int lwork = 0;
  if constexpr (std::is_same_v<C, float>) DELTAW_CUDA_CHECK(cusolverDnSgesvd_bufferSize(h, p, q, &lwork));
  else DELTAW_CUDA_CHECK(cusolverDnDgesvd_bufferSize(h, p, q, &lwork));
  const auto mark = ctx.position();
  C* work = ctx.allocate<C>(std::size_t(std::max(1, lwork)));
  int* info = ctx.allocate<int>(1);
  const signed char ju = want_u ? 'S' : 'N', jv = want_vt ? 'S' : 'N';
  if constexpr (std::is_same_v<C, float>)
    DELTAW_CUDA_CHECK(cusolverDnSgesvd(h, ju, jv, p, q, A.p, lda, S, U, lda, VT, q, work, lwork, nullptr, info));
  else
    DELTAW_CUDA_CHECK(cusolverDnDgesvd(h, ju, jv, p, q, A.p, lda, S, U, lda, VT, q, work, lwork, nullptr, info));
  int status = 0;
  DELTAW_CUDA_CHECK(cudaMemcpyAsync(&status, info, sizeof(int), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  ctx.release(mark);
  if (status != 0)
    throw cuda_error(std::string(op) + ": cusolverDn<t>gesvd of a " + shape_str(A.rows, A.cols) +
                         " matrix did not converge (devInfo = " + std::to_string(status) + ")",
                     status);
}

/// The thin SVD of a device matrix M [p, q] (any layout with a unit stride, any
/// storage type, computed in C): U [p, t], S [t], V [q, t] in scratch, t = min(p, q).
template <class C>
struct thin_svd_result {
  colmat<C> U, V;
  C* S = nullptr;
  index_t t = 0;
};

template <class C, class TM>
thin_svd_result<C> thin_svd(context& ctx, const device_view<TM>& M, const char* op) {
  const index_t p = M.rows(), q = M.cols(), t = std::min(p, q);
  thin_svd_result<C> out;
  out.t = t;
  const bool tall = p >= q;
  // X = M (tall) or Mᵀ, column-major [a, t]; gesvd gives X = Ux·S·VTx.
  const index_t a = tall ? p : q;
  const colmat<C> X = take_colmat<C>(ctx, a, t);
  const colmat<C> Ux = take_colmat<C>(ctx, a, t), VTx = take_colmat<C>(ctx, t, t);
  out.S = t > 0 ? ctx.allocate<C>(std::size_t(t)) : nullptr;
  if (t == 0) {
    out.U = {nullptr, p, 0};
    out.V = {nullptr, q, 0};
    return out;
  }
  if (tall) copy(ctx, device_view<const TM>(M), X.view());
  else copy(ctx, device_view<const TM>(M).transpose(), X.view());
  gesvd_tall(ctx, X, true, true, Ux.p, out.S, VTx.p, op);
  // The transpose of VTx, column-major [t, t], reusing X's memory (X is spent).
  const colmat<C> Vx{X.p, t, t};
  copy(ctx, VTx.cview().transpose(), Vx.view());
  // M = Ux·S·Vxᵀ when tall; else M = Xᵀ = Vx·S·Uxᵀ.
  out.U = tall ? Ux : Vx;
  out.V = tall ? Vx : Ux;
  return out;
}

// ---- the linear operator of an expression: M·X and Mᵀ·Y in deltaw's row-major layout ----

template <class E>
struct is_cuda_low_rank : std::false_type {};
template <class T>
struct is_cuda_low_rank<low_rank<T, device::cuda>> : std::true_type {};

/// O = β·O + G·M for a device expression M [m, n], G [g, m], O [g, n] (the transposed
/// application; a LoRA goes through an g × r scratch, other updates through their shared
/// evaluator).
template <class C, class E>
void apply_transposed_expr(context& ctx, const E& e, const device_view<const C>& G, const device_view<C>& O,
                           double beta) {
  constexpr const char* op = "deltaw::cuda::randomized_svd (Mᵀ·Q)";
  if constexpr (is_matrix_view_v<E>) {
    gemm(ctx, O, G, e, 1.0, beta, op);
  } else if constexpr (is_cuda_low_rank<E>::value) {
    const auto mark = ctx.position();
    const colmat<C> T = take_colmat<C>(ctx, G.rows(), e.rank());
    gemm(ctx, T.view(), G, e.B(), 1.0, 0.0, op);
    gemm(ctx, O, T.cview(), e.A(), e.scale(), beta, op);
    ctx.release(mark);
  } else if constexpr (update<E>) {
    evaluator<E>::template apply_transposed<C, C>(ctx, e, G, O, beta);
  } else {
    gemm(ctx, O, G, e.base(), 1.0, beta, op);
    std::apply([&](const auto&... u) { (apply_transposed_expr<C>(ctx, u, G, O, 1.0), ...); }, e.deltas());
  }
}

/// Ω [n, l] column-major (= Ωᵀ [l, n] row-major), drawn on the host exactly as
/// deltaw::randomized_svd draws it and copied into dst.
template <class C>
void upload_gaussian_sketch(const context& ctx, std::uint64_t seed, index_t l, index_t n, C* dst) {
  const random_stream rng{seed, 0x72737664u /* "rsvd", as on the CPU */};
  std::vector<C> h(std::size_t(l * n));
  for (index_t i = 0; i < l; ++i)
    for (index_t j = 0; j < n; ++j)
      h[std::size_t(i * n + j)] = C(rng.normal(std::uint64_t(i) * std::uint64_t(n) + std::uint64_t(j)));
  if (!h.empty())
    DELTAW_CUDA_CHECK(cudaMemcpyAsync(dst, h.data(), h.size() * sizeof(C), cudaMemcpyHostToDevice, ctx.stream()));
  ctx.synchronize();  // h is pageable host memory that dies here
}

/// Y ← orthonormal basis of its columns, in place (Y column-major [rows, l], rows ≥ l).
template <class C>
void orthonormalise(context& ctx, C* Y, index_t rows, index_t l, const char* op) {
  thin_qr<C>(ctx, colmat<C>{Y, rows, l}, nullptr, op);
}

}  // namespace detail

/// The top-k SVD of a device expression (a weight view, an update, or `W + Δ…` over CUDA
/// views) by the randomized range finder with q power iterations, the expression only
/// applied. Arithmetic in C (by default the expression's own). Same algorithm, test matrix
/// and Householder convention as deltaw::randomized_svd. The result stays on the device.
template <class C = void, class E>
  requires cuda_expression<E>
device_svd<::deltaw::detail::rsvd_compute_t<C, E>> randomized_svd(context& ctx, const E& e, index_t k,
                                                                  const rsvd_options& opt = {}) {
  using CC = ::deltaw::detail::rsvd_compute_t<C, E>;
  detail::check_solver_type<CC>();
  constexpr const char* op = "deltaw::cuda::randomized_svd";
  const index_t m = e.rows(), n = e.cols();
  ::deltaw::detail::check_truncation(k, m, n, op);
  if (opt.oversampling < 0 || opt.power_iterations < 0)
    throw argument_error(std::string(op) + ": oversampling and power_iterations must be non-negative; got p = " +
                         std::to_string(opt.oversampling) + ", q = " + std::to_string(opt.power_iterations));
  const index_t l = std::min<index_t>(k + opt.oversampling, std::min(m, n));
  device_guard g(ctx.device());
  ctx.begin_operation();
  // Yᵀ [l, m] and Zᵀ [l, n] row-major: the column-major Y [m, l] and Z [n, l] of the factorisations.
  CC* Y = ctx.allocate<CC>(std::size_t(m * l));
  CC* Z = ctx.allocate<CC>(std::size_t(n * l));
  const device_view<CC> Yt(Y, l, m), Zt(Z, l, n);
  detail::upload_gaussian_sketch<CC>(ctx, opt.seed, l, n, Z);  // Ωᵀ in Z's memory
  detail::apply_expr<CC, E, CC>(ctx, e, device_view<const CC>(Zt), Yt);  // (M·Ω)ᵀ
  detail::orthonormalise(ctx, Y, m, l, op);
  for (index_t it = 0; it < opt.power_iterations; ++it) {
    detail::apply_transposed_expr<CC>(ctx, e, device_view<const CC>(Yt), Zt, 0.0);  // (Mᵀ·Q)ᵀ
    detail::orthonormalise(ctx, Z, n, l, op);
    detail::apply_expr<CC, E, CC>(ctx, e, device_view<const CC>(Zt), Yt);  // (M·Z)ᵀ
    detail::orthonormalise(ctx, Y, m, l, op);
  }
  // B = Qᵀ·M [l, n] is Zᵀ; Z = Bᵀ [n, l] is tall: Bᵀ = U'·Σ·VT' gives B = VT'ᵀ·Σ·U'ᵀ,
  // so M ≈ (Q·VT'ᵀ)·Σ·U'ᵀ.
  detail::apply_transposed_expr<CC>(ctx, e, device_view<const CC>(Yt), Zt, 0.0);
  CC* Up = ctx.allocate<CC>(std::size_t(n * l));
  CC* VTp = ctx.allocate<CC>(std::size_t(l * l));
  CC* Sp = ctx.allocate<CC>(std::size_t(l));
  detail::gesvd_tall(ctx, detail::colmat<CC>{Z, n, l}, true, true, Up, Sp, VTp, op);
  device_svd<CC> out;
  out.m = m;
  out.n = n;
  out.k = k;
  out.U = buffer<CC>(std::size_t(m * k));
  out.S = buffer<CC>(std::size_t(k));
  out.V = buffer<CC>(std::size_t(n * k));
  const device_view<CC> Uo(out.U.data(), m, k, 1, m);
  // U = Q·(VT'ᵀ)[:, :k] = Q·(VT'[:k, :])ᵀ.
  const device_view<const CC> VTk(VTp, k, l, 1, l);
  gemm(ctx, Uo, device_view<const CC>(Y, m, l, 1, m), VTk.transpose(), 1.0, 0.0, op);
  DELTAW_CUDA_CHECK(cudaMemcpyAsync(out.V.data(), Up, std::size_t(n * k) * sizeof(CC), cudaMemcpyDeviceToDevice,
                                    ctx.stream()));
  DELTAW_CUDA_CHECK(cudaMemcpyAsync(out.S.data(), Sp, std::size_t(k) * sizeof(CC), cudaMemcpyDeviceToDevice,
                                    ctx.stream()));
  return out;
}

/// With the calling thread's default context.
template <class C = void, class E>
  requires cuda_expression<E>
device_svd<::deltaw::detail::rsvd_compute_t<C, E>> randomized_svd(const E& e, index_t k, const rsvd_options& opt = {}) {
  return randomized_svd<C>(default_context(), e, k, opt);
}

}  // namespace cuda
DELTAW_NAMESPACE_END
