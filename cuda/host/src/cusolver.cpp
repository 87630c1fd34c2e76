// SPDX-License-Identifier: MIT
// Host implementation of the cuSOLVER entry points declared in cuda/host/include/cusolverDn.h.
#include <cusolverDn.h>

#include <new>

#include "shim.hpp"

using deltaw_cuda_host::detail::reg;

struct cusolverDnContext {
  cudaStream_t stream = nullptr;
};

namespace {
bool live(cusolverDnHandle_t h) {
  std::lock_guard<std::mutex> lock(reg().mutex);
  return h != nullptr && reg().solver_handles.count(h) != 0;
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

}  // extern "C"
