// SPDX-License-Identifier: MIT
// Error checking for the CUDA backend: every failing CUDA runtime, cuBLAS or cuSOLVER
// call becomes a deltaw::cuda::cuda_error naming the call and the library's status.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <string>

#include <deltaw/core/error.hpp>

DELTAW_NAMESPACE_BEGIN
namespace cuda {

/// A CUDA runtime, cuBLAS or cuSOLVER call failed. what() names the call, the status
/// (name and description) and where it was made; code() is the library's status value.
class cuda_error : public error {
 public:
  cuda_error(const std::string& what, int code) : error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

namespace detail {

inline const char* cusolver_status_name(cusolverStatus_t s) {
  // cuSOLVER has no status-to-string function.
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "CUSOLVER_STATUS_<unknown>";
  }
}

inline std::string where(const char* file, int line) { return std::string(" (") + file + ":" + std::to_string(line) + ")"; }

inline void check(cudaError_t s, const char* call, const char* file, int line) {
  if (s == cudaSuccess) return;
  cudaGetLastError();  // reset the runtime's last error so a later launch check does not report it again
  throw cuda_error(std::string("deltaw::cuda: ") + call + " failed: " + cudaGetErrorName(s) + ": " +
                       cudaGetErrorString(s) + where(file, line),
                   int(s));
}
inline void check(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw cuda_error(std::string("deltaw::cuda: ") + call + " failed: " + cublasGetStatusName(s) + ": " +
                       cublasGetStatusString(s) + where(file, line),
                   int(s));
}
inline void check(cusolverStatus_t s, const char* call, const char* file, int line) {
  if (s == CUSOLVER_STATUS_SUCCESS) return;
  throw cuda_error(std::string("deltaw::cuda: ") + call + " failed: " + cusolver_status_name(s) + where(file, line),
                   int(s));
}

}  // namespace detail
}  // namespace cuda
DELTAW_NAMESPACE_END

/// Checks a cudaError_t, cublasStatus_t or cusolverStatus_t and throws
/// deltaw::cuda::cuda_error naming the call on failure.
#define DELTAW_CUDA_CHECK(call) ::deltaw::cuda::detail::check((call), #call, __FILE__, __LINE__)

/// Checks the launch of the kernel just issued (configuration errors surface here;
/// faults during execution surface at the next synchronising call).
#define DELTAW_CUDA_CHECK_LAUNCH(name) \
  ::deltaw::cuda::detail::check(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
