// SPDX-License-Identifier: MIT
// The host shim of the CUDA runtime, cuBLAS and cuSOLVER (cuda/host) against an
// independent reference: column-major products with every op flag, padded leading
// dimensions, strided batches, 16-bit GemmEx rounding, and the status codes of the
// argument checks; the runtime's memory, copies, streams, events and error state.
// Host-device configuration only (docs/cuda.md).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <deltaw/core/dtype.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <doctest/doctest.h>

#ifndef DELTAW_CUDA_HOST_SHIM
#error "host_test_shim.cpp is built only in the host-device configuration"
#endif

namespace {

/// A device allocation of n elements, filled from a host vector when given.
template <class T>
struct dev {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dev(std::size_t count) : n(count) { REQUIRE(cudaMalloc(&p, n * sizeof(T)) == cudaSuccess); }
  explicit dev(const std::vector<T>& h) : dev(h.size()) {
    REQUIRE(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~dev() { cudaFree(p); }
  dev(const dev&) = delete;
  dev& operator=(const dev&) = delete;
  std::vector<T> get() const {
    std::vector<T> h(n);
    REQUIRE(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
};

std::vector<double> uniform(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<double> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

template <class T>
std::vector<T> as(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = deltaw::convert<T>(v[i]);
  return out;
}

/// op(X)(i, j) of a column-major stored X with leading dimension ld.
double at(const std::vector<double>& X, int ld, bool t, int i, int j) {
  return t ? X[std::size_t(i) * ld + j] : X[std::size_t(j) * ld + i];
}

/// Reference C = α·op(A)·op(B) + β·C in double (C not read when β = 0).
void ref_gemm(bool ta, bool tb, int m, int n, int k, double alpha, const std::vector<double>& A, int lda,
              const std::vector<double>& B, int ldb, double beta, std::vector<double>& C, int ldc) {
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double s = 0;
      for (int l = 0; l < k; ++l) s += at(A, lda, ta, i, l) * at(B, ldb, tb, l, j);
      double& c = C[std::size_t(j) * ldc + i];
      c = alpha * s + (beta == 0.0 ? 0.0 : beta * c);
    }
}

struct handle {
  cublasHandle_t h = nullptr;
  handle() { REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS); }
  ~handle() { cublasDestroy(h); }
};

template <class T>
cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, T alpha,
                    const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if constexpr (std::is_same_v<T, float>)
    return cublasSgemm(h, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc);
  else
    return cublasDgemm(h, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc);
}

template <class T>
double max_rel(const std::vector<T>& got, const std::vector<double>& ref) {
  double err = 0, scale = 1;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(ref[i]));
    const double g = double(got[i]);
    err = std::max(err, std::isnan(g) != std::isnan(ref[i]) ? std::numeric_limits<double>::infinity()
                                                            : (std::isnan(g) ? 0.0 : std::abs(g - ref[i])));
  }
  return err / scale;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda host shim: S/Dgemm match a double reference for every op flag and padded ld", T, float,
                   double) {
  handle h;
  const double tol = std::is_same_v<T, double> ? 1e-13 : 1e-6;
  struct dims {
    int m, n, k;
  };
  std::uint64_t seed = 1;
  for (dims d : {dims{5, 7, 3}, dims{1, 1, 1}, dims{33, 17, 65}, dims{4, 6, 0}, dims{8, 1, 9}}) {
    for (cublasOperation_t ta : {CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C})
      for (cublasOperation_t tb : {CUBLAS_OP_N, CUBLAS_OP_T})
        for (int pad : {0, 3})
          for (double beta : {0.0, 1.0, -0.5}) {
            CAPTURE(d.m);
            CAPTURE(d.n);
            CAPTURE(d.k);
            CAPTURE(int(ta));
            CAPTURE(int(tb));
            CAPTURE(pad);
            CAPTURE(beta);
            const bool at_ = ta != CUBLAS_OP_N, bt = tb != CUBLAS_OP_N;
            const int ar = at_ ? d.k : d.m, ac = at_ ? d.m : d.k, br = bt ? d.n : d.k, bc = bt ? d.k : d.n;
            const int lda = std::max(1, ar + pad), ldb = std::max(1, br + pad), ldc = std::max(1, d.m + pad);
            auto A = uniform(std::size_t(lda) * std::max(1, ac), ++seed);
            auto B = uniform(std::size_t(ldb) * std::max(1, bc), ++seed);
            auto C = uniform(std::size_t(ldc) * d.n, ++seed);
            // β = 0: C holds NaN, which must not be read; padding rows must stay untouched.
            if (beta == 0.0)
              for (int j = 0; j < d.n; ++j)
                for (int i = 0; i < d.m; ++i) C[std::size_t(j) * ldc + i] = std::numeric_limits<double>::quiet_NaN();
            // The reference from the values as stored in T.
            for (auto* v : {&A, &B, &C})
              for (auto& x : *v) x = double(T(x));
            dev<T> dA(as<T>(A)), dB(as<T>(B)), dC(as<T>(C));
            std::vector<double> ref = C;
            ref_gemm(at_, bt, d.m, d.n, d.k, 0.75, A, lda, B, ldb, beta, ref, ldc);
            REQUIRE(gemm<T>(h.h, ta, tb, d.m, d.n, d.k, T(0.75), dA.p, lda, dB.p, ldb, T(beta), dC.p, ldc) ==
                    CUBLAS_STATUS_SUCCESS);
            CHECK(max_rel(dC.get(), ref) <= tol);
          }
  }
}

TEST_CASE("cuda host shim: strided batched products, broadcast by a zero stride") {
  handle h;
  const int m = 6, n = 5, k = 4, batch = 3;
  const long long sA = m * k, sC = m * n;
  auto A = as<double>(uniform(std::size_t(sA * batch), 1)), B = uniform(std::size_t(k * n), 2),
       C = uniform(std::size_t(sC * batch), 3);
  dev<double> dA(A), dB(B), dC(C);
  const double alpha = 2.0, beta = 1.0;
  REQUIRE(cublasDgemmStridedBatched(h.h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA.p, m, sA, dB.p, k, 0, &beta,
                                    dC.p, m, sC, batch) == CUBLAS_STATUS_SUCCESS);
  std::vector<double> ref = C;
  for (int b = 0; b < batch; ++b) {
    std::vector<double> Ab(A.begin() + b * sA, A.begin() + (b + 1) * sA), Cb(ref.begin() + b * sC,
                                                                                ref.begin() + (b + 1) * sC);
    ref_gemm(false, false, m, n, k, alpha, Ab, m, B, k, beta, Cb, m);
    std::copy(Cb.begin(), Cb.end(), ref.begin() + b * sC);
  }
  CHECK(max_rel(dC.get(), ref) <= 1e-14);
  // batchCount 0 is a no-op; a negative one is invalid.
  CHECK(cublasDgemmStridedBatched(h.h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA.p, m, sA, dB.p, k, 0, &beta, dC.p,
                                  m, sC, 0) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasDgemmStridedBatched(h.h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA.p, m, sA, dB.p, k, 0, &beta, dC.p,
                                  m, sC, -1) == CUBLAS_STATUS_INVALID_VALUE);
  // A batch stride that walks past the allocation is caught.
  CHECK(cublasDgemmStridedBatched(h.h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA.p, m, sA, dB.p, k, 0, &beta, dC.p,
                                  m, sC, batch + 1) == CUBLAS_STATUS_EXECUTION_FAILED);
}

TEST_CASE_TEMPLATE("cuda host shim: GemmEx over 16-bit storage, fp32 compute, rounded once", T, deltaw::bf16,
                   deltaw::fp16) {
  handle h;
  const cudaDataType t = std::is_same_v<T, deltaw::bf16> ? CUDA_R_16BF : CUDA_R_16F;
  const int m = 9, n = 7, k = 13;
  auto A = uniform(std::size_t(k * m), 1), B = uniform(std::size_t(k * n), 2), C = uniform(std::size_t(m * n), 3);
  for (auto* v : {&A, &B, &C})
    for (auto& x : *v) x = deltaw::convert<double>(deltaw::convert<T>(x));
  dev<T> dA(as<T>(A)), dB(as<T>(B)), dC(as<T>(C));
  dev<float> dF(std::size_t(m * n));
  const float alpha = 1.5f, beta = 1.0f, zero = 0.0f;
  // op(A) = Aᵀ (A stored k × m), B stored k × n.
  std::vector<double> ref = C, ref32(std::size_t(m * n));
  ref_gemm(true, false, m, n, k, alpha, A, k, B, k, beta, ref, m);
  ref_gemm(true, false, m, n, k, alpha, A, k, B, k, 0.0, ref32, m);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, dA.p, t, k, dB.p, t, k, &zero, dF.p,
                       CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  CHECK(max_rel(dF.get(), ref32) <= 1e-6);
  REQUIRE(cublasGemmEx(h.h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, dA.p, t, k, dB.p, t, k, &beta, dC.p, t, m,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
  // Each element is the fp32 result rounded to T once: equal to rounding the exact value,
  // except where fp32 accumulation sits on a rounding boundary (allow one spacing).
  const auto got = dC.get();
  int bad = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double exact = ref[i], r = deltaw::convert<double>(deltaw::convert<T>(exact));
    const double spacing = std::ldexp(1.0, int(std::floor(std::log2(std::max(std::abs(exact), 1e-3)))) -
                                               (std::is_same_v<T, deltaw::bf16> ? 7 : 10));
    if (std::abs(deltaw::convert<double>(got[i]) - r) > spacing) ++bad;
  }
  CHECK(bad == 0);
  // Mixed operand types are not a GemmEx combination.
  CHECK(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA.p, t, m, dF.p, CUDA_R_32F, k, &beta, dF.p,
                     CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
  CHECK(cublasGemmEx(h.h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, dA.p, t, m, dB.p, t, k, &beta, dC.p, t, m,
                     CUBLAS_COMPUTE_64F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
}

TEST_CASE("cuda host shim: cuBLAS argument checks return cuBLAS's status codes") {
  handle h;
  dev<float> A(64), B(64), C(64);
  const float one = 1.0f;
  auto sg = [&](cublasHandle_t hh, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda, int ldb,
                int ldc, const float* a = nullptr, const float* b = nullptr, float* c = nullptr) {
    return cublasSgemm(hh, ta, tb, m, n, k, &one, a ? a : A.p, lda, b ? b : B.p, ldb, &one, c ? c : C.p, ldc);
  };
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, 4, 4, 4) == CUBLAS_STATUS_SUCCESS);
  CHECK(sg(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, 4, 4, 4) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, -1, 4, 4, 4, 4, 4) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, -1, 4, 4, 4, 4) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, -1, 4, 4, 4) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(sg(h.h, cublasOperation_t(7), CUBLAS_OP_N, 4, 4, 4, 4, 4, 4) == CUBLAS_STATUS_INVALID_VALUE);
  // lda < max(1, rows of A as stored): m for N, k for T.
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 5, 4, 3, 4, 3, 5) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(sg(h.h, CUBLAS_OP_T, CUBLAS_OP_N, 5, 4, 3, 3, 3, 5) == CUBLAS_STATUS_SUCCESS);
  CHECK(sg(h.h, CUBLAS_OP_T, CUBLAS_OP_N, 5, 4, 3, 2, 3, 5) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 0, 4, 3, 0, 3, 1) == CUBLAS_STATUS_INVALID_VALUE);  // lda = 0 < 1
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 0, 4, 3, 1, 3, 1) == CUBLAS_STATUS_SUCCESS);
  // ldb < max(1, k) for N, max(1, n) for T; ldc < max(1, m).
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, 4, 3, 4) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_T, 4, 5, 2, 4, 4, 4) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, 4, 4, 3) == CUBLAS_STATUS_INVALID_VALUE);
  // Operands outside device memory: the call fails rather than reading host memory.
  std::vector<float> host(64);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, 4, 4, 4, host.data()) == CUBLAS_STATUS_EXECUTION_FAILED);
  CHECK(sg(h.h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 8, 8, 8, 9) == CUBLAS_STATUS_EXECUTION_FAILED);  // C past its end
  // Handles and math modes.
  cublasHandle_t dead = nullptr;
  REQUIRE(cublasCreate(&dead) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasDestroy(dead) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasDestroy(dead) == CUBLAS_STATUS_NOT_INITIALIZED);
  CHECK(cublasSetMathMode(h.h, cublasMath_t(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)) ==
        CUBLAS_STATUS_SUCCESS);
  cublasMath_t mode{};
  CHECK(cublasGetMathMode(h.h, &mode) == CUBLAS_STATUS_SUCCESS);
  CHECK(int(mode) == int(CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
  CHECK(cublasSetMathMode(h.h, cublasMath_t(5)) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(std::strcmp(cublasGetStatusName(CUBLAS_STATUS_INVALID_VALUE), "CUBLAS_STATUS_INVALID_VALUE") == 0);
  cusolverDnHandle_t s = nullptr;
  REQUIRE(cusolverDnCreate(&s) == CUSOLVER_STATUS_SUCCESS);
  cudaStream_t st = nullptr;
  REQUIRE(cudaStreamCreate(&st) == cudaSuccess);
  CHECK(cusolverDnSetStream(s, st) == CUSOLVER_STATUS_SUCCESS);
  cudaStream_t got = nullptr;
  CHECK(cusolverDnGetStream(s, &got) == CUSOLVER_STATUS_SUCCESS);
  CHECK(got == st);
  CHECK(cusolverDnDestroy(s) == CUSOLVER_STATUS_SUCCESS);
  CHECK(cusolverDnDestroy(s) == CUSOLVER_STATUS_NOT_INITIALIZED);
  CHECK(cudaStreamDestroy(st) == cudaSuccess);
}

TEST_CASE("cuda host shim: runtime memory, copies, streams, events and the last error") {
  int n = 0, d = -1;
  CHECK(cudaGetDeviceCount(&n) == cudaSuccess);
  CHECK(n == 1);
  CHECK(cudaGetDevice(&d) == cudaSuccess);
  CHECK(d == 0);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(cudaSetDevice(1) == cudaErrorInvalidDevice);
  CHECK(cudaPeekAtLastError() == cudaErrorInvalidDevice);
  CHECK(cudaGetLastError() == cudaErrorInvalidDevice);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(std::strcmp(cudaGetErrorName(cudaErrorInvalidDevice), "cudaErrorInvalidDevice") == 0);

  const std::size_t before = deltaw_cuda_host::device_bytes_in_use();
  float* p = nullptr;
  REQUIRE(cudaMalloc(&p, 40 * sizeof(float)) == cudaSuccess);
  CHECK(reinterpret_cast<std::uintptr_t>(p) % 256 == 0);
  CHECK(deltaw_cuda_host::device_bytes_in_use() == before + 40 * sizeof(float));
  CHECK(std::isnan(p[0]));  // fresh device memory reads as NaN
  CHECK(deltaw_cuda_host::is_device_range(p + 10, 30 * sizeof(float)));
  CHECK_FALSE(deltaw_cuda_host::is_device_range(p + 10, 31 * sizeof(float)));
  std::vector<float> h(40, 1.0f);
  CHECK(cudaMemcpy(p, h.data(), 40 * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
  CHECK(cudaMemcpy(h.data(), p, 41 * sizeof(float), cudaMemcpyDeviceToHost) == cudaErrorInvalidValue);
  CHECK(cudaMemcpy(h.data(), h.data() + 1, 4, cudaMemcpyHostToDevice) == cudaErrorInvalidValue);
  CHECK(cudaMemcpy(p, h.data(), 4, cudaMemcpyKind(9)) == cudaErrorInvalidMemcpyDirection);
  // 2D memset of a 5 × 3 column-major window with leading dimension 8 (floats).
  CHECK(cudaMemset2DAsync(p, 8 * sizeof(float), 0, 5 * sizeof(float), 3, nullptr) == cudaSuccess);
  CHECK(cudaMemset2DAsync(p, 4 * sizeof(float), 0, 5 * sizeof(float), 3, nullptr) == cudaErrorInvalidValue);
  CHECK(cudaMemset2DAsync(p, 8 * sizeof(float), 0, 5 * sizeof(float), 6, nullptr) == cudaErrorInvalidValue);
  REQUIRE(cudaMemcpy(h.data(), p, 40 * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  int zeros = 0;
  for (int i = 0; i < 40; ++i) zeros += h[std::size_t(i)] == 0.0f;
  CHECK(zeros == 15);
  CHECK(h[5] == 1.0f);
  CHECK(h[8] == 0.0f);
  CHECK(cudaFree(p + 1) == cudaErrorInvalidValue);
  CHECK(cudaFree(p) == cudaSuccess);
  CHECK(cudaFree(p) == cudaErrorInvalidValue);
  CHECK(cudaFree(nullptr) == cudaSuccess);
  CHECK(deltaw_cuda_host::device_bytes_in_use() == before);
  cudaGetLastError();

  cudaStream_t s = nullptr;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
  CHECK(cudaStreamSynchronize(s) == cudaSuccess);
  cudaEvent_t e0 = nullptr, e1 = nullptr, nt = nullptr;
  REQUIRE(cudaEventCreate(&e0) == cudaSuccess);
  REQUIRE(cudaEventCreate(&e1) == cudaSuccess);
  REQUIRE(cudaEventCreateWithFlags(&nt, cudaEventDisableTiming) == cudaSuccess);
  float ms = -1;
  CHECK(cudaEventElapsedTime(&ms, e0, e1) == cudaErrorInvalidResourceHandle);  // not recorded yet
  CHECK(cudaEventRecord(e0, s) == cudaSuccess);
  CHECK(cudaEventRecord(e1, s) == cudaSuccess);
  CHECK(cudaEventSynchronize(e1) == cudaSuccess);
  CHECK(cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess);
  CHECK(ms >= 0.0f);
  CHECK(cudaEventRecord(nt, s) == cudaSuccess);
  CHECK(cudaEventElapsedTime(&ms, e0, nt) == cudaErrorInvalidResourceHandle);
  for (cudaEvent_t e : {e0, e1, nt}) CHECK(cudaEventDestroy(e) == cudaSuccess);
  CHECK(cudaStreamDestroy(s) == cudaSuccess);
  CHECK(cudaStreamDestroy(s) == cudaErrorInvalidResourceHandle);
  CHECK(cudaStreamSynchronize(s) == cudaErrorInvalidResourceHandle);
  CHECK(cudaGetLastError() == cudaErrorInvalidResourceHandle);
}

namespace shim_solver_test {

/// A column-major m × n matrix with leading dimension ld (padding NaN) from uniform values.
template <class T>
std::vector<T> padded(int m, int n, int ld, std::uint64_t seed) {
  const std::vector<double> v = uniform(std::size_t(m) * std::size_t(n), seed);
  std::vector<T> a(std::size_t(ld) * std::size_t(n), T(std::numeric_limits<double>::quiet_NaN()));
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) a[std::size_t(j) * ld + i] = T(v[std::size_t(j) * m + i]);
  return a;
}

/// The m × n block of a column-major vector with leading dimension ld, in double.
template <class T>
Eigen::MatrixXd block_of(const std::vector<T>& a, int m, int n, int ld) {
  Eigen::MatrixXd out(m, n);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) out(i, j) = double(a[std::size_t(j) * ld + i]);
  return out;
}

struct solver {
  cusolverDnHandle_t h = nullptr;
  solver() { REQUIRE(cusolverDnCreate(&h) == CUSOLVER_STATUS_SUCCESS); }
  ~solver() { cusolverDnDestroy(h); }
};

template <class T>
cusolverStatus_t geqrf_bs(cusolverDnHandle_t h, int m, int n, T* A, int lda, int* lw) {
  if constexpr (std::is_same_v<T, float>) return cusolverDnSgeqrf_bufferSize(h, m, n, A, lda, lw);
  else return cusolverDnDgeqrf_bufferSize(h, m, n, A, lda, lw);
}
template <class T>
cusolverStatus_t geqrf(cusolverDnHandle_t h, int m, int n, T* A, int lda, T* tau, T* w, int lw, int* info) {
  if constexpr (std::is_same_v<T, float>) return cusolverDnSgeqrf(h, m, n, A, lda, tau, w, lw, info);
  else return cusolverDnDgeqrf(h, m, n, A, lda, tau, w, lw, info);
}
template <class T>
cusolverStatus_t orgqr_bs(cusolverDnHandle_t h, int m, int n, int k, const T* A, int lda, const T* tau, int* lw) {
  if constexpr (std::is_same_v<T, float>) return cusolverDnSorgqr_bufferSize(h, m, n, k, A, lda, tau, lw);
  else return cusolverDnDorgqr_bufferSize(h, m, n, k, A, lda, tau, lw);
}
template <class T>
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int n, int k, T* A, int lda, const T* tau, T* w, int lw, int* info) {
  if constexpr (std::is_same_v<T, float>) return cusolverDnSorgqr(h, m, n, k, A, lda, tau, w, lw, info);
  else return cusolverDnDorgqr(h, m, n, k, A, lda, tau, w, lw, info);
}
template <class T>
cusolverStatus_t gesvd_bs(cusolverDnHandle_t h, int m, int n, int* lw) {
  if constexpr (std::is_same_v<T, float>) return cusolverDnSgesvd_bufferSize(h, m, n, lw);
  else return cusolverDnDgesvd_bufferSize(h, m, n, lw);
}
template <class T>
cusolverStatus_t gesvd(cusolverDnHandle_t h, signed char ju, signed char jv, int m, int n, T* A, int lda, T* S, T* U,
                       int ldu, T* VT, int ldvt, T* w, int lw, int* info) {
  if constexpr (std::is_same_v<T, float>)
    return cusolverDnSgesvd(h, ju, jv, m, n, A, lda, S, U, ldu, VT, ldvt, w, lw, nullptr, info);
  else
    return cusolverDnDgesvd(h, ju, jv, m, n, A, lda, S, U, ldu, VT, ldvt, w, lw, nullptr, info);
}

}  // namespace shim_solver_test

TEST_CASE_TEMPLATE("cuda host shim: cuSOLVER geqrf, orgqr and gesvd match Eigen on padded column-major operands", T,
                   float, double) {
  namespace st = shim_solver_test;
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
  st::solver s;
  const int m = 9, n = 5, lda = 11;
  const std::vector<T> a0 = st::padded<T>(m, n, lda, 91);
  const Eigen::MatrixXd A = st::block_of(a0, m, n, lda);
  dev<T> A_d(a0), tau{std::size_t(n)};
  dev<int> info_d{1};

  // QR: R and Q as Eigen's Householder QR (the same sign convention), Q·R = A.
  int lw = -1;
  REQUIRE(st::geqrf_bs<T>(s.h, m, n, A_d.p, lda, &lw) == CUSOLVER_STATUS_SUCCESS);
  REQUIRE(lw >= 1);
  dev<T> work{std::size_t(lw)};
  REQUIRE(st::geqrf<T>(s.h, m, n, A_d.p, lda, tau.p, work.p, lw, info_d.p) == CUSOLVER_STATUS_SUCCESS);
  CHECK(info_d.get()[0] == 0);
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(A);
  const Eigen::MatrixXd R = st::block_of(A_d.get(), n, n, lda).template triangularView<Eigen::Upper>();
  const Eigen::MatrixXd Rref = qr.matrixQR().topRows(n).triangularView<Eigen::Upper>();
  CHECK((R - Rref).cwiseAbs().maxCoeff() <= tol * 10);
  int lq = -1;
  REQUIRE(st::orgqr_bs<T>(s.h, m, n, n, A_d.p, lda, tau.p, &lq) == CUSOLVER_STATUS_SUCCESS);
  dev<T> qwork{std::size_t(lq)};
  REQUIRE(st::orgqr<T>(s.h, m, n, n, A_d.p, lda, tau.p, qwork.p, lq, info_d.p) == CUSOLVER_STATUS_SUCCESS);
  const std::vector<T> q = A_d.get();
  const Eigen::MatrixXd Q = st::block_of(q, m, n, lda);
  const Eigen::MatrixXd Qref = qr.householderQ() * Eigen::MatrixXd::Identity(m, n);
  CHECK((Q - Qref).cwiseAbs().maxCoeff() <= tol * 10);
  CHECK((Q * R - A).cwiseAbs().maxCoeff() <= tol * 10);
  for (int j = 0; j < n; ++j)  // the padding rows are untouched
    for (int i = m; i < lda; ++i) CHECK(std::isnan(double(q[std::size_t(j) * lda + i])));

  // SVD with padded U and VT: singular values as Eigen's, U·S·VT = A, orthonormal vectors.
  dev<T> B_d(a0), S{std::size_t(n)}, U{std::size_t(10 * n)}, VT{std::size_t(6 * n)};
  int lsv = -1;
  REQUIRE(st::gesvd_bs<T>(s.h, m, n, &lsv) == CUSOLVER_STATUS_SUCCESS);
  dev<T> svwork{std::size_t(lsv)};
  REQUIRE(st::gesvd<T>(s.h, 'S', 'S', m, n, B_d.p, lda, S.p, U.p, 10, VT.p, 6, svwork.p, lsv, info_d.p) ==
          CUSOLVER_STATUS_SUCCESS);
  CHECK(info_d.get()[0] == 0);
  const Eigen::JacobiSVD<Eigen::MatrixXd> ref(A);
  const std::vector<T> sv = S.get();
  for (int i = 0; i < n; ++i) CHECK(std::abs(double(sv[std::size_t(i)]) - ref.singularValues()(i)) <= tol * 10);
  const Eigen::MatrixXd Um = st::block_of(U.get(), m, n, 10), Vt = st::block_of(VT.get(), n, n, 6);
  Eigen::VectorXd sd(n);
  for (int i = 0; i < n; ++i) sd(i) = double(sv[std::size_t(i)]);
  CHECK((Um * sd.asDiagonal() * Vt - A).cwiseAbs().maxCoeff() <= tol * 10);
  CHECK((Um.transpose() * Um - Eigen::MatrixXd::Identity(n, n)).cwiseAbs().maxCoeff() <= tol * 10);
  CHECK((Vt * Vt.transpose() - Eigen::MatrixXd::Identity(n, n)).cwiseAbs().maxCoeff() <= tol * 10);
  dev<T> C_d(a0), S2{std::size_t(n)};  // values only: U and VT unreferenced (null)
  REQUIRE(st::gesvd<T>(s.h, 'N', 'N', m, n, C_d.p, lda, S2.p, nullptr, 1, nullptr, 1, svwork.p, lsv, info_d.p) ==
          CUSOLVER_STATUS_SUCCESS);
  CHECK(max_rel(S2.get(), std::vector<double>(sv.begin(), sv.end())) <= tol);

  // cuSOLVER's argument checks and statuses.
  CHECK(st::gesvd_bs<T>(s.h, n, m, &lsv) == CUSOLVER_STATUS_INVALID_VALUE);  // gesvd needs m >= n
  CHECK(st::gesvd<T>(s.h, 'S', 'S', n, m, C_d.p, lda, S2.p, U.p, 10, VT.p, 6, svwork.p, lsv, info_d.p) ==
        CUSOLVER_STATUS_INVALID_VALUE);
  CHECK(st::gesvd<T>(s.h, 'X', 'S', m, n, C_d.p, lda, S2.p, U.p, 10, VT.p, 6, svwork.p, lsv, info_d.p) ==
        CUSOLVER_STATUS_INVALID_VALUE);
  CHECK(st::gesvd<T>(s.h, 'S', 'S', m, n, C_d.p, lda, S2.p, U.p, m - 1, VT.p, 6, svwork.p, lsv, info_d.p) ==
        CUSOLVER_STATUS_INVALID_VALUE);  // ldu < m
  CHECK(st::gesvd<T>(s.h, 'S', 'S', m, n, C_d.p, lda, S2.p, U.p, 10, VT.p, 6, svwork.p, 0, info_d.p) ==
        CUSOLVER_STATUS_INVALID_VALUE);  // workspace below the query's answer (stricter than cuSOLVER)
  CHECK(st::geqrf<T>(s.h, m, n, C_d.p, m - 1, tau.p, work.p, lw, info_d.p) == CUSOLVER_STATUS_INVALID_VALUE);
  CHECK(st::geqrf_bs<T>(s.h, m, n, C_d.p, lda, nullptr) == CUSOLVER_STATUS_INVALID_VALUE);
  CHECK(st::orgqr_bs<T>(s.h, n, m, n, C_d.p, lda, tau.p, &lq) == CUSOLVER_STATUS_INVALID_VALUE);  // n > m
  CHECK(st::orgqr_bs<T>(s.h, m, n, n + 1, C_d.p, lda, tau.p, &lq) == CUSOLVER_STATUS_INVALID_VALUE);  // k > n
  std::vector<T> host(a0);  // a host pointer: a GPU would fault
  CHECK(st::geqrf<T>(s.h, m, n, host.data(), lda, tau.p, work.p, lw, info_d.p) == CUSOLVER_STATUS_EXECUTION_FAILED);
  int host_info = 0;
  CHECK(st::geqrf<T>(s.h, m, n, C_d.p, lda, tau.p, work.p, lw, &host_info) == CUSOLVER_STATUS_EXECUTION_FAILED);
  cusolverDnHandle_t gone = nullptr;
  REQUIRE(cusolverDnCreate(&gone) == CUSOLVER_STATUS_SUCCESS);
  REQUIRE(cusolverDnDestroy(gone) == CUSOLVER_STATUS_SUCCESS);
  CHECK(st::geqrf_bs<T>(gone, m, n, C_d.p, lda, &lw) == CUSOLVER_STATUS_NOT_INITIALIZED);
  CHECK(st::gesvd<T>(gone, 'S', 'S', m, n, C_d.p, lda, S2.p, U.p, 10, VT.p, 6, svwork.p, lsv, info_d.p) ==
        CUSOLVER_STATUS_NOT_INITIALIZED);
}
