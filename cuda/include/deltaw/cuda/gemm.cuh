// SPDX-License-Identifier: MIT
// C = α·P·Q + β·C on CUDA views through cuBLAS, for any pair of unit-stride layouts.
//
// cuBLAS is column-major. A view with unit row stride is a column-major matrix with
// leading dimension col_stride; a view with unit column stride (row-major) is the
// transpose of one, used with CUBLAS_OP_T. A row-major output C is computed as
// Cᵀ = Qᵀ·Pᵀ. No data moves for any of this.
//
// Element types: float·float→float (Sgemm), double·double→double (Dgemm), and two
// operands of the same 16-bit type into float or that type (cublasGemmEx, fp32 compute).
// Other combinations convert operands to the output type in scratch: a small operand
// whole, a large one in panels, so that a weight is never converted whole.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

#include <deltaw/core/dtype.hpp>
#include <deltaw/core/error.hpp>
#include <deltaw/core/view.hpp>

#include "context.cuh"
#include "error.cuh"
#include "for_each.cuh"

DELTAW_NAMESPACE_BEGIN
namespace cuda {

template <class T>
using device_view = matrix_view<T, device::cuda>;

namespace detail {

using ::deltaw::detail::shape_str;

/// Elements converted per panel when a large operand's type must change (64 MiB in fp32).
inline constexpr index_t panel_elements = index_t(1) << 24;

template <class T>
constexpr cudaDataType_t data_type() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<U, double>) return CUDA_R_64F;
  else if constexpr (std::is_same_v<U, bf16>) return CUDA_R_16BF;
  else {
    static_assert(std::is_same_v<U, fp16>, "deltaw::cuda: unsupported element type");
    return CUDA_R_16F;
  }
}

/// True when cuBLAS multiplies TP·TQ into TC without conversions.
template <class TC, class TP, class TQ>
inline constexpr bool native_gemm =
    std::is_same_v<TP, TQ> &&
    ((std::is_same_v<TP, TC> && (std::is_same_v<TC, float> || std::is_same_v<TC, double>)) ||
     (is_storage16_v<TP> && (std::is_same_v<TC, float> || std::is_same_v<TC, TP>)));

inline int to_int(index_t v, const char* what, const char* op) {
  if (v > index_t(INT_MAX))
    throw argument_error(std::string(op) + ": " + what + " " + std::to_string(v) +
                         " exceeds cuBLAS's 32-bit int range");
  return int(v);
}

inline std::string strides_str(index_t rs, index_t cs) {
  std::string s("(");  // appended piece by piece: GCC 12's false -Wrestrict, as in shape_str
  s += std::to_string(rs);
  s += ", ";
  s += std::to_string(cs);
  s += ')';
  return s;
}

/// A view as cuBLAS sees it: op(stored) equals the view; stored is column-major with
/// leading dimension ld.
struct blas_operand {
  const void* ptr;
  int ld;
  cublasOperation_t op;
};

template <class T>
blas_operand as_blas_operand(const device_view<T>& v, const char* op) {
  const index_t r = v.rows(), c = v.cols();
  if (v.is_col_major()) {
    const index_t ld = c <= 1 ? std::max<index_t>(1, r) : v.col_stride();
    if (ld >= std::max<index_t>(1, r)) return {v.data(), to_int(ld, "a leading dimension", op), CUBLAS_OP_N};
  }
  if (v.is_row_major()) {
    const index_t ld = r <= 1 ? std::max<index_t>(1, c) : v.row_stride();
    if (ld >= std::max<index_t>(1, c)) return {v.data(), to_int(ld, "a leading dimension", op), CUBLAS_OP_T};
  }
  throw layout_error(std::string(op) + ": the CUDA backend needs views with a unit stride in one dimension and "
                     "non-overlapping rows or columns; got a " + shape_str(r, c) + " view with strides " +
                     strides_str(v.row_stride(), v.col_stride()));
}

/// Leading dimension of a column-major output view.
template <class T>
int output_ld(const device_view<T>& C, const char* op) {
  const index_t r = C.rows();
  const index_t ld = C.cols() <= 1 ? std::max<index_t>(1, r) : C.col_stride();
  if (ld < std::max<index_t>(1, r))
    throw layout_error(std::string(op) + ": the output view " + shape_str(C.rows(), C.cols()) + " with strides " +
                       strides_str(C.row_stride(), C.col_stride()) + " has overlapping columns");
  return to_int(ld, "a leading dimension", op);
}

/// dst(i, j) = convert(src(i, j)) for the k-th element of dst; consecutive k walk dst's
/// unit-stride dimension (coalesced writes on the GPU).
template <class D, class S>
struct convert_element {
  device_view<D> dst;
  device_view<const S> src;
  bool dst_col_major;
  DELTAW_HOST_DEVICE void operator()(index_t k) const {
    const index_t rows = dst.rows(), cols = dst.cols();
    const index_t i = dst_col_major ? k % rows : k / cols;
    const index_t j = dst_col_major ? k / rows : k % cols;
    dst(i, j) = convert<D>(src(i, j));
  }
};

/// Element-converting copy between two device views of the same shape, on ctx's stream.
template <class D, class S>
void convert_copy(const context& ctx, const device_view<D>& dst, const device_view<const S>& src) {
  for_each_index(ctx, dst.rows() * dst.cols(), convert_element<D, S>{dst, src, dst.is_col_major()},
                 "deltaw::cuda::detail::convert_copy");
}

/// v as element type C: v itself when it already is, else a column-major copy in the
/// context's scratch.
template <class C, class T>
device_view<const C> as_type(const context& ctx, const device_view<const T>& v) {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, C>) {
    return v;
  } else {
    C* p = ctx.allocate<C>(std::size_t(v.rows() * v.cols()));
    device_view<C> out(p, v.rows(), v.cols(), 1, std::max<index_t>(1, v.rows()));
    convert_copy<C, std::remove_cv_t<T>>(ctx, out, device_view<const std::remove_cv_t<T>>(v));
    return out;
  }
}

/// C = α·P·Q + β·C with C column-major and a native type combination.
template <class TC, class TP, class TQ>
void gemm_native(const context& ctx, const device_view<TC>& C, const device_view<const TP>& P,
                 const device_view<const TQ>& Q, double alpha, double beta, const char* op) {
  const index_t m = C.rows(), n = C.cols(), k = P.cols();
  if (m == 0 || n == 0) return;
  const int ldc = output_ld(C, op);
  if (k == 0) {  // empty product: C = β·C, and β is 0 or 1 in deltaw
    if (beta == 0.0)
      DELTAW_CUDA_CHECK(cudaMemset2DAsync(C.data(), std::size_t(ldc) * sizeof(TC), 0, std::size_t(m) * sizeof(TC),
                                          std::size_t(n), ctx.stream()));
    else if (beta != 1.0)
      throw argument_error(std::string(op) + ": internal: empty product with beta other than 0 or 1");
    return;
  }
  const auto a = as_blas_operand(P, op);
  const auto b = as_blas_operand(Q, op);
  const int im = to_int(m, "a dimension", op), in = to_int(n, "a dimension", op), ik = to_int(k, "a dimension", op);
  if constexpr (std::is_same_v<TC, double>) {
    DELTAW_CUDA_CHECK(cublasDgemm(ctx.cublas(), a.op, b.op, im, in, ik, &alpha, static_cast<const double*>(a.ptr), a.ld,
                                  static_cast<const double*>(b.ptr), b.ld, &beta, C.data(), ldc));
  } else if constexpr (std::is_same_v<TC, float> && std::is_same_v<TP, float>) {
    const float fa = float(alpha), fb = float(beta);
    DELTAW_CUDA_CHECK(cublasSgemm(ctx.cublas(), a.op, b.op, im, in, ik, &fa, static_cast<const float*>(a.ptr), a.ld,
                                  static_cast<const float*>(b.ptr), b.ld, &fb, C.data(), ldc));
  } else {
    const float fa = float(alpha), fb = float(beta);
    DELTAW_CUDA_CHECK(cublasGemmEx(ctx.cublas(), a.op, b.op, im, in, ik, &fa, a.ptr, data_type<TP>(), a.ld, b.ptr,
                                   data_type<TQ>(), b.ld, &fb, C.data(), data_type<TC>(), ldc, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  }
}

template <class TC, class TP, class TQ>
void gemm_col_major(const context& ctx, const device_view<TC>& C, const device_view<const TP>& P,
                    const device_view<const TQ>& Q, double alpha, double beta, const char* op);

/// C = α·P·Q + β·C for C float/double, converting P and Q to C's type where needed:
/// the smaller operand whole, the larger one in panels.
template <class TC, class TP, class TQ>
void gemm_converting(const context& ctx, const device_view<TC>& C, const device_view<const TP>& P,
                     const device_view<const TQ>& Q, double alpha, double beta, const char* op) {
  const index_t m = C.rows(), n = C.cols(), k = P.cols();
  const index_t step = std::max<index_t>(1, panel_elements / std::max<index_t>(1, k));
  constexpr bool convert_p = !std::is_same_v<TP, TC>;
  constexpr bool convert_q = !std::is_same_v<TQ, TC>;
  if (convert_p && (!convert_q || m >= n)) {
    // P is the operand to panel: rows of P give rows of C.
    const auto Qc = as_type<TC>(ctx, Q);
    for (index_t r0 = 0; r0 < m; r0 += step) {
      const auto mk = ctx.position();
      const index_t nr = std::min(step, m - r0);
      const auto Pp = as_type<TC>(ctx, P.middle_rows(r0, nr));
      gemm_native<TC, TC, TC>(ctx, C.middle_rows(r0, nr), Pp, Qc, alpha, beta, op);
      ctx.release(mk);
    }
  } else {
    // Q is the operand to panel: columns of Q give columns of C.
    const auto Pc = as_type<TC>(ctx, P);
    for (index_t c0 = 0; c0 < n; c0 += step) {
      const auto mk = ctx.position();
      const index_t nc = std::min(step, n - c0);
      const auto Qp = as_type<TC>(ctx, Q.middle_cols(c0, nc));
      gemm_native<TC, TC, TC>(ctx, C.middle_cols(c0, nc), Pc, Qp, alpha, beta, op);
      ctx.release(mk);
    }
  }
}

template <class TC, class TP, class TQ>
void gemm_col_major(const context& ctx, const device_view<TC>& C, const device_view<const TP>& P,
                    const device_view<const TQ>& Q, double alpha, double beta, const char* op) {
  if constexpr (native_gemm<TC, TP, TQ>) {
    gemm_native<TC, TP, TQ>(ctx, C, P, Q, alpha, beta, op);
  } else if constexpr (std::is_same_v<TC, float> || std::is_same_v<TC, double>) {
    gemm_converting<TC, TP, TQ>(ctx, C, P, Q, alpha, beta, op);
  } else {
    // A 16-bit output (merge into a bf16/fp16 weight) with operands of another type:
    // convert panels of C to the compute type, update them, round them back.
    using A = compute_t<TC, TP, TQ>;
    const index_t m = C.rows(), n = C.cols();
    const index_t step = std::max<index_t>(1, panel_elements / std::max<index_t>(1, m));
    for (index_t c0 = 0; c0 < n; c0 += step) {
      const auto mk = ctx.position();
      const index_t nc = std::min(step, n - c0);
      const auto Cp = C.middle_cols(c0, nc);
      A* p = ctx.allocate<A>(std::size_t(m * nc));
      const device_view<A> Ca(p, m, nc, 1, std::max<index_t>(1, m));
      if (beta != 0.0) convert_copy<A, TC>(ctx, Ca, device_view<const TC>(Cp));
      gemm_col_major<A, TP, TQ>(ctx, Ca, P, Q.middle_cols(c0, nc), alpha, beta, op);
      convert_copy<TC, A>(ctx, Cp, device_view<const A>(Ca));
      ctx.release(mk);
    }
  }
}

}  // namespace detail

/// C = α·P·Q + β·C on ctx's stream. P [m, k], Q [k, n], C [m, n]; every view needs a
/// unit stride in one dimension. C is float or double, or a 16-bit type (in-place merge).
template <class TC, class TP, class TQ>
void gemm(const context& ctx, const device_view<TC>& C, const device_view<TP>& P, const device_view<TQ>& Q, double alpha,
          double beta, const char* op = "deltaw::cuda::gemm") {
  static_assert(!std::is_const_v<TC>, "deltaw::cuda::gemm: the output view must be writable");
  using P_ = std::remove_cv_t<TP>;
  using Q_ = std::remove_cv_t<TQ>;
  if (P.rows() != C.rows() || Q.cols() != C.cols() || P.cols() != Q.rows())
    throw shape_error(std::string(op) + ": cannot multiply " + detail::shape_str(P.rows(), P.cols()) + " by " +
                      detail::shape_str(Q.rows(), Q.cols()) + " into " + detail::shape_str(C.rows(), C.cols()));
  if (C.rows() == 0 || C.cols() == 0) return;
  const device_view<const P_> Pc(P);
  const device_view<const Q_> Qc(Q);
  if (C.is_col_major()) {
    detail::gemm_col_major<TC, P_, Q_>(ctx, C, Pc, Qc, alpha, beta, op);
  } else if (C.is_row_major()) {
    detail::gemm_col_major<TC, Q_, P_>(ctx, C.transpose(), Qc.transpose(), Pc.transpose(), alpha, beta, op);
  } else {
    throw layout_error(std::string(op) + ": the output needs a unit stride in one dimension; got a " +
                       detail::shape_str(C.rows(), C.cols()) + " view with strides " +
                       detail::strides_str(C.row_stride(), C.col_stride()));
  }
}

}  // namespace cuda
DELTAW_NAMESPACE_END
