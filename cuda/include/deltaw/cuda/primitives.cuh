// SPDX-License-Identifier: MIT
// The primitive layer on CUDA (deltaw/kernels/ is the CPU side, docs/design.md): GEMM with
// op flags and the strided batched GEMM over cuBLAS, plus the element-wise operations of
// elementwise.cuh over Thrust. Same names and argument order as the CPU primitives, with
// deltaw::cuda::context first, so that code written against the primitives finds these by
// argument-dependent lookup.
#pragma once

#include <cublas_v2.h>

#include <span>
#include <string>
#include <type_traits>

#include <deltaw/kernels/gemm.hpp>

#include "context.cuh"
#include "elementwise.cuh"
#include "error.cuh"
#include "gemm.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

namespace detail {

inline void check_gemm_shapes(index_t am, index_t ak, index_t bk, index_t bn, index_t cm, index_t cn, const char* op) {
  if (ak != bk || am != cm || bn != cn)
    throw shape_error(std::string(op) + ": op(A) is " + shape_str(am, ak) + ", op(B) is " + shape_str(bk, bn) +
                      " and C is " + shape_str(cm, cn) + "; C = op(A)·op(B) needs [m, k]·[k, n] = [m, n]");
}

/// True when cuBLAS can read v in place (as_blas_operand succeeds): a unit stride in one
/// dimension and non-overlapping lines.
template <class T>
bool blas_addressable(const device_view<T>& v) {
  const index_t r = v.rows(), c = v.cols();
  if (v.is_col_major() && (c <= 1 || v.col_stride() >= std::max<index_t>(1, r))) return true;
  if (v.is_row_major() && (r <= 1 || v.row_stride() >= std::max<index_t>(1, c))) return true;
  return false;
}

/// v itself when cuBLAS can read it, else a column-major copy in ctx's scratch.
template <class C>
device_view<const C> addressable(const context& ctx, const device_view<const C>& v) {
  if (blas_addressable(v)) return v;
  C* p = ctx.allocate<C>(std::size_t(v.rows() * v.cols()));
  const device_view<C> out(p, v.rows(), v.cols(), 1, std::max<index_t>(1, v.rows()));
  copy(ctx, v, out);
  return out;
}

/// Y = α·T + β·Y (Y unread when β = 0).
template <class C>
struct combine {
  C alpha, beta;
  DELTAW_HOST_DEVICE C operator()(C t, C y) const { return beta == C(0) ? alpha * t : alpha * t + beta * y; }
};

template <class C>
cublasStatus_t gemm_strided_batched_call(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const C* alpha, const C* A, int lda, long long sa, const C* B, int ldb,
                                         long long sb, const C* beta, C* Cp, int ldc, long long sc, int count) {
  if constexpr (std::is_same_v<C, float>)
    return cublasSgemmStridedBatched(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, Cp, ldc, sc, count);
  else
    return cublasDgemmStridedBatched(h, ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, Cp, ldc, sc, count);
}

}  // namespace detail

/// C = α·op(A)·op(B) + β·C on ctx's stream; any layouts (operands cuBLAS cannot address
/// are copied to scratch first, an output it cannot address is computed in scratch and
/// combined); C is not read when β = 0, as in BLAS.
template <class C>
void gemm(const context& ctx, std::type_identity_t<C> alpha, device_view<const C> A, kernels::op oa,
          device_view<const C> B, kernels::op ob, std::type_identity_t<C> beta, device_view<C> Cv) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "deltaw::cuda::gemm: float or double");
  constexpr const char* op = "deltaw::cuda::gemm";
  if (oa == kernels::op::trans) A = A.transpose();
  if (ob == kernels::op::trans) B = B.transpose();
  detail::check_gemm_shapes(A.rows(), A.cols(), B.rows(), B.cols(), Cv.rows(), Cv.cols(), op);
  if (Cv.rows() == 0 || Cv.cols() == 0) return;
  if (A.cols() == 0 || alpha == C(0)) return scale(ctx, Cv, beta);  // C = β·C, unread when β = 0
  const auto mark = ctx.position();
  const auto a = detail::addressable(ctx, A), b = detail::addressable(ctx, B);
  if (detail::blas_addressable(Cv)) {
    gemm(ctx, Cv, a, b, double(alpha), double(beta), op);
  } else {
    C* p = ctx.allocate<C>(std::size_t(Cv.rows() * Cv.cols()));
    const device_view<C> T(p, Cv.rows(), Cv.cols(), 1, Cv.rows());
    gemm(ctx, T, a, b, 1.0, 0.0, op);
    transform(ctx, device_view<const C>(T), Cv, detail::combine<C>{alpha, beta});
  }
  ctx.release(mark);
}

/// count independent products C_i = α·op(A_i)·op(B_i) + β·C_i, where A_i is A's view moved
/// by i·stride_a elements (likewise B, C; a stride of 0 repeats an operand): one
/// cublas<t>gemmStridedBatched call when cuBLAS can address the three views, else one
/// gemm per item.
template <class C>
void gemm_strided_batched(const context& ctx, std::type_identity_t<C> alpha, device_view<const C> A, index_t stride_a,
                          kernels::op oa, device_view<const C> B, index_t stride_b, kernels::op ob,
                          std::type_identity_t<C> beta, device_view<C> Cv, index_t stride_c, index_t count) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>,
                "deltaw::cuda::gemm_strided_batched: float or double");
  constexpr const char* op = "deltaw::cuda::gemm_strided_batched";
  if (count < 0) throw argument_error(std::string(op) + ": a negative batch count " + std::to_string(count));
  if (oa == kernels::op::trans) A = A.transpose();
  if (ob == kernels::op::trans) B = B.transpose();
  detail::check_gemm_shapes(A.rows(), A.cols(), B.rows(), B.cols(), Cv.rows(), Cv.cols(), op);
  if (count == 0 || Cv.rows() == 0 || Cv.cols() == 0) return;
  const bool direct = A.cols() > 0 && detail::blas_addressable(A) && detail::blas_addressable(B) &&
                      detail::blas_addressable(Cv) && count <= index_t(INT_MAX);
  if (!direct) {
    for (index_t i = 0; i < count; ++i)
      gemm<C>(ctx, alpha, device_view<const C>(A.data() + i * stride_a, A.rows(), A.cols(), A.row_stride(), A.col_stride()),
              kernels::op::none,
              device_view<const C>(B.data() + i * stride_b, B.rows(), B.cols(), B.row_stride(), B.col_stride()),
              kernels::op::none, beta,
              device_view<C>(Cv.data() + i * stride_c, Cv.rows(), Cv.cols(), Cv.row_stride(), Cv.col_stride()));
    return;
  }
  // cuBLAS is column-major: a row-major C is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ.
  const bool c_col = Cv.is_col_major() && (Cv.cols() <= 1 || Cv.col_stride() >= std::max<index_t>(1, Cv.rows()));
  const device_view<C> Cc = c_col ? Cv : Cv.transpose();
  const device_view<const C> P = c_col ? A : B.transpose(), Q = c_col ? B : A.transpose();
  const index_t sp = c_col ? stride_a : stride_b, sq = c_col ? stride_b : stride_a;
  const auto p = detail::as_blas_operand(P, op), q = detail::as_blas_operand(Q, op);
  const int ldc = detail::output_ld(Cc, op);
  const C a_ = alpha, b_ = beta;
  DELTAW_CUDA_CHECK(detail::gemm_strided_batched_call<C>(
      ctx.cublas(), p.op, q.op, detail::to_int(Cc.rows(), "a dimension", op), detail::to_int(Cc.cols(), "a dimension", op),
      detail::to_int(P.cols(), "a dimension", op), &a_, static_cast<const C*>(p.ptr), p.ld, sp,
      static_cast<const C*>(q.ptr), q.ld, sq, &b_, Cc.data(), ldc, stride_c, int(count)));
}

/// Independent GEMMs of different shapes (kernels::gemm_grouped on the CPU): one cuBLAS
/// product per problem, issued in order on ctx's stream. (cublasGemmGroupedBatchedEx, one
/// launch for all, is not used yet: the host-device shim does not implement it.)
template <class C>
void gemm_grouped(const context& ctx, std::span<const kernels::gemm_problem<C, device::cuda>> problems) {
  for (const auto& p : problems) gemm<C>(ctx, p.alpha, p.A, p.oa, p.B, p.ob, p.beta, p.Cv);
}

}  // namespace cuda
DELTAW_NAMESPACE_END
