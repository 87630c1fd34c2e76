// SPDX-License-Identifier: MIT
// GEMM primitives: C = α·op(A)·op(B) + β·C over views with runtime layouts, strided
// batches of them, and groups of independent problems.
//
// Every view may be row-major, column-major or (by copying) anything else; the layouts are
// reduced at run time to one column-major call with transpose flags, as BLAS takes it, so
// the CPU compiles exactly one GEMM per arithmetic type (Eigen's, or OpenBLAS's sgemm/dgemm
// when DELTAW_USE_BLAS is on). C must not overlap A or B.
#pragma once

#include <climits>
#include <span>
#include <string>
#include <type_traits>

#include "../core/parallel.hpp"
#include "context.hpp"

DELTAW_NAMESPACE_BEGIN
namespace kernels {

/// What a GEMM does with an operand: use it as is, or transposed.
enum class op : unsigned char { none, trans };

namespace detail {

/// The data of the i-th matrix of a strided batch; an empty view's data (possibly null) as is.
template <class T>
T* batch_item(const matrix_view<T>& v, index_t i, index_t stride) {
  return v.rows() == 0 || v.cols() == 0 ? v.data() : v.data() + i * stride;
}

template <class C>
using cm_mut_map =
    Eigen::Map<Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Column-major C [m, n] += α·A·B with A [m, k] and B [k, n] stored in the given orders:
/// Eigen's blocked GEMM (and its OpenMP split) called directly, without the expression
/// layer's small-size and vector paths, which would multiply what each TU compiles.
template <int LhsOrder, int RhsOrder, class C>
void eigen_gemm(index_t m, index_t n, index_t k, C alpha, const C* a, index_t lda, const C* b, index_t ldb, C* c,
                index_t ldc) {
  using Lhs = Eigen::Map<const Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, LhsOrder>, Eigen::Unaligned,
                         Eigen::OuterStride<>>;
  using Rhs = Eigen::Map<const Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, RhsOrder>, Eigen::Unaligned,
                         Eigen::OuterStride<>>;
  using Dst = cm_mut_map<C>;
  using Blocking = Eigen::internal::gemm_blocking_space<Eigen::ColMajor, C, C, Eigen::Dynamic, Eigen::Dynamic, Eigen::Dynamic>;
  using Gemm = Eigen::internal::general_matrix_matrix_product<Eigen::Index, C, LhsOrder, false, C, RhsOrder, false,
                                                              Eigen::ColMajor, 1>;
  using Functor = Eigen::internal::gemm_functor<C, Eigen::Index, Gemm, Lhs, Rhs, Dst, Blocking>;
  const Lhs A(a, m, k, Eigen::OuterStride<>(lda));
  const Rhs B(b, k, n, Eigen::OuterStride<>(ldb));
  Dst Cm(c, m, n, Eigen::OuterStride<>(ldc));
  Blocking blocking(m, n, k, 1, true);
  Eigen::internal::parallelize_gemm<true>(Functor(A, B, Cm, alpha, blocking), m, n, k, false);
}

/// The BLAS contract: column-major C [m, n] = α·op(a)·op(b) + β·C, op(a) [m, k], op(b)
/// [k, n]; C is not read when β = 0. The one place a CPU product is compiled.
template <class C>
void gemm_col_major(bool ta, bool tb, index_t m, index_t n, index_t k, C alpha, const C* a, index_t lda, const C* b,
                    index_t ldb, C beta, C* c, index_t ldc) {
  if (m == 0 || n == 0) return;
#if defined(EIGEN_USE_BLAS)
  if (k > 0 && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    auto call = [&](index_t n0, index_t nn) {  // columns [n0, n0 + nn) of C
      const int im = int(m), in = int(nn), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
      const C* bb = b + (tb ? n0 : n0 * ldb);
      if constexpr (std::is_same_v<C, float>)
        sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, bb, &ildb, &beta, c + n0 * ldc, &ildc);
      else
        dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, bb, &ildb, &beta, c + n0 * ldc, &ildc);
    };
    // A one-thread BLAS (OPENBLAS_NUM_THREADS=1) beside OpenMP threads: deltaw splits a large
    // product's columns over them, so that one OpenMP pool runs everything.
    const index_t threads = deltaw::detail::blas_single_threaded() ? deltaw::detail::max_threads() : 1;
    if (threads > 1 && n >= 128 * threads && double(m) * double(n) * double(k) >= double(1 << 21)) {
      const index_t step = ((n + threads - 1) / threads + 15) / 16 * 16;
      deltaw::detail::parallel_for((n + step - 1) / step, true,
                                   [&](index_t i) { call(i * step, std::min(step, n - i * step)); });
    } else {
      call(0, n);
    }
    return;
  }
#endif
  cm_mut_map<C> Cm(c, m, n, Eigen::OuterStride<>(ldc));
  if (beta == C(0)) Cm.setZero(); else if (beta != C(1)) Cm *= beta;
  if (k == 0 || alpha == C(0)) return;
  // A transposed column-major operand is a row-major one of the transposed shape.
  if (!ta && !tb) eigen_gemm<Eigen::ColMajor, Eigen::ColMajor>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
  else if (!ta) eigen_gemm<Eigen::ColMajor, Eigen::RowMajor>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
  else if (!tb) eigen_gemm<Eigen::RowMajor, Eigen::ColMajor>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
  else eigen_gemm<Eigen::RowMajor, Eigen::RowMajor>(m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

inline void check_gemm(index_t am, index_t ak, index_t bk, index_t bn, index_t cm, index_t cn, const char* op) {
  if (ak != bk || am != cm || bn != cn)
    throw shape_error(std::string(op) + ": op(A) is " + deltaw::detail::shape_str(am, ak) + ", op(B) is " +
                      deltaw::detail::shape_str(bk, bn) + " and C is " + deltaw::detail::shape_str(cm, cn) +
                      "; C = op(A)·op(B) needs [m, k]·[k, n] = [m, n]");
}

}  // namespace detail

/// C = α·op(A)·op(B) + β·C. Any layouts (operands without a unit stride are copied first);
/// C is not read when β = 0, as in BLAS.
template <class C>
void gemm(const cpu_context& ctx, std::type_identity_t<C> alpha, matrix_view<const C> A, op oa,
          matrix_view<const C> B, op ob, std::type_identity_t<C> beta, matrix_view<C> Cv) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "deltaw::kernels::gemm: float or double");
  if (oa == op::trans) A = A.transpose();
  if (ob == op::trans) B = B.transpose();
  detail::check_gemm(A.rows(), A.cols(), B.rows(), B.cols(), Cv.rows(), Cv.cols(), "deltaw::kernels::gemm");
  if (Cv.rows() == 0 || Cv.cols() == 0) return;

  // C must be column-major for the kernel: a row-major C is the column-major Cᵀ = Bᵀ·Aᵀ.
  if (kernels::detail::col_major_ld(Cv) < 0) {
    if (kernels::detail::row_major_ld(Cv) >= 0) {
      gemm<C>(ctx, alpha, B.transpose(), op::none, A.transpose(), op::none, beta, Cv.transpose());
    } else {  // no usable layout: compute into a scratch and combine.
      auto T = make_scratch<C>(ctx, Cv.rows(), Cv.cols());
      gemm<C>(ctx, C(1), A, op::none, B, op::none, C(0), T.view());
      for (index_t i = 0; i < Cv.rows(); ++i)
        for (index_t j = 0; j < Cv.cols(); ++j)
          Cv(i, j) = beta == C(0) ? alpha * T.view()(i, j) : alpha * T.view()(i, j) + beta * Cv(i, j);
    }
    return;
  }
  const operand<C> Ao(ctx, A), Bo(ctx, B);
  const auto& a = Ao.view();
  const auto& b = Bo.view();
  const index_t lda_n = kernels::detail::col_major_ld(a), ldb_n = kernels::detail::col_major_ld(b);
  const bool ta = lda_n < 0, tb = ldb_n < 0;
  const index_t lda = ta ? kernels::detail::row_major_ld(a) : lda_n;
  const index_t ldb = tb ? kernels::detail::row_major_ld(b) : ldb_n;
  detail::gemm_col_major<C>(ta, tb, Cv.rows(), Cv.cols(), A.cols(), alpha, a.data(), lda, b.data(), ldb, beta,
                            Cv.data(), kernels::detail::col_major_ld(Cv));
}

/// count independent GEMMs C_i = α·op(A_i)·op(B_i) + β·C_i, where A_i is A's view moved by
/// i·stride_a elements (likewise B, C): the strided batch of cuBLAS.
template <class C>
void gemm_strided_batched(const cpu_context& ctx, std::type_identity_t<C> alpha, matrix_view<const C> A,
                          index_t stride_a, op oa, matrix_view<const C> B, index_t stride_b, op ob,
                          std::type_identity_t<C> beta, matrix_view<C> Cv, index_t stride_c, index_t count) {
  for (index_t i = 0; i < count; ++i) {
    const matrix_view<const C> Ai(detail::batch_item(A, i, stride_a), A.rows(), A.cols(), A.row_stride(), A.col_stride());
    const matrix_view<const C> Bi(detail::batch_item(B, i, stride_b), B.rows(), B.cols(), B.row_stride(), B.col_stride());
    const matrix_view<C> Ci(detail::batch_item(Cv, i, stride_c), Cv.rows(), Cv.cols(), Cv.row_stride(), Cv.col_stride());
    gemm<C>(ctx, alpha, Ai, oa, Bi, ob, beta, Ci);
  }
}

/// One problem of a grouped GEMM: C = α·op(A)·op(B) + β·C, shapes free per problem.
template <class C, class Device = device::cpu>
struct gemm_problem {
  C alpha = C(1);
  matrix_view<const C, Device> A;
  op oa = op::none;
  matrix_view<const C, Device> B;
  op ob = op::none;
  C beta = C(0);
  matrix_view<C, Device> Cv;
};

/// Independent GEMMs of different shapes (adapters of different ranks in one batch).
template <class C>
void gemm_grouped(const cpu_context& ctx, std::span<const gemm_problem<C>> problems) {
  for (const auto& p : problems) gemm<C>(ctx, p.alpha, p.A, p.oa, p.B, p.ob, p.beta, p.Cv);
}

/// C = α·Σ_i op(A_i)·op(B_i) + β·C over a strided batch of count (A_i, B_i as in
/// gemm_strided_batched): the batch-reduce GEMM, for sums of per-token products such as
/// Σ_t Q_t·X_tᵀ over tokens. C is not read when β = 0; count = 0 leaves β·C.
template <class C>
void gemm_strided_reduce(const cpu_context& ctx, std::type_identity_t<C> alpha, matrix_view<const C> A,
                         index_t stride_a, op oa, matrix_view<const C> B, index_t stride_b, op ob,
                         std::type_identity_t<C> beta, matrix_view<C> Cv, index_t count) {
  {
    const auto Ao = oa == op::trans ? A.transpose() : A;
    const auto Bo = ob == op::trans ? B.transpose() : B;
    detail::check_gemm(Ao.rows(), Ao.cols(), Bo.rows(), Bo.cols(), Cv.rows(), Cv.cols(),
                       "deltaw::kernels::gemm_strided_reduce");
  }
  if (count <= 0) {
    for (index_t i = 0; i < Cv.rows(); ++i)
      for (index_t j = 0; j < Cv.cols(); ++j) Cv(i, j) = beta == C(0) ? C(0) : beta * Cv(i, j);
    return;
  }
  for (index_t i = 0; i < count; ++i) {
    const matrix_view<const C> Ai(detail::batch_item(A, i, stride_a), A.rows(), A.cols(), A.row_stride(), A.col_stride());
    const matrix_view<const C> Bi(detail::batch_item(B, i, stride_b), B.rows(), B.cols(), B.row_stride(), B.col_stride());
    gemm<C>(ctx, alpha, Ai, oa, Bi, ob, i == 0 ? beta : C(1), Cv);
  }
}

}  // namespace kernels
DELTAW_NAMESPACE_END
