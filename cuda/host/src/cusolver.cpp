// SPDX-License-Identifier: MIT
// Host implementation of the cuSOLVER entry points declared in cuda/host/include/cusolverDn.h,
// over the LAPACK of the linked BLAS (OpenBLAS ships it; Fortran symbols, declared here so
// that no LAPACKE header is needed). Column-major, cuSOLVER's argument checks first (status
// codes), then every operand must lie in one live cudaMalloc allocation (stderr names the
// one that does not, EXECUTION_FAILED), then LAPACK runs and its info goes to *devInfo.
// Stricter than cuSOLVER: a workspace smaller than the _bufferSize answer is INVALID_VALUE.
#include <cusolverDn.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <new>
#include <type_traits>

#include "shim.hpp"

using deltaw_cuda_host::detail::device_range_locked;
using deltaw_cuda_host::detail::reg;

extern "C" {
// LAPACK (Fortran ABI; the hidden character lengths trail the arguments).
void sgeqrf_(const int* m, const int* n, float* a, const int* lda, float* tau, float* work, const int* lwork, int* info);
void dgeqrf_(const int* m, const int* n, double* a, const int* lda, double* tau, double* work, const int* lwork,
             int* info);
void sorgqr_(const int* m, const int* n, const int* k, float* a, const int* lda, const float* tau, float* work,
             const int* lwork, int* info);
void dorgqr_(const int* m, const int* n, const int* k, double* a, const int* lda, const double* tau, double* work,
             const int* lwork, int* info);
void sgesvd_(const char* jobu, const char* jobvt, const int* m, const int* n, float* a, const int* lda, float* s,
             float* u, const int* ldu, float* vt, const int* ldvt, float* work, const int* lwork, int* info,
             std::size_t, std::size_t);
void dgesvd_(const char* jobu, const char* jobvt, const int* m, const int* n, double* a, const int* lda, double* s,
             double* u, const int* ldu, double* vt, const int* ldvt, double* work, const int* lwork, int* info,
             std::size_t, std::size_t);
}

struct cusolverDnContext {
  cudaStream_t stream = nullptr;
};

namespace {
bool live(cusolverDnHandle_t h) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  return h != nullptr && reg().solver_handles.count(h) != 0;
}

/// A column-major operand rows × cols with leading dimension ld (or a vector: cols = 1).
struct operand {
  const void* ptr;
  long long rows, cols, ld;
  std::size_t elem;
  const char* name;
};

/// Every operand inside a live allocation; says which one is not on stderr.
bool on_device(const char* fn, std::initializer_list<operand> ops) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  for (const operand& o : ops) {
    const std::size_t bytes = o.rows == 0 || o.cols == 0 ? 0 : std::size_t((o.cols - 1) * o.ld + o.rows) * o.elem;
    if (!device_range_locked(o.ptr, bytes)) {
      std::fprintf(stderr,
                   "deltaw cuda host shim: %s: %s (%lld x %lld, ld %lld, %zu bytes at %p) is not inside a live "
                   "cudaMalloc allocation; a GPU would fault\n",
                   fn, o.name, o.rows, o.cols, o.ld, bytes, o.ptr);
      return false;
    }
  }
  return true;
}

template <class T>
int geqrf_lwork(int m, int n) {
  const int lda = std::max(1, m), query = -1;
  int info = 0;
  T w{};
  if constexpr (std::is_same_v<T, float>) sgeqrf_(&m, &n, nullptr, &lda, nullptr, &w, &query, &info);
  else dgeqrf_(&m, &n, nullptr, &lda, nullptr, &w, &query, &info);
  return std::max(1, int(w));
}

template <class T>
int orgqr_lwork(int m, int n, int k) {
  const int lda = std::max(1, m), query = -1;
  int info = 0;
  T w{};
  if constexpr (std::is_same_v<T, float>) sorgqr_(&m, &n, &k, nullptr, &lda, nullptr, &w, &query, &info);
  else dorgqr_(&m, &n, &k, nullptr, &lda, nullptr, &w, &query, &info);
  return std::max(1, int(w));
}

template <class T>
int gesvd_lwork(char ju, char jv, int m, int n) {
  const int lda = std::max(1, m), ldu = std::max(1, m), ldvt = std::max(1, n), query = -1;
  int info = 0;
  T w{}, s{}, u{}, vt{};
  if constexpr (std::is_same_v<T, float>)
    sgesvd_(&ju, &jv, &m, &n, nullptr, &lda, &s, &u, &ldu, &vt, &ldvt, &w, &query, &info, 1, 1);
  else
    dgesvd_(&ju, &jv, &m, &n, nullptr, &lda, &s, &u, &ldu, &vt, &ldvt, &w, &query, &info, 1, 1);
  return std::max(1, int(w));
}

template <class T>
cusolverStatus_t geqrf_buffer(cusolverDnHandle_t h, int m, int n, int lda, int* lwork) {
  if (!live(h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (m < 0 || n < 0 || lda < std::max(1, m) || lwork == nullptr) return CUSOLVER_STATUS_INVALID_VALUE;
  *lwork = geqrf_lwork<T>(m, n);
  return CUSOLVER_STATUS_SUCCESS;
}

template <class T>
cusolverStatus_t geqrf(const char* fn, cusolverDnHandle_t h, int m, int n, T* A, int lda, T* tau, T* work, int lwork,
                       int* info) {
  if (!live(h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (m < 0 || n < 0 || lda < std::max(1, m)) return CUSOLVER_STATUS_INVALID_VALUE;
  if (lwork < geqrf_lwork<T>(m, n)) return CUSOLVER_STATUS_INVALID_VALUE;
  const long long t = std::min(m, n);
  if (!on_device(fn, {{A, m, n, lda, sizeof(T), "A"},
                      {tau, t, 1, std::max(1LL, t), sizeof(T), "TAU"},
                      {work, lwork, 1, lwork, sizeof(T), "Workspace"},
                      {info, 1, 1, 1, sizeof(int), "devInfo"}}))
    return CUSOLVER_STATUS_EXECUTION_FAILED;
  if constexpr (std::is_same_v<T, float>) sgeqrf_(&m, &n, A, &lda, tau, work, &lwork, info);
  else dgeqrf_(&m, &n, A, &lda, tau, work, &lwork, info);
  return CUSOLVER_STATUS_SUCCESS;
}

bool orgqr_args(int m, int n, int k, int lda) { return m >= 0 && n >= 0 && n <= m && k >= 0 && k <= n && lda >= std::max(1, m); }

template <class T>
cusolverStatus_t orgqr_buffer(cusolverDnHandle_t h, int m, int n, int k, int lda, int* lwork) {
  if (!live(h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!orgqr_args(m, n, k, lda) || lwork == nullptr) return CUSOLVER_STATUS_INVALID_VALUE;
  *lwork = orgqr_lwork<T>(m, n, k);
  return CUSOLVER_STATUS_SUCCESS;
}

template <class T>
cusolverStatus_t orgqr(const char* fn, cusolverDnHandle_t h, int m, int n, int k, T* A, int lda, const T* tau,
                       T* work, int lwork, int* info) {
  if (!live(h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!orgqr_args(m, n, k, lda)) return CUSOLVER_STATUS_INVALID_VALUE;
  if (lwork < orgqr_lwork<T>(m, n, k)) return CUSOLVER_STATUS_INVALID_VALUE;
  if (!on_device(fn, {{A, m, n, lda, sizeof(T), "A"},
                      {tau, k, 1, std::max(1, k), sizeof(T), "tau"},
                      {work, lwork, 1, lwork, sizeof(T), "work"},
                      {info, 1, 1, 1, sizeof(int), "devInfo"}}))
    return CUSOLVER_STATUS_EXECUTION_FAILED;
  if constexpr (std::is_same_v<T, float>) sorgqr_(&m, &n, &k, A, &lda, tau, work, &lwork, info);
  else dorgqr_(&m, &n, &k, A, &lda, tau, work, &lwork, info);
  return CUSOLVER_STATUS_SUCCESS;
}

template <class T>
cusolverStatus_t gesvd_buffer(cusolverDnHandle_t h, int m, int n, int* lwork) {
  if (!live(h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (m < 0 || n < 0 || m < n || lwork == nullptr) return CUSOLVER_STATUS_INVALID_VALUE;
  // The query knows neither job: the largest of the two full-vector jobs.
  *lwork = std::max(gesvd_lwork<T>('A', 'A', m, n), gesvd_lwork<T>('N', 'N', m, n));
  return CUSOLVER_STATUS_SUCCESS;
}

bool job_ok(signed char j) { return j == 'A' || j == 'S' || j == 'O' || j == 'N'; }

template <class T>
cusolverStatus_t gesvd(const char* fn, cusolverDnHandle_t h, signed char jobu, signed char jobvt, int m, int n, T* A,
                       int lda, T* S, T* U, int ldu, T* VT, int ldvt, T* work, int lwork, T* rwork, int* info) {
  if (!live(h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  // cuSOLVER's gesvd supports m >= n only, and not both vector sets overwriting A.
  if (m < 0 || n < 0 || m < n || !job_ok(jobu) || !job_ok(jobvt) || (jobu == 'O' && jobvt == 'O'))
    return CUSOLVER_STATUS_INVALID_VALUE;
  const bool want_u = jobu == 'A' || jobu == 'S', want_vt = jobvt == 'A' || jobvt == 'S';
  if (lda < std::max(1, m) || (want_u && ldu < std::max(1, m)) || (want_vt && ldvt < std::max(1, n)))
    return CUSOLVER_STATUS_INVALID_VALUE;
  const char ju = char(jobu), jv = char(jobvt);
  if (lwork < gesvd_lwork<T>(ju, jv, m, n)) return CUSOLVER_STATUS_INVALID_VALUE;
  const int t = std::min(m, n);
  const long long ucols = jobu == 'A' ? m : t, vtrows = jobvt == 'A' ? n : t;
  if (!on_device(fn, {{A, m, n, lda, sizeof(T), "A"},
                      {S, t, 1, std::max(1, t), sizeof(T), "S"},
                      {U, want_u ? m : 0, ucols, std::max(1, ldu), sizeof(T), "U"},
                      {VT, want_vt ? vtrows : 0, n, std::max(1, ldvt), sizeof(T), "VT"},
                      {work, lwork, 1, lwork, sizeof(T), "work"},
                      {rwork, rwork ? std::max(0, t - 1) : 0, 1, std::max(1, t), sizeof(T), "rwork"},
                      {info, 1, 1, 1, sizeof(int), "devInfo"}}))
    return CUSOLVER_STATUS_EXECUTION_FAILED;
  // LAPACK wants ldu, ldvt >= 1 even where it does not reference U or VT.
  const int lu = std::max(1, ldu), lv = std::max(1, ldvt);
  T dummy{};
  T* Up = want_u ? U : &dummy;
  T* Vp = want_vt ? VT : &dummy;
  if constexpr (std::is_same_v<T, float>)
    sgesvd_(&ju, &jv, &m, &n, A, &lda, S, Up, &lu, Vp, &lv, work, &lwork, info, 1, 1);
  else
    dgesvd_(&ju, &jv, &m, &n, A, &lda, S, Up, &lu, Vp, &lv, work, &lwork, info, 1, 1);
  // As cuSOLVER: the unconverged superdiagonal (LAPACK leaves it in work[1 .. t-1]) in rwork.
  if (*info > 0 && rwork != nullptr)
    for (int i = 0; i + 1 < t; ++i) rwork[i] = work[i + 1];
  return CUSOLVER_STATUS_SUCCESS;
}
}  // namespace

extern "C" {

cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* handle) {
  if (handle == nullptr) return CUSOLVER_STATUS_INVALID_VALUE;
  auto* h = new (std::nothrow) cusolverDnContext;
  if (h == nullptr) return CUSOLVER_STATUS_ALLOC_FAILED;
  std::lock_guard<std::mutex> lock(reg().mutex);
  reg().solver_handles.insert(h);
  *handle = h;
  return CUSOLVER_STATUS_SUCCESS;
}

cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t handle) {
  {
    std::lock_guard<std::mutex> lock(reg().mutex);
    if (handle == nullptr || reg().solver_handles.erase(handle) == 0) return CUSOLVER_STATUS_NOT_INITIALIZED;
  }
  delete handle;
  return CUSOLVER_STATUS_SUCCESS;
}

cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t handle, cudaStream_t streamId) {
  if (!live(handle)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  handle->stream = streamId;
  return CUSOLVER_STATUS_SUCCESS;
}

cusolverStatus_t cusolverDnGetStream(cusolverDnHandle_t handle, cudaStream_t* streamId) {
  if (!live(handle)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (streamId == nullptr) return CUSOLVER_STATUS_INVALID_VALUE;
  *streamId = handle->stream;
  return CUSOLVER_STATUS_SUCCESS;
}

// ---- QR -----------------------------------------------------------------------------

cusolverStatus_t cusolverDnSgeqrf_bufferSize(cusolverDnHandle_t handle, int m, int n, float*, int lda, int* Lwork) {
  return geqrf_buffer<float>(handle, m, n, lda, Lwork);
}
cusolverStatus_t cusolverDnDgeqrf_bufferSize(cusolverDnHandle_t handle, int m, int n, double*, int lda, int* Lwork) {
  return geqrf_buffer<double>(handle, m, n, lda, Lwork);
}
cusolverStatus_t cusolverDnSgeqrf(cusolverDnHandle_t handle, int m, int n, float* A, int lda, float* TAU,
                                  float* Workspace, int Lwork, int* devInfo) {
  return geqrf<float>("cusolverDnSgeqrf", handle, m, n, A, lda, TAU, Workspace, Lwork, devInfo);
}
cusolverStatus_t cusolverDnDgeqrf(cusolverDnHandle_t handle, int m, int n, double* A, int lda, double* TAU,
                                  double* Workspace, int Lwork, int* devInfo) {
  return geqrf<double>("cusolverDnDgeqrf", handle, m, n, A, lda, TAU, Workspace, Lwork, devInfo);
}
cusolverStatus_t cusolverDnSorgqr_bufferSize(cusolverDnHandle_t handle, int m, int n, int k, const float*, int lda,
                                             const float*, int* lwork) {
  return orgqr_buffer<float>(handle, m, n, k, lda, lwork);
}
cusolverStatus_t cusolverDnDorgqr_bufferSize(cusolverDnHandle_t handle, int m, int n, int k, const double*, int lda,
                                             const double*, int* lwork) {
  return orgqr_buffer<double>(handle, m, n, k, lda, lwork);
}
cusolverStatus_t cusolverDnSorgqr(cusolverDnHandle_t handle, int m, int n, int k, float* A, int lda, const float* tau,
                                  float* work, int lwork, int* devInfo) {
  return orgqr<float>("cusolverDnSorgqr", handle, m, n, k, A, lda, tau, work, lwork, devInfo);
}
cusolverStatus_t cusolverDnDorgqr(cusolverDnHandle_t handle, int m, int n, int k, double* A, int lda,
                                  const double* tau, double* work, int lwork, int* devInfo) {
  return orgqr<double>("cusolverDnDorgqr", handle, m, n, k, A, lda, tau, work, lwork, devInfo);
}

// ---- SVD ----------------------------------------------------------------------------

cusolverStatus_t cusolverDnSgesvd_bufferSize(cusolverDnHandle_t handle, int m, int n, int* lwork) {
  return gesvd_buffer<float>(handle, m, n, lwork);
}
cusolverStatus_t cusolverDnDgesvd_bufferSize(cusolverDnHandle_t handle, int m, int n, int* lwork) {
  return gesvd_buffer<double>(handle, m, n, lwork);
}
cusolverStatus_t cusolverDnSgesvd(cusolverDnHandle_t handle, signed char jobu, signed char jobvt, int m, int n,
                                  float* A, int lda, float* S, float* U, int ldu, float* VT, int ldvt, float* work,
                                  int lwork, float* rwork, int* devInfo) {
  return gesvd<float>("cusolverDnSgesvd", handle, jobu, jobvt, m, n, A, lda, S, U, ldu, VT, ldvt, work, lwork, rwork,
                      devInfo);
}
cusolverStatus_t cusolverDnDgesvd(cusolverDnHandle_t handle, signed char jobu, signed char jobvt, int m, int n,
                                  double* A, int lda, double* S, double* U, int ldu, double* VT, int ldvt,
                                  double* work, int lwork, double* rwork, int* devInfo) {
  return gesvd<double>("cusolverDnDgesvd", handle, jobu, jobvt, m, n, A, lda, S, U, ldu, VT, ldvt, work, lwork, rwork,
                       devInfo);
}

}  // extern "C"
