// SPDX-License-Identifier: MIT
// Host implementation of the cuBLAS entry points declared in cuda/host/include/cublas_v2.h,
// over the CBLAS interface of the linked BLAS (OpenBLAS). Column-major throughout, as in
// cuBLAS; argument checks come first and fail with cuBLAS's status codes.
#include <cublas_v2.h>

#include <cblas.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include <deltaw/core/dtype.hpp>

#include "shim.hpp"

using deltaw_cuda_host::detail::device_range_locked;
using deltaw_cuda_host::detail::reg;

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

namespace {

bool live(cublasHandle_t h) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  return h != nullptr && reg().blas_handles.count(h) != 0;
}

bool valid_op(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

/// An operand as stored: rows × cols column-major with leading dimension ld.
struct stored {
  const void* ptr;
  long long rows, cols, ld;
  std::size_t elem;
  const char* name;
};

stored as_stored(const void* p, cublasOperation_t op, int m_rows, int m_cols, int ld, std::size_t elem,
                 const char* name) {
  // op(X) is m_rows × m_cols; X itself is that or its transpose.
  if (op == CUBLAS_OP_N) return {p, m_rows, m_cols, ld, elem, name};
  return {p, m_cols, m_rows, ld, elem, name};
}

std::size_t extent_bytes(const stored& s) {
  if (s.rows == 0 || s.cols == 0) return 0;
  return std::size_t((s.cols - 1) * s.ld + s.rows) * s.elem;
}

/// Every operand of every batch inside a live allocation; says which one is not on stderr.
bool operands_on_device(const char* fn, std::initializer_list<stored> ops, int batch = 1,
                        std::initializer_list<long long> strides = {}) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  std::size_t i = 0;
  for (const stored& s : ops) {
    const long long stride = i < strides.size() ? *(strides.begin() + i) : 0;
    ++i;
    const std::size_t bytes = extent_bytes(s);
    for (int b = 0; b < batch; ++b) {
      const char* p = static_cast<const char*>(s.ptr) + b * stride * static_cast<long long>(s.elem);
      if (!device_range_locked(p, bytes)) {
        std::fprintf(stderr,
                     "deltaw cuda host shim: %s: %s (batch %d, %lld x %lld, ld %lld, %zu bytes at %p) is not inside "
                     "a live cudaMalloc allocation; a GPU would fault\n",
                     fn, s.name, b, s.rows, s.cols, s.ld, bytes, static_cast<const void*>(p));
        return false;
      }
    }
  }
  return true;
}

/// The argument checks of cublas<t>gemm, in cuBLAS's order (handle, then values).
cublasStatus_t check_gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                          const void* alpha, const void* beta, int lda, int ldb, int ldc) {
  if (!live(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!valid_op(ta) || !valid_op(tb) || m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k)) return CUBLAS_STATUS_INVALID_VALUE;
  if (ldb < std::max(1, tb == CUBLAS_OP_N ? k : n)) return CUBLAS_STATUS_INVALID_VALUE;
  if (ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
  if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

CBLAS_TRANSPOSE cblas_op(cublasOperation_t op) { return op == CUBLAS_OP_N ? CblasNoTrans : CblasTrans; }

/// C = α·op(A)·op(B) + β·C in T with the BLAS; C is not read when β = 0 (as in cuBLAS).
template <class T>
void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, T alpha, const T* A, int lda, const T* B,
          int ldb, T beta, T* C, int ldc) {
  if (beta == T(0))
    for (int j = 0; j < n; ++j) std::fill_n(C + std::size_t(j) * std::size_t(ldc), m, T(0));
  if (k == 0 || alpha == T(0)) {
    if (beta != T(0) && beta != T(1))
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) C[std::size_t(j) * std::size_t(ldc) + std::size_t(i)] *= beta;
    return;
  }
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasColMajor, cblas_op(ta), cblas_op(tb), m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    cblas_dgemm(CblasColMajor, cblas_op(ta), cblas_op(tb), m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <class T>
cublasStatus_t gemm_strided_batched(const char* fn, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                                    int m, int n, int k, const T* alpha, const T* A, int lda, long long sA,
                                    const T* B, int ldb, long long sB, const T* beta, T* C, int ldc, long long sC,
                                    int batch) {
  if (const cublasStatus_t s = check_gemm(h, ta, tb, m, n, k, alpha, beta, lda, ldb, ldc); s != CUBLAS_STATUS_SUCCESS)
    return s;
  if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (batch == 0 || m == 0 || n == 0 || ((*alpha == T(0) || k == 0) && *beta == T(1))) return CUBLAS_STATUS_SUCCESS;
  const stored a = as_stored(A, ta, m, k, lda, sizeof(T), "A"), b = as_stored(B, tb, k, n, ldb, sizeof(T), "B"),
               c{C, m, n, ldc, sizeof(T), "C"};
  const bool need_ab = k > 0 && *alpha != T(0);
  if (!(need_ab ? operands_on_device(fn, {c, a, b}, batch, {sC, sA, sB}) : operands_on_device(fn, {c}, batch, {sC})))
    return CUBLAS_STATUS_EXECUTION_FAILED;
  for (int i = 0; i < batch; ++i)
    gemm<T>(ta, tb, m, n, k, *alpha, A + i * sA, lda, B + i * sB, ldb, *beta, C + i * sC, ldc);
  return CUBLAS_STATUS_SUCCESS;
}

/// cublas<t>gemmGroupedBatched: the checks first (handle; group_count; the host arrays;
/// every group's values as cublas<t>gemm checks them; then, for Ex, the type
/// combination), then every problem's device memory (the pointer arrays and each
/// problem's operands: nothing is written when any lies outside a live allocation), then
/// the products one by one. A problem is skipped as in cuBLAS's quick return (m or n is 0,
/// or α = 0 or k = 0 with β = 1).
template <class T>
cublasStatus_t gemm_grouped_batched(const char* fn, cublasHandle_t h, const cublasOperation_t* ta,
                                    const cublasOperation_t* tb, const int* m, const int* n, const int* k,
                                    const T* alpha, const T* const* Aarray, const int* lda, const T* const* Barray,
                                    const int* ldb, const T* beta, T* const* Carray, const int* ldc, int group_count,
                                    const int* group_size, bool types_supported = true) {
  if (!live(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (group_count == 0) return CUBLAS_STATUS_SUCCESS;
  if (ta == nullptr || tb == nullptr || m == nullptr || n == nullptr || k == nullptr || alpha == nullptr ||
      lda == nullptr || ldb == nullptr || beta == nullptr || ldc == nullptr || group_size == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  long long total = 0;
  for (int g = 0; g < group_count; ++g) {
    if (!valid_op(ta[g]) || !valid_op(tb[g]) || m[g] < 0 || n[g] < 0 || k[g] < 0 || group_size[g] < 0)
      return CUBLAS_STATUS_INVALID_VALUE;
    if (lda[g] < std::max(1, ta[g] == CUBLAS_OP_N ? m[g] : k[g])) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldb[g] < std::max(1, tb[g] == CUBLAS_OP_N ? k[g] : n[g])) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldc[g] < std::max(1, m[g])) return CUBLAS_STATUS_INVALID_VALUE;
    total += group_size[g];
  }
  if (!types_supported) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (total == 0) return CUBLAS_STATUS_SUCCESS;
  {
    // The pointer arrays are device memory that the GPU reads.
    std::lock_guard<std::mutex> lock(reg().mutex);
    const std::size_t bytes = std::size_t(total) * sizeof(void*);
    const void* arrays[3] = {Aarray, Barray, Carray};
    const char* names[3] = {"Aarray", "Barray", "Carray"};
    for (int i = 0; i < 3; ++i)
      if (!device_range_locked(arrays[i], bytes)) {
        std::fprintf(stderr,
                     "deltaw cuda host shim: %s: the pointer array %s (%lld pointers, %zu bytes at %p) is not inside "
                     "a live cudaMalloc allocation; a GPU would fault\n",
                     fn, names[i], total, bytes, arrays[i]);
        return CUBLAS_STATUS_EXECUTION_FAILED;
      }
  }
  const auto skipped = [&](int g) {
    return m[g] == 0 || n[g] == 0 || ((alpha[g] == T(0) || k[g] == 0) && beta[g] == T(1));
  };
  // Every problem's operands before any product, so that a failing call writes nothing.
  long long p = 0;
  for (int g = 0; g < group_count; ++g)
    for (int i = 0; i < group_size[g]; ++i, ++p) {
      if (skipped(g)) continue;
      const stored a = as_stored(Aarray[p], ta[g], m[g], k[g], lda[g], sizeof(T), "A"),
                   b = as_stored(Barray[p], tb[g], k[g], n[g], ldb[g], sizeof(T), "B"),
                   c{Carray[p], m[g], n[g], ldc[g], sizeof(T), "C"};
      const bool need_ab = k[g] > 0 && alpha[g] != T(0);
      if (!(need_ab ? operands_on_device(fn, {c, a, b}) : operands_on_device(fn, {c}))) {
        std::fprintf(stderr, "deltaw cuda host shim: %s: (that was problem %lld, in group %d)\n", fn, p, g);
        return CUBLAS_STATUS_EXECUTION_FAILED;
      }
    }
  p = 0;
  for (int g = 0; g < group_count; ++g)
    for (int i = 0; i < group_size[g]; ++i, ++p)
      if (!skipped(g))
        gemm<T>(ta[g], tb[g], m[g], n[g], k[g], alpha[g], Aarray[p], lda[g], Barray[p], ldb[g], beta[g], Carray[p],
                ldc[g]);
  return CUBLAS_STATUS_SUCCESS;
}

std::size_t type_size(cudaDataType t) {
  switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_64F: return 8;
    case CUDA_R_16F:
    case CUDA_R_16BF: return 2;
  }
  return 0;
}

float load16(const void* p, std::size_t i, cudaDataType t) {
  std::uint16_t b;
  std::memcpy(&b, static_cast<const char*>(p) + 2 * i, 2);
  return t == CUDA_R_16BF ? float(deltaw::bf16::from_bits(b)) : float(deltaw::fp16::from_bits(b));
}

void store16(void* p, std::size_t i, cudaDataType t, float v) {
  const std::uint16_t b = t == CUDA_R_16BF ? deltaw::bf16(v).bits : deltaw::fp16(v).bits;
  std::memcpy(static_cast<char*>(p) + 2 * i, &b, 2);
}

/// A stored 16-bit operand as a packed fp32 column-major copy (ld = rows); exact.
std::vector<float> widen(const stored& s, cudaDataType t) {
  std::vector<float> out(std::size_t(s.rows * s.cols));
  for (long long j = 0; j < s.cols; ++j)
    for (long long i = 0; i < s.rows; ++i) out[std::size_t(j * s.rows + i)] = load16(s.ptr, std::size_t(j * s.ld + i), t);
  return out;
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  auto* h = new (std::nothrow) cublasContext;
  if (h == nullptr) return CUBLAS_STATUS_ALLOC_FAILED;
  std::lock_guard<std::mutex> lock(reg().mutex);
  reg().blas_handles.insert(h);
  *handle = h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  {
    std::lock_guard<std::mutex> lock(reg().mutex);
    if (handle == nullptr || reg().blas_handles.erase(handle) == 0) return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t streamId) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = streamId;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t* streamId) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (streamId == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *streamId = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  const int base = int(mode) & ~int(CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  if (base < 0 || base > int(CUBLAS_TF32_TENSOR_OP_MATH)) return CUBLAS_STATUS_INVALID_VALUE;
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->math;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "an error was detected when checking the current licensing";
  }
  return "unknown error";
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                           int k, const float* alpha, const float* A, int lda, const float* B, int ldb,
                           const float* beta, float* C, int ldc) {
  return gemm_strided_batched<float>("cublasSgemm", handle, transa, transb, m, n, k, alpha, A, lda, 0, B, ldb, 0,
                                     beta, C, ldc, 0, 1);
}

cublasStatus_t cublasDgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                           int k, const double* alpha, const double* A, int lda, const double* B, int ldb,
                           const double* beta, double* C, int ldc) {
  return gemm_strided_batched<double>("cublasDgemm", handle, transa, transb, m, n, k, alpha, A, lda, 0, B, ldb, 0,
                                      beta, C, ldc, 0, 1);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                         int m, int n, int k, const float* alpha, const float* A, int lda,
                                         long long int strideA, const float* B, int ldb, long long int strideB,
                                         const float* beta, float* C, int ldc, long long int strideC, int batchCount) {
  return gemm_strided_batched<float>("cublasSgemmStridedBatched", handle, transa, transb, m, n, k, alpha, A, lda,
                                     strideA, B, ldb, strideB, beta, C, ldc, strideC, batchCount);
}

cublasStatus_t cublasDgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                         int m, int n, int k, const double* alpha, const double* A, int lda,
                                         long long int strideA, const double* B, int ldb, long long int strideB,
                                         const double* beta, double* C, int ldc, long long int strideC,
                                         int batchCount) {
  return gemm_strided_batched<double>("cublasDgemmStridedBatched", handle, transa, transb, m, n, k, alpha, A, lda,
                                      strideA, B, ldb, strideB, beta, C, ldc, strideC, batchCount);
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  (void)algo;  // every algorithm computes the same product here
  if (const cublasStatus_t s = check_gemm(handle, transa, transb, m, n, k, alpha, beta, lda, ldb, ldc);
      s != CUBLAS_STATUS_SUCCESS)
    return s;
  const bool c64 = computeType == CUBLAS_COMPUTE_64F || computeType == CUBLAS_COMPUTE_64F_PEDANTIC;
  const bool c32 = computeType == CUBLAS_COMPUTE_32F || computeType == CUBLAS_COMPUTE_32F_PEDANTIC ||
                   computeType == CUBLAS_COMPUTE_32F_FAST_16F || computeType == CUBLAS_COMPUTE_32F_FAST_16BF ||
                   computeType == CUBLAS_COMPUTE_32F_FAST_TF32;
  // The combinations of cuBLAS's GemmEx table that the shim implements (real types only).
  const bool is16 = Atype == CUDA_R_16F || Atype == CUDA_R_16BF;
  const bool supported =
      Atype == Btype && ((c64 && Atype == CUDA_R_64F && Ctype == CUDA_R_64F) ||
                         (c32 && Atype == CUDA_R_32F && Ctype == CUDA_R_32F) ||
                         (c32 && is16 && (Ctype == Atype || Ctype == CUDA_R_32F)));
  if (!supported) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (c64)
    return gemm_strided_batched<double>("cublasGemmEx", handle, transa, transb, m, n, k,
                                        static_cast<const double*>(alpha), static_cast<const double*>(A), lda, 0,
                                        static_cast<const double*>(B), ldb, 0, static_cast<const double*>(beta),
                                        static_cast<double*>(C), ldc, 0, 1);
  if (!is16)
    return gemm_strided_batched<float>("cublasGemmEx", handle, transa, transb, m, n, k,
                                       static_cast<const float*>(alpha), static_cast<const float*>(A), lda, 0,
                                       static_cast<const float*>(B), ldb, 0, static_cast<const float*>(beta),
                                       static_cast<float*>(C), ldc, 0, 1);
  const float fa = *static_cast<const float*>(alpha), fb = *static_cast<const float*>(beta);
  if (m == 0 || n == 0 || ((fa == 0.0f || k == 0) && fb == 1.0f)) return CUBLAS_STATUS_SUCCESS;
  const stored a = as_stored(A, transa, m, k, lda, 2, "A"), b = as_stored(B, transb, k, n, ldb, 2, "B"),
               c{C, m, n, ldc, type_size(Ctype), "C"};
  const bool need_ab = k > 0 && fa != 0.0f;
  if (!(need_ab ? operands_on_device("cublasGemmEx", {c, a, b}) : operands_on_device("cublasGemmEx", {c})))
    return CUBLAS_STATUS_EXECUTION_FAILED;
  try {
    std::vector<float> a32, b32;
    if (need_ab) {
      a32 = widen(a, Atype);
      b32 = widen(b, Btype);
    }
    const int la = int(std::max<long long>(1, a.rows)), lb = int(std::max<long long>(1, b.rows));
    if (Ctype == CUDA_R_32F) {
      gemm<float>(transa, transb, m, n, k, fa, a32.data(), la, b32.data(), lb, fb, static_cast<float*>(C), ldc);
    } else {
      // fp32 accumulation of α·op(A)·op(B) + β·C, rounded to the 16-bit output once.
      std::vector<float> c32(std::size_t(m) * std::size_t(n));
      if (fb != 0.0f)
        for (int j = 0; j < n; ++j)
          for (int i = 0; i < m; ++i)
            c32[std::size_t(j) * m + i] = load16(C, std::size_t(j) * std::size_t(ldc) + std::size_t(i), Ctype);
      gemm<float>(transa, transb, m, n, k, fa, a32.data(), la, b32.data(), lb, fb, c32.data(), m);
      for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i)
          store16(C, std::size_t(j) * std::size_t(ldc) + std::size_t(i), Ctype, c32[std::size_t(j) * m + i]);
    }
  } catch (const std::bad_alloc&) {
    return CUBLAS_STATUS_ALLOC_FAILED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemmGroupedBatched(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                         const cublasOperation_t transb_array[], const int m_array[],
                                         const int n_array[], const int k_array[], const float alpha_array[],
                                         const float* const Aarray[], const int lda_array[],
                                         const float* const Barray[], const int ldb_array[],
                                         const float beta_array[], float* const Carray[], const int ldc_array[],
                                         int group_count, const int group_size[]) {
  return gemm_grouped_batched<float>("cublasSgemmGroupedBatched", handle, transa_array, transb_array, m_array,
                                     n_array, k_array, alpha_array, Aarray, lda_array, Barray, ldb_array, beta_array,
                                     Carray, ldc_array, group_count, group_size);
}

cublasStatus_t cublasDgemmGroupedBatched(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                         const cublasOperation_t transb_array[], const int m_array[],
                                         const int n_array[], const int k_array[], const double alpha_array[],
                                         const double* const Aarray[], const int lda_array[],
                                         const double* const Barray[], const int ldb_array[],
                                         const double beta_array[], double* const Carray[], const int ldc_array[],
                                         int group_count, const int group_size[]) {
  return gemm_grouped_batched<double>("cublasDgemmGroupedBatched", handle, transa_array, transb_array, m_array,
                                      n_array, k_array, alpha_array, Aarray, lda_array, Barray, ldb_array,
                                      beta_array, Carray, ldc_array, group_count, group_size);
}

cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                          const cublasOperation_t transb_array[], const int m_array[],
                                          const int n_array[], const int k_array[], const void* alpha_array,
                                          const void* const Aarray[], cudaDataType_t Atype, const int lda_array[],
                                          const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
                                          const void* beta_array, void* const Carray[], cudaDataType_t Ctype,
                                          const int ldc_array[], int group_count, const int group_size[],
                                          cublasComputeType_t computeType) {
  constexpr const char* fn = "cublasGemmGroupedBatchedEx";
  const bool c64 = computeType == CUBLAS_COMPUTE_64F || computeType == CUBLAS_COMPUTE_64F_PEDANTIC;
  const bool c32 = computeType == CUBLAS_COMPUTE_32F || computeType == CUBLAS_COMPUTE_32F_PEDANTIC ||
                   computeType == CUBLAS_COMPUTE_32F_FAST_16F || computeType == CUBLAS_COMPUTE_32F_FAST_16BF ||
                   computeType == CUBLAS_COMPUTE_32F_FAST_TF32;
  const bool same = Atype == Btype && Btype == Ctype;
  // Pointer arrays of one element type or another have the same representation; alpha and
  // beta are arrays of the scale type (float for 32F compute, double for 64F).
  if (c64 && same && Atype == CUDA_R_64F)
    return gemm_grouped_batched<double>(
        fn, handle, transa_array, transb_array, m_array, n_array, k_array, static_cast<const double*>(alpha_array),
        reinterpret_cast<const double* const*>(Aarray), lda_array, reinterpret_cast<const double* const*>(Barray),
        ldb_array, static_cast<const double*>(beta_array), reinterpret_cast<double* const*>(Carray), ldc_array,
        group_count, group_size);
  const bool supported = c32 && same && Atype == CUDA_R_32F;
  return gemm_grouped_batched<float>(
      fn, handle, transa_array, transb_array, m_array, n_array, k_array, static_cast<const float*>(alpha_array),
      reinterpret_cast<const float* const*>(Aarray), lda_array, reinterpret_cast<const float* const*>(Barray),
      ldb_array, static_cast<const float*>(beta_array), reinterpret_cast<float* const*>(Carray), ldc_array,
      group_count, group_size, supported);
}

}  // extern "C"
