// SPDX-License-Identifier: MIT
// The primitive layer on CUDA (deltaw/kernels/ is the CPU side, docs/design.md): GEMM with
// op flags and the strided batched GEMM over cuBLAS, plus the element-wise operations of
// elementwise.cuh over Thrust. Same names and argument order as the CPU primitives, with
// deltaw::cuda::context first, so that code written against the primitives finds these by
// argument-dependent lookup.
#pragma once

#include <cublas_v2.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

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

template <class C>
cublasStatus_t gemm_grouped_batched_call(cublasHandle_t h, const cublasOperation_t* ta, const cublasOperation_t* tb,
                                         const int* m, const int* n, const int* k, const C* alpha, const C* const* A,
                                         const int* lda, const C* const* B, const int* ldb, const C* beta,
                                         C* const* Cp, const int* ldc, int groups, const int* group_size) {
  if constexpr (std::is_same_v<C, float>)
    return cublasSgemmGroupedBatched(h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, Cp, ldc, groups, group_size);
  else
    return cublasDgemmGroupedBatched(h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, Cp, ldc, groups, group_size);
}

/// C = α·A·B + β·C (op flags applied to the views already) as cuBLAS's column-major
/// product: C itself when it is column-major, else Cᵀ = Bᵀ·Aᵀ. Needs the three views
/// blas_addressable; the operands' flags and leading dimensions come from as_blas_operand.
template <class C>
struct column_major_form {
  device_view<C> Cc;          // column-major
  device_view<const C> P, Q;  // Cc = P·Q
  bool swapped;               // Cc = Cᵀ, P = Bᵀ, Q = Aᵀ
  column_major_form(const device_view<const C>& A, const device_view<const C>& B, const device_view<C>& Cv)
      : swapped(!(Cv.is_col_major() && (Cv.cols() <= 1 || Cv.col_stride() >= std::max<index_t>(1, Cv.rows())))) {
    Cc = swapped ? Cv.transpose() : Cv;
    P = swapped ? B.transpose() : A;
    Q = swapped ? A.transpose() : B;
  }
};

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
  const detail::column_major_form<C> f(A, B, Cv);
  const device_view<C>& Cc = f.Cc;
  const device_view<const C>& P = f.P;
  const index_t sp = f.swapped ? stride_b : stride_a, sq = f.swapped ? stride_a : stride_b;
  const auto p = detail::as_blas_operand(P, op), q = detail::as_blas_operand(f.Q, op);
  const int ldc = detail::output_ld(Cc, op);
  const C a_ = alpha, b_ = beta;
  DELTAW_CUDA_CHECK(detail::gemm_strided_batched_call<C>(
      ctx.cublas(), p.op, q.op, detail::to_int(Cc.rows(), "a dimension", op), detail::to_int(Cc.cols(), "a dimension", op),
      detail::to_int(P.cols(), "a dimension", op), &a_, static_cast<const C*>(p.ptr), p.ld, sp,
      static_cast<const C*>(q.ptr), q.ld, sq, &b_, Cc.data(), ldc, stride_c, int(count)));
}

namespace detail {

/// Fits cuBLAS's 32-bit int arguments.
inline bool fits_int(index_t v) { return v >= 0 && v <= index_t(INT_MAX); }

/// One cublas<t>gemmGroupedBatched call being assembled on the host: per group the shape,
/// op flags, leading dimensions, α and β (host arrays, as cuBLAS reads them); per problem
/// the three column-major operand pointers (uploaded to the device by issue_grouped).
/// Consecutive problems of equal shape, flags, leading dimensions, α and β share a group.
/// A problem the grouped call cannot express goes to `fallback` and runs as its own gemm
/// right after the call: an operand without a unit stride in one dimension or with
/// overlapping lines (not a column-major matrix with a leading dimension, nor the
/// transpose of one), an empty product (k = 0) or α = 0 (C = β·C: a scale, not a product),
/// a dimension or leading dimension beyond int. Layouts may differ from problem to problem:
/// each problem's flags are its own (a row-major C is computed as Cᵀ = Bᵀ·Aᵀ).
template <class C>
struct grouped_gemm_call {
  std::vector<cublasOperation_t> ta, tb;
  std::vector<int> m, n, k, lda, ldb, ldc, size;
  std::vector<C> alpha, beta;
  std::vector<C*> a, b, c;  // per problem
  std::vector<kernels::gemm_problem<C, device::cuda>> fallback;

  /// C = α·A·B + β·C, the op flags applied to A and B already and the shapes checked.
  void add(C al, const device_view<const C>& A, const device_view<const C>& B, C be, const device_view<C>& Cv) {
    if (Cv.rows() == 0 || Cv.cols() == 0) return;
    const bool direct = A.cols() > 0 && al != C(0) && blas_addressable(A) && blas_addressable(B) &&
                        blas_addressable(Cv) && fits_int(Cv.rows()) && fits_int(Cv.cols()) && fits_int(A.cols()) &&
                        fits_int(A.row_stride()) && fits_int(A.col_stride()) && fits_int(B.row_stride()) &&
                        fits_int(B.col_stride()) && fits_int(Cv.row_stride()) && fits_int(Cv.col_stride());
    if (!direct) {
      fallback.push_back({al, A, kernels::op::none, B, kernels::op::none, be, Cv});
      return;
    }
    constexpr const char* op = "deltaw::cuda::gemm_grouped";
    const column_major_form<C> f(A, B, Cv);
    const auto p = as_blas_operand(f.P, op), q = as_blas_operand(f.Q, op);
    const int im = int(f.Cc.rows()), in = int(f.Cc.cols()), ik = int(f.P.cols()), ic = output_ld(f.Cc, op);
    const bool same = !size.empty() && ta.back() == p.op && tb.back() == q.op && m.back() == im && n.back() == in &&
                      k.back() == ik && lda.back() == p.ld && ldb.back() == q.ld && ldc.back() == ic &&
                      alpha.back() == al && beta.back() == be;
    if (same) {
      ++size.back();
    } else {
      ta.push_back(p.op), tb.push_back(q.op), m.push_back(im), n.push_back(in), k.push_back(ik);
      lda.push_back(p.ld), ldb.push_back(q.ld), ldc.push_back(ic), alpha.push_back(al), beta.push_back(be);
      size.push_back(1);
    }
    a.push_back(const_cast<C*>(static_cast<const C*>(p.ptr)));
    b.push_back(const_cast<C*>(static_cast<const C*>(q.ptr)));
    c.push_back(f.Cc.data());
  }
  std::size_t problems() const { return a.size(); }
};

/// Issues the calls in order on ctx's stream: their pointer arrays are uploaded into
/// scratch together (one copy), then per call one cublas<t>gemmGroupedBatched and its
/// fallback products. Problems of one call run in no particular order; a call starts
/// after the previous one's products (stream order).
template <class C>
void issue_grouped(const context& ctx, std::span<const grouped_gemm_call<C>> calls, const char* op) {
  std::size_t total = 0;
  for (const auto& call : calls) total += 3 * call.problems();
  const auto mark = ctx.position();
  C* const* dev = nullptr;
  if (total > 0) {
    std::vector<C*> host;
    host.reserve(total);
    for (const auto& call : calls) {
      host.insert(host.end(), call.a.begin(), call.a.end());
      host.insert(host.end(), call.b.begin(), call.b.end());
      host.insert(host.end(), call.c.begin(), call.c.end());
    }
    C** d = ctx.allocate<C*>(total);
    // From pageable memory: returns once `host` has been read, ordered on the stream.
    DELTAW_CUDA_CHECK(cudaMemcpyAsync(d, host.data(), total * sizeof(C*), cudaMemcpyHostToDevice, ctx.stream()));
    dev = d;
  }
  for (const auto& call : calls) {
    if (const std::size_t np = call.problems(); np > 0) {
      if (call.size.size() > std::size_t(INT_MAX)) throw argument_error(std::string(op) + ": too many groups");
      DELTAW_CUDA_CHECK(gemm_grouped_batched_call<C>(
          ctx.cublas(), call.ta.data(), call.tb.data(), call.m.data(), call.n.data(), call.k.data(),
          call.alpha.data(), dev, call.lda.data(), dev + np, call.ldb.data(), call.beta.data(), dev + 2 * np,
          call.ldc.data(), int(call.size.size()), call.size.data()));
      dev += 3 * np;
    }
    for (const auto& p : call.fallback) gemm<C>(ctx, p.alpha, p.A, p.oa, p.B, p.ob, p.beta, p.Cv);
  }
  // The arrays are read on the stream: scratch taken after this point is written later.
  ctx.release(mark);
}

/// True when some problem writes memory that another problem reads or writes (each view's
/// [first, last] byte interval first, the exact lattice test of views_overlap for the
/// intervals that meet). Past 16 exact tests per problem it gives up and answers true,
/// which only costs the grouped call.
template <class C>
bool problems_interfere(std::span<const kernels::gemm_problem<C, device::cuda>> problems) {
  struct use {
    std::uintptr_t lo, hi;
    std::size_t problem;
    int which;  // 0: A, 1: B, 2: C (written)
  };
  std::vector<use> uses;
  uses.reserve(3 * problems.size());
  for (std::size_t i = 0; i < problems.size(); ++i) {
    const auto& p = problems[i];
    auto add = [&](const auto& v, int which) {
      const auto l = ::deltaw::detail::lattice_of(v);
      if (l.empty()) return true;
      if (l.s0 < 0 || l.s1 < 0) return false;
      uses.push_back({l.base, l.base + std::uintptr_t(l.extent()), i, which});
      return true;
    };
    if (!(add(p.A, 0) && add(p.B, 1) && add(p.Cv, 2))) return true;
  }
  std::sort(uses.begin(), uses.end(), [](const use& x, const use& y) { return x.lo < y.lo; });
  const auto view_of = [&](const use& u) {
    const auto& p = problems[u.problem];
    return u.which == 0 ? ::deltaw::detail::lattice_of(p.A)
                        : u.which == 1 ? ::deltaw::detail::lattice_of(p.B) : ::deltaw::detail::lattice_of(p.Cv);
  };
  std::size_t budget = 16 * problems.size() + 16;
  for (std::size_t i = 0; i < uses.size(); ++i)
    for (std::size_t j = i + 1; j < uses.size() && uses[j].lo < uses[i].hi; ++j) {
      if (uses[j].problem == uses[i].problem || (uses[i].which != 2 && uses[j].which != 2)) continue;
      if (budget-- == 0) return true;
      if (::deltaw::detail::lattices_overlap(view_of(uses[i]), view_of(uses[j]))) return true;
    }
  return false;
}

}  // namespace detail

/// Independent GEMMs of different shapes (kernels::gemm_grouped on the CPU): C_i =
/// α_i·op(A_i)·op(B_i) + β_i·C_i. One cublas<t>gemmGroupedBatched call for all of them
/// (each problem its own group, consecutive problems of equal shape merged), its pointer
/// arrays uploaded into ctx's scratch; the problems it cannot express run one by one
/// after it (detail::grouped_gemm_call: views without a unit stride, k = 0 or α = 0).
/// The problems must be independent, as on the CPU: when one writes memory that another
/// reads or writes, they run one by one in order instead (their results then equal the
/// CPU's sequential ones). Shapes are checked for every problem before anything runs.
template <class C>
void gemm_grouped(const context& ctx, std::span<const kernels::gemm_problem<C, device::cuda>> problems) {
  static_assert(std::is_same_v<C, float> || std::is_same_v<C, double>, "deltaw::cuda::gemm_grouped: float or double");
  constexpr const char* op = "deltaw::cuda::gemm_grouped";
  for (const auto& p : problems) {
    const auto A = p.oa == kernels::op::trans ? p.A.transpose() : p.A;
    const auto B = p.ob == kernels::op::trans ? p.B.transpose() : p.B;
    detail::check_gemm_shapes(A.rows(), A.cols(), B.rows(), B.cols(), p.Cv.rows(), p.Cv.cols(), op);
  }
  if (problems.size() <= 1 || detail::problems_interfere<C>(problems)) {
    for (const auto& p : problems) gemm<C>(ctx, p.alpha, p.A, p.oa, p.B, p.ob, p.beta, p.Cv);
    return;
  }
  detail::grouped_gemm_call<C> call;
  for (const auto& p : problems)
    call.add(p.alpha, p.oa == kernels::op::trans ? p.A.transpose() : p.A,
             p.ob == kernels::op::trans ? p.B.transpose() : p.B, p.beta, p.Cv);
  detail::issue_grouped<C>(ctx, std::span<const detail::grouped_gemm_call<C>>(&call, 1), op);
}

}  // namespace cuda
DELTAW_NAMESPACE_END
